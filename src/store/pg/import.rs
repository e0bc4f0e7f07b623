//! Rows into jobs on PostgreSQL. A batch of new, valid rows goes in with one binary
//! `COPY` (the shape of a first import and of a night's inbox); a batch with invalid
//! rows, or whose keys are taken, goes row by row through the rules both backends
//! share (`store::import::taken`; README, "Importing rows").

use std::collections::HashSet;

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};

use crate::job::Payload;
use crate::source::ImportRow;
use crate::store::ImportCounts;
use crate::store::body::BODY_COLUMNS;
use crate::store::clock::now_ms;
use crate::store::failure::Failure;
use crate::store::import::{Taken, taken};

type Tx<'a> = deadpool_postgres::Transaction<'a>;

/// Imports one batch from `source` and adds its counts to the run's, in one
/// transaction.
pub(super) async fn import_batch(
    client: &mut deadpool_postgres::Client,
    run_id: i64,
    source: &str,
    rows: &[ImportRow],
) -> Result<ImportCounts, Failure> {
    let tx = client.transaction().await?;
    let counts = import_rows(&tx, run_id, source, rows.iter()).await?;
    add_import_counts(&tx, run_id, counts).await?;
    tx.commit().await?;
    Ok(counts)
}

/// Imports inbox rows and deletes them from the inbox, in one transaction. Only the
/// rows this transaction can lock at once are moved (`SKIP LOCKED`): a row some
/// other session holds stays for the next run, and no producer is ever waited for.
/// Exactly the rows moved are deleted, never a range: a producer's row whose
/// transaction commits late, under a lower id, is not lost.
pub(super) async fn import_inbox(
    client: &mut deadpool_postgres::Client,
    run_id: i64,
    rows: Vec<ImportRow>,
) -> Result<ImportCounts, Failure> {
    let tx = client.transaction().await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.line as i64).collect();
    let locked: HashSet<i64> = tx
        .query(
            "SELECT id FROM inbox WHERE id = ANY($1) FOR UPDATE SKIP LOCKED",
            &[&ids],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let moved = rows.iter().filter(|r| locked.contains(&(r.line as i64)));
    let counts = import_rows(&tx, run_id, "inbox", moved).await?;
    let locked: Vec<i64> = locked.into_iter().collect();
    tx.execute("DELETE FROM inbox WHERE id = ANY($1)", &[&locked])
        .await?;
    if counts.rows > 0 {
        add_import_counts(&tx, run_id, counts).await?;
    }
    tx.commit().await?;
    Ok(counts)
}

/// Adds a batch's counts to the run's import totals.
pub(super) async fn add_import_counts(
    tx: &Tx<'_>,
    run_id: i64,
    add: ImportCounts,
) -> Result<(), Failure> {
    let current: Option<String> = tx
        .query_one(
            "SELECT imported FROM runs WHERE id = $1 FOR UPDATE",
            &[&run_id],
        )
        .await?
        .try_get(0)?;
    let text = add.added_to(current.as_deref());
    tx.execute(
        "UPDATE runs SET imported = $1 WHERE id = $2",
        &[&text, &run_id],
    )
    .await?;
    Ok(())
}

/// What every row of one batch shares.
struct Batch {
    run_id: i64,
    source_id: i64,
    now: i64,
}

async fn import_rows<'r>(
    tx: &Tx<'_>,
    run_id: i64,
    source: &str,
    rows: impl Iterator<Item = &'r ImportRow> + Clone,
) -> Result<ImportCounts, Failure> {
    tx.execute(
        "INSERT INTO sources (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
        &[&source],
    )
    .await?;
    let source_id: i64 = tx
        .query_one("SELECT id FROM sources WHERE name = $1", &[&source])
        .await?
        .try_get(0)?;
    let batch = Batch {
        run_id,
        source_id,
        now: now_ms(),
    };
    let all_valid = rows.clone().all(|r| r.outcome.is_ok());
    if all_valid && rows.clone().next().is_some() && !fixes_any(tx, rows.clone()).await? {
        tx.batch_execute("SAVEPOINT copy").await?;
        match copy_new(tx, &batch, rows.clone()).await {
            Ok(n) => {
                tx.batch_execute("RELEASE copy").await?;
                return Ok(ImportCounts {
                    rows: n,
                    queued: n,
                    ..ImportCounts::default()
                });
            }
            // A key already taken: the rules decide, row by row.
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                tx.batch_execute("ROLLBACK TO copy").await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut counts = ImportCounts::default();
    for row in rows {
        counts.rows += 1;
        match &row.outcome {
            Ok(payload) => import_valid(tx, &batch, row, payload, &mut counts).await?,
            Err(reason) => {
                counts.invalid += 1;
                import_invalid(tx, &batch, row, reason).await?;
            }
        }
    }
    Ok(counts)
}

/// Whether a row of the batch fixes an invalid job of an earlier import (its key is
/// that row's): then the batch takes the rules' path.
async fn fixes_any<'r>(
    tx: &Tx<'_>,
    rows: impl Iterator<Item = &'r ImportRow>,
) -> Result<bool, Failure> {
    // min() over the partial index of invalid rows' keys: one index probe whatever
    // the planner's statistics say (an EXISTS over a table not yet analyzed was
    // planned as a scan of every job, once per batch).
    let any: bool = tx
        .query_one(
            "SELECT min(row_key) IS NOT NULL FROM jobs WHERE row_key IS NOT NULL",
            &[],
        )
        .await?
        .try_get(0)?;
    if !any {
        return Ok(false);
    }
    let keys: Vec<&str> = rows
        .filter_map(|r| r.outcome.as_ref().ok().map(Payload::key))
        .collect();
    Ok(tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE row_key IS NOT NULL AND row_key = ANY($1))",
            &[&keys],
        )
        .await?
        .try_get(0)?)
}

