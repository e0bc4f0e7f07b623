//! The sandbox: a local HTTP server that behaves like the KohortPay API as
//! `kohortpay-api.md` describes it, plus the faults a real server produces only on
//! bad days, each with a rate knob and a seed.
//!
//! Routes: `POST /groups` (and `/payment-groups`), `GET /groups/{id}`,
//! `GET /orders/{id}`, `GET /health`, and `GET /_sandbox/stats`.
//!
//! Deterministic rules for tests (see README): customer ids starting `cus_unknown`
//! → 404; `cus_reject` → 400 with a message array; order ids starting `ord_unknown`
//! → 404; `ord_checkout` → the order already has a group.

pub mod state;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use jiff::Timestamp;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub use state::Stats;
use state::{Rejection, World};

/// The sandbox's knobs. Probabilities are per request, in `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxConfig {
    /// Each request waits a uniform random time in this range before it is handled.
    pub latency: (Duration, Duration),
    pub error_500: f64,
    /// 502 with an HTML body, like the hosting router's.
    pub error_502_html: f64,
    /// 503 with `Retry-After`.
    pub error_503: f64,
    /// 429 with `Retry-After`.
    pub error_429: f64,
    /// The `Retry-After` sent with 429 and 503, in seconds.
    pub retry_after_secs: u64,
    /// Requests per second above which the sandbox answers 429 (`None`: no limit).
    pub rate_limit: Option<f64>,
    /// The connection is dropped before the request is processed.
    pub reset: f64,
    /// A create is stored, then the connection is dropped: the response is lost.
    pub lost_response: f64,
    /// A create is stored, then answered 201 with a truncated, non-JSON body.
    pub truncated: f64,
    /// A create is stored, then answered 201 with a body of 50 MB (the group, then
    /// padding), as a broken proxy or server might.
    pub oversized: f64,
    /// The client gets a 503 after `late_after`; the group is created `late_after`
    /// later still (the router gave up, the app carried on).
    pub late_create: f64,
    pub late_after: Duration,
    pub seed: u64,
    /// Serve HTTPS with this certificate chain and key (PEM files).
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            latency: (Duration::ZERO, Duration::ZERO),
            error_500: 0.0,
            error_502_html: 0.0,
            error_503: 0.0,
            error_429: 0.0,
            retry_after_secs: 1,
            rate_limit: None,
            reset: 0.0,
            lost_response: 0.0,
            truncated: 0.0,
            oversized: 0.0,
            late_create: 0.0,
            late_after: Duration::from_secs(1),
            seed: 1,
            tls: None,
        }
    }
}

struct App {
    /// Faults can change while serving (an outage that ends), so behind a lock.
    cfg: std::sync::RwLock<SandboxConfig>,
    world: Mutex<World>,
    rng: Mutex<fastrand::Rng>,
    limiter: Option<DefaultDirectRateLimiter>,
    booted: Timestamp,
    clock: Instant,
    in_flight: AtomicU64,
    /// Order ids asked for in `GET /orders?search=` lists.
    list_ids_asked: AtomicU64,
    peak: AtomicU64,
    /// Request start times, ms since boot (for the one-second window maximum).
    starts: Mutex<Vec<u64>>,
}

impl App {
    fn count(&self, what: String) {
        let mut w = self.world.lock().unwrap_or_else(|e| e.into_inner());
        *w.requests.entry(what).or_default() += 1;
    }

    fn roll(&self) -> f64 {
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).f64()
    }

    fn stats(&self, detail: bool) -> Stats {
        let w = self.world.lock().unwrap_or_else(|e| e.into_inner());
        let dup: BTreeMap<String, u32> = w
            .groups_per_key
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        let mut starts = self
            .starts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        starts.sort_unstable();
        let (mut best, mut lo) = (0usize, 0usize);
        for hi in 0..starts.len() {
            while starts[hi] - starts[lo] >= 1000 {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        Stats {
            requests: w.requests.clone(),
            groups_total: w.groups.len() as u64,
            keys_with_groups: w.groups_per_key.len() as u64,
            duplicate_keys: dup.len() as u64,
            duplicates: dup.into_iter().take(100).collect(),
            peak_concurrency: self.peak.load(Ordering::Relaxed),
            list_ids_asked: self.list_ids_asked.load(Ordering::Relaxed),
            max_starts_in_one_second: best as u64,
            groups_per_key: detail.then(|| {
                w.groups_per_key
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect()
            }),
        }
    }
}

/// A running sandbox.
#[derive(Debug)]
pub struct Sandbox {
    https: bool,
    addr: SocketAddr,
    app: Arc<AppHandle>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Opaque handle so `Sandbox` can be `Debug`.
pub struct AppHandle(Arc<App>);

impl std::fmt::Debug for AppHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppHandle")
    }
}

