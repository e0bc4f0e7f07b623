//! The engine: drains every pending job through the API, paced and recorded.
//!
//! It sees jobs, outcomes, a [`Store`] handle and an [`ApiClient`]; it knows no SQL
//! and no CLI. A fixed pool of workers takes the pending jobs in id order, read from
//! the store a page at a time, so memory does not grow with the queue.

mod ctx;
mod desk;
pub(crate) mod pacing;
mod protocol;
mod requests;
pub(crate) mod retry;
mod worker;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::ApiClient;
use crate::error::{Error, Result};
use crate::store::{Job, Store};
use ctx::Ctx;
pub use pacing::Pacer;
pub use retry::RetryPolicy;

/// When to ask the API whether a group already exists before creating one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precheck {
    /// Before the first create of every job with an orderId (the default).
    Always,
    /// Only after an ambiguous outcome or an interrupted request.
    Ambiguous,
}

/// The engine's resolved settings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineConfig {
    pub concurrency: usize,
    /// Requests started per second; `None` for no limit.
    pub rate: Option<f64>,
    pub retry: RetryPolicy,
    pub precheck: Precheck,
    #[serde(with = "secs")]
    pub settle: Duration,
    /// Consecutive 5xx/transport failures that open the circuit breaker.
    pub breaker_threshold: u32,
    /// Send rows whose earlier outcome is unknown and cannot be checked (a person's decision).
    pub resend_unknown: bool,
    /// How long in-flight requests may finish after a stop.
    #[serde(with = "secs")]
    pub grace: Duration,
    /// The longest `Retry-After` waited out; a longer one stops the run.
    #[serde(with = "secs")]
    pub max_pause: Duration,
    /// Seed for the backoff jitter (tests); `None` for random.
    pub seed: Option<u64>,
}

mod secs {
    pub(crate) fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// Why a run stopped before its queue was empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Auth rejected or the API is down (exit 3).
    Api(String),
    /// SIGINT or SIGTERM (exit 4).
    Signal,
}

/// Stop and abandon switches shared by the engine and the signal handler.
#[derive(Debug, Default)]
pub struct Control {
    /// No new request may start.
    pub stop: CancellationToken,
    /// Stop waiting for requests in flight.
    pub abandon: CancellationToken,
    reason: Mutex<Option<StopReason>>,
}

impl Control {
    /// Stops the run (the first reason wins).
    pub(crate) fn stop(&self, reason: StopReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            match &reason {
                StopReason::Api(msg) => tracing::error!(reason = %msg, "stopping the run"),
                StopReason::Signal => tracing::warn!(
                    "stopping: no new requests; waiting for those in flight (signal again to abandon them)"
                ),
            }
            *r = Some(reason);
        }
        self.stop.cancel();
    }

    /// A signal arrived: the first stops the run, the second abandons in-flight requests.
    pub(crate) fn signal(&self) {
        if self.stop.is_cancelled() {
            tracing::warn!(
                "second signal: abandoning requests in flight (the next run checks them)"
            );
            self.abandon.cancel();
        } else {
            self.stop(StopReason::Signal);
        }
    }

    pub(crate) fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// How a drain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drained {
    pub stopped: Option<StopReason>,
    /// Requests were still in flight when the run gave up waiting for them.
    pub abandoned: bool,
    /// Jobs this run left alone because another run claimed them since (only ever
    /// non-zero if two runs worked on one database at once).
    pub claims_lost: u64,
    /// How long requests were held by `Retry-After` pauses.
    pub paused: Duration,
    /// How long jobs cleared by a check waited for their create to leave.
    pub check_gaps: Option<Gaps>,
}

/// A distribution of waits, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Gaps {
    pub count: u64,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

impl Gaps {
    fn of(h: &hdrhistogram::Histogram<u64>) -> Option<Gaps> {
        (!h.is_empty()).then(|| Gaps {
            count: h.len(),
            p50_ms: h.value_at_quantile(0.5),
            p99_ms: h.value_at_quantile(0.99),
            max_ms: h.max(),
        })
    }
}

/// Called once per job whose task ended (a progress bar's tick).
pub(crate) type OnDone = Arc<dyn Fn() + Send + Sync>;

