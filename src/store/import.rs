//! Importing rows into `jobs`: chunks of valid rows in one statement, and the rules
//! for rows whose key is taken (duplicates, conflicts, fixes) or that are invalid.

use rusqlite::{Connection, OptionalExtension, named_params};

use super::body::{BODY_COLUMNS, bind_body, body_values, read_body};
use super::clock::now_ms;
use super::types::ImportCounts;
use crate::job::Payload;
use crate::source::ImportRow;

/// The id of a source name, added on first use.
fn source_id(c: &Connection, name: &str) -> rusqlite::Result<i64> {
    c.prepare_cached("INSERT INTO sources (name) VALUES (:name) ON CONFLICT (name) DO NOTHING")?
        .execute(named_params! {":name": name})?;
    c.prepare_cached("SELECT id FROM sources WHERE name = :name")?
        .query_row(named_params! {":name": name}, |r| r.get(0))
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
    let batch = ImportBatch {
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
                let new = batch.job(row, payload);
                match new.insert(&mut insert)? {
                    None => import_valid(c, &mut insert, &new, &mut counts)?,
                    Some(id) if invalid_keys.contains(payload.key()) => {
                        new.settle_insert(c, id, &mut counts)?;
                    }
                    Some(_) => counts.queued += 1,
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
    batch: &ImportBatch,
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
                "SELECT id FROM jobs WHERE state = 'invalid' AND source_id = :source_id \
                 AND line = :line AND raw = :raw LIMIT 1",
            )?
            .query_row(
                named_params! {":source_id": source_id, ":line": line, ":raw": raw},
                |r| r.get(0),
            )
            .optional()?,
    };
    match earlier {
        Some(id) => {
            c.prepare_cached(
                "UPDATE jobs SET error = :reason, raw = :raw, source_id = :source_id, \
                 line = :line, last_run_id = :run_id, updated_ms = :now WHERE id = :id",
            )?
            .execute(named_params! {
                ":reason": reason,
                ":raw": raw,
                ":source_id": source_id,
                ":line": line,
                ":run_id": run_id,
                ":now": now,
                ":id": id,
            })?;
        }
        None => {
            c.prepare_cached(
                "INSERT INTO jobs (row_key, raw, source_id, line, state, error, \
                 error_class, first_run_id, last_run_id, updated_ms) \
                 VALUES (:row_key, :raw, :source_id, :line, 'invalid', :reason, 'invalid', \
                 :run_id, :run_id, :now)",
            )?
            .execute(named_params! {
                ":row_key": row.key,
                ":raw": raw,
                ":source_id": source_id,
                ":line": line,
                ":reason": reason,
                ":run_id": run_id,
                ":now": now,
            })?;
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
         AND row_key IN (SELECT value FROM json_each(:keys))",
    )?
    .query_map(named_params! {":keys": keys}, |r| r.get(0))?
    .collect()
}

/// The newest invalid job whose row would have had this key.
fn latest_invalid(c: &Connection, row_key: &str) -> rusqlite::Result<Option<i64>> {
    c.prepare_cached(
        // `row_key IS NOT NULL` spelled out: the partial index's condition then follows
        // from the query itself, not from the bound value, which would make SQLite
        // recompile the statement on every bind.
        "SELECT id FROM jobs WHERE row_key IS NOT NULL AND row_key = :row_key \
         AND state = 'invalid' ORDER BY id DESC LIMIT 1",
    )?
    .query_row(named_params! {":row_key": row_key}, |r| r.get(0))
    .optional()
}

/// What every row of one import batch shares.
struct ImportBatch {
    run_id: i64,
    source_id: i64,
    now: i64,
}

impl ImportBatch {
    /// A valid row of this batch, on its way into `jobs`.
    fn job<'a>(&self, row: &'a ImportRow, payload: &'a Payload) -> NewJob<'a> {
        NewJob {
            run_id: self.run_id,
            source_id: self.source_id,
            line: row.line as i64,
            payload,
            metadata_json: row.metadata_json.as_deref(),
            now: self.now,
        }
    }
}

/// Valid rows inserted by one statement on the fast path of an import.
const CHUNK_ROWS: usize = 100;

/// The numbered parameters of the chunk insert ([`chunk_sql`]): the three the rows
/// share, then seven for each row (numbered rather than named: SQLite looks a name
/// up among all of a statement's parameters, 703 here).
mod chunk_params {
    /// The batch's source, run and time.
    pub(super) const SOURCE_ID: usize = 1;
    pub(super) const RUN_ID: usize = 2;
    pub(super) const NOW: usize = 3;
    /// Per row: the six body fields, then the line.
    pub(super) const PER_ROW: usize = 7;

    /// The first parameter of row `k`.
    pub(super) fn first_of_row(k: usize) -> usize {
        NOW + 1 + PER_ROW * k
    }
}

/// `INSERT … VALUES (…), (…), …` of [`CHUNK_ROWS`] new pending jobs: does nothing
/// for a row whose key is taken. With `returning`, it returns the rows that went in
/// (which costs about half as much again as the insert: only used when needed).
fn chunk_sql(returning: bool) -> &'static str {
    static PLAIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static RETURNING: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    match returning {
        false => PLAIN.get_or_init(|| chunk_insert_sql("")),
        true => RETURNING.get_or_init(|| chunk_insert_sql(" RETURNING key, line")),
    }
}

