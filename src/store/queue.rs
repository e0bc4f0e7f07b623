//! The queue side of the store: moving inbox rows into jobs, and putting failed
//! (or unknown) jobs back to pending for `retry-failed`.

use rusqlite::types::Value;
use rusqlite::{Connection, named_params};

use super::clock::now_ms;
use super::import;
use super::types::{FailureClass, ImportCounts};
use crate::job::{Field, RowFields};
use crate::source::ImportRow;

/// A producer may store any SQLite type; anything scalar is read as text.
fn text(v: Value) -> Option<String> {
    match v {
        Value::Null | Value::Blob(_) => None,
        Value::Integer(i) => Some(i.to_string()),
        Value::Real(f) => Some(f.to_string()),
        Value::Text(t) => Some(t),
    }
}

/// The id of the last inbox row present now (`None`: the inbox is empty). A run
/// moves the rows up to it; rows written later wait for the next run.
pub(super) fn inbox_last(c: &Connection) -> rusqlite::Result<Option<i64>> {
    c.query_row("SELECT max(id) FROM inbox", [], |r| r.get(0))
}

/// Up to `limit` inbox rows after `after` and up to `last`, in id order, as their
/// fields (columns from the one table, [`Field`]).
pub(super) fn inbox_page(
    c: &Connection,
    after: i64,
    last: i64,
    limit: usize,
) -> rusqlite::Result<Vec<(i64, RowFields)>> {
    let fields: Vec<Field> = Field::ALL.into_iter().filter(|f| f.in_inbox()).collect();
    let columns: Vec<&str> = fields.iter().map(|f| f.column()).collect();
    let sql = format!(
        "SELECT id, {} FROM inbox WHERE id > :after AND id <= :last ORDER BY id LIMIT :limit",
        columns.join(", ")
    );
    let mut stmt = c.prepare_cached(&sql)?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    stmt.query_map(
        named_params! {":after": after, ":last": last, ":limit": limit},
        |r| {
            let mut row = RowFields::default();
            for (i, field) in fields.iter().enumerate() {
                *row.slot(*field) = text(r.get(i + 1)?);
            }
            Ok((r.get(0)?, row))
        },
    )?
    .collect()
}

/// Imports inbox rows (validated by the caller, as CSV rows are) and deletes every
/// inbox row up to `through`, in the caller's transaction: a row is moved once.
pub(super) fn import_inbox(
    c: &Connection,
    run_id: i64,
    rows: &[ImportRow],
    through: i64,
) -> rusqlite::Result<ImportCounts> {
    let counts = import::import(c, run_id, "inbox", rows)?;
    c.execute(
        "DELETE FROM inbox WHERE id <= :through",
        named_params! {":through": through},
    )?;
    Ok(counts)
}

/// Puts `unknown` jobs back to pending (a person decided to re-send them). Returns how
/// many.
pub(super) fn requeue_unknown(c: &Connection, run_id: i64) -> rusqlite::Result<usize> {
    c.execute(REQUEUE_UNKNOWN, [run_id])
}

/// `unknown` jobs back to pending, for run `?1` (both backends).
pub(super) const REQUEUE_UNKNOWN: &str = "UPDATE jobs SET state = 'pending', \
     last_run_id = ?1, next_attempt_at = NULL WHERE state = 'unknown'";

/// Which failed jobs `retry-failed` puts back.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetryFilter {
    /// Only jobs whose last HTTP status is one of these.
    pub statuses: Vec<u16>,
    /// Only jobs whose last attempt got no HTTP response at all.
    pub transport_only: bool,
    /// Only jobs of these failure classes (`retries_exhausted`, `http_404`, …).
    pub classes: Vec<FailureClass>,
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
        conditions.push(format!(
            "last_status IS NULL AND error_class = '{}'",
            FailureClass::RetriesExhausted
        ));
    }
    if !f.classes.is_empty() {
        let names = list_params("class", f.classes.len());
        conditions.push(format!("error_class IN ({})", names.join(", ")));
        let classes = f.classes.iter().map(|c| Value::Text(c.to_string()));
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
