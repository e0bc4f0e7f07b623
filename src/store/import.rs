//! Importing rows into `jobs`: chunks of valid rows in one statement, and the rules
//! for rows whose key is taken (duplicates, conflicts, fixes) or that are invalid.

use rusqlite::{Connection, OptionalExtension, params};

use super::body::{BODY_COLUMNS, bind_body, read_body};
use super::clock::now_ms;
use super::types::ImportCounts;
use crate::job::Payload;
use crate::source::ImportRow;

/// The id of a source name, added on first use.
fn source_id(c: &Connection, name: &str) -> rusqlite::Result<i64> {
    c.prepare_cached("INSERT INTO sources (name) VALUES (?1) ON CONFLICT (name) DO NOTHING")?
        .execute(params![name])?;
    c.prepare_cached("SELECT id FROM sources WHERE name = ?1")?
        .query_row(params![name], |r| r.get(0))
}

/// Imports one batch of rows. See the README ("Importing rows") for the rules.
pub(super) fn import(
    c: &Connection,
    run_id: i64,
    source: &str,
    rows: &[ImportRow],
) -> rusqlite::Result<ImportCounts> {
    let now = now_ms();
    let source_id = source_id(c, source)?;
    let mut counts = ImportCounts::default();
    // The keys of this batch that an invalid row already has: a valid row with one
    // of them is that row's fix. Looked up once for the batch (a probe per row made
    // SQLite re-plan the statement on every bind: 7 times slower).
    let mut invalid_keys = invalid_twins(c, rows)?;
    let mut insert = c.prepare_cached(INSERT_JOB)?;
    let batch = Batch {
        run_id,
        source_id,
        now,
    };
    let mut at = 0;
    while at < rows.len() {
        // The next CHUNK_ROWS valid rows go in with one statement (see
        // `insert_chunk`), the invalid rows among them after it. A valid row that
        // fixes an invalid one of the same window ends the window before it, so an
        // invalid row is always recorded before its fix.
        let mut picked: Vec<&ImportRow> = Vec::with_capacity(CHUNK_ROWS);
        let mut skipped: Vec<&ImportRow> = Vec::new();
        let mut end = at;
        while end < rows.len() && picked.len() < CHUNK_ROWS {
            let row = &rows[end];
            match &row.outcome {
                Ok(p) if skipped.iter().any(|s| s.key.as_deref() == Some(p.key())) => break,
                Ok(_) => picked.push(row),
                Err(_) => skipped.push(row),
            }
            end += 1;
        }
        if picked.len() == CHUNK_ROWS {
            insert_chunk(c, &mut insert, &batch, &picked, &invalid_keys, &mut counts)?;
            for row in skipped {
                import_invalid(c, &batch, row, &mut invalid_keys, &mut counts)?;
            }
            at = end;
            continue;
        }
        let row = &rows[at];
        at += 1;
        match &row.outcome {
            Ok(payload) => {
                counts.rows += 1;
                let new = NewJob {
                    run_id,
                    source_id,
                    line: row.line as i64,
                    payload,
                    metadata_json: row.metadata_json.as_deref(),
                    now,
                };
                if !new.insert(&mut insert)? {
                    import_valid(c, &mut insert, &new, &mut counts)?;
                } else if invalid_keys.contains(payload.key()) {
                    new.settle_insert(c, c.last_insert_rowid(), &mut counts)?;
                } else {
                    counts.queued += 1;
                }
            }
            Err(_) => import_invalid(c, &batch, row, &mut invalid_keys, &mut counts)?,
        }
    }
    Ok(counts)
}

