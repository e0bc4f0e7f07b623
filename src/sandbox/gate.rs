//! What every API request passes before its handler runs: the rate limit, the key,
//! the latency, and the fault roll, in that order.

use std::time::Duration;

use axum::http::{HeaderMap, header};
use axum::response::Response;
use serde_json::json;

use super::app::App;
use super::faults::Fault;
use super::responses::{envelope, with_retry_after};

/// What the gate lets through: whether the key is a live one, and the fault that
/// is still to strike (one that loses the answer after processing, or none).
pub(super) struct Pass {
    pub(super) live: bool,
    pub(super) fault: Fault,
}

/// Common to every API request: rate limit, auth, latency, and the fault roll.
/// `Err` is the response to send instead, already counted under `route`.
pub(super) async fn gate(
    app: &App,
    headers: &HeaderMap,
    route: &str,
    creates: bool,
) -> Result<Pass, Response> {
    if let Some(l) = &app.limiter
        && l.check().is_err()
    {
        app.count(format!("{route} 429"));
        return Err(with_retry_after(
            envelope(429, json!("Too many requests")),
            1,
        ));
    }
    let live = match authorize(headers) {
        Ok(live) => live,
        Err(message) => {
            app.count(format!("{route} 401"));
            return Err(envelope(401, json!(message)));
        }
    };
    let c = app.faults();
    let (lo, hi) = c.latency;
    if hi > Duration::ZERO {
        let span = hi.saturating_sub(lo).as_secs_f64();
        let wait = lo + Duration::try_from_secs_f64(span * app.roll()).unwrap_or_default();
        tokio::time::sleep(wait).await;
    }
    let fault = Fault::roll(&c, app.roll(), creates);
    if let Some((label, resp)) = fault.refusal(c.retry_after_secs) {
        app.count(format!("{route} {label}"));
        return Err(resp);
    }
    Ok(Pass { live, fault })
}

/// Checks the bearer key: `Ok(live)`, or the message of the 401 to send.
fn authorize(headers: &HeaderMap) -> Result<bool, &'static str> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let key = auth.strip_prefix("Bearer ").unwrap_or("");
    let live = key.starts_with("sk_live_");
    // `sk_test_revoked…` stands for a key of the right form that the API no longer takes.
    let revoked = key.starts_with("sk_test_revoked") || key.starts_with("sk_live_revoked");
    if !(live || key.starts_with("sk_test_")) || revoked {
        return Err(if auth.is_empty() {
            "No API key provided."
        } else {
            "Invalid API key provided."
        });
    }
    Ok(live)
}
