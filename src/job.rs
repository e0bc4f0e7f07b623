//! What one row asks for: the `POST /groups` request body, its key, and the rules
//! a row must pass before it may be sent.
//!
//! Validation is pure (the clock is passed in) so it is shared, unchanged, by
//! `run`, `enqueue`, `validate` and the inbox queue.

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Earliest accepted `expiresAt`, from now. The server's floor is 1 minute; the margin
/// covers the time between import and send.
pub(crate) const MIN_EXPIRY: SignedDuration = SignedDuration::from_mins(2);
/// Latest accepted `expiresAt`, from now (the server's ceiling is 90 days, fixed at its start).
pub(crate) const MAX_EXPIRY: SignedDuration = SignedDuration::from_hours(89 * 24);

/// A field of the request body, as an input column: the one table of columns the
/// CSV reader, the inbox reader, `export failures` and the README follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    CustomerId,
    OrderId,
    PaymentIntentId,
    ExpiresAt,
    MidExpireAt,
    /// A JSON object (or `metadata.KEY` columns, one per key).
    Metadata,
}

impl Field {
    /// Every field, in the order of the request body.
    pub(crate) const ALL: [Field; 6] = [
        Field::CustomerId,
        Field::OrderId,
        Field::PaymentIntentId,
        Field::ExpiresAt,
        Field::MidExpireAt,
        Field::Metadata,
    ];

    /// The name in CSV headers, `export failures` and the request body (camelCase).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Field::CustomerId => "customerId",
            Field::OrderId => "orderId",
            Field::PaymentIntentId => "paymentIntentId",
            Field::ExpiresAt => "expiresAt",
            Field::MidExpireAt => "midExpireAt",
            Field::Metadata => "metadata",
        }
    }

    /// The column of `jobs` (and of `inbox`, where it has one) that holds it.
    pub(crate) fn column(self) -> &'static str {
        match self {
            Field::CustomerId => "customer_id",
            Field::OrderId => "order_id",
            Field::PaymentIntentId => "payment_intent_id",
            Field::ExpiresAt => "expires_at",
            Field::MidExpireAt => "mid_expire_at",
            Field::Metadata => "metadata",
        }
    }

    /// Whether producers can give it in the `inbox` table.
    pub(crate) fn in_inbox(self) -> bool {
        self != Field::MidExpireAt
    }

    /// The field a header names, with case, spaces, `-` and `_` ignored
    /// (`customer_id`, `Customer ID` and `customerId` are one column).
    pub(crate) fn for_header(header: &str) -> Option<Field> {
        let folded = |s: &str| -> String {
            s.chars()
                .filter(|c| !matches!(c, '_' | '-' | ' '))
                .flat_map(char::to_lowercase)
                .collect()
        };
        let header = folded(header.trim());
        Field::ALL.into_iter().find(|f| folded(f.name()) == header)
    }
}

/// The request body of `POST /groups`, in the camelCase the API documents.
///
/// Serialized with sorted metadata keys and fixed timestamp formatting, so equal
/// payloads give byte-equal JSON: that is how a re-imported row is told apart
/// from a conflicting one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Payload {
    pub customer_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_intent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid_expire_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
}

impl Payload {
    /// The job key: the order id, else the payment intent id.
    pub(crate) fn key(&self) -> &str {
        key_of(self.order_id.as_deref(), self.payment_intent_id.as_deref()).unwrap_or_default()
    }

    /// A text field's value (`None` for the metadata, which is not text).
    fn text(&self, field: Field) -> Option<&str> {
        match field {
            Field::CustomerId => Some(&self.customer_id),
            Field::OrderId => self.order_id.as_deref(),
            Field::PaymentIntentId => self.payment_intent_id.as_deref(),
            Field::ExpiresAt => self.expires_at.as_deref(),
            Field::MidExpireAt => self.mid_expire_at.as_deref(),
            Field::Metadata => None,
        }
    }