/// Records an invalid row (or updates the invalid job of an earlier import of it).
fn import_invalid(
    c: &Connection,
    batch: &Batch,
    row: &ImportRow,
    invalid_keys: &mut std::collections::HashSet<String>,
    counts: &mut ImportCounts,
) -> rusqlite::Result<()> {
    let Err(reason) = &row.outcome else {
        return Ok(());
    };
    let (run_id, source_id, now, line) =
        (batch.run_id, batch.source_id, batch.now, row.line as i64);
    counts.rows += 1;
    counts.invalid += 1;
    if let Some(k) = &row.key {
        invalid_keys.insert(k.clone());
    }
    // The row as written is kept for invalid rows only: a valid row's request body
    // says the same thing (exports rebuild the row from it).
    let raw = serde_json::to_string(&row.raw).unwrap_or_default();
    let earlier: Option<i64> = match &row.key {
        Some(k) => latest_invalid(c, k)?,
        None => c
            .prepare_cached(
                "SELECT id FROM jobs WHERE state = 'invalid' AND source_id = ?1 \
                 AND line = ?2 AND raw = ?3 LIMIT 1",
            )?
            .query_row(params![source_id, line, raw], |r| r.get(0))
            .optional()?,
    };
    match earlier {
        Some(id) => {
            c.prepare_cached(
                "UPDATE jobs SET error = ?1, raw = ?2, source_id = ?3, line = ?4, \
                 last_run_id = ?5, updated_ms = ?6 WHERE id = ?7",
            )?
            .execute(params![reason, raw, source_id, line, run_id, now, id])?;
        }
        None => {
            c.prepare_cached(
                "INSERT INTO jobs (row_key, raw, source_id, line, state, error, \
                 error_class, first_run_id, last_run_id, updated_ms) \
                 VALUES (?1, ?2, ?3, ?4, 'invalid', ?5, 'invalid', ?6, ?6, ?7)",
            )?
            .execute(params![row.key, raw, source_id, line, reason, run_id, now])?;
        }
    }
    Ok(())
}

/// The keys of `rows` (valid ones) that an invalid job of an earlier import has.
fn invalid_twins(
    c: &Connection,
    rows: &[ImportRow],
) -> rusqlite::Result<std::collections::HashSet<String>> {
    let any: bool = c
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM jobs WHERE row_key IS NOT NULL)")?
        .query_row([], |r| r.get(0))?;
    if !any {
        return Ok(Default::default());
    }
    let keys: Vec<&str> = rows
        .iter()
        .filter_map(|r| r.outcome.as_ref().ok().map(Payload::key))
        .collect();
    let keys = serde_json::to_string(&keys).unwrap_or_default();
    c.prepare_cached(
        "SELECT DISTINCT row_key FROM jobs WHERE row_key IS NOT NULL \
         AND row_key IN (SELECT value FROM json_each(?1))",
    )?
    .query_map(params![keys], |r| r.get(0))?
    .collect()
}

/// The newest invalid job whose row would have had this key.
fn latest_invalid(c: &Connection, row_key: &str) -> rusqlite::Result<Option<i64>> {
    c.prepare_cached(
        // `row_key IS NOT NULL` spelled out: the partial index's condition then follows
        // from the query itself, not from the bound value, which would make SQLite
        // recompile the statement on every bind.
        "SELECT id FROM jobs WHERE row_key IS NOT NULL AND row_key = ?1 AND state = 'invalid' \
         ORDER BY id DESC LIMIT 1",
    )?
    .query_row(params![row_key], |r| r.get(0))
    .optional()
}

/// What every row of one import batch shares.
struct Batch {
    run_id: i64,
    source_id: i64,
    now: i64,
}

/// Valid rows inserted by one statement on the fast path of an import.
const CHUNK_ROWS: usize = 100;

/// `INSERT … VALUES (…), (…), …` of [`CHUNK_ROWS`] new pending jobs; does nothing for
/// a row whose key is taken. ?1–?3 are the batch's source, run and time; each row
/// binds seven more (the six body fields and the line).
fn chunk_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let rows: Vec<String> = (0..CHUNK_ROWS)
            .map(|k| {
                let p = 4 + 7 * k;
                format!(
                    "(?{}, ?{}, ?{}, ?{}, ?{}, ?{}, '', ?1, ?{}, 'pending', ?2, ?2, ?3)",
                    p,
                    p + 1,
                    p + 2,
                    p + 3,
                    p + 4,
                    p + 5,
                    p + 6
                )
            })
            .collect();
        format!(
            "INSERT INTO jobs (customer_id, order_id, payment_intent_id, expires_at, \
             mid_expire_at, metadata, raw, source_id, line, state, first_run_id, last_run_id, \
             updated_ms) VALUES {} ON CONFLICT (key) DO NOTHING",
            rows.join(", ")
        )
    })
}