fn chunk_insert_sql(returning: &str) -> String {
    use chunk_params::{NOW, PER_ROW, RUN_ID, SOURCE_ID, first_of_row};
    {
        let rows: Vec<String> = (0..CHUNK_ROWS)
            .map(|k| {
                let p: Vec<String> = (first_of_row(k)..first_of_row(k) + PER_ROW)
                    .map(|i| format!("?{i}"))
                    .collect();
                format!(
                    "({}, '', ?{SOURCE_ID}, {}, 'pending', ?{RUN_ID}, ?{RUN_ID}, ?{NOW})",
                    p[..6].join(", "),
                    p[6]
                )
            })
            .collect();
        format!(
            "INSERT INTO jobs ({BODY_COLUMNS}, raw, source_id, line, state, first_run_id, \
             last_run_id, updated_ms) VALUES {} ON CONFLICT (key) DO NOTHING{returning}",
            rows.join(", ")
        )
    }
}

/// Inserts a chunk of valid rows with one statement: a statement per row costs about
/// a third more (`cargo bench --bench sqlite_floor`). A row the statement did not
/// insert takes the path of a row whose insert did nothing (duplicate, conflict or
/// fix).
fn insert_chunk(
    c: &Connection,
    insert: &mut rusqlite::Statement<'_>,
    batch: &ImportBatch,
    chunk: &[&ImportRow],
    invalid_keys: &std::collections::HashSet<String>,
    counts: &mut ImportCounts,
) -> rusqlite::Result<()> {
    let valid: Vec<(&ImportRow, &Payload)> = chunk
        .iter()
        .filter_map(|row| row.outcome.as_ref().ok().map(|p| (*row, p)))
        .collect();
    let went_in = insert_rows(c, batch, &valid)?;
    counts.rows += chunk.len() as u64;
    for ((row, payload), went_in) in valid.into_iter().zip(went_in) {
        let new = batch.job(row, payload);
        if !went_in {
            import_valid(c, insert, &new, counts)?;
        } else if invalid_keys.contains(payload.key()) {
            // A fix of an invalid row takes that row's place.
            new.settle_insert(c, job_with_key(c, payload.key())?, counts)?;
        } else {
            counts.queued += 1;
        }
    }
    Ok(())
}

/// Inserts `rows` with [`chunk_sql`]; returns, for each row, whether it went in
/// (its key was not taken by an earlier job or an earlier row of the chunk). The
/// plain statement's count of changes settles the usual cases (all rows went in, or
/// none); only when some did is it undone and run again, returning the new jobs.
fn insert_rows(
    c: &Connection,
    batch: &ImportBatch,
    rows: &[(&ImportRow, &Payload)],
) -> rusqlite::Result<Vec<bool>> {
    let savepoint = |sql: &str| c.prepare_cached(sql)?.execute([]).map(drop);
    savepoint("SAVEPOINT chunk")?;
    let went_in = match bound_chunk(c, batch, rows, false).and_then(|mut s| s.raw_execute()) {
        Ok(0) => Ok(vec![false; rows.len()]),
        Ok(n) if n == rows.len() => Ok(vec![true; rows.len()]),
        Ok(_) => savepoint("ROLLBACK TO chunk")
            .and_then(|()| returned_rows(bound_chunk(c, batch, rows, true)?, rows)),
        Err(e) => Err(e),
    };
    savepoint("RELEASE chunk")?;
    went_in
}

