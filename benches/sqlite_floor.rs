//! What SQLite alone costs for an import, against which `enqueue` is measured.
//!
//! `cargo bench --bench sqlite_floor` (release; about 15 s). It inserts the same
//! 1,000,000 prepared rows (no CSV, no validation: only the writes) four ways,
//! each in 4,000-row transactions on a fresh WAL database, and prints the times:
//!
//! 1. `plain`: four text/integer columns, no index (what `sqlite3 .import` writes).
//! 2. `unique key`: the same with `UNIQUE` on the order id (the least a queue that
//!    never sends a row twice must keep).
//! 3. `jobs`: the real `jobs` table of kohort-batch (schema made by `Store::open`),
//!    with the importer's own `INSERT` statement.
//! 4. `jobs, one statement per batch`: the same rows through `INSERT … SELECT` from
//!    a table filled beforehand (not timed): the per-statement overhead removed.
//!
//! See BENCHMARKS.md ("Where the import stands") for the figures and what they mean.

#![expect(clippy::print_stdout, reason = "a benchmark prints its figures")]

use std::path::Path;
use std::time::{Duration, Instant};

use kohort_batch::store::Store;
use rusqlite::{Connection, params};

const ROWS: usize = 1_000_000;
const BATCH: usize = 4_000;

struct Row {
    customer_id: String,
    order_id: String,
    metadata: String,
    line: i64,
}

fn rows() -> Vec<Row> {
    (1..=ROWS)
        .map(|i| Row {
            customer_id: format!("cus_{i:07}"),
            order_id: format!("ord_{i:07}"),
            metadata: r#"{"campaign":"spring"}"#.to_owned(),
            line: i as i64 + 1,
        })
        .collect()
}

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "NORMAL")?;
    c.pragma_update(None, "cache_size", -16_384)?;
    Ok(c)
}

/// Inserts every row with `sql` (parameters: customer, order, metadata, line), one
/// statement per row; returns the time including a final checkpoint.
fn per_row(c: &Connection, sql: &str, rows: &[Row]) -> rusqlite::Result<Duration> {
    let start = Instant::now();
    for chunk in rows.chunks(BATCH) {
        c.execute_batch("BEGIN")?;
        let mut stmt = c.prepare_cached(sql)?;
        for r in chunk {
            stmt.execute(params![r.customer_id, r.order_id, r.metadata, r.line])?;
        }
        drop(stmt);
        c.execute_batch("COMMIT")?;
    }
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(start.elapsed())
}

const JOBS_INSERT: &str = "INSERT INTO jobs (customer_id, order_id, payment_intent_id, \
     expires_at, mid_expire_at, metadata, raw, source_id, line, state, first_run_id, \
     last_run_id, updated_ms) VALUES (?1, ?2, NULL, NULL, NULL, ?3, '', 1, ?4, 'pending', 1, 1, 0) \
     ON CONFLICT (key) DO NOTHING";

/// A database with kohort-batch's schema (and one run and one source to point at).
fn jobs_db(path: &Path) -> Result<Connection, Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    runtime.block_on(async {
        let store = Store::open(path)?;
        store.begin_run("bench", "{}".into(), false).await?;
        store.close().await;
        Ok::<_, kohort_batch::Error>(())
    })?;
    let c = connect(path)?;
    c.execute("INSERT INTO sources (id, name) VALUES (1, 'bench.csv')", [])?;
    Ok(c)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let rows = rows();
    let mut results: Vec<(&str, Duration)> = Vec::new();

    let c = connect(&dir.path().join("plain.db"))?;
    c.execute_batch(
        "CREATE TABLE t (customer_id TEXT, order_id TEXT, metadata TEXT, line INTEGER)",
    )?;
    let sql = "INSERT INTO t VALUES (?1, ?2, ?3, ?4)";
    results.push(("plain", per_row(&c, sql, &rows)?));

    let c = connect(&dir.path().join("unique.db"))?;
    c.execute_batch(
        "CREATE TABLE t (customer_id TEXT, order_id TEXT UNIQUE, metadata TEXT, line INTEGER)",
    )?;
    results.push(("unique key", per_row(&c, sql, &rows)?));

    let c = jobs_db(&dir.path().join("jobs.db"))?;
    results.push(("jobs", per_row(&c, JOBS_INSERT, &rows)?));

    let c = jobs_db(&dir.path().join("jobs-set.db"))?;
    c.execute_batch(
        "CREATE TABLE stage (id INTEGER PRIMARY KEY, customer_id TEXT, order_id TEXT, \
         metadata TEXT, line INTEGER)",
    )?;
    per_row(
        &c,
        "INSERT INTO stage (customer_id, order_id, metadata, line) VALUES (?1, ?2, ?3, ?4)",
        &rows,
    )?;
    let start = Instant::now();
    for from in (1..=ROWS as i64).step_by(BATCH) {
        c.execute_batch("BEGIN")?;
        c.prepare_cached(
            "INSERT INTO jobs (customer_id, order_id, metadata, raw, source_id, line, state, \
             first_run_id, last_run_id, updated_ms) \
             SELECT customer_id, order_id, metadata, '', 1, line, 'pending', 1, 1, 0 \
             FROM stage WHERE id BETWEEN ?1 AND ?2 ON CONFLICT (key) DO NOTHING",
        )?
        .execute(params![from, from + BATCH as i64 - 1])?;
        c.execute_batch("COMMIT")?;
    }
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    results.push(("jobs, one statement per batch", start.elapsed()));

    let plain = results[0].1.as_secs_f64();
    println!("{ROWS} rows, {BATCH} per transaction, WAL, checkpointed at the end");
    for (name, took) in &results {
        println!(
            "{name:>30}: {:6.2} s  ({:.2} x plain)",
            took.as_secs_f64(),
            took.as_secs_f64() / plain
        );
    }
    Ok(())
}
