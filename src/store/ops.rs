//! The writes: runs and the lock, imports, and job state changes with their attempts.

use rusqlite::{Connection, OptionalExtension, params};

use super::types::{Attempt, ImportCounts, Job, Transition};
use crate::job::{Payload, SendBody};
use crate::source::ImportRow;

/// Now, in the fixed-width text form stored everywhere (sorts as time does).
pub(crate) fn now_text() -> String {
    ts_text(jiff::Timestamp::now())
}

/// A time as the text columns hold it: RFC 3339 in UTC with microseconds, e.g.
/// `2026-11-24T13:51:21.015000Z` (the same as `strftime("%Y-%m-%dT%H:%M:%S%.6fZ")`,
/// without parsing a format on every row).
fn ts_text(ts: jiff::Timestamp) -> String {
    format!("{ts:.6}")
}

/// Records a run; for an `exclusive` run (its caller holds the run lock) also the
/// lock row, which only names the holder (for older versions and for people). Returns
/// the run id and its start time.
pub(super) fn begin_run(
    c: &Connection,
    command: &str,
    options: &str,
    exclusive: bool,
) -> rusqlite::Result<(i64, String)> {
    let started = now_text();
    let pid = i64::from(std::process::id());
    c.execute(
        "INSERT INTO runs (command, started_at, pid, options) VALUES (?1, ?2, ?3, ?4)",
        params![command, started, pid, options],
    )?;
    let run_id = c.last_insert_rowid();
    if !exclusive {
        // Import-only sessions (enqueue) never send, so they do not take the lock.
        return Ok((run_id, started));
    }
    c.execute("DELETE FROM lock", [])?;
    c.execute(
        "INSERT INTO lock (id, pid, run_id, started_at) VALUES (1, ?1, ?2, ?3)",
        params![pid, run_id, started],
    )?;
    // Earlier sending runs that never finished ended with their process (the run
    // lock is ours, so none of them is still going): their reports say so.
    c.execute(
        "UPDATE runs SET stopped = 'the process ended before the run finished (killed, or \
         the machine stopped); the next run checked its jobs in flight' \
         WHERE finished_at IS NULL AND stopped IS NULL AND id < ?1 \
         AND (command = 'run' OR command = 'retry-failed')",
        params![run_id],
    )?;
    // A job still in flight was interrupted mid-request: its outcome is unknown, so it
    // must be checked (no earlier than the settle time set when it was sent).
    let interrupted = c.execute(
        "UPDATE jobs SET state = 'pending', needs_check = 1, error = 'interrupted while in flight', \
         updated_ms = ?1 WHERE state = 'in_flight'",
        params![now_ms()],
    )?;
    if interrupted > 0 {
        tracing::warn!(
            jobs = interrupted,
            "found jobs interrupted mid-request by an earlier run; they are checked before any re-send"
        );
    }
    Ok((run_id, started))
}

/// Records the end of a run; returns its finish time as stored (the report printed
/// now and `report --run` later show the same one).
pub(super) fn finish_run(
    c: &Connection,
    run_id: i64,
    exit_code: u8,
    stopped: Option<&str>,
    paused_ms: i64,
) -> rusqlite::Result<String> {
    let finished_at = now_text();
    c.execute(
        "UPDATE runs SET finished_at = ?1, exit_code = ?2, stopped = ?3, paused_ms = ?4 \
         WHERE id = ?5",
        params![finished_at, exit_code, stopped, paused_ms, run_id],
    )?;
    c.execute("DELETE FROM lock WHERE run_id = ?1", params![run_id])?;
    Ok(finished_at)
}

/// Now, unix milliseconds (`updated_ms`).
pub(crate) fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// The request-body columns of `jobs`, in the order [`bind_body`] binds and
/// [`read_body`] reads them.
pub(super) const BODY_COLUMNS: &str =
    "customer_id, order_id, payment_intent_id, expires_at, mid_expire_at, metadata";

