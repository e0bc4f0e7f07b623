//! The database schema, as an ordered list of migrations keyed by `PRAGMA user_version`.
//!
//! Migrations only ever get appended: a database written by an older version is
//! brought forward in one transaction when it is opened.

use rusqlite::{Connection, OptionalExtension};

use super::failure::{DbCause, Failure};

/// Each entry moves the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: runs, jobs, attempts, groups, import issues.
    r#"
    CREATE TABLE runs (
        id          INTEGER PRIMARY KEY,
        command     TEXT NOT NULL,
        started_at  TEXT NOT NULL,
        finished_at TEXT,
        pid         INTEGER NOT NULL,
        exit_code   INTEGER,
        stopped     TEXT,              -- why the run stopped early, if it did
        options     TEXT NOT NULL,     -- the resolved options, as JSON (never the key)
        imported    TEXT               -- import counts of this run, as JSON
    );

    CREATE TABLE jobs (
        id              INTEGER PRIMARY KEY,
        key             TEXT UNIQUE,   -- orderId, else paymentIntentId; NULL for invalid rows
        row_key         TEXT,          -- the key an invalid row would have had
        customer_id     TEXT,
        order_id        TEXT,
        payment_intent_id TEXT,
        payload         TEXT,          -- the POST /groups body (JSON); NULL for invalid rows
        raw             TEXT NOT NULL, -- invalid rows: the row as written, header -> cell (JSON); else ''
        source          TEXT NOT NULL, -- file name, '<stdin>' or 'inbox'
        line            INTEGER,       -- line of the row in its file
        state           TEXT NOT NULL CHECK (state IN
                          ('pending','in_flight','succeeded','failed','unknown','invalid')),
        obtained        TEXT CHECK (obtained IN ('created','existing','recovered')),
        attempts        INTEGER NOT NULL DEFAULT 0,  -- HTTP exchanges, all runs
        creates         INTEGER NOT NULL DEFAULT 0,  -- POST /groups sent, all runs
        needs_check     INTEGER NOT NULL DEFAULT 0,  -- 1: a group may exist; check before sending
        next_attempt_at INTEGER,       -- unix ms; not before
        error           TEXT,          -- the reason for failed / unknown / invalid
        error_class     TEXT,
        last_status     INTEGER,
        group_id        TEXT,
        first_run_id    INTEGER REFERENCES runs(id),
        last_run_id     INTEGER REFERENCES runs(id),
        updated_at      TEXT NOT NULL
    );
    CREATE INDEX jobs_state ON jobs(state, id);
    CREATE INDEX jobs_row_key ON jobs(row_key) WHERE row_key IS NOT NULL;
    CREATE INDEX jobs_source_line ON jobs(source, line) WHERE state = 'invalid';
    CREATE INDEX jobs_last_run ON jobs(last_run_id, state);

    CREATE TABLE attempts (
        id          INTEGER PRIMARY KEY,
        job_id      INTEGER NOT NULL REFERENCES jobs(id),
        run_id      INTEGER NOT NULL REFERENCES runs(id),
        kind        TEXT NOT NULL CHECK (kind IN ('create','check_order','fetch_group')),
        started_at  TEXT NOT NULL,
        started_ms  INTEGER NOT NULL,  -- the same instant, unix ms (for rates)
        latency_ms  REAL NOT NULL,
        status      INTEGER,           -- HTTP status; NULL for transport errors
        class       TEXT NOT NULL,     -- outcome class, see api::classify
        error       TEXT
    );
    CREATE INDEX attempts_run ON attempts(run_id);
    CREATE INDEX attempts_job ON attempts(job_id);

    CREATE TABLE groups (
        id          TEXT PRIMARY KEY,  -- pg_...
        job_id      INTEGER NOT NULL REFERENCES jobs(id),
        share_id    TEXT,
        status      TEXT,
        customer_id TEXT,
        order_id    TEXT,
        expires_at  TEXT,
        created_at  TEXT,
        obtained    TEXT NOT NULL,
        raw         TEXT NOT NULL,     -- the group object exactly as received
        recorded_at TEXT NOT NULL
    );
    CREATE INDEX groups_job ON groups(job_id);

    CREATE TABLE import_issues (
        id      INTEGER PRIMARY KEY,
        run_id  INTEGER NOT NULL REFERENCES runs(id),
        source  TEXT NOT NULL,
        line    INTEGER,
        key     TEXT,
        kind    TEXT NOT NULL CHECK (kind IN ('duplicate','conflict')),
        reason  TEXT NOT NULL
    );
    CREATE INDEX import_issues_run ON import_issues(run_id);

    -- Which process is running a batch on this database (at most one row).
    CREATE TABLE lock (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        pid        INTEGER NOT NULL,
        run_id     INTEGER NOT NULL,
        started_at TEXT NOT NULL
    );
    "#,
    // 2: the inbox queue. A stable contract for producers (see README, "The queue").
    r#"
    CREATE TABLE inbox (
        id                INTEGER PRIMARY KEY AUTOINCREMENT,
        customer_id       TEXT,
        order_id          TEXT,
        payment_intent_id TEXT,
        metadata          TEXT,      -- a JSON object, as text
        expires_at        TEXT,      -- RFC 3339
        enqueued_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
    );
    "#,
    // 3: indexes that earn their keep. Every job changes state twice per send and an
    // index on the state (or the run) is rewritten each time, so none: the engine,
    // reports and exports all walk jobs in id order, which costs one scan per run.
    r#"
    DROP INDEX jobs_state;
    DROP INDEX jobs_last_run;
    DROP INDEX attempts_job;
    DROP INDEX groups_job;
    "#,
    // 4: groups keyed by their job. Keyed by the random `pg_…` id, every commit
    // dirtied one random B-tree page per group (and wrote each whole to the WAL);
    // job ids grow with the work, so new groups append. One job has one group.
    r#"
    CREATE TABLE groups_by_job (
        job_id      INTEGER PRIMARY KEY REFERENCES jobs(id),
        id          TEXT NOT NULL,     -- pg_...
        share_id    TEXT,
        status      TEXT,
        customer_id TEXT,
        order_id    TEXT,
        expires_at  TEXT,
        created_at  TEXT,
        obtained    TEXT NOT NULL,
        raw         TEXT NOT NULL,     -- the group object exactly as received
        recorded_at TEXT NOT NULL
    );
    INSERT INTO groups_by_job
        SELECT g.job_id, g.id, g.share_id, g.status, g.customer_id, g.order_id, g.expires_at,
               g.created_at, g.obtained, g.raw, g.recorded_at
        FROM groups g JOIN jobs j ON j.id = g.job_id AND j.group_id = g.id;
    DROP TABLE groups;
    ALTER TABLE groups_by_job RENAME TO groups;
    "#,
    // 5: jobs half the size, and CHECKs that cost nothing. A job stored its request
    // body twice (JSON, plus some fields again), its source file's name on every row
    // and a 27-byte timestamp: at a million rows that was 200 MB written twice (WAL,
    // then checkpoint). Now the body is one column per field and the key is computed
    // from them; sources are a table. And `x IN (...)` in a CHECK built a temporary
    // B-tree on every insert and state change; the same rule as a chain of `=` does not.
    // The whole rebuild took an import of a million rows from 4.9 s to 1.3 s.
    r#"
    CREATE TABLE sources (
        id   INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE      -- file name as given, '<stdin>' or 'inbox'
    );
    INSERT INTO sources (name) SELECT DISTINCT source FROM jobs ORDER BY source;

    CREATE TABLE jobs_v5 (
        id                INTEGER PRIMARY KEY,
        -- First, what a run's report counts (a scan reads a record's columns in order).
        state             TEXT NOT NULL CHECK (state = 'pending' OR state = 'in_flight'
                            OR state = 'succeeded' OR state = 'failed' OR state = 'unknown'
                            OR state = 'invalid'),
        last_run_id       INTEGER,     -- runs(id): the run that last changed the job
        obtained          TEXT CHECK (obtained = 'created' OR obtained = 'existing'
                            OR obtained = 'recovered'),
        -- The POST /groups body, one column per field (NULL: not sent); all NULL for
        -- invalid rows.
        customer_id       TEXT,
        order_id          TEXT,
        payment_intent_id TEXT,
        expires_at        TEXT,
        mid_expire_at     TEXT,
        metadata          TEXT,        -- a JSON object
        key               TEXT GENERATED ALWAYS AS (coalesce(order_id, payment_intent_id)) VIRTUAL,
        row_key           TEXT,        -- the key an invalid row would have had
        raw               TEXT NOT NULL, -- invalid rows: the row as written, header -> cell (JSON); else ''
        source_id         INTEGER NOT NULL, -- sources(id)
        line              INTEGER,     -- line of the row in its file (inbox: the inbox id)
        attempts          INTEGER NOT NULL DEFAULT 0,  -- HTTP exchanges, all runs
        creates           INTEGER NOT NULL DEFAULT 0,  -- POST /groups sent, all runs
        needs_check       INTEGER NOT NULL DEFAULT 0,  -- 1: a group may exist; check before sending
        next_attempt_at   INTEGER,     -- unix ms; not before
        error             TEXT,        -- the reason for failed / unknown / invalid
        error_class       TEXT,
        last_status       INTEGER,
        group_id          TEXT,
        first_run_id      INTEGER,     -- runs(id)
        updated_ms        INTEGER NOT NULL -- unix ms
        -- The run and source ids are not declared as foreign keys: rows of runs and
        -- sources are never deleted, the ids come from the same transaction, and each
        -- declared key costs a lookup on every insert and state change (a tenth of an
        -- import's time).
    );
    INSERT INTO jobs_v5 (id, customer_id, order_id, payment_intent_id, expires_at,
        mid_expire_at, metadata, row_key, raw, source_id, line, state, obtained, attempts,
        creates, needs_check, next_attempt_at, error, error_class, last_status, group_id,
        first_run_id, last_run_id, updated_ms)
    SELECT j.id, j.payload ->> '$.customerId', j.payload ->> '$.orderId',
        j.payload ->> '$.paymentIntentId', j.payload ->> '$.expiresAt',
        j.payload ->> '$.midExpireAt', j.payload -> '$.metadata', j.row_key, j.raw, s.id,
        j.line, j.state, j.obtained, j.attempts, j.creates, j.needs_check,
        j.next_attempt_at, j.error, j.error_class, j.last_status, j.group_id,
        j.first_run_id, j.last_run_id,
        coalesce(CAST(round((julianday(j.updated_at) - 2440587.5) * 86400000.0) AS INTEGER), 0)
    FROM jobs j JOIN sources s ON s.name = j.source;
    DROP TABLE jobs;
    ALTER TABLE jobs_v5 RENAME TO jobs;
    CREATE UNIQUE INDEX jobs_key ON jobs(key);
    CREATE INDEX jobs_row_key ON jobs(row_key) WHERE row_key IS NOT NULL;
    CREATE INDEX jobs_source_line ON jobs(source_id, line) WHERE state = 'invalid';

    CREATE TABLE attempts_v5 (
        id          INTEGER PRIMARY KEY,
        job_id      INTEGER NOT NULL REFERENCES jobs(id),
        run_id      INTEGER NOT NULL REFERENCES runs(id),
        kind        TEXT NOT NULL CHECK (kind = 'create' OR kind = 'check_order'
                      OR kind = 'fetch_group'),
        started_at  TEXT NOT NULL,
        started_ms  INTEGER NOT NULL,  -- the same instant, unix ms (for rates)
        latency_ms  REAL NOT NULL,
        status      INTEGER,           -- HTTP status; NULL for transport errors
        class       TEXT NOT NULL,     -- outcome class, see api::classify
        error       TEXT
    );
    INSERT INTO attempts_v5 SELECT id, job_id, run_id, kind, started_at, started_ms,
        latency_ms, status, class, error FROM attempts;
    DROP TABLE attempts;
    ALTER TABLE attempts_v5 RENAME TO attempts;
    CREATE INDEX attempts_run ON attempts(run_id);
    "#,
    // 6: groups stored in the order they are recorded. Keyed by job id, they did not
    // append after all: jobs finish in any order among the few hundred in flight, so
    // each commit rewrote dozens of pages near the table's end (most of a run's WAL).
    // Now the table appends and a small unique index finds a job's group. Attempts and
    // groups no longer declare foreign keys, like jobs since migration 5: their parents
    // are never deleted, and each declared key cost a lookup on every insert.
    r#"
    CREATE TABLE groups_v6 (
        job_id      INTEGER NOT NULL UNIQUE, -- jobs(id); one group per job
        id          TEXT NOT NULL,     -- pg_...
        share_id    TEXT,
        status      TEXT,
        customer_id TEXT,
        order_id    TEXT,
        expires_at  TEXT,
        created_at  TEXT,
        obtained    TEXT NOT NULL,
        raw         TEXT NOT NULL,     -- the group object exactly as received
        recorded_at TEXT NOT NULL
    );
    INSERT INTO groups_v6 (job_id, id, share_id, status, customer_id, order_id, expires_at,
                           created_at, obtained, raw, recorded_at)
        SELECT job_id, id, share_id, status, customer_id, order_id, expires_at, created_at,
               obtained, raw, recorded_at
        FROM groups ORDER BY job_id;
    DROP TABLE groups;
    ALTER TABLE groups_v6 RENAME TO groups;
    CREATE TABLE attempts_v6 (
        id          INTEGER PRIMARY KEY,
        job_id      INTEGER NOT NULL,  -- jobs(id)
        run_id      INTEGER NOT NULL,  -- runs(id)
        kind        TEXT NOT NULL CHECK (kind = 'create' OR kind = 'check_order'
                      OR kind = 'fetch_group'),
        started_at  TEXT NOT NULL,
        started_ms  INTEGER NOT NULL,  -- the same instant, unix ms (for rates)
        latency_ms  REAL NOT NULL,
        status      INTEGER,           -- HTTP status; NULL for transport errors
        class       TEXT NOT NULL,     -- outcome class, see api::classify
        error       TEXT
    );
    INSERT INTO attempts_v6 SELECT id, job_id, run_id, kind, started_at, started_ms,
        latency_ms, status, class, error FROM attempts;
    DROP TABLE attempts;
    ALTER TABLE attempts_v6 RENAME TO attempts;
    CREATE INDEX attempts_run ON attempts(run_id);
    "#,
    // 7: jobs claimed by their run, and conflicting rows kept. A job is marked in
    // flight only from pending by the run that claimed it, and only that run records
    // its outcome (should the run lock ever fail, a second run's sends are refused, not
    // duplicated). A conflicting row's data is kept for `export failures`.
    r#"
    ALTER TABLE jobs ADD COLUMN claim_run INTEGER;  -- runs(id): the run that took the job to send it
    ALTER TABLE import_issues ADD COLUMN raw TEXT;  -- conflicts: the row, input column -> cell (JSON)
    ALTER TABLE runs ADD COLUMN paused_ms INTEGER;  -- time requests were held by Retry-After pauses
    ALTER TABLE runs ADD COLUMN report TEXT;        -- the report as printed when the run finished (JSON)
    "#,
    // 8: existence checks in lists. One `GET /orders?search=` request checks up to 25
    // jobs: each of them records it (kind `list_orders`), and `batch` (the run's
    // number for the request) tells that they shared one request.
    r#"
    CREATE TABLE attempts_v8 (
        id          INTEGER PRIMARY KEY,
        job_id      INTEGER NOT NULL,  -- jobs(id)
        run_id      INTEGER NOT NULL,  -- runs(id)
        kind        TEXT NOT NULL CHECK (kind = 'create' OR kind = 'check_order'
                      OR kind = 'fetch_group' OR kind = 'list_orders'),
        started_at  TEXT NOT NULL,
        started_ms  INTEGER NOT NULL,  -- the same instant, unix ms (for rates)
        latency_ms  REAL NOT NULL,
        status      INTEGER,           -- HTTP status; NULL for transport errors
        class       TEXT NOT NULL,     -- outcome class, see api::classify
        error       TEXT,
        batch       INTEGER            -- list_orders: the run's number for the shared request
    );
    INSERT INTO attempts_v8 (id, job_id, run_id, kind, started_at, started_ms, latency_ms,
                             status, class, error)
        SELECT id, job_id, run_id, kind, started_at, started_ms, latency_ms, status, class,
               error FROM attempts;
    DROP TABLE attempts;
    ALTER TABLE attempts_v8 RENAME TO attempts;
    CREATE INDEX attempts_run ON attempts(run_id);
    "#,
];

