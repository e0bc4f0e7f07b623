//! The KohortPay API client: the only module that knows reqwest.
//!
//! Each call returns a [`Reply`]: the outcome class, the status, the latency, any
//! `Retry-After`, a readable error text, and the parsed value when there is one.
//! Calls never fail with a Rust error: a failed exchange is data for the engine.

pub mod classify;
mod orders;
pub mod wire;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use jiff::Timestamp;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};

pub use classify::{Class, Exchange, RETRY_AFTER_CAP, Transport, classify};
pub(crate) use orders::{LIST_TAKE, searchable};
pub(crate) use wire::ListedOrder;

use crate::error::{Error, Result};
use crate::job::{Group, SendBody};

/// An API key. Its `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: String) -> Self {
        ApiKey(key)
    }

    pub(crate) fn is_live(&self) -> bool {
        self.0.starts_with("sk_live_")
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// The result of one HTTP exchange.
#[derive(Debug, Clone)]
pub struct Reply<T> {
    pub class: Class,
    pub status: Option<u16>,
    pub started_at: Timestamp,
    pub latency: Duration,
    pub retry_after: Option<Duration>,
    /// What went wrong, readable (None on success).
    pub error: Option<String>,
    /// The parsed body, on success.
    pub value: Option<T>,
}

/// A client bound to one base URL and key.
#[derive(Clone, Debug)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    /// `POST {base}/groups`, parsed once.
    groups_url: reqwest::Url,
    auth: HeaderValue,
}

impl ApiClient {
    /// Builds a client. `ca_cert` adds a private root certificate (PEM).
    pub fn new(
        base: &str,
        key: &ApiKey,
        timeout: Duration,
        ca_cert: Option<&Path>,
    ) -> Result<Self> {
        // Installing the provider twice is harmless; the first one wins.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| {
                Error::usage("the API key contains characters that cannot be sent in a header")
            })?;
        auth.set_sensitive(true);
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("kohort-batch/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(256);
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path).map_err(|source| Error::File {
                action: "read CA certificate",
                path: path.to_owned(),
                source,
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                Error::usage(format!("{} is not a PEM certificate: {e}", path.display()))
            })?;
            builder = builder.tls_certs_merge([cert]);
        }
        let http = builder.build().map_err(|e| match ca_cert {
            // The one input that can make the client fail to build.
            Some(path) => Error::usage(format!(
                "--ca-cert {}: the certificate cannot be used ({}); give a PEM file of the \
                 root certificate",
                path.display(),
                error_chain(&e)
            )),
            None => Error::internal_from("cannot build the HTTP client", e),
        })?;
        let base = base.trim_end_matches('/').to_owned();
        let groups_url = reqwest::Url::parse(&format!("{base}/groups"))
            .map_err(|e| Error::usage(format!("--api-base {base} is not a valid URL: {e}")))?;
        Ok(ApiClient {
            http,
            base,
            groups_url,
            auth,
        })
    }

    /// `POST /groups`.
    pub async fn create_group(&self, body: &SendBody) -> Reply<Group> {
        let req = self
            .http
            .post(self.groups_url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body.json());
        self.exchange(req, wire::parse_group, true).await
    }

    /// `GET /orders/{id}`: the order's group id, if it has one.
    pub async fn order_group(&self, order_id: &str) -> Reply<Option<String>> {
        let req = self
            .http
            .get(format!("{}/orders/{}", self.base, path_segment(order_id)));
        self.exchange(req, wire::parse_order_group, false).await
    }

    /// `GET /groups/{id}`: the group, or `None` (the API's empty 200).
    pub async fn group(&self, group_id: &str) -> Reply<Option<Group>> {
        let req = self
            .http
            .get(format!("{}/groups/{}", self.base, path_segment(group_id)));
        self.exchange(req, wire::parse_group_lookup, false).await
    }

    /// One request; `kind_is_create` says whether it may have created a group (a
    /// body that cannot be read is then ambiguous, not a reason to ask again).
    async fn exchange<T>(
        &self,
        req: reqwest::RequestBuilder,
        parse: fn(&[u8]) -> Result<T, String>,
        kind_is_create: bool,
    ) -> Reply<T> {
        let started_at = Timestamp::now();
        let clock = Instant::now();
        let req = req.header(AUTHORIZATION, self.auth.clone());
        let reply = |class, status, retry_after, error, value| Reply {
            class,
            status,
            started_at,
            latency: clock.elapsed(),
            retry_after,
            error,
            value,
        };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let transport = transport_kind(&e);
                return reply(
                    classify(Exchange::Transport(transport)),
                    None,
                    None,
                    Some(describe_transport(transport, &e)),
                    None,
                );
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| classify::parse_retry_after(v, SystemTime::now()));
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let body = read_bounded(resp).await;
        let (class, error, value) = judge(status, body, location.as_deref(), parse, kind_is_create);
        reply(class, Some(status), retry_after, error, value)
    }
}