/// Binds the body's fields to parameters `at` to `at + 5` (metadata as JSON text,
/// made by the reader).
fn bind_body(
    stmt: &mut rusqlite::Statement<'_>,
    at: usize,
    p: &Payload,
    metadata_json: Option<&str>,
) -> rusqlite::Result<()> {
    stmt.raw_bind_parameter(at, &p.customer_id)?;
    stmt.raw_bind_parameter(at + 1, &p.order_id)?;
    stmt.raw_bind_parameter(at + 2, &p.payment_intent_id)?;
    stmt.raw_bind_parameter(at + 3, &p.expires_at)?;
    stmt.raw_bind_parameter(at + 4, &p.mid_expire_at)?;
    stmt.raw_bind_parameter(at + 5, metadata_json)
}

/// Reads the six body columns starting at column `at`; `None` for an invalid row.
pub(super) fn read_body(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Option<Payload>> {
    let Some(customer_id) = r.get::<_, Option<String>>(at)? else {
        return Ok(None);
    };
    let metadata = match r.get::<_, Option<String>>(at + 5)? {
        None => None,
        Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(
                at + 5,
                rusqlite::types::Type::Text,
                Box::new(e),
            )
        })?),
    };
    Ok(Some(Payload {
        customer_id,
        order_id: r.get(at + 1)?,
        payment_intent_id: r.get(at + 2)?,
        expires_at: r.get(at + 3)?,
        mid_expire_at: r.get(at + 4)?,
        metadata,
    }))
}

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

/// Adds a batch's counts to the run's import totals.
pub(super) fn add_import_counts(
    c: &Connection,
    run_id: i64,
    add: ImportCounts,
) -> rusqlite::Result<()> {
    let current: Option<String> = c.query_row(
        "SELECT imported FROM runs WHERE id = ?1",
        params![run_id],
        |r| r.get(0),
    )?;
    let mut total: ImportCounts = current
        .and_then(|s| serde_json::from_str::<ImportCounts>(&s).ok())
        .unwrap_or_default();
    total += add;
    let text = serde_json::to_string(&total).unwrap_or_default();
    c.execute(
        "UPDATE runs SET imported = ?1 WHERE id = ?2",
        params![text, run_id],
    )?;
    Ok(())
}

/// Claims up to `limit` pending jobs with an id above `after_id` for `run_id`, and
/// returns them in id order, as they are now. A job claimed by an older run (one
/// that ended, or crashed) is taken over; one claimed by a newer run is left to it.
pub(super) fn claim_pending(
    c: &Connection,
    run_id: i64,
    after_id: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Job>> {
    let mut stmt = c.prepare_cached(&format!(
        "UPDATE jobs SET claim_run = ?1 WHERE id IN (SELECT id FROM jobs WHERE state = 'pending' \
         AND id > ?2 AND (claim_run IS NULL OR claim_run <= ?1) ORDER BY id LIMIT ?3) \
         RETURNING id, key, attempts, creates, needs_check, next_attempt_at, line, {BODY_COLUMNS}, \
         source_id"
    ))?;
    // A handful of sources: their names are read once per page, shared by the jobs.
    let mut names: std::collections::HashMap<i64, std::sync::Arc<str>> = c
        .prepare_cached("SELECT id, name FROM sources")?
        .query_map([], |r| {
            Ok((r.get(0)?, std::sync::Arc::from(r.get::<_, String>(1)?)))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let rows = stmt.query_map(params![run_id, after_id, limit as i64], |r| {
        let body = send_body(r, 7)?.ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                7,
                rusqlite::types::Type::Null,
                "a pending job without a request body".into(),
            )
        })?;
        Ok(Job {
            id: r.get(0)?,
            key: r.get(1)?,
            body,
            attempts: r.get(2)?,
            creates: r.get(3)?,
            needs_check: r.get(4)?,
            next_attempt_at: r.get(5)?,
            line: r.get(6)?,
            source: names
                .entry(r.get(13)?)
                .or_insert_with(|| std::sync::Arc::from("?"))
                .clone(),
        })
    })?;
    let mut jobs = rows.collect::<rusqlite::Result<Vec<Job>>>()?;
    // RETURNING gives no order.
    jobs.sort_unstable_by_key(|j| j.id);
    Ok(jobs)
}