/// Inserts a chunk of valid rows with one statement: a statement per row costs about
/// a third more (`cargo bench --bench sqlite_floor`). When some keys were taken, each
/// row is looked up: a row went in if its key now has a job newer than the statement
/// with this row's line; any other row takes the path of a row whose insert did
/// nothing (duplicate, conflict or fix).
fn insert_chunk(
    c: &Connection,
    insert: &mut rusqlite::Statement<'_>,
    batch: &Batch,
    chunk: &[&ImportRow],
    invalid_keys: &std::collections::HashSet<String>,
    counts: &mut ImportCounts,
) -> rusqlite::Result<()> {
    let before: i64 = c
        .prepare_cached("SELECT coalesce(max(id), 0) FROM jobs")?
        .query_row([], |r| r.get(0))?;
    let mut stmt = c.prepare_cached(chunk_sql())?;
    stmt.raw_bind_parameter(1, batch.source_id)?;
    stmt.raw_bind_parameter(2, batch.run_id)?;
    stmt.raw_bind_parameter(3, batch.now)?;
    let valid = || {
        chunk
            .iter()
            .filter_map(|row| row.outcome.as_ref().ok().map(|p| (row, p)))
    };
    for (k, (row, p)) in valid().enumerate() {
        let at = 4 + 7 * k;
        bind_body(&mut stmt, at, p, row.metadata_json.as_deref())?;
        stmt.raw_bind_parameter(at + 6, row.line as i64)?;
    }
    let inserted = stmt.raw_execute()?;
    drop(stmt);
    counts.rows += chunk.len() as u64;
    fn job<'a>(batch: &Batch, row: &'a ImportRow, payload: &'a Payload) -> NewJob<'a> {
        NewJob {
            run_id: batch.run_id,
            source_id: batch.source_id,
            line: row.line as i64,
            payload,
            metadata_json: row.metadata_json.as_deref(),
            now: batch.now,
        }
    }
    if inserted == chunk.len() {
        // All went in, with the ids after `before` in order (a rowid key takes the
        // next number): a fix of an invalid row then takes that row's place.
        for (k, (row, payload)) in valid().enumerate() {
            if invalid_keys.contains(payload.key()) {
                job(batch, row, payload).settle_insert(c, before + 1 + k as i64, counts)?;
            } else {
                counts.queued += 1;
            }
        }
        return Ok(());
    }
    for (row, payload) in valid() {
        let line = row.line as i64;
        let new = job(batch, row, payload);
        // A row went in if its key now has a job newer than the statement, with
        // this row's line.
        let went_in = if inserted == 0 {
            None
        } else {
            c.prepare_cached("SELECT id, line FROM jobs WHERE key = ?1")?
                .query_row(params![payload.key()], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?))
                })
                .optional()?
                .filter(|(id, l)| *id > before && *l == Some(line))
                .map(|(id, _)| id)
        };
        match went_in {
            Some(id) if invalid_keys.contains(payload.key()) => new.settle_insert(c, id, counts)?,
            Some(_) => counts.queued += 1,
            None => import_valid(c, insert, &new, counts)?,
        }
    }
    Ok(())
}

/// A new pending job; does nothing when its key is taken (see [`NewJob::insert`]).
const INSERT_JOB: &str = "INSERT INTO jobs (customer_id, order_id, payment_intent_id, expires_at, \
     mid_expire_at, metadata, raw, source_id, line, state, first_run_id, last_run_id, updated_ms) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, '', ?7, ?8, 'pending', ?9, ?9, ?10) \
     ON CONFLICT (key) DO NOTHING";

/// A valid row on its way into `jobs`.
struct NewJob<'a> {
    run_id: i64,
    source_id: i64,
    line: i64,
    payload: &'a Payload,
    metadata_json: Option<&'a str>,
    now: i64,
}

