//! The SQLite store: the only place that holds SQL.
//!
//! One thread owns the connection. Everything else talks to it through a
//! [`Store`] handle over a bounded channel; the owner runs whatever has queued up
//! in one transaction (group commit) and answers each caller only after that
//! transaction is durable. So "`in_flight` is written before a request leaves"
//! holds while thousands of rows per second go by.

mod ops;
mod queries;
mod queue;
mod schema;
mod types;

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::source::ImportRow;

pub(crate) use ops::now_text;
pub use queries::{FailureReason, JobExport, RunFacts, RunListEntry};
pub use queue::RetryFilter;
pub use types::{
    Attempt, GroupRec, ImportCounts, Job, JobState, Obtained, RequestKind, Transition,
};

/// Most tasks run in one transaction before it is committed.
const MAX_BATCH: usize = 2048;

type Finish = Box<dyn FnOnce(Option<&str>) + Send>;
type Task = Box<dyn FnOnce(&Connection) -> Finish + Send>;

/// A cheap, cloneable handle to the database owner.
#[derive(Clone, Debug)]
pub struct Store {
    tx: mpsc::Sender<Task>,
    path: PathBuf,
}

impl Store {
    /// Opens an existing database (for commands that only read it).
    pub fn open_existing(path: &Path) -> Result<Store> {
        if !path.exists() {
            return Err(Error::Usage(format!(
                "there is no database at {}: pass the --db of your runs (or set KOHORT_BATCH_DB)",
                path.display()
            )));
        }
        Store::open(path)
    }