    /// The row this body came from, as input columns (canonical names) and cells:
    /// metadata of string values as `metadata.KEY` columns (how a CSV gives it),
    /// any other metadata as the JSON `metadata` column.
    pub(crate) fn input_cells(&self) -> std::collections::BTreeMap<String, String> {
        let mut cells = std::collections::BTreeMap::new();
        for field in Field::ALL {
            if let Some(v) = self.text(field) {
                cells.insert(field.name().to_owned(), v.to_owned());
            }
        }
        match &self.metadata {
            Some(m) if m.values().all(Value::is_string) => {
                for (k, v) in m {
                    cells.insert(
                        format!("metadata.{k}"),
                        v.as_str().unwrap_or_default().to_owned(),
                    );
                }
            }
            Some(m) => {
                cells.insert(
                    "metadata".to_owned(),
                    serde_json::to_string(m).unwrap_or_default(),
                );
            }
            None => {}
        }
        cells
    }

    /// The canonical JSON text stored and compared (see [`BodyText::to_json`]).
    pub(crate) fn to_json(&self) -> String {
        let metadata = self
            .metadata
            .as_ref()
            .map(|m| serde_json::to_string(m).unwrap_or_default());
        let body = BodyText {
            customer_id: &self.customer_id,
            order_id: self.order_id.as_deref(),
            payment_intent_id: self.payment_intent_id.as_deref(),
            expires_at: self.expires_at.as_deref(),
            mid_expire_at: self.mid_expire_at.as_deref(),
            metadata: metadata.as_deref(),
        };
        String::from_utf8(body.to_json()).unwrap_or_default()
    }
}

/// A request body's fields as text, borrowed from a [`Payload`] or from the
/// database's columns: the one writer of the JSON that is sent, stored and compared.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyText<'a> {
    pub customer_id: &'a str,
    pub order_id: Option<&'a str>,
    pub payment_intent_id: Option<&'a str>,
    pub expires_at: Option<&'a str>,
    pub mid_expire_at: Option<&'a str>,
    /// The metadata object, as JSON text (written as it is).
    pub metadata: Option<&'a str>,
}

impl<'a> BodyText<'a> {
    /// `{"customerId":…,…}`: the fields in [`Field::ALL`] order under their names,
    /// absent ones left out, strings escaped as JSON, the metadata as given.
    pub(crate) fn to_json(self) -> Vec<u8> {
        let mut json = Vec::with_capacity(160);
        json.push(b'{');
        for field in Field::ALL {
            let Some(value) = self.get(field) else {
                continue;
            };
            if json.len() > 1 {
                json.push(b',');
            }
            json.push(b'"');
            json.extend_from_slice(field.name().as_bytes());
            json.extend_from_slice(b"\":");
            if field == Field::Metadata {
                json.extend_from_slice(value.as_bytes());
            } else {
                // Writing a string into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut json, value);
            }
        }
        json.push(b'}');
        json
    }

    fn get(self, field: Field) -> Option<&'a str> {
        match field {
            Field::CustomerId => Some(self.customer_id),
            Field::OrderId => self.order_id,
            Field::PaymentIntentId => self.payment_intent_id,
            Field::ExpiresAt => self.expires_at,
            Field::MidExpireAt => self.mid_expire_at,
            Field::Metadata => self.metadata,
        }
    }
}

/// A request body ready to send: the JSON text of a [`Payload`], and the ids the
/// engine decides by. Cheap to clone for each attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendBody {
    json: bytes::Bytes,
    order_id: Option<String>,
    payment_intent: bool,
}

impl SendBody {
    /// `json` must be what `Payload::to_json` gives for a payload with this
    /// `orderId` and (if `payment_intent`) a `paymentIntentId`.
    pub fn new(
        json: impl Into<bytes::Bytes>,
        order_id: Option<String>,
        payment_intent: bool,
    ) -> Self {
        SendBody {
            json: json.into(),
            order_id,
            payment_intent,
        }
    }