impl Sandbox {
    /// Binds `listen` (port 0 picks a free one) and serves until shut down.
    pub async fn start(cfg: SandboxConfig, listen: SocketAddr) -> std::io::Result<Sandbox> {
        let tls = cfg.tls.clone();
        let https = tls.is_some();
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let limiter = cfg.rate_limit.and_then(|r| {
            let burst = NonZeroU32::new(r.ceil() as u32).unwrap_or(NonZeroU32::MIN);
            Duration::try_from_secs_f64(1.0 / r)
                .ok()
                .and_then(Quota::with_period)
                .map(|q| RateLimiter::direct(q.allow_burst(burst)))
        });
        let app = Arc::new(App {
            rng: Mutex::new(fastrand::Rng::with_seed(cfg.seed)),
            cfg: std::sync::RwLock::new(cfg),
            world: Mutex::new(World::default()),
            limiter,
            booted: Timestamp::now(),
            clock: Instant::now(),
            in_flight: AtomicU64::new(0),
            list_ids_asked: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            starts: Mutex::new(Vec::new()),
        });
        let api = Router::new()
            .route("/groups", post(create_group))
            .route("/payment-groups", post(create_group))
            .route("/groups/{id}", get(get_group))
            .route("/orders", get(list_orders))
            .route("/orders/{id}", get(get_order))
            .layer(middleware::from_fn_with_state(app.clone(), track));
        let router = Router::new()
            .merge(api)
            .route(
                "/health",
                get(|| async { axum::Json(json!({"status": "ok"})) }),
            )
            .route("/_sandbox/stats", get(stats))
            .with_state(app.clone());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = match tls {
            None => tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            }),
            Some((cert, key)) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let config =
                    axum_server::tls_rustls::RustlsConfig::from_pem_file(&cert, &key).await?;
                let server =
                    axum_server::tls_rustls::from_tcp_rustls(listener.into_std()?, config)?;
                let handle = axum_server::Handle::new();
                let closer = handle.clone();
                tokio::spawn(async move {
                    stop.cancelled().await;
                    closer.graceful_shutdown(Some(Duration::from_secs(1)));
                });
                tokio::spawn(server.handle(handle).serve(router.into_make_service()))
            }
        };
        Ok(Sandbox {
            https,
            addr,
            app: Arc::new(AppHandle(app)),
            shutdown,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, or `https://…` when serving TLS.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Changes the faults from now on (e.g. to end a simulated outage).
    pub fn set_faults(&self, cfg: SandboxConfig) {
        *self.app.0.cfg.write().unwrap_or_else(|e| e.into_inner()) = cfg;
    }

    /// The counters, read in-process.
    pub fn stats(&self, detail: bool) -> Stats {
        self.app.0.stats(detail)
    }

    /// Stops accepting requests and waits for the server to end.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }

    /// Serves until `stop` fires.
    pub async fn serve_until(self, stop: CancellationToken) {
        stop.cancelled().await;
        self.shutdown().await;
    }
}

/// Counts requests in flight and their start times.
async fn track(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let now = app.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    app.peak.fetch_max(now, Ordering::SeqCst);
    let ms = app.clock.elapsed().as_millis() as u64;
    app.starts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(ms);
    let resp = next.run(req).await;
    app.in_flight.fetch_sub(1, Ordering::SeqCst);
    resp
}

fn envelope(status: u16, message: Value) -> Response {
    let kind = if status >= 500 {
        "api_error"
    } else {
        "invalid_request_error"
    };
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        axum::Json(json!({"error": {"type": kind, "message": message}})),
    )
        .into_response()
}

fn with_retry_after(mut resp: Response, secs: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

fn html_502() -> Response {
    let page = "<!DOCTYPE html><html><head><title>Application Error</title></head>\
                <body><h1>502 Bad Gateway</h1><p>The upstream application did not respond.</p></body></html>";
    let mut resp = (StatusCode::BAD_GATEWAY, page).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

/// A response whose body fails at once: the connection is cut without a complete answer.
fn dropped_connection() -> Response {
    let failing = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("sandbox fault: connection dropped"))
    });
    Response::new(Body::from_stream(failing))
}

