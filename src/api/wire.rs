//! Parsing what the API sends: groups and orders in snake_case or camelCase,
//! error envelopes whose `message` is a string or a list, and HTML error pages.
//!
//! Everything here is pure and total: any input gives a value or an error text,
//! never a panic (see the property tests).

use std::borrow::Cow;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
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

/// Reads a group object. Unknown fields and enum values are ignored; the body is kept
/// in `raw` as received.
pub fn parse_group(body: &[u8]) -> Result<Group, String> {
    let fields: GroupFields = serde_json::from_slice(body).map_err(not_a_group)?;
    fields.into_group(body)
}

/// Reads `GET /groups/{id}`: the API answers 200 with an empty body when there is no
/// such group.
pub fn parse_group_lookup(body: &[u8]) -> Result<Option<Group>, String> {
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() {
        return Ok(None);
    }
    let fields: Option<GroupFields> = serde_json::from_slice(trimmed).map_err(not_a_group)?;
    match fields {
        Some(f) if f.keys > 0 => f.into_group(trimmed).map(Some),
        _ => Ok(None),
    }
}

fn not_a_group(e: serde_json::Error) -> String {
    if e.is_data() {
        "the body is not a JSON object".to_owned()
    } else {
        format!("the body is not JSON ({e})")
    }
}

/// A field the API may spell in snake_case or camelCase: the snake_case one wins when
/// both are present, even if it is null (as a lookup in the object would find it first).
#[derive(Default)]
struct Spelled {
    snake: Option<Option<String>>,
    camel: Option<String>,
}

impl Spelled {
    fn value(self) -> Option<String> {
        match self.snake {
            Some(v) => v,
            None => self.camel,
        }
    }
}

/// The fields of a group object that [`Group`] keeps, read straight from the JSON
/// (no intermediate `Value`: a group has some twenty fields, and only these are kept).
#[derive(Default)]
struct GroupFields {
    /// How many keys the object had (an empty object is "no group" for lookups).
    keys: usize,
    id: Option<String>,
    share_id: Spelled,
    status: Option<String>,
    customer_id: Spelled,
    order_id: Spelled,
    expires_at: Spelled,
    created_at: Spelled,
}

impl GroupFields {
    fn into_group(self, body: &[u8]) -> Result<Group, String> {
        let id = self
            .id
            .filter(|s| !s.is_empty())
            .ok_or_else(|| "the group has no id".to_owned())?;
        Ok(Group {
            id,
            share_id: self.share_id.value(),
            status: self.status,
            customer_id: self.customer_id.value(),
            order_id: self.order_id.value(),
            expires_at: self.expires_at.value(),
            created_at: self.created_at.value(),
            // Valid UTF-8, as it parsed as JSON.
            raw: std::str::from_utf8(body).map_or_else(
                |_| String::from_utf8_lossy(body).into_owned(),
                str::to_owned,
            ),
        })
    }
}

impl<'de> Deserialize<'de> for GroupFields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = GroupFields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<GroupFields, A::Error> {
                let mut g = GroupFields::default();
                while let Some(Key(key)) = map.next_key()? {
                    g.keys += 1;
                    // A repeated key replaces the earlier value, as in a JSON object.
                    let (snake, camel) = match &*key {
                        "id" => {
                            g.id = map.next_value::<Scalar>()?.0;
                            continue;
                        }
                        "status" => {
                            g.status = map.next_value::<Scalar>()?.0;
                            continue;
                        }
                        "share_id" => (Some(&mut g.share_id), None),
                        "shareId" => (None, Some(&mut g.share_id)),
                        "customer_id" => (Some(&mut g.customer_id), None),
                        "customerId" => (None, Some(&mut g.customer_id)),
                        "order_id" => (Some(&mut g.order_id), None),
                        "orderId" => (None, Some(&mut g.order_id)),
                        "expires_at" => (Some(&mut g.expires_at), None),
                        "expiresAt" => (None, Some(&mut g.expires_at)),
                        "created_at" => (Some(&mut g.created_at), None),
                        "createdAt" => (None, Some(&mut g.created_at)),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    let value = map.next_value::<Scalar>()?.0;
                    if let Some(field) = snake {
                        field.snake = Some(value);
                    } else if let Some(field) = camel {
                        field.camel = value;
                    }
                }
                Ok(g)
            }
        }
        d.deserialize_map(Object)
    }
}

/// An object key, borrowed from the body unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// A scalar as text (strings as they are, numbers and booleans printed); `None` for
/// null, arrays and objects.
struct Scalar(Option<String>);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(Some(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar(Some(v)))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(Some(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(Some(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(Some(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                // Printed as serde_json prints numbers.
                Ok(Scalar(
                    serde_json::Number::from_f64(v).map(|n| n.to_string()),
                ))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar(None))
            }
        }
        d.deserialize_any(ScalarVisitor)
    }
}

/// An order's group as its `payment_group_id` says: `Ok(None)` when the field is
/// there and null or empty (no group yet); an error when the field is missing or not
/// text, which says nothing (and must never read as "no group": that would create a
/// second one).
fn order_group_of(obj: &Map<String, Value>) -> Result<Option<String>, String> {
    let present = obj
        .get("payment_group_id")
        .or_else(|| obj.get("paymentGroupId"));
    match present {
        None => Err("the order has no payment_group_id field".to_owned()),
        Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone()).filter(|s| !s.is_empty())),
        Some(other) => Err(format!(
            "the order's payment_group_id is not text ({other})"
        )),
    }
}