    /// The JSON text to send.
    pub(crate) fn json(&self) -> bytes::Bytes {
        self.json.clone()
    }

    /// Whether `GET /orders/{orderId}` can tell if this row's group exists: a row
    /// that also carries a `paymentIntentId` is linked to the payment intent, not the
    /// order, so the order check would not see its group.
    pub(crate) fn checkable_order(&self) -> Option<&str> {
        match (&self.order_id, self.payment_intent) {
            (Some(order), false) => Some(order),
            _ => None,
        }
    }
}

impl From<&Payload> for SendBody {
    fn from(p: &Payload) -> Self {
        SendBody::new(
            p.to_json(),
            p.order_id.clone(),
            p.payment_intent_id.is_some(),
        )
    }
}

/// A group as the API returned it, with the fields a merchant needs picked out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group {
    /// `pg_…`
    pub id: String,
    /// `KHT-…`: what a merchant hands to the customer.
    pub share_id: Option<String>,
    pub status: Option<String>,
    pub customer_id: Option<String>,
    pub order_id: Option<String>,
    pub expires_at: Option<String>,
    pub created_at: Option<String>,
    /// The JSON object exactly as the API sent it.
    pub raw: String,
}

/// The cells of one input row, already picked out by column.
#[derive(Debug, Default, Clone)]
pub struct RowFields {
    pub customer_id: Option<String>,
    pub order_id: Option<String>,
    pub payment_intent_id: Option<String>,
    pub expires_at: Option<String>,
    pub mid_expire_at: Option<String>,
    /// The `metadata` column: JSON text that must be an object.
    pub metadata: Option<String>,
    /// `metadata.KEY` columns, in column order.
    pub metadata_columns: Vec<(String, String)>,
}

impl RowFields {
    /// The key this row would have, even if it is invalid (for reporting).
    pub(crate) fn key(&self) -> Option<String> {
        let (order, intent) = (clean(&self.order_id), clean(&self.payment_intent_id));
        key_of(order.as_deref(), intent.as_deref()).map(str::to_owned)
    }

    /// Where a field's cell goes.
    pub(crate) fn slot(&mut self, field: Field) -> &mut Option<String> {
        match field {
            Field::CustomerId => &mut self.customer_id,
            Field::OrderId => &mut self.order_id,
            Field::PaymentIntentId => &mut self.payment_intent_id,
            Field::ExpiresAt => &mut self.expires_at,
            Field::MidExpireAt => &mut self.mid_expire_at,
            Field::Metadata => &mut self.metadata,
        }
    }

    /// The cells given, by input column name (`metadata.KEY` columns included).
    pub(crate) fn cells(&self) -> std::collections::BTreeMap<String, String> {
        let mut me = self.clone();
        let mut cells: std::collections::BTreeMap<String, String> = Field::ALL
            .into_iter()
            .filter_map(|f| me.slot(f).take().map(|v| (f.name().to_owned(), v)))
            .collect();
        for (k, v) in &self.metadata_columns {
            cells.insert(format!("metadata.{k}"), v.clone());
        }
        cells
    }
}

/// The one rule for a job's key: the order id, else the payment intent id (the
/// `jobs.key` column is the same rule in SQL: `coalesce(order_id, payment_intent_id)`).
pub(crate) fn key_of<'a>(
    order_id: Option<&'a str>,
    payment_intent_id: Option<&'a str>,
) -> Option<&'a str> {
    order_id.or(payment_intent_id)
}