/// The six body columns starting at column `at` as the JSON text to send, written
/// straight from the columns (no [`Payload`] in between): the same text
/// [`Payload::to_json`] gives. `None` for an invalid row.
fn send_body(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Option<SendBody>> {
    let text =
        |i: usize| -> rusqlite::Result<Option<&str>> { Ok(r.get_ref(at + i)?.as_str_or_null()?) };
    let Some(customer_id) = text(0)? else {
        return Ok(None);
    };
    let mut json = Vec::with_capacity(160);
    json.push(b'{');
    let mut field = |name: &str, value: &str| {
        if json.len() > 1 {
            json.push(b',');
        }
        json.push(b'"');
        json.extend_from_slice(name.as_bytes());
        json.extend_from_slice(b"\":");
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut json, value);
    };
    field("customerId", customer_id);
    let order_id = text(1)?;
    let payment_intent = text(2)?;
    for (name, value) in [
        ("orderId", order_id),
        ("paymentIntentId", payment_intent),
        ("expiresAt", text(3)?),
        ("midExpireAt", text(4)?),
    ] {
        if let Some(v) = value {
            field(name, v);
        }
    }
    if let Some(metadata) = text(5)? {
        // Written by kohort-batch from a parsed object; checked all the same, as it is
        // sent as it is.
        let valid = serde_json::from_str::<serde::de::IgnoredAny>(metadata)
            .map_err(|e| e.to_string())
            .and_then(|_| match metadata.trim_start().starts_with('{') {
                true => Ok(()),
                false => Err("not a JSON object".to_owned()),
            });
        if let Err(e) = valid {
            return Err(rusqlite::Error::FromSqlConversionFailure(
                at + 5,
                rusqlite::types::Type::Text,
                format!("the stored metadata is not a JSON object: {e}").into(),
            ));
        }
        json.extend_from_slice(b",\"metadata\":");
        json.extend_from_slice(metadata.as_bytes());
    }
    json.push(b'}');
    Ok(Some(SendBody::new(
        json,
        order_id.map(str::to_owned),
        payment_intent.is_some(),
    )))
}

/// `UPDATE jobs` for a state change: the columns every change sets (?1–?5), then
/// `$extra` (from ?6), as one literal (no formatting per call). Only the run that
/// claimed the job (?3) may change it, and only from the states in `$from`.
macro_rules! set_state_sql {
    ($extra:literal, $from:expr) => {
        concat!(
            "UPDATE jobs SET attempts = attempts + ?1, \
             last_status = CASE WHEN ?1 = 1 THEN ?2 ELSE last_status END, \
             last_run_id = ?3, updated_ms = ?4",
            $extra,
            " WHERE id = ?5 AND claim_run = ?3 AND ",
            $from
        )
    };
}

/// The states a job a run is working on can be in.
macro_rules! working {
    () => {
        "(state = 'pending' OR state = 'in_flight')"
    };
}

