//! Parsing what the API sends: groups and orders in snake_case or camelCase,
//! error envelopes whose `message` is a string or a list, and HTML error pages.
//!
//! Everything here is pure and total: any input gives a value or an error text,
//! never a panic (see the property tests).

use serde_json::{Map, Value};

use crate::job::Group;

fn field<'a>(obj: &'a Map<String, Value>, snake: &str, camel: &str) -> Option<&'a Value> {
    obj.get(snake)
        .or_else(|| obj.get(camel))
        .filter(|v| !v.is_null())
}

/// A scalar as text (strings as they are, numbers and booleans printed); `None` for
/// null, arrays and objects.
fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Reads a group object. Unknown fields and enum values are kept in `raw` and ignored.
pub fn parse_group(body: &[u8]) -> Result<Group, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON ({e})"))?;
    group_from_value(&value, body)
}

/// The group in `value`, with `body` (what `value` was parsed from) kept as received.
fn group_from_value(value: &Value, body: &[u8]) -> Result<Group, String> {
    let obj = value
        .as_object()
        .ok_or_else(|| "the body is not a JSON object".to_owned())?;
    let id = text(field(obj, "id", "id"))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| "the group has no id".to_owned())?;
    Ok(Group {
        id,
        share_id: text(field(obj, "share_id", "shareId")),
        status: text(field(obj, "status", "status")),
        customer_id: text(field(obj, "customer_id", "customerId")),
        order_id: text(field(obj, "order_id", "orderId")),
        expires_at: text(field(obj, "expires_at", "expiresAt")),
        created_at: text(field(obj, "created_at", "createdAt")),
        // Valid UTF-8, as it parsed as JSON.
        raw: std::str::from_utf8(body).map_or_else(
            |_| String::from_utf8_lossy(body).into_owned(),
            str::to_owned,
        ),
    })
}

/// Reads `GET /groups/{id}`: the API answers 200 with an empty body when there is no
/// such group.
pub fn parse_group_lookup(body: &[u8]) -> Result<Option<Group>, String> {
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() {
        return Ok(None);
    }
    let value: Value =
        serde_json::from_slice(trimmed).map_err(|e| format!("the body is not JSON ({e})"))?;
    match &value {
        Value::Null => Ok(None),
        Value::Object(o) if o.is_empty() => Ok(None),
        _ => group_from_value(&value, trimmed).map(Some),
    }
}

/// Reads `GET /orders/{id}` and returns its `payment_group_id` (None: no group yet).
pub fn parse_order_group(body: &[u8]) -> Result<Option<String>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON ({e})"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| "the order is not a JSON object".to_owned())?;
    Ok(text(field(obj, "payment_group_id", "paymentGroupId")).filter(|s| !s.is_empty()))
}

/// A readable one-line description of an error response body.
pub fn describe_error(status: u16, body: &[u8]) -> String {
    let prefix = format!("HTTP {status}");
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        let err = value.get("error").unwrap_or(&value);
        let message = match err.get("message") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|i| text(Some(i)).unwrap_or_else(|| i.to_string()))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            Some(other) => Some(other.to_string()),
            None => None,
        };
        let code = text(err.get("code")).or_else(|| text(err.get("type")));
        return match (message, code) {
            (Some(m), Some(c)) => format!("{prefix}: {m} ({c})"),
            (Some(m), None) => format!("{prefix}: {m}"),
            (None, Some(c)) => format!("{prefix}: {c}"),
            (None, None) => prefix,
        };
    }
    let body_text = String::from_utf8_lossy(body);
    let lower = body_text.to_ascii_lowercase();
    if lower.contains("<html") || lower.contains("<!doctype") {
        let title = lower
            .find("<title>")
            .and_then(|start| {
                let rest = &body_text[start + 7..];
                rest.to_ascii_lowercase()
                    .find("</title>")
                    .map(|end| rest[..end].trim().to_owned())
            })
            .filter(|t| !t.is_empty());
        return match title {
            Some(t) => format!("{prefix}: HTML error page \"{}\"", shorten(&t, 120)),
            None => format!("{prefix}: HTML error page"),
        };
    }
    let trimmed = body_text.trim();
    if trimmed.is_empty() {
        prefix
    } else {
        format!("{prefix}: {}", shorten(trimmed, 200))
    }
}

/// Cuts `s` to at most `max` characters, marking the cut.
pub fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((i, _)) => format!("{}…", &s[..i]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_and_camel_groups() {
        let snake = br#"{"id":"pg_0123456789abcd","share_id":"KHT-test-ABCDEFGH","status":"OPEN",
            "expires_at":"2026-12-01T00:00:00.000Z","created_at":null,"reminder_email_sent":"NOT_SENT",
            "brand_new_field":{"x":1}}"#;
        let g = parse_group(snake).unwrap();
        assert_eq!(g.id, "pg_0123456789abcd");
        assert_eq!(g.share_id.as_deref(), Some("KHT-test-ABCDEFGH"));
        assert_eq!(g.created_at, None);
        let camel =
            br#"{"id":"pg_1","shareId":"KHT-X","status":"SOMETHING_NEW","reminderEmailSent":true}"#;
        let g = parse_group(camel).unwrap();
        assert_eq!(g.share_id.as_deref(), Some("KHT-X"));
        assert_eq!(g.status.as_deref(), Some("SOMETHING_NEW"));
        assert!(parse_group(b"{}").unwrap_err().contains("no id"));
        assert!(parse_group(b"{\"id\":").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn lookups_treat_empty_as_absent() {
        assert_eq!(parse_group_lookup(b"").unwrap(), None);
        assert_eq!(parse_group_lookup(b"  \n").unwrap(), None);
        assert_eq!(parse_group_lookup(b"{}").unwrap(), None);
        assert_eq!(
            parse_group_lookup(br#"{"id":"pg_1"}"#).unwrap().unwrap().id,
            "pg_1"
        );
        assert_eq!(
            parse_order_group(br#"{"id":"o","payment_group_id":null}"#).unwrap(),
            None
        );
        assert_eq!(
            parse_order_group(br#"{"paymentGroupId":"pg_2"}"#)
                .unwrap()
                .as_deref(),
            Some("pg_2")
        );
    }

    #[test]
    fn error_bodies_are_readable() {
        let arr = br#"{"error":{"type":"invalid_request_error","message":["customerId should not be empty","expiresAt must be a date"],"code":"parameter_invalid"}}"#;
        assert_eq!(
            describe_error(400, arr),
            "HTTP 400: customerId should not be empty; expiresAt must be a date (parameter_invalid)"
        );
        let s =
            br#"{"error":{"type":"invalid_request_error","message":"Customer cus_9 not found."}}"#;
        assert_eq!(
            describe_error(404, s),
            "HTTP 404: Customer cus_9 not found. (invalid_request_error)"
        );
        let html = b"<!DOCTYPE html><html><head><title>Application Error</title></head></html>";
        assert_eq!(
            describe_error(502, html),
            "HTTP 502: HTML error page \"Application Error\""
        );
        assert_eq!(describe_error(503, b""), "HTTP 503");
        assert_eq!(describe_error(500, b"oops"), "HTTP 500: oops");
    }
}
