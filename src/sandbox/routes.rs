//! The route table and one handler per route. Each handler passes the gate first,
//! then asks the world, and counts its answer under "METHOD /route STATUS".

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use jiff::Timestamp;
use serde_json::{Value, json};

use super::app::{App, track};
use super::faults::Fault;
use super::faults::ListAnswer;
use super::gate::{Pass, gate};
use super::responses::{created_raw, dropped_connection, envelope, html_503};
use super::state::{self, Rejection};

/// The API routes (tracked for the stats), the health check and the stats.
pub(super) fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/groups", post(create_group))
        .route("/payment-groups", post(create_group))
        .route("/groups/{id}", get(get_group))
        .route("/orders", get(list_orders))
        .route("/orders/{id}", get(get_order))
        .layer(middleware::from_fn_with_state(app.clone(), track));
    Router::new()
        .merge(api)
        .route(
            "/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/_sandbox/stats", get(stats))
        .with_state(app)
}

/// Both create routes are counted under this one.
const CREATE: &str = "POST /groups";

async fn create_group(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let Pass { live, fault } = match gate(&app, &headers, CREATE, true).await {
        Ok(pass) => pass,
        Err(resp) => return resp,
    };
    let body = match validated(&app, &body) {
        Ok(body) => body,
        Err(Rejection { status, message }) => {
            app.count(format!("{CREATE} {status}"));
            return envelope(status, message);
        }
    };
    match fault {
        Fault::Late => late_create(app, body, live).await,
        Fault::Lost => {
            app.create(&body, live);
            app.count(format!("{CREATE} 201 lost"));
            dropped_connection()
        }
        Fault::Oversized => {
            let mut group = app.create(&body, live).to_string().into_bytes();
            app.count(format!("{CREATE} 201 oversized"));
            group.resize(50 << 20, b' ');
            created_raw(group)
        }
        Fault::Truncated => {
            let group = app.create(&body, live).to_string();
            app.count(format!("{CREATE} 201 truncated"));
            created_raw(group[..group.len() / 2].to_owned())
        }
        Fault::None
        | Fault::Status429
        | Fault::Status500
        | Fault::Html502
        | Fault::Status503
        | Fault::Reset => {
            let mut group = app.create(&body, live);
            app.count(format!("{CREATE} 201"));
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

/// The create's body, parsed and checked by the server's rules.
fn validated(app: &App, body: &[u8]) -> Result<Value, Rejection> {
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
        return Err(Rejection {
            status: 400,
            message: json!(["the request body must be JSON"]),
        });
    };
    app.world()
        .validate_create(&body, Timestamp::now(), app.booted)?;
    Ok(body)
}

/// The router answers 503 after `late_after`; the application creates the group
/// `late_after` later still.
async fn late_create(app: Arc<App>, body: Value, live: bool) -> Response {
    let delay = app.faults().late_after;
    // Counted now: the client may hang up before the 503 is sent.
    app.count(format!("{CREATE} late"));
    let late_app = app.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay.saturating_mul(2)).await;
        late_app.create(&body, live);
    });
    tokio::time::sleep(delay).await;
    html_503()
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
    let found = app.world().group(&id);
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
    let (take, skip) = match page(&q) {
        Ok(page) => page,
        Err(problems) => {
            app.count(format!("{route} 400"));
            return envelope(400, json!(problems));
        }
    };
    let search = q.get("search").cloned().unwrap_or_default();
    let asked = asked_ids(&search);
    app.list_ids_asked
        .fetch_add(asked.len() as u64, Ordering::Relaxed);
    let answer = app.faults().list_answer;
    if answer == ListAnswer::Refused {
        app.count(format!("{route} 400"));
        return envelope(400, json!(["search must be one condition"]));
    }
    let search = match answer {
        // Every order of the account, as if `search` were not there.
        ListAnswer::Unfiltered => String::new(),
        ListAnswer::FirstOnly => asked
            .first()
            .map(|id| format!("id:{id}"))
            .unwrap_or_default(),
        ListAnswer::Honest | ListAnswer::Refused | ListAnswer::Summaries => search,
    };
    let (mut data, count) =
        app.change(|w, rng| w.list_orders(rng, &search, take, skip, Timestamp::now()));
    if answer == ListAnswer::Summaries {
        for order in &mut data {
            if let Some(o) = order.as_object_mut() {
                o.remove("payment_group_id");
            }
        }
    }
    app.count(format!("{route} 200"));
    axum::Json(json!({ "data": data, "count": count })).into_response()
}

/// The order ids an `id:` condition of `search` names.
fn asked_ids(search: &str) -> Vec<&str> {
    search
        .split(',')
        .flat_map(|any| any.split(" OR "))
        .filter_map(|cond| cond.trim().strip_prefix("id:"))
        .collect()
}

/// `(take, skip)` of a list query, by the server's limits, or what is wrong with them.
fn page(q: &BTreeMap<String, String>) -> Result<(usize, usize), Vec<&'static str>> {
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
    match (take, skip, problems.is_empty()) {
        (Ok(take), Ok(skip), true) => Ok((take, skip)),
        _ => Err(problems),
    }
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
    match app.change(|w, rng| w.order(rng, &id, Timestamp::now())) {
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