/// [`chunk_sql`] with `rows` bound, ready to run.
fn bound_chunk<'c>(
    c: &'c Connection,
    batch: &ImportBatch,
    rows: &[(&ImportRow, &Payload)],
    returning: bool,
) -> rusqlite::Result<rusqlite::CachedStatement<'c>> {
    let mut stmt = c.prepare_cached(chunk_sql(returning))?;
    stmt.raw_bind_parameter(chunk_params::SOURCE_ID, batch.source_id)?;
    stmt.raw_bind_parameter(chunk_params::RUN_ID, batch.run_id)?;
    stmt.raw_bind_parameter(chunk_params::NOW, batch.now)?;
    for (k, (row, p)) in rows.iter().enumerate() {
        let line = row.line as i64;
        let metadata_json = row.metadata_json.as_deref();
        let values = body_values(p, &metadata_json)
            .into_iter()
            .chain([&line as &dyn rusqlite::ToSql]);
        for (i, value) in values.enumerate() {
            stmt.raw_bind_parameter(chunk_params::first_of_row(k) + i, value)?;
        }
    }
    Ok(stmt)
}

/// Runs a [`chunk_sql`] with RETURNING; returns which rows went in.
fn returned_rows(
    mut stmt: rusqlite::CachedStatement<'_>,
    rows: &[(&ImportRow, &Payload)],
) -> rusqlite::Result<Vec<bool>> {
    // RETURNING gives no order: each new job is matched to its row by line and key.
    let by_line: std::collections::HashMap<i64, usize> = rows
        .iter()
        .enumerate()
        .map(|(k, (row, _))| (row.line as i64, k))
        .collect();
    let mut went_in = vec![false; rows.len()];
    let mut returned = stmt.raw_query();
    while let Some(r) = returned.next()? {
        let row = r.get::<_, Option<i64>>(1)?.and_then(|l| by_line.get(&l));
        if let Some(&k) = row
            && r.get_ref(0)?.as_str_or_null()? == Some(rows[k].1.key())
        {
            went_in[k] = true;
        }
    }
    Ok(went_in)
}

/// The id of the job that holds `key` (a row's new job, once it went in).
fn job_with_key(c: &Connection, key: &str) -> rusqlite::Result<i64> {
    c.prepare_cached("SELECT id FROM jobs WHERE key = :key")?
        .query_row(named_params! {":key": key}, |r| r.get(0))
}

/// A new pending job; does nothing when its key is taken (see [`NewJob::insert`]).
const INSERT_JOB: &str = "INSERT INTO jobs (customer_id, order_id, payment_intent_id, expires_at, \
     mid_expire_at, metadata, raw, source_id, line, state, first_run_id, last_run_id, updated_ms) \
     VALUES (:customer_id, :order_id, :payment_intent_id, :expires_at, :mid_expire_at, :metadata, \
     '', :source_id, :line, 'pending', :run_id, :run_id, :now) \
     ON CONFLICT (key) DO NOTHING RETURNING id";

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
            "UPDATE jobs SET customer_id = :customer_id, order_id = :order_id, \
             payment_intent_id = :payment_intent_id, expires_at = :expires_at, \
             mid_expire_at = :mid_expire_at, metadata = :metadata, row_key = NULL, raw = '', \
             source_id = :source_id, line = :line, state = 'pending', needs_check = :needs_check, \
             next_attempt_at = NULL, error = NULL, error_class = NULL, last_status = NULL, \
             last_run_id = :run_id, updated_ms = :now WHERE id = :id",
        )?;
        bind_body(&mut stmt, self.payload, self.metadata_json)?;
        stmt.raw_bind_parameter(c":source_id", self.source_id)?;
        stmt.raw_bind_parameter(c":line", self.line)?;
        stmt.raw_bind_parameter(c":needs_check", needs_check)?;
        stmt.raw_bind_parameter(c":run_id", self.run_id)?;
        stmt.raw_bind_parameter(c":now", self.now)?;
        stmt.raw_bind_parameter(c":id", id)?;
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
                c.prepare_cached("DELETE FROM jobs WHERE id = :id")?
                    .execute(named_params! {":id": inserted})?;
                self.replace(c, invalid, false)?;
                counts.fixed += 1;
            }
        }
        Ok(())
    }

    /// Inserts the job with [`INSERT_JOB`]; returns its id, `None` if its key is
    /// already taken.
    fn insert(&self, stmt: &mut rusqlite::Statement<'_>) -> rusqlite::Result<Option<i64>> {
        bind_body(stmt, self.payload, self.metadata_json)?;
        stmt.raw_bind_parameter(c":source_id", self.source_id)?;
        stmt.raw_bind_parameter(c":line", self.line)?;
        stmt.raw_bind_parameter(c":run_id", self.run_id)?;
        stmt.raw_bind_parameter(c":now", self.now)?;
        let mut returned = stmt.raw_query();
        match returned.next()? {
            Some(r) => Ok(Some(r.get(0)?)),
            None => Ok(None),
        }
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
            "SELECT id, state, creates, {BODY_COLUMNS} FROM jobs WHERE key = :key"
        ))?
        .query_row(named_params! {":key": key}, |r| {
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
            } else if new.insert(insert)?.is_some() {
                counts.queued += 1;
            }
        }
        Some((id, state, old, creates)) => {
            match taken(key, new.payload, &state, old.as_ref(), creates) {
                Taken::Duplicate { touch } => {
                    counts.duplicates += 1;
                    if touch {
                        c.prepare_cached("UPDATE jobs SET last_run_id = :run_id WHERE id = :id")?
                            .execute(named_params! {":run_id": new.run_id, ":id": id})?;
                    }
                }
                Taken::Fix { needs_check } => {
                    replace(id, needs_check)?;
                    counts.fixed += 1;
                }
                Taken::Conflict { reason, raw } => {
                    counts.conflicts += 1;
                    c.prepare_cached(
                    "INSERT INTO import_issues (run_id, source, line, key, kind, reason, raw) \
                     VALUES (:run_id, (SELECT name FROM sources WHERE id = :source_id), :line, :key, \
                     'conflict', :reason, :raw)",
                )?
                .execute(named_params! {
                    ":run_id": new.run_id,
                    ":source_id": new.source_id,
                    ":line": new.line,
                    ":key": key,
                    ":reason": reason,
                    ":raw": raw,
                })?;
                }
            }
        }
    }
    Ok(())
}