/// Sends every pending job. Returns when the queue is empty or the run stopped.
pub async fn drain(
    store: Store,
    api: ApiClient,
    cfg: EngineConfig,
    control: Arc<Control>,
    run_id: i64,
    on_done: Option<OnDone>,
) -> Result<Drained> {
    let ctx = Arc::new(Ctx {
        span: tracing::Span::current(),
        store: store.clone(),
        api,
        pacer: Pacer::new(cfg.concurrency, cfg.rate, cfg.breaker_threshold),
        cfg,
        control: control.clone(),
        run_id,
        claims_lost: Default::default(),
        desk: desk::Desk::new(),
        check_gaps: std::sync::Mutex::new(
            hdrhistogram::Histogram::new_with_bounds(1, 86_400_000, 2)
                .map_err(|e| Error::internal_from("cannot make a histogram", e))?,
        ),
    });
    let desk_done = CancellationToken::new();
    let desk_task = tokio::spawn(desk::serve(
        ctx.clone(),
        ctx.desk.clone(),
        desk_done.clone(),
    ));
    let workers = spawn_workers(&ctx, on_done);
    let (first_error, abandoned) = wait_for(workers, &control, ctx.cfg.grace).await;
    desk_done.cancel();
    let _ = desk_task.await;
    store.flush().await?;
    if let Some(e) = first_error {
        return Err(e);
    }
    let claims_lost = ctx.claims_lost.load(std::sync::atomic::Ordering::Relaxed);
    if claims_lost > 0 {
        tracing::warn!(
            jobs = claims_lost,
            "left jobs to another run that claimed them while this one ran; two runs worked \
             on this database at once (see the README: How exactly-once is kept)"
        );
    }
    Ok(Drained {
        stopped: control.reason(),
        abandoned,
        claims_lost,
        paused: ctx.pacer.paused_total(),
        check_gaps: Gaps::of(&ctx.check_gaps.lock().unwrap_or_else(|e| e.into_inner())),
    })
}

/// Starts the workers: each takes the next pending job (in id order) and sees it
/// through before it takes another; the one that finds the page empty reads the
/// next page. Enough of them to keep every request slot busy while others wait out
/// a backoff or a list, and at most 2,048 (a few KiB each): memory does not follow
/// `--concurrency`.
fn spawn_workers(ctx: &Arc<Ctx>, on_done: Option<OnDone>) -> JoinSet<Result<()>> {
    let pool_size = (ctx.cfg.concurrency * 8).clamp(256, 2_048);
    let feed = Arc::new(tokio::sync::Mutex::new(Feed {
        store: ctx.store.clone(),
        run_id: ctx.run_id,
        page: VecDeque::new(),
        after: 0,
        done: false,
    }));
    let mut workers = JoinSet::new();
    for _ in 0..pool_size {
        let ctx = ctx.clone();
        let feed = feed.clone();
        let on_done = on_done.clone();
        workers.spawn(async move {
            loop {
                if ctx.control.stop.is_cancelled() {
                    return Ok(());
                }
                let Some(job) = feed.lock().await.next().await? else {
                    return Ok(());
                };
                if ctx.control.stop.is_cancelled() {
                    return Ok(()); // the job stays pending
                }
                let result = worker::see_through(&ctx, job).await;
                if let Some(f) = &on_done {
                    f();
                }
                result?;
            }
        });
    }
    workers
}

/// Waits for the workers to end: once the run stops, for at most `grace` (or until
/// a second signal), then abandons those still waiting for a reply. The first error
/// a worker met, and whether any were abandoned.
async fn wait_for(
    mut workers: JoinSet<Result<()>>,
    control: &Control,
    grace: Duration,
) -> (Option<Error>, bool) {
    let mut first_error: Option<Error> = None;
    let mut abandoned = false;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if deadline.is_none() && control.stop.is_cancelled() {
            deadline = Some(tokio::time::Instant::now() + grace);
        }
        let timer = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => control.stop.cancelled().await,
            }
        };
        tokio::select! {
            next = workers.join_next() => match next {
                None => break,
                some => collect(some, &mut first_error, control),
            },
            () = control.abandon.cancelled() => { abandoned = true; break; }
            () = timer => if deadline.is_some() { abandoned = true; break; },
        }
    }
    if abandoned {
        tracing::warn!(
            workers = workers.len(),
            "abandoning requests still in flight; their jobs stay in_flight and the next run checks them"
        );
        workers.abort_all();
        while workers.join_next().await.is_some() {}
    }
    (first_error, abandoned)
}

/// Pages of pending jobs, handed out one at a time in id order.
struct Feed {
    store: Store,
    run_id: i64,
    page: VecDeque<Job>,
    /// The id of the last job read.
    after: i64,
    /// A read found no more jobs.
    done: bool,
}

impl Feed {
    /// Jobs read from the store at a time (memory stays flat however long the queue).
    const PAGE: usize = 512;

    /// The next pending job (claimed for the run), or `None` when every one has been
    /// handed out.
    async fn next(&mut self) -> Result<Option<Job>> {
        if self.page.is_empty() && !self.done {
            let page = self
                .store
                .claim_pending(self.run_id, self.after, Self::PAGE)
                .await?;
            match page.last() {
                Some(last) => self.after = last.id,
                None => self.done = true,
            }
            self.page = page.into();
        }
        Ok(self.page.pop_front())
    }
}

fn collect(
    next: Option<Result<Result<()>, tokio::task::JoinError>>,
    first_error: &mut Option<Error>,
    control: &Control,
) {
    let err = match next {
        None | Some(Ok(Ok(()))) => return,
        Some(Ok(Err(e))) => e,
        Some(Err(join)) if join.is_cancelled() => return,
        Some(Err(join)) => Error::internal(format!("a worker panicked: {join}")),
    };
    tracing::error!(error = %crate::error::render(&err), "stopping the run: cannot record outcomes");
    control.stop.cancel();
    first_error.get_or_insert(err);
}
