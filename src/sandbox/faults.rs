//! The sandbox's knobs and the fault each request draws from them: the status
//! codes a real server or its router sends on bad days, cut connections, and
//! creates whose answer is lost, cut, bloated or late.

use std::time::Duration;

use axum::response::Response;
use serde_json::json;

use super::responses::{dropped_connection, envelope, html_502, with_retry_after};

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
    /// How `GET /orders?search=` lists answer.
    pub list_answer: ListAnswer,
    pub seed: u64,
    /// Serve HTTPS with this certificate chain and key (PEM files).
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// How the order list answers: as the server does, or as a server the client must
/// not trust further than documented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListAnswer {
    /// By the server's rules.
    Honest,
    /// Ignores `search`: the first orders of the account, whatever was asked.
    Unfiltered,
    /// Refuses every list with a 400.
    Refused,
    /// Lists only the first order asked for.
    FirstOnly,
    /// Lists the orders asked for as summaries, without `payment_group_id`.
    Summaries,
}

impl std::str::FromStr for ListAnswer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "honest" => Ok(ListAnswer::Honest),
            "unfiltered" => Ok(ListAnswer::Unfiltered),
            "refused" => Ok(ListAnswer::Refused),
            "first-only" => Ok(ListAnswer::FirstOnly),
            "summaries" => Ok(ListAnswer::Summaries),
            _ => Err(format!(
                "--list-answer {s:?} is not one of honest, unfiltered, refused, first-only, \
                 summaries"
            )),
        }
    }
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
            list_answer: ListAnswer::Honest,
            seed: 1,
            tls: None,
        }
    }
}

/// Faults decided before a request is processed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Fault {
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

impl Fault {
    /// The fault of a request, from one uniform draw `r` in `[0, 1)`: each knob takes
    /// its share of `[0, 1)` in turn; the create-only ones count only for creates.
    pub(super) fn roll(c: &SandboxConfig, mut r: f64, creates: bool) -> Fault {
        let table = [
            (c.error_429, Fault::Status429, false),
            (c.error_500, Fault::Status500, false),
            (c.error_502_html, Fault::Html502, false),
            (c.error_503, Fault::Status503, false),
            (c.reset, Fault::Reset, false),
            (c.lost_response, Fault::Lost, true),
            (c.truncated, Fault::Truncated, true),
            (c.oversized, Fault::Oversized, true),
            (c.late_create, Fault::Late, true),
        ];
        table
            .into_iter()
            .filter(|&(_, _, create_only)| creates || !create_only)
            .find(|&(p, _, _)| {
                r -= p;
                r < 0.0
            })
            .map_or(Fault::None, |(_, fault, _)| fault)
    }

    /// The answer sent instead of processing the request, with the label it is
    /// counted under; `None` when the request goes on (perhaps to lose its answer).
    pub(super) fn refusal(self, retry_after_secs: u64) -> Option<(&'static str, Response)> {
        let unavailable =
            |status, message| with_retry_after(envelope(status, json!(message)), retry_after_secs);
        match self {
            Fault::Status429 => Some(("429", unavailable(429, "Too many requests"))),
            Fault::Status500 => Some(("500", envelope(500, json!("Internal server error")))),
            Fault::Html502 => Some(("502", html_502())),
            Fault::Status503 => Some(("503", unavailable(503, "Service unavailable"))),
            Fault::Reset => Some(("dropped", dropped_connection())),
            Fault::None | Fault::Lost | Fault::Truncated | Fault::Oversized | Fault::Late => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_knob_takes_its_share_in_turn() {
        let c = SandboxConfig {
            error_429: 0.1,
            error_500: 0.1,
            reset: 0.1,
            lost_response: 0.2,
            late_create: 0.1,
            ..SandboxConfig::default()
        };
        let cases = [
            (0.05, true, Fault::Status429),
            (0.15, true, Fault::Status500),
            (0.25, true, Fault::Reset),
            (0.35, true, Fault::Lost),
            (0.45, true, Fault::Lost),
            (0.55, true, Fault::Late),
            (0.65, true, Fault::None),
            (0.35, false, Fault::None),
            (0.55, false, Fault::None),
        ];
        for (r, creates, want) in cases {
            assert_eq!(
                Fault::roll(&c, r, creates),
                want,
                "r = {r}, creates = {creates}"
            );
        }
        assert_eq!(
            Fault::roll(&SandboxConfig::default(), 0.0, true),
            Fault::None
        );
    }

    #[test]
    fn only_early_faults_refuse() {
        for (fault, label) in [
            (Fault::Status429, Some("429")),
            (Fault::Status500, Some("500")),
            (Fault::Html502, Some("502")),
            (Fault::Status503, Some("503")),
            (Fault::Reset, Some("dropped")),
            (Fault::None, None),
            (Fault::Lost, None),
            (Fault::Truncated, None),
            (Fault::Oversized, None),
            (Fault::Late, None),
        ] {
            assert_eq!(fault.refusal(7).map(|(l, _)| l), label, "{fault:?}");
        }
        let (_, resp) = Fault::Status503.refusal(7).unwrap();
        assert_eq!(resp.headers()["retry-after"], "7");
    }
}
