//! The dry run's copy of a PostgreSQL record: the tables a plan reads (sources,
//! jobs, the inbox) copied into a new SQLite database, where the dry run imports,
//! moves the inbox and requeues exactly as a run would. PostgreSQL is only read.

use std::path::Path;

use rusqlite::types::Value;
use tokio_postgres::types::Type;

use crate::store::failure::{DbCause, Failure};

/// The tables and columns copied (a job's `key` is computed from its body).
const TABLES: [(&str, &str); 3] = [
    ("sources", "id, name"),
    (
        "jobs",
        "id, state, last_run_id, obtained, customer_id, order_id, payment_intent_id, \
         expires_at, mid_expire_at, metadata, row_key, raw, source_id, line, attempts, \
         creates, needs_check, next_attempt_at, error, error_class, last_status, group_id, \
         first_run_id, updated_ms, claim_run",
    ),
    (
        "inbox",
        "id, customer_id, order_id, payment_intent_id, metadata, expires_at",
    ),
];

/// Rows read per query.
const PAGE: i64 = 10_000;

/// Copies the tables into a new SQLite database at `dest`, made here with the current
/// schema.
pub(super) async fn copy_into(
    client: &mut deadpool_postgres::Client,
    dest: &Path,
) -> Result<(), Failure> {
    // One snapshot of all three tables, as a run going on or producers see them at
    // one moment (rows moved from the inbox meanwhile are counted once).
    let client = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    // A failure of the copy's own file says which file.
    let local = |f: Failure| f.context(&format!("cannot write the copy {}", dest.display()));
    let mut sqlite = rusqlite::Connection::open(dest).map_err(|e| local(e.into()))?;
    crate::store::schema::prepare(
        &mut sqlite,
        crate::store::Access::Write,
        crate::store::DEFAULT_BUSY_TIMEOUT,
    )
    .map_err(local)?;
    for (table, columns) in TABLES {
        let n = columns.split(", ").count();
        let marks: Vec<String> = (1..=n).map(|i| format!("?{i}")).collect();
        let insert = format!(
            "INSERT INTO {table} ({columns}) VALUES ({})",
            marks.join(", ")
        );
        let select = format!("SELECT {columns} FROM {table} WHERE id > $1 ORDER BY id LIMIT $2");
        let mut after = 0i64;
        loop {
            let rows = client.query(&select, &[&after, &PAGE]).await?;
            let Some(last) = rows.last() else { break };
            after = last.try_get(0)?;
            write_page(&mut sqlite, &insert, n, &rows).map_err(local)?;
        }
    }
    Ok(())
}

/// Inserts one page of rows into the copy, in one transaction.
fn write_page(
    sqlite: &mut rusqlite::Connection,
    insert: &str,
    columns: usize,
    rows: &[tokio_postgres::Row],
) -> Result<(), Failure> {
    let tx = sqlite.transaction()?;
    {
        let mut stmt = tx.prepare_cached(insert)?;
        for row in rows {
            let values = (0..columns)
                .map(|i| value(row, i))
                .collect::<Result<Vec<Value>, Failure>>()?;
            stmt.execute(rusqlite::params_from_iter(values))?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Column `i` of `row` as SQLite stores it.
fn value(row: &tokio_postgres::Row, i: usize) -> Result<Value, Failure> {
    let ty = row.columns()[i].type_();
    Ok(if *ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(i)?
            .map_or(Value::Null, Value::Integer)
    } else if *ty == Type::TEXT {
        row.try_get::<_, Option<String>>(i)?
            .map_or(Value::Null, Value::Text)
    } else {
        return Err(Failure::new(
            DbCause::Bug,
            format!(
                "column {} has the unexpected type {ty}",
                row.columns()[i].name()
            ),
        ));
    })
}