fn clean(cell: &Option<String>) -> Option<String> {
    cell.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn parse_ts(field: &str, text: &str) -> Result<Timestamp, String> {
    text.parse::<Timestamp>().map_err(|_| {
        format!(
            "{field} {text:?} is not an RFC 3339 timestamp with a time zone \
             (write it like 2026-12-24T18:00:00Z)"
        )
    })
}

/// Checks a row against the rules the server enforces (plus safety margins) and
/// builds its request body. Every problem is listed, so one pass fixes the row.
pub(crate) fn validate(row: &RowFields, now: Timestamp) -> Result<Payload, Vec<String>> {
    let customer_id = clean(&row.customer_id);
    let order_id = clean(&row.order_id);
    let payment_intent_id = clean(&row.payment_intent_id);
    let mut problems = id_problems(&customer_id, &order_id, &payment_intent_id);
    let oversized = oversized_fields(row);
    if !oversized.is_empty() {
        // Nothing more is parsed out of a field that large.
        problems.extend(oversized);
        return Err(problems);
    }
    let expires_at = expiry(clean(&row.expires_at), now, &mut problems);
    let mid_expire_at = mid_expiry(clean(&row.mid_expire_at), expires_at, &mut problems);
    let metadata = metadata(row, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Payload {
        customer_id: customer_id.unwrap_or_default(),
        order_id,
        payment_intent_id,
        expires_at: expires_at.map(crate::text::api_time),
        mid_expire_at: mid_expire_at.map(crate::text::api_time),
        metadata,
    })
}

/// What is wrong with the ids (already trimmed): missing, reformatted by Excel, or
/// holding a control character.
fn id_problems(
    customer_id: &Option<String>,
    order_id: &Option<String>,
    payment_intent_id: &Option<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if customer_id.is_none() {
        problems.push("customerId is empty: every row needs the KohortPay customer id".to_owned());
    }
    if order_id.is_none() && payment_intent_id.is_none() {
        problems.push("orderId and paymentIntentId are both empty: give at least one".to_owned());
    }
    for (field, value) in [
        ("customerId", customer_id),
        ("orderId", order_id),
        ("paymentIntentId", payment_intent_id),
    ] {
        if let Some(v) = value.as_deref().filter(|v| excel_number(v)) {
            problems.push(format!(
                "{field} {v} looks like a number Excel reformatted (an id turned into \
                 scientific notation): format the column as text and export it again"
            ));
        }
        if let Some(c) = value
            .as_deref()
            .and_then(|v| v.chars().find(|c| c.is_control()))
        {
            problems.push(format!(
                "{field} contains a control character ({}): ids are one line of text; \
                 in a CSV file, check for an unclosed quote",
                control_name(c)
            ));
        }
        // `.` and `..` would name another path in a URL (`GET /orders/..`).
        if let Some(v) = value.as_deref().filter(|v| v.bytes().all(|b| b == b'.')) {
            problems.push(format!(
                "{field} {v:?} is only dots: no KohortPay id looks like that, and it cannot \
                 be asked about in a URL; fix the id"
            ));
        }
    }
    problems
}

/// One problem per field (as written, `metadata.KEY` columns included) over
/// [`MAX_FIELD_BYTES`].
fn oversized_fields(row: &RowFields) -> Vec<String> {
    let mut row = row.clone();
    let fields = Field::ALL.map(|f| (f.name().to_owned(), row.slot(f).take()));
    let metadata_columns = row
        .metadata_columns
        .iter()
        .map(|(k, v)| (format!("metadata.{k}"), v.len()));
    fields
        .into_iter()
        .filter_map(|(f, v)| v.map(|v| (f, v.len())))
        .chain(metadata_columns)
        .filter(|(_, len)| *len > MAX_FIELD_BYTES)
        .map(|(field, len)| {
            format!(
                "{field} is {}, over the limit of {} for one field: shorten it (this row \
                 was not sent)",
                size_text(len),
                size_text(MAX_FIELD_BYTES)
            )
        })
        .collect()
}

/// `expiresAt`, parsed and checked against the window the API accepts from `now`.
/// A timestamp outside the window is still returned, so `midExpireAt` is checked
/// against it too.
fn expiry(text: Option<String>, now: Timestamp, problems: &mut Vec<String>) -> Option<Timestamp> {
    let text = text?;
    let ts = match parse_ts("expiresAt", &text) {
        Ok(ts) => ts,
        Err(e) => {
            problems.push(e);
            return None;
        }
    };
    let (lo, hi) = (now + MIN_EXPIRY, now + MAX_EXPIRY);
    if ts < lo || ts > hi {
        problems.push(format!(
            "expiresAt {text} is outside the allowed window: it must lie between \
             2 minutes and 89 days from now ({} … {})",
            crate::text::api_time(lo),
            crate::text::api_time(hi)
        ));
    }
    Some(ts)
}

/// `midExpireAt`, parsed and checked to come before `expires_at`.
fn mid_expiry(
    text: Option<String>,
    expires_at: Option<Timestamp>,
    problems: &mut Vec<String>,
) -> Option<Timestamp> {
    let text = text?;
    let mid = match parse_ts("midExpireAt", &text) {
        Ok(mid) => mid,
        Err(e) => {
            problems.push(e);
            return None;
        }
    };
    if let Some(end) = expires_at
        && mid >= end
    {
        problems.push(format!(
            "midExpireAt {text} is not before expiresAt {}",
            crate::text::api_time(end)
        ));
    }
    Some(mid)
}

/// The metadata object: the `metadata` column's JSON, with the non-empty
/// `metadata.KEY` columns added (a column wins over the same key in the JSON);
/// checked against [`MAX_FIELD_BYTES`] as a whole.
fn metadata(row: &RowFields, problems: &mut Vec<String>) -> Option<Map<String, Value>> {
    let mut metadata = match clean(&row.metadata) {
        None => None,
        Some(text) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => Some(map),
            Ok(other) => {
                problems.push(format!(
                    "metadata must be a JSON object like {{\"campaign\":\"spring\"}}, not {}",
                    json_kind(&other)
                ));
                None
            }
            Err(e) => {
                problems.push(format!("metadata is not valid JSON ({e})"));
                None
            }
        },
    };
    for (key, value) in &row.metadata_columns {
        if value.is_empty() {
            continue;
        }
        metadata
            .get_or_insert_with(Map::new)
            .insert(key.clone(), Value::String(value.clone()));
    }
    if let Some(m) = &metadata {
        let len = serde_json::to_string(m).map_or(0, |t| t.len());
        if len > MAX_FIELD_BYTES {
            problems.push(format!(
                "metadata is {} as JSON, over the limit of {}: shorten it (this row was not \
                 sent)",
                size_text(len),
                size_text(MAX_FIELD_BYTES)
            ));
        }
    }
    metadata
}