/// What a response comes to once its body is read, or found too long or cut short:
/// its class, the readable error (None on success) and the parsed value.
fn judge<T>(
    status: u16,
    body: reqwest::Result<Option<bytes::Bytes>>,
    location: Option<&str>,
    parse: fn(&[u8]) -> Result<T, String>,
    kind_is_create: bool,
) -> (Class, Option<String>, Option<T>) {
    let success = (200..300).contains(&status);
    let http = |body_ok| classify(Exchange::Http { status, body_ok });
    let body = match body {
        Ok(Some(b)) => b,
        Ok(None) => {
            // Not read past the limit: for a create the group may well exist
            // (checked, never re-sent blindly); for a lookup, ask again later.
            let class = match (kind_is_create, success) {
                (true, true) => Class::Ambiguous,
                (false, true) => Class::Retry,
                _ => http(true),
            };
            let error = format!(
                "HTTP {status}, but the body is over {} MiB and was not read",
                MAX_BODY >> 20
            );
            return (class, Some(error), None);
        }
        Err(e) => {
            let class = if success {
                classify(Exchange::Transport(Transport::Body))
            } else {
                http(true)
            };
            let error = format!(
                "HTTP {status}, but the body was cut short: {}",
                error_chain(&e)
            );
            return (class, Some(error), None);
        }
    };
    if success {
        return match parse(&body) {
            Ok(v) => (Class::Ok, None, Some(v)),
            Err(why) => {
                let error = format!("HTTP {status}, but the response could not be read: {why}");
                (http(false), Some(error), None)
            }
        };
    }
    let error = if (300..400).contains(&status) {
        format!(
            "HTTP {status}, a redirect to {}",
            location.unwrap_or("nowhere given")
        )
    } else {
        wire::describe_error(status, &body)
    };
    (http(true), Some(error), None)
}

/// The largest response body read: a group, an order or an error is a few KiB;
/// anything past this is not what the API sends, and is not held in memory.
pub(crate) const MAX_BODY: usize = 1 << 20;

/// Reads a response body up to [`MAX_BODY`]; `Ok(None)` when it is larger (the rest
/// is not read, and the connection is dropped with the response).
async fn read_bounded(mut resp: reqwest::Response) -> reqwest::Result<Option<bytes::Bytes>> {
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Ok(None);
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > MAX_BODY {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}

fn path_segment(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn transport_kind(e: &reqwest::Error) -> Transport {
    if e.is_connect() && untrusted_certificate(e) {
        Transport::Untrusted
    } else if e.is_connect() {
        Transport::Connect
    } else if e.is_timeout() {
        Transport::Timeout
    } else if e.is_body() || e.is_decode() {
        Transport::Body
    } else {
        Transport::Reset
    }
}

/// Whether the TLS handshake failed because the server's certificate is not trusted
/// (rustls says so somewhere in the error's causes): the API's, or PostgreSQL's.
pub(crate) fn untrusted_certificate(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(tls) = c.downcast_ref::<rustls::Error>() {
            return matches!(tls, rustls::Error::InvalidCertificate(_));
        }
        // An io::Error's `source` skips the error it wraps: look inside it instead.
        cause = match c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    false
}

fn describe_transport(kind: Transport, e: &reqwest::Error) -> String {
    let what = match kind {
        Transport::Connect => "could not connect",
        Transport::Untrusted => {
            "could not connect: the API's TLS certificate is not trusted (give its CA with \
             --ca-cert, or check --api-base)"
        }
        Transport::Timeout => "timed out waiting for the response",
        Transport::Reset => "the connection failed mid-request",
        Transport::Body => "the response body was cut short",
    };
    format!("{what}: {}", error_chain(e))
}

/// The error and its causes on one line; URLs carry no secrets (the key is a header).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_never_printed() {
        let key = ApiKey::new("sk_test_secret".into());
        assert!(!format!("{key:?}").contains("secret"));
        assert!(!key.is_live());
        assert!(ApiKey::new("sk_live_x".into()).is_live());
    }

    #[test]
    fn a_read_response_is_judged_by_status_body_and_kind() {
        type Read = reqwest::Result<Option<bytes::Bytes>>;
        let parse = |b: &[u8]| -> Result<u8, String> { b.first().copied().ok_or("empty".into()) };
        let body = |b: &'static [u8]| Ok(Some(bytes::Bytes::from_static(b)));
        let cases: [(u16, Read, bool, Class, bool); 7] = [
            (201, body(b"x"), true, Class::Ok, false),
            (201, Ok(None), true, Class::Ambiguous, true),
            (200, Ok(None), false, Class::Retry, true),
            (
                201,
                body(b""),
                true,
                classify(Exchange::Http {
                    status: 201,
                    body_ok: false,
                }),
                true,
            ),
            (400, body(b"{}"), true, Class::Definitive, true),
            (400, Ok(None), false, Class::Definitive, true),
            (
                302,
                body(b""),
                false,
                classify(Exchange::Http {
                    status: 302,
                    body_ok: true,
                }),
                true,
            ),
        ];
        for (status, b, create, class, has_error) in cases {
            let (got, error, value) = judge(status, b, Some("/elsewhere"), parse, create);
            assert_eq!(
                (got, error.is_some(), value.is_some()),
                (class, has_error, !has_error)
            );
        }
        let (_, error, _) = judge(302, body(b""), Some("/elsewhere"), parse, false);
        assert_eq!(error.as_deref(), Some("HTTP 302, a redirect to /elsewhere"));
    }

    #[test]
    fn ids_are_escaped_in_paths() {
        assert_eq!(path_segment("ord_1-A.b~"), "ord_1-A.b~");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }
}