/// Faults decided before a request is processed.
enum Fault {
    None,
    Status429,
    Status500,
    Html502,
    Status503,
    Reset,
    /// Processed, then the answer is lost in one of these ways:
    Lost,
    Truncated,
    Oversized,
    Late,
}

/// Common to every API request: rate limit, auth, latency, and the fault roll.
/// `Ok(live)` lets the request through; `Err` is the response to send instead.
async fn gate(
    app: &App,
    headers: &HeaderMap,
    route: &str,
    creates: bool,
) -> Result<(bool, Fault), Response> {
    if let Some(l) = &app.limiter
        && l.check().is_err()
    {
        app.count(format!("{route} 429"));
        return Err(with_retry_after(
            envelope(429, json!("Too many requests")),
            1,
        ));
    }
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let key = auth.strip_prefix("Bearer ").unwrap_or("");
    let live = key.starts_with("sk_live_");
    // `sk_test_revoked…` stands for a key of the right form that the API no longer takes.
    let revoked = key.starts_with("sk_test_revoked") || key.starts_with("sk_live_revoked");
    if !(live || key.starts_with("sk_test_")) || revoked {
        app.count(format!("{route} 401"));
        let msg = if auth.is_empty() {
            "No API key provided."
        } else {
            "Invalid API key provided."
        };
        return Err(envelope(401, json!(msg)));
    }
    let c = app.cfg.read().unwrap_or_else(|e| e.into_inner()).clone();
    let (lo, hi) = c.latency;
    if hi > Duration::ZERO {
        let span = hi.saturating_sub(lo).as_secs_f64();
        let wait = lo + Duration::try_from_secs_f64(span * app.roll()).unwrap_or_default();
        tokio::time::sleep(wait).await;
    }
    let mut r = app.roll();
    let mut hit = |p: f64| {
        r -= p;
        r < 0.0
    };
    let fault = if hit(c.error_429) {
        Fault::Status429
    } else if hit(c.error_500) {
        Fault::Status500
    } else if hit(c.error_502_html) {
        Fault::Html502
    } else if hit(c.error_503) {
        Fault::Status503
    } else if hit(c.reset) {
        Fault::Reset
    } else if creates && hit(c.lost_response) {
        Fault::Lost
    } else if creates && hit(c.truncated) {
        Fault::Truncated
    } else if creates && hit(c.oversized) {
        Fault::Oversized
    } else if creates && hit(c.late_create) {
        Fault::Late
    } else {
        Fault::None
    };
    let early = match fault {
        Fault::Status429 => Some((
            429,
            with_retry_after(
                envelope(429, json!("Too many requests")),
                c.retry_after_secs,
            ),
        )),
        Fault::Status500 => Some((500, envelope(500, json!("Internal server error")))),
        Fault::Html502 => Some((502, html_502())),
        Fault::Status503 => Some((
            503,
            with_retry_after(
                envelope(503, json!("Service unavailable")),
                c.retry_after_secs,
            ),
        )),
        Fault::Reset => {
            app.count(format!("{route} dropped"));
            return Err(dropped_connection());
        }
        _ => None,
    };
    if let Some((status, resp)) = early {
        app.count(format!("{route} {status}"));
        return Err(resp);
    }
    Ok((live, fault))
}

