//! The database schema, as an ordered list of migrations keyed by `PRAGMA user_version`.
//!
//! Migrations only ever get appended: a database written by an older version is
//! brought forward in one transaction when it is opened.

use rusqlite::Connection;

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
];

/// The schema version this build writes.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

/// Sets the connection up (WAL, busy timeout) and applies pending migrations.
pub fn prepare(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL in WAL mode survives a killed process; only a power cut can lose the
    // last commits, and the existence check covers those jobs.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Savepoint journals in memory, not in temp files; a 16 MiB page cache.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -16_384)?;
    // Checkpoint every ~16 MiB of WAL rather than 4: fewer stalls in the writer thread.
    conn.pragma_update(None, "wal_autocheckpoint", 4_000)?;
    // Every statement of the hot path stays prepared (the default keeps 16).
    conn.set_prepared_statement_cache_capacity(128);
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current > VERSION {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_MISMATCH),
            Some(format!(
                "schema version {current} is newer than this kohort-batch understands \
                 ({VERSION}); use a newer kohort-batch"
            )),
        ));
    }
    migrate(conn, current, VERSION)
}

/// Applies the migrations that take the schema from `from` to `to`, in one transaction.
fn migrate(conn: &mut Connection, from: i64, to: i64) -> rusqlite::Result<()> {
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
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn migrations_apply_once_and_are_idempotent() {
        let mut conn = Connection::open_in_memory().unwrap();
        prepare(&mut conn).unwrap();
        prepare(&mut conn).unwrap();
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