impl NewJob<'_> {
    /// Puts this row in place of job `id` (an invalid or failed version of it).
    fn replace(&self, c: &Connection, id: i64, needs_check: bool) -> rusqlite::Result<()> {
        let mut stmt = c.prepare_cached(
            "UPDATE jobs SET customer_id = ?1, order_id = ?2, payment_intent_id = ?3, \
             expires_at = ?4, mid_expire_at = ?5, metadata = ?6, row_key = NULL, raw = '', \
             source_id = ?7, line = ?8, state = 'pending', needs_check = ?9, \
             next_attempt_at = NULL, error = NULL, error_class = NULL, last_status = NULL, \
             last_run_id = ?10, updated_ms = ?11 WHERE id = ?12",
        )?;
        bind_body(&mut stmt, 1, self.payload, self.metadata_json)?;
        stmt.raw_bind_parameter(7, self.source_id)?;
        stmt.raw_bind_parameter(8, self.line)?;
        stmt.raw_bind_parameter(9, needs_check)?;
        stmt.raw_bind_parameter(10, self.run_id)?;
        stmt.raw_bind_parameter(11, self.now)?;
        stmt.raw_bind_parameter(12, id)?;
        stmt.raw_execute().map(drop)
    }

    /// After this row went in as job `inserted`: if it is the fix of an invalid row
    /// of the same key, it takes that row's place (the invalid one is replaced, the
    /// new job removed) and counts as fixed; otherwise it counts as queued. One probe
    /// of the small index of invalid rows' keys, so an import does not slow down
    /// once invalid rows exist.
    fn settle_insert(
        &self,
        c: &Connection,
        inserted: i64,
        counts: &mut ImportCounts,
    ) -> rusqlite::Result<()> {
        match latest_invalid(c, self.payload.key())? {
            None => counts.queued += 1,
            Some(invalid) => {
                c.prepare_cached("DELETE FROM jobs WHERE id = ?1")?
                    .execute(params![inserted])?;
                self.replace(c, invalid, false)?;
                counts.fixed += 1;
            }
        }
        Ok(())
    }

    /// Inserts the job with [`INSERT_JOB`]; false if its key is already taken.
    fn insert(&self, stmt: &mut rusqlite::Statement<'_>) -> rusqlite::Result<bool> {
        bind_body(stmt, 1, self.payload, self.metadata_json)?;
        stmt.raw_bind_parameter(7, self.source_id)?;
        stmt.raw_bind_parameter(8, self.line)?;
        stmt.raw_bind_parameter(9, self.run_id)?;
        stmt.raw_bind_parameter(10, self.now)?;
        Ok(stmt.raw_execute()? == 1)
    }
}

fn import_valid(
    c: &Connection,
    insert: &mut rusqlite::Statement<'_>,
    new: &NewJob<'_>,
    counts: &mut ImportCounts,
) -> rusqlite::Result<()> {
    let key = new.payload.key();
    let existing: Option<(i64, String, Option<Payload>, i64)> = c
        .prepare_cached(&format!(
            "SELECT id, state, creates, {BODY_COLUMNS} FROM jobs WHERE key = ?1"
        ))?
        .query_row(params![key], |r| {
            Ok((r.get(0)?, r.get(1)?, read_body(r, 3)?, r.get(2)?))
        })
        .optional()?;
    let replace = |id: i64, needs_check: bool| new.replace(c, id, needs_check);
    match existing {
        None => {
            let fixed_invalid = latest_invalid(c, key)?;
            if let Some(id) = fixed_invalid {
                replace(id, false)?;
                counts.fixed += 1;
            } else if new.insert(insert)? {
                counts.queued += 1;
            }
        }
        Some((id, state, Some(old), _)) if old == *new.payload => {
            counts.duplicates += 1;
            if state == "failed" || state == "unknown" {
                // Not sent again (retry-failed does that), but not done either: this
                // run's report lists it and its exit code says so.
                c.prepare_cached("UPDATE jobs SET last_run_id = ?1 WHERE id = ?2")?
                    .execute(params![new.run_id, id])?;
            }
        }
        Some((id, state, _, creates)) if state == "failed" => {
            // A fixed version of a failed row. If a create was ever sent, a group may
            // exist after all: check before sending again.
            replace(id, creates > 0)?;
            counts.fixed += 1;
        }
        Some((_, state, _, _)) => {
            counts.conflicts += 1;
            let reason = format!(
                "key {key} was already imported with different data (that job is {state}); \
                 this row was not sent. Remove the row, or give it its own orderId"
            );
            // The row itself is kept, for `export failures`: nothing a person wrote is lost.
            let raw = serde_json::to_string(&new.payload.input_cells()).unwrap_or_default();
            c.prepare_cached(
                "INSERT INTO import_issues (run_id, source, line, key, kind, reason, raw) \
                 VALUES (?1, (SELECT name FROM sources WHERE id = ?2), ?3, ?4, 'conflict', ?5, ?6)",
            )?
            .execute(params![
                new.run_id,
                new.source_id,
                new.line,
                key,
                reason,
                raw
            ])?;
        }
    }
    Ok(())
}