async fn create_group(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let route = "POST /groups";
    let (live, fault) = match gate(&app, &headers, route, true).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        app.count(format!("{route} 400"));
        return envelope(400, json!(["the request body must be JSON"]));
    };
    let now = Timestamp::now();
    {
        let w = app.world.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(Rejection { status, message }) = w.validate_create(&body, now, app.booted) {
            drop(w);
            app.count(format!("{route} {status}"));
            return envelope(status, message);
        }
    }
    let create = |app: &App| {
        let mut rng = app.rng.lock().unwrap_or_else(|e| e.into_inner());
        let mut w = app.world.lock().unwrap_or_else(|e| e.into_inner());
        w.create(&mut rng, &body, live, Timestamp::now())
    };
    match fault {
        Fault::Late => {
            // The router answers 503 after late_after; the app finishes later still.
            let delay = app.cfg.read().unwrap_or_else(|e| e.into_inner()).late_after;
            // Counted now: the client may hang up before the 503 is sent.
            app.count(format!("{route} late"));
            let late_app = app.clone();
            let late_body = body.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay * 2).await;
                let mut rng = late_app.rng.lock().unwrap_or_else(|e| e.into_inner());
                let mut w = late_app.world.lock().unwrap_or_else(|e| e.into_inner());
                w.create(&mut rng, &late_body, live, Timestamp::now());
            });
            tokio::time::sleep(delay).await;
            html_503()
        }
        Fault::Lost => {
            create(&app);
            app.count(format!("{route} 201 lost"));
            dropped_connection()
        }
        Fault::Oversized => {
            let mut body = create(&app).to_string().into_bytes();
            app.count(format!("{route} 201 oversized"));
            body.resize(50 << 20, b' ');
            (
                StatusCode::CREATED,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }
        Fault::Truncated => {
            let group = create(&app).to_string();
            app.count(format!("{route} 201 truncated"));
            let cut = group[..group.len() / 2].to_owned();
            (
                StatusCode::CREATED,
                [(header::CONTENT_TYPE, "application/json")],
                cut,
            )
                .into_response()
        }
        _ => {
            let mut group = create(&app);
            app.count(format!("{route} 201"));
            let late = group["customer_id"]
                .as_str()
                .is_some_and(|c| c.starts_with(state::LATE_SHARE_ID));
            if late {
                group["share_id"] = Value::Null;
            }
            (StatusCode::CREATED, axum::Json(group)).into_response()
        }
    }
}

fn html_503() -> Response {
    let page =
        "<html><head><title>Service Unavailable</title></head><body>Request timeout</body></html>";
    let mut resp = (StatusCode::SERVICE_UNAVAILABLE, page).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    resp
}

async fn get_group(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let route = "GET /groups/{id}";
    if let Err(resp) = gate(&app, &headers, route, false).await {
        return resp;
    }
    let found = app
        .world
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .group(&id);
    app.count(format!("{route} 200"));
    match found {
        Some(g) => axum::Json(g).into_response(),
        // The real API answers 200 with an empty body for an unknown group.
        None => StatusCode::OK.into_response(),
    }
}

/// `GET /orders?search=…&take=…&skip=…`: the list, with the server's limits.
async fn list_orders(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let route = "GET /orders";
    if let Err(resp) = gate(&app, &headers, route, false).await {
        return resp;
    }
    let number = |name: &str, default: usize| {
        q.get(name)
            .map_or(Ok(default), |v| v.trim().parse::<usize>().map_err(|_| ()))
    };
    let (take, skip) = (number("take", 10), number("skip", 0));
    let mut problems = Vec::new();
    match take {
        Ok(t) if t > 25 => problems.push("take must not be greater than 25"),
        Ok(0) => problems.push("take must not be less than 1"),
        Ok(_) => {}
        Err(()) => problems.push("take must be an integer number"),
    }
    if skip.is_err() {
        problems.push("skip must be an integer number");
    }
    let (Ok(take), Ok(skip), true) = (take, skip, problems.is_empty()) else {
        app.count(format!("{route} 400"));
        return envelope(400, json!(problems));
    };
    let search = q.get("search").cloned().unwrap_or_default();
    let asked = search.matches("id:").count() as u64;
    let (data, count) = {
        let mut rng = app.rng.lock().unwrap_or_else(|e| e.into_inner());
        let mut w = app.world.lock().unwrap_or_else(|e| e.into_inner());
        w.list_orders(&mut rng, &search, take, skip, Timestamp::now())
    };
    app.count(format!("{route} 200"));
    app.list_ids_asked.fetch_add(asked, Ordering::Relaxed);
    axum::Json(json!({ "data": data, "count": count })).into_response()
}

async fn get_order(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let route = "GET /orders/{id}";
    if let Err(resp) = gate(&app, &headers, route, false).await {
        return resp;
    }
    let result = {
        let mut rng = app.rng.lock().unwrap_or_else(|e| e.into_inner());
        let mut w = app.world.lock().unwrap_or_else(|e| e.into_inner());
        w.order(&mut rng, &id, Timestamp::now())
    };
    match result {
        Ok(order) => {
            app.count(format!("{route} 200"));
            axum::Json(order).into_response()
        }
        Err(Rejection { status, message }) => {
            app.count(format!("{route} {status}"));
            envelope(status, message)
        }
    }
}

async fn stats(State(app): State<Arc<App>>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    let detail = q.get("detail").is_some_and(|v| v == "1" || v == "true");
    axum::Json(app.stats(detail)).into_response()
}