/// What a valid row becomes when its key is taken by job of state `state`, body
/// `old` and `creates` creates sent (the rule of both backends; README, "Importing
/// rows").
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Taken {
    /// The same data: not sent again. `touch`: the job is failed or unknown, so this
    /// run's report lists it (not sent again, but not done either).
    Duplicate { touch: bool },
    /// A fixed version of a failed row takes its place. If a create was ever sent, a
    /// group may exist after all: `needs_check`.
    Fix { needs_check: bool },
    /// Other data under a key in use: not imported, kept for `export failures`.
    Conflict { reason: String, raw: String },
}

/// Decides what a valid row `new` becomes when its key is taken (see [`Taken`]).
pub(super) fn taken(
    key: &str,
    new: &Payload,
    state: &str,
    old: Option<&Payload>,
    creates: i64,
) -> Taken {
    if old == Some(new) {
        return Taken::Duplicate {
            touch: state == "failed" || state == "unknown",
        };
    }
    if state == "failed" {
        return Taken::Fix {
            needs_check: creates > 0,
        };
    }
    Taken::Conflict {
        reason: format!(
            "key {key} was already imported with different data (that job is {state}); \
             this row was not sent. Remove the row, or give it its own orderId"
        ),
        // The row itself is kept, for `export failures`: nothing a person wrote is lost.
        raw: serde_json::to_string(&new.input_cells()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(customer: &str) -> Payload {
        serde_json::from_str(&format!(
            r#"{{"customerId":"{customer}","orderId":"ord_1"}}"#
        ))
        .unwrap()
    }

    /// The rule both backends apply to a row whose key a job already has.
    #[test]
    fn a_taken_key_is_a_duplicate_a_fix_or_a_conflict() {
        let (same, other) = (body("cus_1"), body("cus_2"));
        let table = [
            ("pending", Some(&same), 0, Taken::Duplicate { touch: false }),
            (
                "succeeded",
                Some(&same),
                1,
                Taken::Duplicate { touch: false },
            ),
            ("failed", Some(&same), 1, Taken::Duplicate { touch: true }),
            ("unknown", Some(&same), 1, Taken::Duplicate { touch: true }),
            ("failed", Some(&other), 0, Taken::Fix { needs_check: false }),
            ("failed", Some(&other), 2, Taken::Fix { needs_check: true }),
        ];
        for (state, old, creates, expected) in table {
            assert_eq!(
                taken("ord_1", &same, state, old, creates),
                expected,
                "{state} {creates}"
            );
        }
        for state in ["pending", "in_flight", "succeeded", "unknown"] {
            let Taken::Conflict { reason, raw } = taken("ord_1", &same, state, Some(&other), 1)
            else {
                panic!("{state}: not a conflict");
            };
            assert!(
                reason.contains("key ord_1") && reason.contains(&format!("that job is {state}")),
                "{reason}"
            );
            assert!(raw.contains("cus_1"), "{raw}");
        }
    }
}