    /// Opens (creating if needed) the database at `path` and starts its owner thread.
    pub fn open(path: &Path) -> Result<Store> {
        let db_err = |e: rusqlite::Error| Error::Database {
            path: path.to_owned(),
            message: format!("{e} (check the path and its permissions)"),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            return Err(Error::Usage(format!(
                "the database directory {} does not exist; create it or pass another --db",
                dir.display()
            )));
        }
        let mut conn = Connection::open(path).map_err(db_err)?;
        schema::prepare(&mut conn).map_err(db_err)?;
        let (tx, rx) = mpsc::channel::<Task>(4096);
        let thread_path = path.to_owned();
        std::thread::Builder::new()
            .name("kohort-store".into())
            .spawn(move || owner_loop(conn, rx, &thread_path))
            .map_err(|e| Error::Internal(format!("cannot start the database thread: {e}")))?;
        Ok(Store {
            tx,
            path: path.to_owned(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the owner thread inside the current batch, and returns its result once
    /// the batch is committed.
    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel::<Result<T, String>>();
        let task: Task = Box::new(move |conn: &Connection| {
            let result = run_in_savepoint(conn, f);
            Box::new(move |commit_error: Option<&str>| {
                let result = match (result, commit_error) {
                    (Ok(_), Some(e)) => Err(format!("commit failed: {e}")),
                    (r, _) => r.map_err(|e| e.to_string()),
                };
                let _ = reply_tx.send(result);
            })
        });
        let closed = || Error::Internal("the database thread has stopped".into());
        self.tx.send(task).await.map_err(|_| closed())?;
        reply_rx
            .await
            .map_err(|_| closed())?
            .map_err(|message| Error::Database {
                path: self.path.clone(),
                message,
            })
    }

    /// Starts a run. An `exclusive` run (one that sends) takes the database lock, or
    /// reports its holder, and turns jobs left `in_flight` by a crash into pending jobs
    /// that are checked before any re-send. Returns the run id.
    pub async fn begin_run(&self, command: &str, options: String, exclusive: bool) -> Result<i64> {
        let command = command.to_owned();
        let result = self
            .call(move |c| ops::begin_run(c, &command, &options, exclusive))
            .await?;
        result.map_err(|(pid, started_at)| Error::Locked {
            path: self.path.clone(),
            pid,
            started_at,
        })
    }

    /// Records the end of a run and releases the lock.
    pub async fn finish_run(
        &self,
        run_id: i64,
        exit_code: u8,
        stopped: Option<String>,
    ) -> Result<()> {
        self.call(move |c| ops::finish_run(c, run_id, exit_code, stopped.as_deref()))
            .await
    }

    /// Imports a batch of rows in one transaction.
    pub async fn import(
        &self,
        run_id: i64,
        source: String,
        rows: Vec<ImportRow>,
    ) -> Result<ImportCounts> {
        let (counts, rows) = self
            .call(move |c| {
                let counts = ops::import(c, run_id, &source, &rows)?;
                ops::add_import_counts(c, run_id, counts)?;
                // Handed back to be freed by the caller: the database thread is the
                // busiest one of an import.
                Ok((counts, rows))
            })
            .await?;
        drop(rows);
        Ok(counts)
    }

    /// Puts `unknown` jobs back to pending (a person decided to re-send them). Returns how many.
    pub async fn requeue_unknown(&self, run_id: i64) -> Result<usize> {
        self.call(move |c| {
            c.execute(
                "UPDATE jobs SET state = 'pending', last_run_id = ?1, next_attempt_at = NULL \
                 WHERE state = 'unknown'",
                [run_id],
            )
        })
        .await
    }

    /// Moves every row now in the inbox into jobs (validated against `now`) in one
    /// transaction. Rows inserted after the move starts wait for the next run.
    pub async fn move_inbox(&self, run_id: i64, now: jiff::Timestamp) -> Result<ImportCounts> {
        self.call(move |c| {
            let counts = queue::move_inbox(c, run_id, now)?;
            if counts.rows > 0 {
                ops::add_import_counts(c, run_id, counts)?;
            }
            Ok(counts)
        })
        .await
    }

    /// Puts failed jobs that match `filter` back to pending. Returns how many.
    pub async fn requeue_failed(&self, run_id: i64, filter: RetryFilter) -> Result<usize> {
        self.call(move |c| queue::requeue_failed(c, run_id, &filter))
            .await
    }

    /// Up to `limit` jobs in the given states with an id above `after_id`, with their
    /// groups (exports page through the table so memory stays flat).
    pub async fn jobs_page(
        &self,
        states: &'static [&'static str],
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<JobExport>> {
        self.call(move |c| queries::jobs_page(c, states, after_id, limit))
            .await
    }

    /// Up to `limit` pending jobs with an id above `after_id`, in id order.
    pub async fn pending_jobs(&self, after_id: i64, limit: usize) -> Result<Vec<Job>> {
        self.call(move |c| ops::pending_jobs(c, after_id, limit))
            .await
    }

    /// Records one HTTP exchange (if any) and the job's new state in one transaction.
    pub async fn record(
        &self,
        run_id: i64,
        job_id: i64,
        attempt: Option<Attempt>,
        transition: Transition,
    ) -> Result<()> {
        self.call(move |c| ops::record(c, run_id, job_id, attempt.as_ref(), &transition))
            .await
    }

    /// Everything the report needs about one run (`None`: no such run).
    pub async fn run_facts(&self, run_id: i64) -> Result<Option<RunFacts>> {
        self.call(move |c| queries::run_facts(c, run_id)).await
    }

    /// When the newest run that exited 0 finished (unix seconds).
    pub async fn last_success(&self) -> Result<Option<f64>> {
        self.call(queries::last_success).await
    }

    /// The id of the newest run, if any.
    pub async fn last_run_id(&self) -> Result<Option<i64>> {
        self.call(queries::last_run_id).await
    }

    /// Recent runs, newest first.
    pub async fn list_runs(&self, limit: usize) -> Result<Vec<RunListEntry>> {
        self.call(move |c| queries::list_runs(c, limit)).await
    }

    /// Job counts by state over the whole database.
    pub async fn state_counts(&self) -> Result<Vec<(String, i64)>> {
        self.call(queries::state_counts).await
    }

    /// Every job with its group (for exports and tests), in id order.
    pub async fn jobs(&self) -> Result<Vec<JobExport>> {
        self.call(queries::jobs).await
    }

    /// Waits until everything queued so far is committed.
    pub async fn flush(&self) -> Result<()> {
        self.call(|_| Ok(())).await
    }
}

fn run_in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    // Prepared once and reused: these run twice per job sent.
    let exec = |sql: &str| conn.prepare_cached(sql)?.execute([]).map(|_| ());
    exec("SAVEPOINT task")?;
    match f(conn) {
        Ok(v) => {
            exec("RELEASE task")?;
            Ok(v)
        }
        Err(e) => {
            exec("ROLLBACK TO task")?;
            exec("RELEASE task")?;
            Err(e)
        }
    }
}

fn owner_loop(conn: Connection, mut rx: mpsc::Receiver<Task>, path: &Path) {
    let mut finishers: Vec<Finish> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let msg = e.to_string();
            tracing::error!(db = %path.display(), error = %msg, "cannot begin a transaction");
            first(&conn)(Some(&msg));
            continue;
        }
        finishers.push(first(&conn));
        let mut yielded = false;
        while finishers.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(task) => finishers.push(task(&conn)),
                // Once, give the senders a moment: a commit costs about as much as many
                // statements, so a few more in this batch are nearly free.
                Err(_) if !yielded => {
                    yielded = true;
                    std::thread::yield_now();
                }
                Err(_) => break,
            }
        }
        let commit = conn.execute_batch("COMMIT").map_err(|e| e.to_string());
        if let Err(msg) = &commit {
            tracing::error!(db = %path.display(), error = %msg, "commit failed");
            let _ = conn.execute_batch("ROLLBACK");
        }
        for finish in finishers.drain(..) {
            finish(commit.as_ref().err().map(String::as_str));
        }
    }
    // Every handle is gone: checkpoint so the WAL does not linger.
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}
