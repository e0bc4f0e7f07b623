//! The answers the sandbox sends besides the happy ones: the API's JSON error
//! envelope, the hosting router's HTML error pages, and a connection cut before
//! the answer is complete.

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// The API's error envelope: `{"error": {"type", "message"}}`, where `message` is a
/// string or a list of strings.
pub(super) fn envelope(status: u16, message: Value) -> Response {
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

pub(super) fn with_retry_after(mut resp: Response, secs: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

/// The router's page when the application did not answer.
pub(super) fn html_502() -> Response {
    let page = "<!DOCTYPE html><html><head><title>Application Error</title></head>\
                <body><h1>502 Bad Gateway</h1><p>The upstream application did not respond.</p></body></html>";
    let mut resp = (StatusCode::BAD_GATEWAY, page).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

/// The router's page when it gave up waiting (the application may carry on).
pub(super) fn html_503() -> Response {
    let page =
        "<html><head><title>Service Unavailable</title></head><body>Request timeout</body></html>";
    let mut resp = (StatusCode::SERVICE_UNAVAILABLE, page).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    resp
}

/// A response whose body fails at once: the connection is cut without a complete answer.
pub(super) fn dropped_connection() -> Response {
    let failing = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("sandbox fault: connection dropped"))
    });
    Response::new(Body::from_stream(failing))
}

/// A 201 whose body is the given bytes, labelled JSON whether or not it is.
pub(super) fn created_raw(body: impl Into<Body>) -> Response {
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        body.into(),
    )
        .into_response()
}