/// Copies new pending jobs in with binary `COPY`; fails (unique violation) if a key
/// is taken. Returns how many went in.
async fn copy_new<'r>(
    tx: &Tx<'_>,
    batch: &Batch,
    rows: impl Iterator<Item = &'r ImportRow>,
) -> Result<u64, tokio_postgres::Error> {
    let sink = tx
        .copy_in(&format!(
            "COPY jobs ({BODY_COLUMNS}, raw, source_id, line, state, first_run_id, \
             last_run_id, updated_ms) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    let types = [
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::INT8,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures_util::pin_mut!(writer);
    for row in rows {
        let Ok(p) = &row.outcome else { continue };
        let line = row.line as i64;
        writer
            .as_mut()
            .write(&[
                &p.customer_id,
                &p.order_id,
                &p.payment_intent_id,
                &p.expires_at,
                &p.mid_expire_at,
                &row.metadata_json.as_deref(),
                &"",
                &batch.source_id,
                &line,
                &"pending",
                &batch.run_id,
                &batch.run_id,
                &batch.now,
            ])
            .await?;
    }
    writer.finish().await
}

/// A valid row whose batch took the rules' path (see SQLite's `import::import_valid`).
async fn import_valid(
    tx: &Tx<'_>,
    batch: &Batch,
    row: &ImportRow,
    payload: &Payload,
    counts: &mut ImportCounts,
) -> Result<(), Failure> {
    let key = payload.key();
    let existing = tx
        .query_opt(
            // Locked until this import commits: the rules decide on the job as it is, and
            // no run changes it between the decision and the write (SQLite's import
            // holds the database's write lock for the same).
            &format!(
                "SELECT id, state, creates, {BODY_COLUMNS} FROM jobs WHERE key = $1 FOR UPDATE"
            ),
            &[&key],
        )
        .await?;
    let Some(existing) = existing else {
        if let Some(invalid) = latest_invalid(tx, key).await? {
            replace(tx, batch, row, payload, invalid, false).await?;
            counts.fixed += 1;
        } else if insert(tx, batch, row, payload).await? {
            counts.queued += 1;
        } else {
            // Another session put the key in meanwhile: the rules decide, now with it.
            return Box::pin(import_valid(tx, batch, row, payload, counts)).await;
        }
        return Ok(());
    };
    let id: i64 = existing.try_get(0)?;
    let state: String = existing.try_get(1)?;
    let old = crate::store::body::payload_of(super::reads::texts(&existing, 3)?)
        .ok()
        .flatten();
    match taken(key, payload, &state, old.as_ref(), existing.try_get(2)?) {
        Taken::Duplicate { touch } => {
            counts.duplicates += 1;
            if touch {
                tx.execute(
                    "UPDATE jobs SET last_run_id = $1 WHERE id = $2",
                    &[&batch.run_id, &id],
                )
                .await?;
            }
        }
        Taken::Fix { needs_check } => {
            replace(tx, batch, row, payload, id, needs_check).await?;
            counts.fixed += 1;
        }
        Taken::Conflict { reason, raw } => {
            counts.conflicts += 1;
            tx.execute(
                "INSERT INTO import_issues (run_id, source, line, key, kind, reason, raw) \
                 VALUES ($1, (SELECT name FROM sources WHERE id = $2), $3, $4, 'conflict', \
                 $5, $6)",
                &[
                    &batch.run_id,
                    &batch.source_id,
                    &(row.line as i64),
                    &key,
                    &reason,
                    &raw,
                ],
            )
            .await?;
        }
    }
    Ok(())
}

/// A row's body in [`BODY_COLUMNS`] order, its source and line, then `more`: the
/// parameters of [`insert`] and [`replace`].
fn row_params<'a>(
    row: &'a ImportRow,
    p: &'a Payload,
    batch: &'a Batch,
    line: &'a i64,
    more: &[&'a (dyn ToSql + Sync)],
) -> Vec<&'a (dyn ToSql + Sync)> {
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![
        &p.customer_id,
        &p.order_id,
        &p.payment_intent_id,
        &p.expires_at,
        &p.mid_expire_at,
        &row.metadata_json,
        &batch.source_id,
        line,
    ];
    params.extend_from_slice(more);
    params
}

/// Inserts a new pending job; false if its key was taken meanwhile.
async fn insert(tx: &Tx<'_>, batch: &Batch, row: &ImportRow, p: &Payload) -> Result<bool, Failure> {
    let n = tx
        .execute(
            &format!(
                "INSERT INTO jobs ({BODY_COLUMNS}, raw, source_id, line, state, first_run_id, \
             last_run_id, updated_ms) VALUES ($1, $2, $3, $4, $5, $6, '', $7, $8, 'pending', \
             $9, $9, $10) ON CONFLICT (key) DO NOTHING"
            ),
            &row_params(
                row,
                p,
                batch,
                &(row.line as i64),
                &[&batch.run_id, &batch.now],
            ),
        )
        .await?;
    Ok(n == 1)
}

/// Puts this row in place of job `id` (an invalid or failed version of it).
async fn replace(
    tx: &Tx<'_>,
    batch: &Batch,
    row: &ImportRow,
    p: &Payload,
    id: i64,
    needs_check: bool,
) -> Result<(), Failure> {
    tx.execute(
        "UPDATE jobs SET customer_id = $1, order_id = $2, payment_intent_id = $3, \
         expires_at = $4, mid_expire_at = $5, metadata = $6, row_key = NULL, raw = '', \
         source_id = $7, line = $8, state = 'pending', needs_check = $9, \
         next_attempt_at = NULL, error = NULL, error_class = NULL, last_status = NULL, \
         last_run_id = $10, updated_ms = $11 WHERE id = $12",
        &row_params(
            row,
            p,
            batch,
            &(row.line as i64),
            &[&i64::from(needs_check), &batch.run_id, &batch.now, &id],
        ),
    )
    .await?;
    Ok(())
}

/// The newest invalid job whose row would have had this key.
async fn latest_invalid(tx: &Tx<'_>, row_key: &str) -> Result<Option<i64>, Failure> {
    Ok(tx
        .query_opt(
            "SELECT id FROM jobs WHERE row_key IS NOT NULL AND row_key = $1 \
             AND state = 'invalid' ORDER BY id DESC LIMIT 1 FOR UPDATE",
            &[&row_key],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()?)
}

/// Records an invalid row, or updates the invalid job of an earlier import of it
/// (see SQLite's `import::import_invalid`).
async fn import_invalid(
    tx: &Tx<'_>,
    batch: &Batch,
    row: &ImportRow,
    reason: &str,
) -> Result<(), Failure> {
    let line = row.line as i64;
    let raw = serde_json::to_string(&row.raw).unwrap_or_default();
    let earlier = match &row.key {
        Some(k) => latest_invalid(tx, k).await?,
        None => tx
            .query_opt(
                "SELECT id FROM jobs WHERE state = 'invalid' AND source_id = $1 \
                 AND line = $2 AND raw = $3 LIMIT 1",
                &[&batch.source_id, &line, &raw],
            )
            .await?
            .map(|r| r.try_get(0))
            .transpose()?,
    };
    match earlier {
        Some(id) => {
            tx.execute(
                "UPDATE jobs SET error = $1, raw = $2, source_id = $3, line = $4, \
                 last_run_id = $5, updated_ms = $6 WHERE id = $7",
                &[
                    &reason,
                    &raw,
                    &batch.source_id,
                    &line,
                    &batch.run_id,
                    &batch.now,
                    &id,
                ],
            )
            .await?;
        }
        None => {
            tx.execute(
                "INSERT INTO jobs (row_key, raw, source_id, line, state, error, error_class, \
                 first_run_id, last_run_id, updated_ms) \
                 VALUES ($1, $2, $3, $4, 'invalid', $5, 'invalid', $6, $6, $7)",
                &[
                    &row.key,
                    &raw,
                    &batch.source_id,
                    &line,
                    &reason,
                    &batch.run_id,
                    &batch.now,
                ],
            )
            .await?;
        }
    }
    Ok(())
}
