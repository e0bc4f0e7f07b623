//! The queue side of the store: moving inbox rows into jobs, and putting failed
//! (or unknown) jobs back to pending for `retry-failed`.

use std::collections::BTreeMap;

use jiff::Timestamp;
use rusqlite::types::Value;
use rusqlite::{Connection, named_params};

use super::clock::now_ms;
use super::import;
use super::types::ImportCounts;
use crate::job::{self, RowFields};
use crate::source::ImportRow;

const CHUNK: i64 = 2000;

/// A producer may store any SQLite type; anything scalar is read as text.
fn text(v: Value) -> Option<String> {
    match v {
        Value::Null | Value::Blob(_) => None,
        Value::Integer(i) => Some(i.to_string()),
        Value::Real(f) => Some(f.to_string()),
        Value::Text(t) => Some(t),
    }
}

/// Moves every inbox row present now into jobs, validating each, then deletes them;
/// all inside the caller's transaction. `line` of such a job is its inbox id.
pub(super) fn move_inbox(
    c: &Connection,
    run_id: i64,
    now: Timestamp,
) -> rusqlite::Result<ImportCounts> {
    let max: Option<i64> = c.query_row("SELECT max(id) FROM inbox", [], |r| r.get(0))?;
    let Some(max) = max else {
        return Ok(ImportCounts::default());
    };
    let mut counts = ImportCounts::default();
    let mut after = 0;
    loop {
        let mut stmt = c.prepare_cached(
            "SELECT id, customer_id, order_id, payment_intent_id, metadata, expires_at FROM inbox \
             WHERE id > :after AND id <= :max ORDER BY id LIMIT :limit",
        )?;
        let rows: Vec<ImportRow> = stmt
            .query_map(
                named_params! {":after": after, ":max": max, ":limit": CHUNK},
                |r| {
                    let id: i64 = r.get(0)?;
                    let fields = RowFields {
                        customer_id: text(r.get(1)?),
                        order_id: text(r.get(2)?),
                        payment_intent_id: text(r.get(3)?),
                        metadata: text(r.get(4)?),
                        expires_at: text(r.get(5)?),
                        ..RowFields::default()
                    };
                    let mut raw = BTreeMap::new();
                    for (name, value) in [
                        ("customerId", &fields.customer_id),
                        ("orderId", &fields.order_id),
                        ("paymentIntentId", &fields.payment_intent_id),
                        ("metadata", &fields.metadata),
                        ("expiresAt", &fields.expires_at),
                    ] {
                        if let Some(v) = value {
                            raw.insert(name.to_owned(), v.clone());
                        }
                    }
                    Ok(ImportRow::new(
                        id as u64,
                        fields.key(),
                        job::validate(&fields, now).map_err(|p| p.join("; ")),
                        raw,
                    ))
                },
            )?
            .collect::<rusqlite::Result<_>>()?;
        let Some(last) = rows.last() else { break };
        after = last.line as i64;
        for row in rows.iter().filter(|r| r.outcome.is_err()) {
            let reason = row.outcome.as_ref().err().map_or("", String::as_str);
            tracing::warn!(run = run_id, source = "inbox", inbox_id = row.line, key = row.key.as_deref().unwrap_or("-"), %reason, "invalid row");
        }
        counts += import::import(c, run_id, "inbox", &rows)?;
    }
    c.execute(
        "DELETE FROM inbox WHERE id <= :max",
        named_params! {":max": max},
    )?;
    Ok(counts)
}

/// Puts `unknown` jobs back to pending (a person decided to re-send them). Returns how
/// many.
pub(super) fn requeue_unknown(c: &Connection, run_id: i64) -> rusqlite::Result<usize> {
    c.execute(
        "UPDATE jobs SET state = 'pending', last_run_id = :run_id, next_attempt_at = NULL \
         WHERE state = 'unknown'",
        named_params! {":run_id": run_id},
    )
}

/// Which failed jobs `retry-failed` puts back.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetryFilter {
    /// Only jobs whose last HTTP status is one of these.
    pub statuses: Vec<u16>,
    /// Only jobs whose last attempt got no HTTP response at all.
    pub transport_only: bool,
    /// Only jobs of these failure classes (`retries_exhausted`, `http_404`, …).
    pub classes: Vec<String>,
    /// Also put back `unknown` jobs (a person's decision: they may duplicate).
    pub include_unknown: bool,
}

/// `:name_0, :name_1, …`: the parameters of an `IN` list of `n` values.
fn list_params(name: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!(":{name}_{i}")).collect()
}

pub(super) fn requeue_failed(
    c: &Connection,
    run_id: i64,
    f: &RetryFilter,
) -> rusqlite::Result<usize> {
    let mut conditions = vec!["state = 'failed'".to_owned()];
    let mut values: Vec<(String, Value)> = Vec::new();
    if !f.statuses.is_empty() {
        let names = list_params("status", f.statuses.len());
        conditions.push(format!("last_status IN ({})", names.join(", ")));
        let statuses = f.statuses.iter().map(|s| Value::Integer(i64::from(*s)));
        values.extend(names.into_iter().zip(statuses));
    }
    if f.transport_only {
        conditions.push("last_status IS NULL AND error_class = 'retries_exhausted'".to_owned());
    }
    if !f.classes.is_empty() {
        let names = list_params("class", f.classes.len());
        conditions.push(format!("error_class IN ({})", names.join(", ")));
        let classes = f.classes.iter().map(|s| Value::Text(s.clone()));
        values.extend(names.into_iter().zip(classes));
    }
    let mut which = format!("({})", conditions.join(" AND "));
    if f.include_unknown {
        which.push_str(" OR state = 'unknown'");
    }
    values.push((":run_id".to_owned(), Value::Integer(run_id)));
    values.push((":now_ms".to_owned(), Value::Integer(now_ms())));
    // A job that ever sent a create may have a group after all: check before re-sending.
    let sql = format!(
        "UPDATE jobs SET state = 'pending', next_attempt_at = NULL, \
         needs_check = (needs_check OR creates > 0), last_run_id = :run_id, \
         updated_ms = :now_ms WHERE {which}"
    );
    let params: Vec<(&str, &dyn rusqlite::ToSql)> = values
        .iter()
        .map(|(name, value)| (name.as_str(), value as &dyn rusqlite::ToSql))
        .collect();
    c.execute(&sql, params.as_slice())
}
