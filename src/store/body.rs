//! A job's request body in its columns: binding it, reading it back, and writing it
//! straight from the columns as the JSON to send.

use crate::job::{BodyText, Payload, SendBody};

/// The request-body columns of `jobs`, in the order [`body_values`] gives them and
/// [`read_body`] reads them.
pub(super) const BODY_COLUMNS: &str =
    "customer_id, order_id, payment_intent_id, expires_at, mid_expire_at, metadata";

/// The parameters [`bind_body`] binds, named as their columns.
const BODY_PARAMS: [&std::ffi::CStr; 6] = [
    c":customer_id",
    c":order_id",
    c":payment_intent_id",
    c":expires_at",
    c":mid_expire_at",
    c":metadata",
];

/// The body's fields in [`BODY_COLUMNS`] order (metadata as JSON text, made by the
/// reader).
pub(super) fn body_values<'a>(
    p: &'a Payload,
    metadata_json: &'a Option<&'a str>,
) -> [&'a dyn rusqlite::ToSql; 6] {
    [
        &p.customer_id,
        &p.order_id,
        &p.payment_intent_id,
        &p.expires_at,
        &p.mid_expire_at,
        metadata_json,
    ]
}

/// Binds the body's fields to the parameters named as their columns (`:customer_id`,
/// …, `:metadata`).
pub(super) fn bind_body(
    stmt: &mut rusqlite::Statement<'_>,
    p: &Payload,
    metadata_json: Option<&str>,
) -> rusqlite::Result<()> {
    for (name, value) in BODY_PARAMS.iter().zip(body_values(p, &metadata_json)) {
        stmt.raw_bind_parameter(*name, value)?;
    }
    Ok(())
}

/// Reads the six body columns starting at column `at`; `None` for an invalid row.
pub(super) fn read_body(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Option<Payload>> {
    let texts = body_texts(r, at)?;
    payload_of(texts).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(at + 5, rusqlite::types::Type::Text, e.into())
    })
}

/// The six body columns starting at column `at`, as text.
fn body_texts<'r>(r: &'r rusqlite::Row<'_>, at: usize) -> rusqlite::Result<[Option<&'r str>; 6]> {
    let text =
        |i: usize| -> rusqlite::Result<Option<&str>> { Ok(r.get_ref(at + i)?.as_str_or_null()?) };
    Ok([text(0)?, text(1)?, text(2)?, text(3)?, text(4)?, text(5)?])
}

/// The six columns' text, in [`BODY_COLUMNS`] order, as a body (`None`: an invalid
/// row, which has none).
fn columns(texts: [Option<&str>; 6]) -> Option<BodyText<'_>> {
    let [
        customer_id,
        order_id,
        payment_intent_id,
        expires_at,
        mid_expire_at,
        metadata,
    ] = texts;
    Some(BodyText {
        customer_id: customer_id?,
        order_id,
        payment_intent_id,
        expires_at,
        mid_expire_at,
        metadata,
    })
}

/// A body from its six columns' text, in [`BODY_COLUMNS`] order (`None`: an invalid
/// row, which has none). Both backends read bodies through this.
pub(super) fn payload_of(texts: [Option<&str>; 6]) -> Result<Option<Payload>, String> {
    let Some(b) = columns(texts) else {
        return Ok(None);
    };
    let metadata = match b.metadata {
        None => None,
        Some(text) => Some(
            serde_json::from_str(text)
                .map_err(|e| format!("the stored metadata is not a JSON object: {e}"))?,
        ),
    };
    Ok(Some(Payload {
        customer_id: b.customer_id.to_owned(),
        order_id: b.order_id.map(str::to_owned),
        payment_intent_id: b.payment_intent_id.map(str::to_owned),
        expires_at: b.expires_at.map(str::to_owned),
        mid_expire_at: b.mid_expire_at.map(str::to_owned),
        metadata,
    }))
}

/// The six body columns starting at column `at` as the JSON text to send, written
/// straight from the columns (no [`Payload`] in between): the same text
/// [`Payload::to_json`] gives. `None` for an invalid row.
pub(super) fn send_body(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Option<SendBody>> {
    let texts = body_texts(r, at)?;
    send_body_of(texts).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(at + 5, rusqlite::types::Type::Text, e.into())
    })
}

/// The JSON to send, from the six body columns' text (see [`send_body`]). Both
/// backends build request bodies through this.
pub(super) fn send_body_of(texts: [Option<&str>; 6]) -> Result<Option<SendBody>, String> {
    let Some(body) = columns(texts) else {
        return Ok(None);
    };
    if let Some(metadata) = body.metadata {
        // Written by kohort-batch from a parsed object; checked all the same, as it is
        // sent as it is.
        serde_json::from_str::<serde::de::IgnoredAny>(metadata)
            .map_err(|e| e.to_string())
            .and_then(|_| match metadata.trim_start().starts_with('{') {
                true => Ok(()),
                false => Err("not a JSON object".to_owned()),
            })
            .map_err(|e| format!("the stored metadata is not a JSON object: {e}"))?;
    }
    let (order_id, payment_intent) = (body.order_id, body.payment_intent_id.is_some());
    Ok(Some(SendBody::new(
        body.to_json(),
        order_id.map(str::to_owned),
        payment_intent,
    )))
}