/// The largest field (or metadata as JSON) a row may carry: far above any real id,
/// date or metadata, far below what would make the API refuse the request after
/// retries and settle waits.
pub(crate) const MAX_FIELD_BYTES: usize = 64 * 1024;

/// A size for a message: `812 bytes`, `64 KiB`, `20.0 MiB`.
fn size_text(n: usize) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1 << 20)),
        n if n >= 1 << 10 && n % 1024 == 0 => format!("{} KiB", n >> 10),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} bytes"),
    }
}

/// Whether an id looks like what Excel makes of a long number: `1.23457E+11`.
fn excel_number(s: &str) -> bool {
    let Some((mantissa, exponent)) = s.split_once(['E', 'e']) else {
        return false;
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        None => mantissa.len() == 1 && digits(mantissa),
        Some((int, frac)) => int.len() == 1 && digits(int) && digits(frac),
    };
    mantissa_ok && exponent.strip_prefix('+').is_some_and(digits)
}

/// How a message names a control character.
fn control_name(c: char) -> String {
    match c {
        '\n' => "a line break".to_owned(),
        '\r' => "a carriage return".to_owned(),
        '\t' => "a tab".to_owned(),
        other => format!("U+{:04X}", u32::from(other)),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_only_dots_are_refused() {
        for id in [".", "..", "..."] {
            let row = RowFields {
                customer_id: Some("cus_1".into()),
                order_id: Some(id.into()),
                ..RowFields::default()
            };
            let problems = validate(&row, Timestamp::now()).unwrap_err();
            assert!(
                problems.iter().any(|p| p.contains("only dots")),
                "{problems:?}"
            );
        }
    }

    /// The one table of input columns: every spelling a header may use finds its
    /// field, and the README names each field and its inbox column.
    #[test]
    fn one_table_of_columns_serves_headers_the_inbox_and_the_readme() {
        let readme = include_str!("../README.md");
        for f in Field::ALL {
            for header in [
                f.name(),
                f.column(),
                &f.name().to_uppercase(),
                &format!(" {} ", f.column()),
            ] {
                assert_eq!(Field::for_header(header), Some(f), "{header:?}");
            }
            assert!(
                readme.contains(&format!("`{}`", f.name())),
                "README lacks {}",
                f.name()
            );
            if f.in_inbox() {
                assert!(
                    readme.contains(&format!("`{}`", f.column())),
                    "README lacks {}",
                    f.column()
                );
            }
        }
        assert_eq!(Field::for_header("metadata.campaign"), None);
        assert_eq!(Field::for_header("order"), None);
        assert_eq!(key_of(Some("o"), Some("p")), Some("o"));
        assert_eq!(key_of(None, Some("p")), Some("p"));
    }

    fn now() -> Timestamp {
        "2026-11-24T12:00:00Z".parse().unwrap()
    }

    fn row(customer: &str, order: &str) -> RowFields {
        RowFields {
            customer_id: Some(customer.into()),
            order_id: Some(order.into()),
            ..RowFields::default()
        }
    }

    #[test]
    fn minimal_row_is_valid_and_serializes_camel_case() {
        let p = validate(&row(" cus_1 ", "ord_1"), now()).unwrap();
        assert_eq!(p.to_json(), r#"{"customerId":"cus_1","orderId":"ord_1"}"#);
        assert_eq!(p.key(), "ord_1");
        assert_eq!(SendBody::from(&p).checkable_order(), Some("ord_1"));
    }

    #[test]
    fn payment_intent_rows_are_not_checkable() {
        let mut r = row("cus_1", "ord_1");
        r.payment_intent_id = Some("pi_1".into());
        let p = validate(&r, now()).unwrap();
        assert_eq!(p.key(), "ord_1");
        assert_eq!(SendBody::from(&p).checkable_order(), None);
        r.order_id = None;
        assert_eq!(validate(&r, now()).unwrap().key(), "pi_1");
    }

    #[test]
    fn timestamps_are_normalized_to_utc_millis() {
        let mut r = row("cus_1", "ord_1");
        r.expires_at = Some("2026-12-01T10:00:00+01:00".into());
        r.mid_expire_at = Some("2026-11-28T00:00:00Z".into());
        let p = validate(&r, now()).unwrap();
        assert_eq!(p.expires_at.as_deref(), Some("2026-12-01T09:00:00.000Z"));
        assert_eq!(p.mid_expire_at.as_deref(), Some("2026-11-28T00:00:00.000Z"));
    }

    #[test]
    fn metadata_columns_merge_into_object() {
        let mut r = row("cus_1", "ord_1");
        r.metadata = Some(r#"{"b":1}"#.into());
        r.metadata_columns = vec![("a".into(), "x".into()), ("empty".into(), String::new())];
        let p = validate(&r, now()).unwrap();
        assert_eq!(
            p.to_json(),
            r#"{"customerId":"cus_1","orderId":"ord_1","metadata":{"a":"x","b":1}}"#
        );
    }

    #[test]
    fn every_problem_is_listed() {
        let r = RowFields {
            customer_id: Some("  ".into()),
            expires_at: Some("2020-01-01T00:00:00Z".into()),
            mid_expire_at: Some("tomorrow".into()),
            metadata: Some("[1,2]".into()),
            ..RowFields::default()
        };
        let problems = validate(&r, now()).unwrap_err();
        assert_eq!(problems.len(), 5, "{problems:#?}");
        assert!(problems[0].contains("customerId is empty"));
        assert!(problems[1].contains("orderId and paymentIntentId"));
        assert!(problems[2].contains("outside the allowed window"));
        assert!(problems[3].contains("not an RFC 3339"));
        assert!(problems[4].contains("not an array"));
    }

    #[test]
    fn expiry_window_edges() {
        let mut r = row("cus_1", "ord_1");
        for (offset, ok) in [
            (60, false),
            (120, true),
            (89 * 86_400, true),
            (89 * 86_400 + 1, false),
        ] {
            r.expires_at = Some(crate::text::api_time(
                now() + SignedDuration::from_secs(offset),
            ));
            assert_eq!(validate(&r, now()).is_ok(), ok, "offset {offset}s");
        }
    }

    #[test]
    fn mid_expire_must_precede_expiry() {
        let mut r = row("cus_1", "ord_1");
        r.expires_at = Some("2026-12-01T00:00:00Z".into());
        r.mid_expire_at = Some("2026-12-01T00:00:00Z".into());
        let problems = validate(&r, now()).unwrap_err();
        assert!(problems[0].contains("not before expiresAt"), "{problems:?}");
    }

    #[test]
    fn ids_with_control_characters_are_invalid() {
        for (customer, order, field, named) in [
            ("cus_2", "\"ord_2\ncus_3,ord_3", "orderId", "a line break"),
            ("cus_\u{1b}[31m", "ord_1", "customerId", "U+001B"),
            ("cus_1", "ord\t1", "orderId", "a tab"),
        ] {
            let problems = validate(&row(customer, order), now()).unwrap_err();
            assert!(
                problems[0].starts_with(field) && problems[0].contains(named),
                "{problems:?}"
            );
        }
        let mut r = row("cus_1", "ord_1");
        r.payment_intent_id = Some("pi\r1".into());
        assert!(validate(&r, now()).unwrap_err()[0].contains("paymentIntentId"));
    }

    #[test]
    fn spreadsheet_numbers_and_huge_fields_are_invalid() {
        for (id, bad) in [
            ("1.23457E+11", true),
            ("1E+5", true),
            ("4.5e+10", true),
            ("ord_1.2E+3", false),
            ("12E+3", false),
            ("1.2E-3", false),
            ("1.E+3", false),
            ("123", false),
        ] {
            assert_eq!(excel_number(id), bad, "{id}");
        }
        let problems = validate(&row("cus_1", "1.23457E+11"), now()).unwrap_err();
        assert!(
            problems[0].contains("looks like a number Excel reformatted"),
            "{problems:?}"
        );
        let mut r = row("cus_1", "ord_1");
        r.metadata_columns = vec![("note".into(), "x".repeat(20 << 20))];
        let problems = validate(&r, now()).unwrap_err();
        assert!(
            problems[0].contains("note is 20.0 MiB, over the limit of 64 KiB"),
            "{problems:?}"
        );
        // Many small metadata columns that add up to more than the limit.
        let mut r = row("cus_1", "ord_1");
        r.metadata_columns = (0..20)
            .map(|i| (format!("k{i}"), "y".repeat(4_000)))
            .collect();
        let problems = validate(&r, now()).unwrap_err();
        assert!(
            problems[0].starts_with("metadata is 78.3 KiB as JSON"),
            "{problems:?}"
        );
        // Just under the limit is fine.
        let mut r = row("cus_1", "ord_1");
        r.metadata_columns = vec![("note".into(), "z".repeat(60_000))];
        assert!(validate(&r, now()).is_ok());
    }

    #[test]
    fn invalid_metadata_json_is_explained() {
        let mut r = row("cus_1", "ord_1");
        r.metadata = Some("{oops".into());
        let problems = validate(&r, now()).unwrap_err();
        assert!(
            problems[0].starts_with("metadata is not valid JSON"),
            "{problems:?}"
        );
    }
}
