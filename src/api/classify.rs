//! Every response and transport error sorted into a closed set of outcomes
//! (`docs/design.md#response-classification`) by one pure function. The table test
//! below is the contract.

use std::time::{Duration, SystemTime};

/// What came back from one HTTP exchange, reduced to what decides the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// A status line arrived; `body_ok` says whether a 2xx body could be read and parsed.
    Http { status: u16, body_ok: bool },
    /// No response: why.
    Transport(Transport),
}

/// Transport failures, by what they imply about the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Connection refused, DNS failure, TLS handshake failure: nothing was sent.
    Connect,
    /// The server's TLS certificate is not trusted: nothing was sent, and every
    /// request would fail the same way (a missing `--ca-cert`, or the wrong address).
    Untrusted,
    /// The client gave up waiting after the request was sent.
    Timeout,
    /// The connection was reset or closed before a complete response.
    Reset,
    /// Headers arrived but the body could not be read.
    Body,
}

/// The closed set of outcomes (`docs/design.md#response-classification`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// 2xx with a readable body: created (or, for a check, answered).
    Ok,
    /// The request is wrong and will stay wrong: fail the row with the API's message.
    Definitive,
    /// Not processed: safe to send again after a delay.
    Retry,
    /// The request may have been processed: check before sending again.
    Ambiguous,
    /// Every row would fail the same way (auth): stop the run, fail nothing.
    Stop,
}

impl Class {
    /// The name stored in `attempts.class`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Class::Ok => "ok",
            Class::Definitive => "definitive",
            Class::Retry => "retry",
            Class::Ambiguous => "ambiguous",
            Class::Stop => "stop",
        }
    }
}

/// Sorts one exchange into its outcome.
pub fn classify(exchange: Exchange) -> Class {
    match exchange {
        Exchange::Transport(Transport::Connect) => Class::Retry,
        Exchange::Transport(Transport::Untrusted) => Class::Stop,
        Exchange::Transport(Transport::Timeout | Transport::Reset | Transport::Body) => {
            Class::Ambiguous
        }
        Exchange::Http { status, body_ok } => match status {
            200..=299 if body_ok => Class::Ok,
            // The server said yes but we cannot see the group: it may well exist.
            200..=299 => Class::Ambiguous,
            // Redirects are not followed; one means --api-base points at the wrong place.
            300..=399 => Class::Stop,
            401 | 403 => Class::Stop,
            408 | 409 | 425 | 429 => Class::Retry,
            400..=499 => Class::Definitive,
            // 500, 502, 503, 504 and any other 5xx: the group may exist.
            500..=599 => Class::Ambiguous,
            // 1xx as a final status, or nonsense: treat as "may have happened".
            _ => Class::Ambiguous,
        },
    }
}

/// The longest `Retry-After` taken as given: anything longer means the same to a
/// run (stop, and come back later), and keeps every sum with it far from overflow.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(7 * 86_400);

/// Parses a `Retry-After` value: delay-seconds or an HTTP date (relative to `now`).
/// A date in the past means "now" (zero); any value is capped at [`RETRY_AFTER_CAP`].
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let d = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else if let Ok(secs) = value.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        Duration::try_from_secs_f64(secs).unwrap_or(RETRY_AFTER_CAP)
    } else {
        let when = httpdate::parse_http_date(value).ok()?;
        when.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(d.min(RETRY_AFTER_CAP))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16) -> Exchange {
        Exchange::Http {
            status,
            body_ok: true,
        }
    }

    #[test]
    fn every_status_of_the_api_notes_and_every_transport_error() {
        use Class::*;
        let table: &[(Exchange, Class, &str)] = &[
            (http(200), Ok, "200 with a group"),
            (http(201), Ok, "201 created"),
            (
                Exchange::Http {
                    status: 201,
                    body_ok: false,
                },
                Ambiguous,
                "201, unreadable body",
            ),
            (http(301), Stop, "redirect: wrong --api-base"),
            (http(400), Definitive, "validation error"),
            (http(401), Stop, "bad or expired key"),
            (http(403), Stop, "treated like 401"),
            (http(404), Definitive, "unknown customer/order"),
            (http(405), Definitive, "other 4xx"),
            (http(408), Retry, "request timeout: not processed"),
            (http(409), Retry, "share-id collision: not created"),
            (http(422), Definitive, "unprocessable"),
            (http(429), Retry, "rate limited"),
            (http(500), Ambiguous, "server error: may exist"),
            (http(501), Ambiguous, "other 5xx"),
            (http(502), Ambiguous, "router: bad gateway"),
            (http(503), Ambiguous, "router: unavailable"),
            (http(504), Ambiguous, "router: gateway timeout"),
            (http(102), Ambiguous, "1xx as final status"),
            (
                Exchange::Transport(Transport::Connect),
                Retry,
                "connection refused / DNS",
            ),
            (
                Exchange::Transport(Transport::Untrusted),
                Stop,
                "untrusted TLS certificate: every request would fail",
            ),
            (
                Exchange::Transport(Transport::Timeout),
                Ambiguous,
                "timeout after sending",
            ),
            (
                Exchange::Transport(Transport::Reset),
                Ambiguous,
                "connection reset",
            ),
            (
                Exchange::Transport(Transport::Body),
                Ambiguous,
                "body cut short",
            ),
        ];
        for (exchange, want, why) in table {
            assert_eq!(classify(*exchange), *want, "{why}: {exchange:?}");
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = httpdate::parse_http_date("Tue, 24 Nov 2026 08:00:00 GMT").unwrap();
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("Tue, 24 Nov 2026 08:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Tue, 24 Nov 2026 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        for huge in ["18446744073709551615", "1e300", "99999999999999999999999"] {
            assert_eq!(
                parse_retry_after(huge, now),
                Some(RETRY_AFTER_CAP),
                "{huge}"
            );
        }
        assert_eq!(parse_retry_after("-3", now), None);
    }
}