/// Reads `GET /orders/{id}` and returns its `payment_group_id` (None: no group yet).
pub fn parse_order_group(body: &[u8]) -> Result<Option<String>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON ({e})"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| "the order is not a JSON object".to_owned())?;
    order_group_of(obj)
}

/// One order of a `GET /orders?search=` list: its id and its group id, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListedOrder {
    pub id: String,
    /// Its group (`Ok(None)`: none yet), or why the entry does not say.
    pub group_id: Result<Option<String>, String>,
}

/// Reads `{"data": [order, …], "count": N}`. Orders without an id are skipped; an
/// order's group id is read as [`parse_order_group`] reads it.
pub(crate) fn parse_order_list(body: &[u8]) -> Result<Vec<ListedOrder>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON ({e})"))?;
    let data = value
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| "the body is not an order list (no \"data\" array)".to_owned())?;
    Ok(data
        .iter()
        .filter_map(Value::as_object)
        .filter_map(|obj| {
            let id = text(field(obj, "id", "id"))?;
            let group_id = order_group_of(obj);
            Some(ListedOrder { id, group_id })
        })
        .collect())
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
pub(crate) fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((i, _)) => format!("{}…", &s[..i]),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

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

    /// The reading of a group through `serde_json::Value`, as it was before the
    /// fields were read straight from the JSON: the two must agree on any input.
    fn through_value(body: &[u8]) -> Result<Group, String> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| format!("the body is not JSON ({e})"))?;
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
            raw: String::from_utf8_lossy(body).into_owned(),
        })
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-zA-Z0-9_ \\\"\u{e9}]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                proptest::collection::vec(("[a-z]{1,3}", inner), 0..3)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// JSON text of an object made of the group's keys in both spellings and others,
    /// written out by hand so keys may repeat and carry escapes.
    fn arb_object() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("id"),
            Just("status"),
            Just("share_id"),
            Just("shareId"),
            Just("customer_id"),
            Just("customerId"),
            Just("order_id"),
            Just("orderId"),
            Just("expires_at"),
            Just("expiresAt"),
            Just("created_at"),
            Just("createdAt"),
            Just("i\\u0064"),
            Just("other"),
        ];
        let value = prop_oneof![
            3 => Just(Value::Null),
            3 => "[a-z0-9]{0,4}".prop_map(Value::String),
            2 => arb_value(),
        ];
        let entries = proptest::collection::vec((key, value), 0..12);
        (any::<bool>(), entries).prop_map(|(with_id, entries)| {
            let mut body: Vec<String> = Vec::new();
            if with_id {
                body.push("\"id\":\"pg_1\"".to_owned());
            }
            body.extend(entries.iter().map(|(k, v)| format!("\"{k}\":{v}")));
            format!("{{{}}}", body.join(","))
        })
    }

    proptest::proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn groups_read_as_through_a_json_value(body in arb_object()) {
            proptest::prop_assert_eq!(parse_group(body.as_bytes()), through_value(body.as_bytes()));
        }

        #[test]
        fn any_json_reads_as_through_a_json_value(v in arb_value()) {
            let body = v.to_string();
            proptest::prop_assert_eq!(parse_group(body.as_bytes()), through_value(body.as_bytes()));
        }
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
    fn order_lists_give_ids_and_groups_and_skip_what_is_not_an_order() {
        let list = parse_order_list(
            br#"{"data":[{"id":"o1","payment_group_id":"pg_1"},{"id":"o2","payment_group_id":null},
                {"paymentGroupId":"pg_x"},7,{"id":"o3","paymentGroupId":""},{"id":"o4"},
                {"id":"o5","payment_group_id":{"id":"pg_5"}}],"count":6}"#,
        )
        .unwrap();
        let got: Vec<(&str, Result<Option<&str>, ()>)> = list
            .iter()
            .map(|o| {
                (
                    o.id.as_str(),
                    o.group_id.as_ref().map(Option::as_deref).map_err(drop),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("o1", Ok(Some("pg_1"))),
                ("o2", Ok(None)),
                ("o3", Ok(None)),
                // No field, or not text: unknown, never "no group".
                ("o4", Err(())),
                ("o5", Err(())),
            ]
        );
        assert!(parse_order_list(br#"{"items":[]}"#).is_err());
        assert!(parse_order_list(b"<html>").is_err());
        assert!(parse_order_group(br#"{"id":"o"}"#).is_err());
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