/// Records one attempt and the job's state change together. Returns false, with the
/// attempt recorded but the job unchanged, when the job is no longer this run's: its
/// claim was taken by a newer run (or it is not in a state this change starts from).
pub(super) fn record(
    c: &Connection,
    run_id: i64,
    job_id: i64,
    attempt: Option<&Attempt>,
    transition: &Transition,
) -> rusqlite::Result<bool> {
    let now_ms = now_ms();
    let (bump, status) = match attempt {
        Some(a) => {
            c.prepare_cached(
                "INSERT INTO attempts (job_id, run_id, kind, started_at, started_ms, latency_ms, \
                 status, class, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                job_id,
                run_id,
                a.kind.as_str(),
                ts_text(a.started_at),
                a.started_at.as_millisecond(),
                a.latency.as_secs_f64() * 1000.0,
                a.status,
                a.class,
                a.error
            ])?;
            (1, a.status)
        }
        None => (0, None),
    };
    let set_state = |sql: &'static str, extra: &[&dyn rusqlite::ToSql]| -> rusqlite::Result<bool> {
        let mut stmt = c.prepare_cached(sql)?;
        let common: [&dyn rusqlite::ToSql; 5] = [&bump, &status, &run_id, &now_ms, &job_id];
        for (i, value) in common.iter().chain(extra).enumerate() {
            stmt.raw_bind_parameter(i + 1, value)?;
        }
        Ok(stmt.raw_execute()? == 1)
    };
    let applied = match transition {
        Transition::Keep => set_state(set_state_sql!("", working!()), &[])?,
        Transition::InFlight {
            check_after,
            new_create: true,
        } => set_state(
            set_state_sql!(
                ", state = 'in_flight', creates = creates + 1, next_attempt_at = ?6",
                "state = 'pending'"
            ),
            &[check_after],
        )?,
        Transition::InFlight {
            check_after,
            new_create: false,
        } => set_state(
            set_state_sql!(", next_attempt_at = ?6", "state = 'in_flight'"),
            &[check_after],
        )?,
        Transition::Unsent => set_state(
            set_state_sql!(
                ", state = 'pending', creates = creates - 1, next_attempt_at = NULL",
                "state = 'in_flight'"
            ),
            &[],
        )?,
        Transition::Succeeded { obtained, group } => {
            let applied = set_state(
                set_state_sql!(
                    ", state = 'succeeded', obtained = ?6, group_id = ?7, needs_check = 0, \
                     next_attempt_at = NULL, error = NULL, error_class = NULL",
                    working!()
                ),
                &[&obtained.as_str(), &group.id],
            )?;
            if applied {
                insert_group(c, job_id, obtained.as_str(), group)?;
            }
            applied
        }
        Transition::Failed {
            reason,
            class,
            status: _,
        } => set_state(
            set_state_sql!(
                ", state = 'failed', error = ?6, error_class = ?7, next_attempt_at = NULL",
                working!()
            ),
            &[reason, class],
        )?,
        Transition::Unknown { reason } => set_state(
            set_state_sql!(
                ", state = 'unknown', error = ?6, error_class = 'ambiguous', needs_check = 1",
                working!()
            ),
            &[reason],
        )?,
        Transition::Pending {
            next_attempt_at,
            needs_check,
            reason,
        } => set_state(
            set_state_sql!(
                ", state = 'pending', next_attempt_at = ?6, needs_check = ?7, error = ?8",
                working!()
            ),
            &[next_attempt_at, needs_check, reason],
        )?,
    };
    if !applied {
        let group = match transition {
            Transition::Succeeded { group, .. } => Some(group.id.as_str()),
            _ => None,
        };
        tracing::warn!(
            job = job_id,
            run = run_id,
            change = transition.name(),
            group,
            "not recorded: this job was claimed by another run since (a second run on this \
             database; the run lock should prevent that). That run records its outcome, \
             checking for a group first"
        );
    }
    Ok(applied)
}

/// Stores a job's group. A job has one group: should a second one ever be recorded
/// for it, the first is kept and the second is logged, never written over.
fn insert_group(
    c: &Connection,
    job_id: i64,
    obtained: &str,
    group: &crate::job::Group,
) -> rusqlite::Result<()> {
    let inserted = c
        .prepare_cached(
            "INSERT INTO groups (id, job_id, share_id, status, customer_id, order_id, \
             expires_at, created_at, obtained, raw, recorded_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
             ON CONFLICT (job_id) DO NOTHING",
        )?
        .execute(params![
            group.id,
            job_id,
            group.share_id,
            group.status,
            group.customer_id,
            group.order_id,
            group.expires_at,
            group.created_at,
            obtained,
            group.raw,
            now_text()
        ])?;
    if inserted == 0 {
        let kept: String = c
            .prepare_cached("SELECT id FROM groups WHERE job_id = ?1")?
            .query_row(params![job_id], |r| r.get(0))?;
        if kept != group.id {
            tracing::error!(
                job = job_id,
                kept = %kept,
                second = %group.id,
                "a second group was recorded for one job; the first is kept. Check both in \
                 the KohortPay dashboard"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use jiff::Timestamp;

    use super::ts_text;

    #[test]
    fn time_text_is_the_strftime_format() {
        for (secs, nanos) in [
            (0, 0),
            (1_795_000_000, 0),
            (1_795_000_000, 999_999_999),
            (1_795_000_000, 1_500),
            (1_795_000_000, 123_456_789),
            (4_102_444_799, 999_999_000),
        ] {
            let ts = Timestamp::new(secs, nanos).unwrap();
            let expected = ts.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
            assert_eq!(ts_text(ts), expected, "{secs}.{nanos:09}");
        }
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..10_000 {
            let ts = Timestamp::new(rng.i64(0..4_102_444_800), rng.i32(0..1_000_000_000)).unwrap();
            assert_eq!(
                ts_text(ts),
                ts.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
            );
        }
    }
}