/// The schema version this build writes.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

/// The mark of a kohort-batch database (`PRAGMA application_id`, "KBAT"): a file
/// without it that holds anything is another application's, and is left alone.
pub const APPLICATION_ID: i32 = 0x4B42_4154;

/// How a command uses the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Creates it if it is new and brings its schema forward (commands that write).
    Write,
    /// Only reads it: never creates, migrates or marks it (`report`, `export`).
    Read,
}

/// Checks that the file is a kohort-batch database (or a new, empty one) before
/// anything is written to it, then, for [`Access::Write`], sets the connection up
/// (WAL, busy timeout), applies pending migrations and marks it as ours.
pub fn prepare(
    conn: &mut Connection,
    access: Access,
    busy_timeout: std::time::Duration,
) -> Result<(), Failure> {
    conn.busy_timeout(busy_timeout)?;
    let app: i32 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let has = |t: &str| tables.iter().any(|name| name == t);
    // Databases made before the mark existed: our schema versions and our tables.
    let unmarked_ours =
        (1..=VERSION).contains(&current) && has("runs") && has("jobs") && has("lock");
    let empty = current == 0 && tables.is_empty();
    if app != APPLICATION_ID && !(app == 0 && (unmarked_ours || empty)) {
        return Err(Failure::new(
            DbCause::NotOurs,
            format!(
                "not a kohort-batch database: it holds {} of another application \
                 (application_id {app}, user_version {current}); nothing in it was changed. \
                 Pass the --db of your runs, or a new file",
                crate::text::count(tables.len() as u64, "table", "tables")
            ),
        ));
    }
    if current > VERSION {
        return Err(newer(current, VERSION));
    }
    // Savepoint journals in memory, not in temp files; a 16 MiB page cache (settings
    // of this connection, not of the file).
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -16_384)?;
    // Every statement of the hot path stays prepared (the default keeps 16).
    conn.set_prepared_statement_cache_capacity(128);
    if access == Access::Read {
        if empty {
            return Err(Failure::new(
                DbCause::NotOurs,
                "empty: no run has used it yet (is --db the file your runs use?)",
            ));
        }
        if current < VERSION {
            return Err(Failure::new(
                DbCause::Version,
                format!(
                    "written by an older kohort-batch (schema {current}; this one needs \
                     {VERSION}); report and export never change a database: upgrade it once \
                     with this version's `run` or `enqueue`, then read it"
                ),
            ));
        }
        return Ok(());
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL in WAL mode survives a killed process; only a power cut can lose the
    // last commits, and the existence check covers those jobs.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    migrate(conn, current, VERSION)?;
    if app != APPLICATION_ID {
        conn.pragma_update(None, "application_id", APPLICATION_ID)?;
    }
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// A schema written by a newer kohort-batch (`found`; this build knows up to
/// `known`): refused, in either backend.
pub(super) fn newer(found: i64, known: i64) -> Failure {
    Failure::new(
        DbCause::Version,
        format!(
            "written by a newer kohort-batch (schema {found}; this one knows up to \
             {known}): use that version or a newer one; nothing was changed"
        ),
    )
}

/// Applies the migrations that take the schema from `from` to `to`, in one transaction.
/// The current schema in a fresh connection (tests).
#[cfg(test)]
pub(super) fn migrate_for_tests(conn: &mut Connection) {
    migrate(conn, 0, VERSION).expect("the schema");
}

fn migrate(conn: &mut Connection, from: i64, to: i64) -> rusqlite::Result<()> {
    if from >= to {
        return Ok(());
    }
    if from > 0 {
        tracing::info!(
            from,
            to,
            "upgrading the database schema: a one-time step that can take a minute on a \
             database of millions of jobs"
        );
    }
    // Migrations rebuild tables, which SQLite allows only with foreign keys off (a
    // setting that can't change inside a transaction); they are checked before commit.
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    let result = migrate_in_transaction(conn, from, to);
    conn.pragma_update(None, "foreign_keys", "ON")?;
    result
}

fn migrate_in_transaction(conn: &mut Connection, from: i64, to: i64) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(to as usize)
        .skip(from as usize)
    {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
    }
    let broken: Option<String> = tx
        .query_row("PRAGMA foreign_key_check", [], |r| r.get(0))
        .optional()?;
    if let Some(table) = broken {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT),
            Some(format!(
                "upgrading the schema would leave a dangling reference in table {table}; \
                 nothing was changed (keep using the previous kohort-batch and report this)"
            )),
        ));
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Payload;

    #[test]
    fn groups_move_to_their_jobs_keeping_the_current_one() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, 0, 3).unwrap();
        conn.execute_batch(
            "INSERT INTO runs (id, command, started_at, pid, options) VALUES (1, 'run', 't', 1, '{}');
             INSERT INTO jobs (id, key, raw, source, state, group_id, updated_at)
                 VALUES (7, 'ord_1', '', 'f', 'succeeded', 'pg_new', 't');
             INSERT INTO groups (id, job_id, share_id, obtained, raw, recorded_at)
                 VALUES ('pg_old', 7, 'KHT-OLD', 'created', '{}', 't'),
                        ('pg_new', 7, 'KHT-NEW', 'recovered', '{}', 't');",
        )
        .unwrap();
        migrate(&mut conn, 3, VERSION).unwrap();
        let (job, id, share): (i64, String, String) = conn
            .query_row("SELECT job_id, id, share_id FROM groups", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((job, id.as_str(), share.as_str()), (7, "pg_new", "KHT-NEW"));
    }

    #[test]
    fn jobs_keep_their_bodies_keys_and_sources_across_the_rebuild() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, 0, 4).unwrap();
        conn.execute_batch(
            r#"INSERT INTO runs (id, command, started_at, pid, options) VALUES (1, 'run', 't', 1, '{}');
             INSERT INTO jobs (id, key, customer_id, order_id, payload, raw, source, line, state,
                 obtained, attempts, creates, group_id, first_run_id, last_run_id, updated_at)
             VALUES (1, 'ord_1', 'cus_1', 'ord_1',
                 '{"customerId":"cus_1","orderId":"ord_1","expiresAt":"2027-01-01T00:00:00.000Z","metadata":{"a":"x","n":2}}',
                 '', 'in/a.csv', 2, 'succeeded', 'created', 1, 1, 'pg_1', 1, 1,
                 '2026-11-24T10:00:00.250000Z');
             INSERT INTO jobs (id, key, payload, raw, source, line, state, first_run_id, last_run_id, updated_at)
             VALUES (2, 'pi_2', '{"customerId":"cus_2","paymentIntentId":"pi_2"}', '', 'inbox', 7,
                 'pending', 1, 1, '2026-11-24T10:00:01.000000Z');
             INSERT INTO jobs (id, row_key, raw, source, line, state, error, first_run_id, last_run_id, updated_at)
             VALUES (3, 'ord_3', '{"orderId":"ord_3"}', 'in/a.csv', 4, 'invalid', 'no customerId', 1, 1,
                 '2026-11-24T10:00:02.000000Z');
             INSERT INTO attempts (job_id, run_id, kind, started_at, started_ms, latency_ms, status, class)
             VALUES (1, 1, 'create', 't', 5, 1.5, 201, 'success');
             INSERT INTO groups (job_id, id, obtained, raw, recorded_at) VALUES (1, 'pg_1', 'created', '{}', 't');"#,
        )
        .unwrap();
        migrate(&mut conn, 4, VERSION).unwrap();
        let rows: Vec<(Option<String>, Option<Payload>, String, i64)> = conn
            .prepare(&format!(
                "SELECT j.key, {}, s.name, j.updated_ms FROM jobs j \
                 JOIN sources s ON s.id = j.source_id ORDER BY j.id",
                crate::store::body::BODY_COLUMNS
            ))
            .unwrap()
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    crate::store::body::read_body(r, 1)?,
                    r.get(7)?,
                    r.get(8)?,
                ))
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let body1: Payload = serde_json::from_str(
            r#"{"customerId":"cus_1","orderId":"ord_1","expiresAt":"2027-01-01T00:00:00.000Z","metadata":{"a":"x","n":2}}"#,
        )
        .unwrap();
        let body2: Payload =
            serde_json::from_str(r#"{"customerId":"cus_2","paymentIntentId":"pi_2"}"#).unwrap();
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap().as_millisecond();
        assert_eq!(
            rows,
            vec![
                (
                    Some("ord_1".into()),
                    Some(body1),
                    "in/a.csv".into(),
                    at("2026-11-24T10:00:00.25Z")
                ),
                (
                    Some("pi_2".into()),
                    Some(body2),
                    "inbox".into(),
                    at("2026-11-24T10:00:01Z")
                ),
                (None, None, "in/a.csv".into(), at("2026-11-24T10:00:02Z")),
            ]
        );
        // The key stays unique, and the attempts and groups still point at their job.
        let dup = conn.execute(
            "INSERT INTO jobs (customer_id, order_id, raw, source_id, state, updated_ms) \
             VALUES ('cus_9', 'ord_1', '', 1, 'pending', 0)",
            [],
        );
        assert!(dup.is_err(), "{dup:?}");
        let linked: i64 = conn
            .query_row(
                "SELECT count(*) FROM attempts a JOIN groups g ON g.job_id = a.job_id \
                 JOIN jobs j ON j.id = a.job_id WHERE j.key = 'ord_1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(linked, 1);
    }

    #[test]
    fn groups_keep_their_jobs_and_append_in_recording_order() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, 0, 5).unwrap();
        conn.execute_batch(
            "INSERT INTO runs (id, command, started_at, pid, options) VALUES (1, 'run', 't', 1, '{}');
             INSERT INTO sources (id, name) VALUES (1, 'a.csv');
             INSERT INTO jobs (id, customer_id, order_id, raw, source_id, state, updated_ms)
                 VALUES (1, 'c', 'o1', '', 1, 'succeeded', 0), (2, 'c', 'o2', '', 1, 'pending', 0),
                        (3, 'c', 'o3', '', 1, 'succeeded', 0);
             INSERT INTO groups (job_id, id, share_id, obtained, raw, recorded_at)
                 VALUES (3, 'pg_3', 'KHT-3', 'created', '{\"id\":\"pg_3\"}', 't3'),
                        (1, 'pg_1', NULL, 'recovered', '{}', 't1');
             INSERT INTO attempts (id, job_id, run_id, kind, started_at, started_ms, latency_ms, status, class)
                 VALUES (10, 3, 1, 'create', 't', 5, 1.5, 201, 'success'),
                        (11, 1, 1, 'check_order', 't', 6, 2.5, 200, 'success');",
        )
        .unwrap();
        migrate(&mut conn, 5, VERSION).unwrap();
        let groups: Vec<(i64, String, Option<String>, String, String)> = conn
            .prepare("SELECT job_id, id, share_id, obtained, raw FROM groups ORDER BY rowid")
            .unwrap()
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            groups,
            vec![
                (1, "pg_1".into(), None, "recovered".into(), "{}".into()),
                (
                    3,
                    "pg_3".into(),
                    Some("KHT-3".into()),
                    "created".into(),
                    r#"{"id":"pg_3"}"#.into()
                ),
            ]
        );
        // One group per job; a new group goes after the others, whatever its job.
        let dup = conn.execute(
            "INSERT INTO groups (job_id, id, obtained, raw, recorded_at) VALUES (3, 'pg_x', 'created', '{}', 't')",
            [],
        );
        assert!(dup.is_err(), "{dup:?}");
        conn.execute(
            "INSERT INTO groups (job_id, id, obtained, raw, recorded_at) VALUES (2, 'pg_2', 'created', '{}', 't')",
            [],
        )
        .unwrap();
        let last: i64 = conn
            .query_row(
                "SELECT job_id FROM groups ORDER BY rowid DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(last, 2);
        let attempts: Vec<(i64, i64, String)> = conn
            .prepare("SELECT id, job_id, kind FROM attempts WHERE run_id = 1 ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            attempts,
            vec![(10, 3, "create".into()), (11, 1, "check_order".into())]
        );
        let declared: i64 = conn
            .query_row(
                "SELECT (SELECT count(*) FROM pragma_foreign_key_list('attempts')) \
                      + (SELECT count(*) FROM pragma_foreign_key_list('groups'))",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(declared, 0);
    }

    #[test]
    fn migrations_apply_once_and_are_idempotent() {
        let mut conn = Connection::open_in_memory().unwrap();
        prepare(&mut conn, Access::Write, std::time::Duration::from_secs(1)).unwrap();
        prepare(&mut conn, Access::Write, std::time::Duration::from_secs(1)).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, VERSION);
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type='table'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(n >= 6);
    }
}
