//! The SQLite store: the only place that holds SQL.
//!
//! One thread owns the connection. Everything else talks to it through a
//! [`Store`] handle over a bounded channel; the owner runs whatever has queued up
//! in one transaction (group commit) and answers each caller only after that
//! transaction is durable. So "`in_flight` is written before a request leaves"
//! holds while thousands of rows per second go by. If one task fails, its whole
//! transaction is rolled back and every task in it is told so. A job's last record
//! in a run need not be waited for: it goes to an outbox, written with the next
//! transaction (a crash before then leaves the job `in_flight`, to be checked).
//!
//! A second thread, with its own connection, copies the WAL into the database file
//! (checkpoints) so the owner never stops for it; [`Store::close`] ends a session
//! with the WAL copied and emptied.

mod failure;
mod lock;
mod ops;
mod queries;
mod queue;
mod schema;
mod types;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::source::ImportRow;

pub use failure::DbCause;
use failure::Failure;
pub use lock::lock_path;
pub use queries::{FailureReason, JobExport, RunFacts, RunListEntry};
pub use queue::RetryFilter;
pub use schema::Access;
pub use types::{
    Attempt, FailureClass, GroupRec, ImportCounts, Job, JobState, Obtained, RequestKind, Transition,
};

/// How long a write waits for another process's transaction by default: at least
/// what the README tells producers to use.
pub const DEFAULT_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Most tasks run in one transaction before it is committed.
const MAX_BATCH: usize = 2048;

/// A unit of work for the owner thread, answered once its transaction has ended.
trait Work: Send {
    /// Runs inside the current transaction; `Err` says why it failed (the
    /// transaction is then rolled back).
    fn run(&mut self, conn: &Connection) -> Result<(), Failure>;
    /// Answers the caller; `commit_error` says why the transaction did not commit.
    fn finish(self: Box<Self>, commit_error: Option<&Failure>);
}

type Task = Box<dyn Work>;

/// A [`Store::call`]: the function, then its result until the caller is answered.
struct Call<F, T> {
    f: Option<F>,
    result: Option<Result<T, Failure>>,
    reply: oneshot::Sender<Result<T, Failure>>,
}

impl<F, T> Work for Call<F, T>
where
    F: FnOnce(&Connection) -> rusqlite::Result<T> + Send,
    T: Send,
{
    fn run(&mut self, conn: &Connection) -> Result<(), Failure> {
        let Some(f) = self.f.take() else {
            return Ok(());
        };
        let result = f(conn).map_err(Failure::from);
        let outcome = match &result {
            Ok(_) => Ok(()),
            Err(e) => Err(e.clone()),
        };
        self.result = Some(result);
        outcome
    }

    fn finish(self: Box<Self>, commit_error: Option<&Failure>) {
        let result = match (self.result, commit_error) {
            (Some(Ok(_)), Some(e)) | (None, Some(e)) => Err(e.context("not saved")),
            (Some(r), _) => r,
            (None, None) => Err(Failure::new(DbCause::Bug, "the work never ran")),
        };
        let _ = self.reply.send(result);
    }
}

/// A job's last record in a run, waiting for the next transaction.
#[derive(Debug)]
struct Record {
    run_id: i64,
    job_id: i64,
    attempt: Option<Attempt>,
    transition: Transition,
}

/// Last records whose callers do not wait (see [`Store::record_last`]). The owner
/// writes them before each task of its next transaction and before its commit, so a
/// call sent after a record returned always sees that record.
#[derive(Debug, Default)]
struct Outbox {
    records: std::sync::Mutex<Vec<Record>>,
    /// Why a transaction holding outbox records failed. Their jobs stay `in_flight`
    /// (checked by the next run, as after a crash); every later call fails with this.
    failed: std::sync::Mutex<Option<Failure>>,
}

impl Outbox {
    /// Adds a record; true if the outbox was empty.
    fn push(&self, record: Record) -> bool {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records.push(record);
        records.len() == 1
    }

    /// Writes every waiting record in the current transaction; returns how many.
    fn write(&self, conn: &Connection) -> Result<usize, Failure> {
        let records = std::mem::take(&mut *self.records.lock().unwrap_or_else(|e| e.into_inner()));
        for r in &records {
            // A record refused because another run claimed the job is logged by `record`.
            ops::record(conn, r.run_id, r.job_id, r.attempt.as_ref(), &r.transition)?;
        }
        Ok(records.len())
    }

    fn is_empty(&self) -> bool {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    fn fail(&self, why: &Failure) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.get_or_insert_with(|| why.context("job outcomes were not saved"));
    }

    fn failure(&self) -> Option<Failure> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What the owner thread is asked to do.
enum Message {
    Task(Task),
    /// Start copying the WAL into the database file now, in the background.
    Checkpoint,
    /// Records wait in the outbox (sent when the first one arrives in an empty outbox).
    Outbox,
    /// Checkpoint the WAL into the database file and stop; answered when done.
    Close(oneshot::Sender<()>),
}

/// A cheap, cloneable handle to the database owner.
#[derive(Clone, Debug)]
pub struct Store {
    tx: mpsc::Sender<Message>,
    path: PathBuf,
    outbox: Arc<Outbox>,
    /// The run lock, while this handle's run sends (see [`Store::begin_run`]).
    lock: Arc<std::sync::Mutex<Option<lock::RunLock>>>,
}

impl Store {
    /// Opens an existing database to read it (`report`, `export`): never creates,
    /// migrates or marks it.
    pub fn open_existing(path: &Path) -> Result<Store> {
        Store::open_with(path, Access::Read, DEFAULT_BUSY_TIMEOUT)
    }

    /// Opens (creating if needed) the database at `path` to write it, with the
    /// default busy timeout.
    pub fn open(path: &Path) -> Result<Store> {
        Store::open_with(path, Access::Write, DEFAULT_BUSY_TIMEOUT)
    }

    /// Opens the database at `path` and starts its owner thread. A file that is
    /// not a kohort-batch database is refused before anything is written to it.
    pub fn open_with(
        path: &Path,
        access: Access,
        busy_timeout: std::time::Duration,
    ) -> Result<Store> {
        let db_err = |f: Failure| Error::Database {
            path: path.to_owned(),
            cause: f.cause,
            message: f.message,
        };
        // SQLite would read `file:…` as a URI (and its `?nolock=1`, `?mode=`), opening
        // another file than the one the run lock is taken beside.
        if path.to_str().is_some_and(|p| p.starts_with("file:")) {
            return Err(Error::Usage(format!(
                "--db {}: give a plain path to the database file, not a SQLite URI",
                path.display()
            )));
        }
        if path.is_dir() {
            return Err(Error::Usage(format!(
                "--db {} is a directory: give the path of the database file in it (e.g. {})",
                path.display(),
                path.join("kohort-batch.db").display()
            )));
        }
        if access == Access::Read && !path.exists() {
            return Err(Error::Usage(format!(
                "there is no database at {}: pass the --db of your runs (or set KOHORT_BATCH_DB)",
                path.display()
            )));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            return Err(Error::Usage(format!(
                "the database directory {} does not exist; create it or pass another --db",
                dir.display()
            )));
        }
        if access == Access::Write {
            create_shared(path).map_err(|source| Error::File {
                action: "create the database",
                path: path.to_owned(),
                source,
            })?;
        }
        let flags = match access {
            Access::Write => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
            Access::Read => OpenFlags::SQLITE_OPEN_READ_WRITE,
        } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(path, flags).map_err(|e| db_err(e.into()))?;
        schema::prepare(&mut conn, access, busy_timeout).map_err(db_err)?;
        let checkpointer =
            Checkpointer::start(&mut conn, path, busy_timeout).map_err(|e| db_err(e.into()))?;
        let (tx, rx) = mpsc::channel::<Message>(4096);
        let thread_path = path.to_owned();
        let outbox = Arc::new(Outbox::default());
        let owner_outbox = outbox.clone();
        std::thread::Builder::new()
            .name("kohort-store".into())
            .spawn(move || owner_loop(conn, rx, &thread_path, checkpointer, &owner_outbox))
            .map_err(|e| Error::Internal(format!("cannot start the database thread: {e}")))?;
        Ok(Store {
            tx,
            path: path.to_owned(),
            outbox,
            lock: Arc::default(),
        })
    }

    /// Copies the kohort-batch database at `src` into a new file `dest` (for a dry
    /// run), reading it only: `src` is checked as `report` checks it and never
    /// changed.
    pub fn snapshot(src: &Path, dest: &Path) -> Result<()> {
        let err = |f: Failure| Error::Database {
            path: src.to_owned(),
            cause: f.cause,
            message: format!("cannot copy it for the dry run: {}", f.message),
        };
        if !src.is_file() {
            return Err(Error::Usage(format!(
                "there is no database at {}: pass the --db of your runs",
                src.display()
            )));
        }
        let mut conn = Connection::open_with_flags(
            src,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| err(e.into()))?;
        // Closing must not copy the WAL into the file either: nothing of `src` changes.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .map_err(|e| err(e.into()))?;
        schema::prepare(&mut conn, Access::Read, DEFAULT_BUSY_TIMEOUT).map_err(|f| {
            Error::Database {
                path: src.to_owned(),
                cause: f.cause,
                message: f.message,
            }
        })?;
        conn.execute("VACUUM INTO ?1", [dest.display().to_string()])
            .map_err(|e| err(e.into()))?;
        Ok(())
    }

    /// What sending the pending jobs would take: (jobs, of which checked first).
    pub async fn send_plan(&self, precheck_always: bool) -> Result<(i64, i64)> {
        self.call(move |c| {
            c.query_row(
                "SELECT count(*), coalesce(sum(needs_check = 1 OR (?1 AND order_id IS NOT NULL \
                 AND payment_intent_id IS NULL AND creates = 0)), 0) \
                 FROM jobs WHERE state = 'pending'",
                [precheck_always],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
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
        self.outbox_ok()?;
        let (reply, reply_rx) = oneshot::channel::<Result<T, Failure>>();
        let task: Task = Box::new(Call {
            f: Some(f),
            result: None,
            reply,
        });
        let closed = || Error::Internal("the database thread has stopped".into());
        self.tx
            .send(Message::Task(task))
            .await
            .map_err(|_| closed())?;
        reply_rx
            .await
            .map_err(|_| closed())?
            .map_err(|failure| self.error(failure))
    }

    /// The top-level error for a failure of this database.
    fn error(&self, failure: Failure) -> Error {
        Error::Database {
            path: self.path.clone(),
            cause: failure.cause,
            message: failure.message,
        }
    }

    /// Starts a run. An `exclusive` run (one that sends) first takes the run lock
    /// (see `lock.rs`), or fails with [`Error::Locked`] naming its holder, and turns
    /// jobs left `in_flight` by a crash into pending jobs that are checked before any
    /// re-send. Returns the run id.
    pub async fn begin_run(&self, command: &str, options: String, exclusive: bool) -> Result<i64> {
        let held = if exclusive {
            Some(lock::RunLock::acquire(&self.path)?)
        } else {
            None
        };
        let command = command.to_owned();
        let (run_id, started_at) = self
            .call(move |c| ops::begin_run(c, &command, &options, exclusive))
            .await?;
        if let Some(mut held) = held {
            held.describe(run_id, &started_at);
            *self.lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(held);
        }
        Ok(run_id)
    }

    /// Records the end of a run (with the time its requests were held by pauses) and
    /// releases the lock. Returns the finish time as stored.
    pub async fn finish_run(
        &self,
        run_id: i64,
        exit_code: u8,
        stopped: Option<String>,
        paused: std::time::Duration,
    ) -> Result<String> {
        let paused_ms = i64::try_from(paused.as_millis()).unwrap_or(i64::MAX);
        let result = self
            .call(move |c| ops::finish_run(c, run_id, exit_code, stopped.as_deref(), paused_ms))
            .await;
        self.lock.lock().unwrap_or_else(|e| e.into_inner()).take();
        result
    }

    /// Imports a batch of rows in one transaction. The rows come back, to be freed by
    /// the thread that made them (freeing is cheaper there, and the database thread is
    /// the busiest one of an import).
    pub async fn import(
        &self,
        run_id: i64,
        source: String,
        rows: Vec<ImportRow>,
    ) -> Result<(ImportCounts, Vec<ImportRow>)> {
        self.call(move |c| {
            let counts = ops::import(c, run_id, &source, &rows)?;
            ops::add_import_counts(c, run_id, counts)?;
            Ok((counts, rows))
        })
        .await
    }

    /// Groups in the whole database recorded without a share id.
    pub async fn groups_without_share_id(&self) -> Result<i64> {
        self.call(queries::groups_without_share_id).await
    }

    /// Adds to the run's import counts (rows the reader skipped, say).
    pub async fn add_import_counts(&self, run_id: i64, counts: ImportCounts) -> Result<()> {
        self.call(move |c| ops::add_import_counts(c, run_id, counts))
            .await
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

    /// Up to `limit` conflicting rows (not imported: their key was taken by other
    /// data) with an id above `after_id`, as jobs in state `conflict`.
    pub async fn conflicts_page(&self, after_id: i64, limit: usize) -> Result<Vec<JobExport>> {
        self.call(move |c| queries::conflicts_page(c, after_id, limit))
            .await
    }

    /// Claims up to `limit` pending jobs with an id above `after_id` for the run, and
    /// returns them in id order. Only the run that claimed a job may mark it in flight
    /// or record its outcome; a newer run takes over the claims of older ones.
    pub async fn claim_pending(
        &self,
        run_id: i64,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<Job>> {
        self.call(move |c| ops::claim_pending(c, run_id, after_id, limit))
            .await
    }

    /// Records one HTTP exchange (if any) and the job's new state in one transaction.
    /// False when the job's state was left alone because another run claimed it since
    /// (the attempt is recorded all the same): the caller must leave the job be.
    pub async fn record(
        &self,
        run_id: i64,
        job_id: i64,
        attempt: Option<Attempt>,
        transition: Transition,
    ) -> Result<bool> {
        self.call(move |c| {
            let applied = ops::record(c, run_id, job_id, attempt.as_ref(), &transition)?;
            // Both were made on the caller's thread: they go back to be freed there.
            Ok((applied, attempt, transition))
        })
        .await
        .map(|(applied, _, _)| applied)
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

    /// Keeps the report of a finished run as it was printed, so `report --run` shows
    /// exactly that later, whatever later runs do to its jobs.
    pub async fn save_report(&self, run_id: i64, json: String) -> Result<()> {
        self.call(move |c| {
            c.execute(
                "UPDATE runs SET report = ?1 WHERE id = ?2",
                rusqlite::params![json, run_id],
            )
            .map(drop)
        })
        .await
    }

    /// The report kept when the run finished (`None` for a run that did not finish,
    /// or that an older version ran).
    pub async fn saved_report(&self, run_id: i64) -> Result<Option<String>> {
        self.call(move |c| {
            c.query_row("SELECT report FROM runs WHERE id = ?1", [run_id], |r| {
                r.get::<_, Option<String>>(0)
            })
            .optional()
            .map(Option::flatten)
        })
        .await
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

    /// Records a job's last change in this run (an attempt, if any, and a final state)
    /// without waiting: it is written with the next transaction, whatever that is. A
    /// crash before then leaves the job `in_flight`, as a crash just before an awaited
    /// record would, and the next run checks it. A failure to write it makes every
    /// later call fail, [`flush`](Self::flush) included.
    pub fn record_last(
        &self,
        run_id: i64,
        job_id: i64,
        attempt: Option<Attempt>,
        transition: Transition,
    ) -> Result<()> {
        self.outbox_ok()?;
        let first = self.outbox.push(Record {
            run_id,
            job_id,
            attempt,
            transition,
        });
        // One message wakes an idle owner; later records ride with whatever comes
        // next. A full queue means the owner is busy and reaches the outbox soon.
        if first
            && let Err(mpsc::error::TrySendError::Closed(_)) = self.tx.try_send(Message::Outbox)
        {
            return Err(Error::Internal("the database thread has stopped".into()));
        }
        Ok(())
    }

    fn outbox_ok(&self) -> Result<()> {
        match self.outbox.failure() {
            None => Ok(()),
            Some(failure) => Err(self.error(failure)),
        }
    }

    /// Waits until everything queued so far (the outbox too) is committed.
    pub async fn flush(&self) -> Result<()> {
        self.call(|_| Ok(())).await?;
        self.outbox_ok()
    }

    /// Starts copying the WAL into the database file in the background, so that little
    /// is left for [`close`](Self::close) (call it once the writing is done).
    pub fn checkpoint_soon(&self) {
        // A full queue means the owner is busy writing anyway; the final checkpoint
        // then does it all.
        let _ = self.tx.try_send(Message::Checkpoint);
    }

    /// Ends the session: everything queued is committed, the WAL is copied into the
    /// database file and emptied, and the owner thread stops (every handle then
    /// fails). Returns when that is done, so the process can exit.
    pub async fn close(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send(Message::Close(done_tx)).await.is_ok() {
            let _ = done_rx.await;
        }
    }
}

/// Creates an empty database file (if there is none) with mode 0666 less the umask:
/// SQLite would create it 0644 less the umask, so a `UMask=0007` could never make it
/// writable by the producers' group. SQLite gives the `-wal` and `-shm` files the
/// database file's mode.
fn create_shared(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .open(path)
    {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// WAL pages (4 KiB) not yet copied after which the checkpointer thread copies them
/// into the database file (SQLite's own checkpoints, every 1,000 pages, would run
/// on the writer thread).
const CHECKPOINT_PAGES: i32 = 2_000;
/// WAL pages after which the writer checkpoints itself: the checkpointer has fallen
/// behind, or could never catch up with a writer that commits back to back (the WAL
/// restarts from its beginning only after a checkpoint that reached its end).
const WRITER_CHECKPOINT_PAGES: i32 = 4 * CHECKPOINT_PAGES;

/// Copies the WAL into the database file on its own thread and connection, so the
/// writer (which every caller waits on) does not do it between transactions.
struct Checkpointer {
    thread: std::thread::JoinHandle<()>,
    /// Wakes the thread (the WAL hook holds another; the thread ends when both are gone).
    wake: Option<std::sync::mpsc::SyncSender<()>>,
}

impl Checkpointer {
    /// Starts the thread and hooks the writer's commits to it.
    fn start(
        writer: &mut Connection,
        path: &Path,
        busy_timeout: std::time::Duration,
    ) -> rusqlite::Result<Checkpointer> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(busy_timeout)?;
        // A connection opens the WAL on its first read; until then it has nothing to
        // checkpoint (and says so by succeeding without doing anything).
        conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))?;
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        // WAL pages already copied, as of the checkpointer's last pass.
        let copied = Arc::new(AtomicI32::new(0));
        let seen = copied.clone();
        let mut last = 0;
        let wake_now = wake.clone();
        writer.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, pages: i32| {
            if pages < last {
                // The WAL restarted from its beginning: nothing in it is copied yet.
                seen.store(0, Ordering::Relaxed);
            }
            last = pages;
            if pages >= WRITER_CHECKPOINT_PAGES {
                // Mostly copied already: this pass is short, and lets the WAL restart.
                // Its failure must not reach the caller: the hook runs after the commit,
                // and an error here would make a committed transaction look failed. The
                // usual one is SQLITE_BUSY, the checkpointer being mid-pass (only one
                // checkpoint runs at a time); the next commit tries again.
                if let Err(e) = wal.checkpoint() {
                    tracing::debug!(error = %e, "writer checkpoint skipped");
                }
            } else if pages - seen.load(Ordering::Relaxed).min(pages) >= CHECKPOINT_PAGES {
                // Full means a wake-up is already pending.
                let _ = wake.try_send(());
            }
            Ok(())
        }))?;
        let db = path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("kohort-checkpoint".into())
            .spawn(move || {
                // Ends when the writer's hook (and its sender) is dropped.
                while woken.recv().is_ok() {
                    match conn.wal_checkpoint_v2(None::<&str>, Default::default()) {
                        Ok((wal, done)) => {
                            copied.store(done, Ordering::Relaxed);
                            tracing::trace!(%db, wal, copied = done, "checkpoint");
                        }
                        Err(e) => tracing::warn!(%db, error = %e, "background checkpoint failed; the writer will checkpoint instead"),
                    }
                }
            })
            .map_err(|e| {
                rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                    Some(format!("cannot start the checkpoint thread: {e}")),
                )
            })?;
        Ok(Checkpointer {
            thread,
            wake: Some(wake_now),
        })
    }

    /// Asks for a pass now (if one is already asked for, that one will do).
    fn wake(&self) {
        if let Some(wake) = &self.wake {
            let _ = wake.try_send(());
        }
    }

    /// Unhooks the writer and waits for a checkpoint in progress to end.
    fn stop(mut self, writer: &mut Connection) {
        self.wake = None;
        let _ = writer.wal_hook(None::<fn(&mut rusqlite::hooks::Wal, i32) -> rusqlite::Result<()>>);
        let _ = self.thread.join();
    }
}

fn owner_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Message>,
    path: &Path,
    checkpointer: Checkpointer,
    outbox: &Outbox,
) {
    let mut batch: Vec<Task> = Vec::with_capacity(MAX_BATCH);
    let mut closing: Option<oneshot::Sender<()>> = None;
    while closing.is_none() {
        match rx.blocking_recv() {
            None => break,
            Some(Message::Checkpoint) => {
                checkpointer.wake();
                continue;
            }
            Some(Message::Close(done)) => {
                closing = Some(done);
                break;
            }
            Some(Message::Outbox) => {}
            Some(Message::Task(task)) => batch.push(task),
        }
        let more = Some((&mut rx, &mut closing));
        transaction(&conn, &mut batch, more, outbox, path, &checkpointer);
    }
    // Last records that came after the last transaction.
    transaction(&conn, &mut batch, None, outbox, path, &checkpointer);
    // The session is over (or every handle is gone): leave no WAL behind.
    checkpointer.stop(&mut conn);
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
        tracing::warn!(db = %path.display(), error = %e, "final checkpoint failed; the next run completes it");
    }
    drop(conn);
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// One transaction: the outbox's records, `batch` (at most one task so far) and, with
/// `more`, whatever else has queued up; then every task is answered.
fn transaction(
    conn: &Connection,
    batch: &mut Vec<Task>,
    more: Option<(
        &mut mpsc::Receiver<Message>,
        &mut Option<oneshot::Sender<()>>,
    )>,
    outbox: &Outbox,
    path: &Path,
    checkpointer: &Checkpointer,
) {
    if batch.is_empty() && more.is_none() && outbox.is_empty() {
        return;
    }
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let msg = Failure::from(e).context("cannot begin a transaction");
        tracing::error!(db = %path.display(), error = %msg, "cannot begin a transaction");
        // The outbox keeps its records for the next transaction.
        for task in batch.drain(..) {
            task.finish(Some(&msg));
        }
        return;
    }
    // Tasks run without savepoints of their own (they cost a copy of every page a
    // task touches): the first task that fails ends the batch, and the whole
    // transaction is rolled back. For the engine that is what a crash just before
    // the commit would be, which the exactly-once protocol is built to survive.
    let mut outbox_written = false;
    let mut write_outbox = |failure: &mut Option<Failure>| {
        if failure.is_none() {
            match outbox.write(conn) {
                Ok(n) => outbox_written |= n > 0,
                Err(e) => {
                    outbox_written = true;
                    *failure = Some(e);
                }
            }
        }
    };
    // The outbox is written before each task runs: a caller that recorded something
    // and then sent a call must read its own write (records and calls stay in order).
    let mut failure = None;
    for task in batch.iter_mut() {
        write_outbox(&mut failure);
        if failure.is_none() {
            failure = task.run(conn).err();
        }
    }
    if let Some((rx, closing)) = more {
        let mut yielded = false;
        while failure.is_none() && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Message::Task(mut task)) => {
                    write_outbox(&mut failure);
                    if failure.is_none() {
                        failure = task.run(conn).err();
                    }
                    batch.push(task);
                }
                // Written below, before the commit.
                Ok(Message::Outbox) => {}
                Ok(Message::Checkpoint) => checkpointer.wake(),
                Ok(Message::Close(done)) => {
                    *closing = Some(done);
                    break;
                }
                // Once, give the senders a moment: a commit costs about as much as many
                // statements, so a few more in this batch are nearly free.
                Err(_) if !yielded => {
                    yielded = true;
                    std::thread::yield_now();
                }
                Err(_) => break,
            }
        }
    }
    write_outbox(&mut failure);
    let end = match failure {
        None => conn.execute_batch("COMMIT").map_err(|e| {
            let msg = Failure::from(e).context("commit failed");
            tracing::error!(db = %path.display(), error = %msg, "commit failed");
            msg
        }),
        Some(e) => {
            Err(e.context("rolled back with the rest of its transaction, in which a write failed"))
        }
    };
    if let Err(e) = &end {
        let _ = conn.execute_batch("ROLLBACK");
        if outbox_written {
            outbox.fail(e);
        }
    }
    for task in batch.drain(..) {
        task.finish(end.as_ref().err());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::job::Payload;

    fn rows(from: u64, n: u64) -> Vec<ImportRow> {
        (from..from + n)
            .map(|i| {
                let payload = Payload {
                    customer_id: format!("cus_{i:08}"),
                    order_id: Some(format!("ord_{i:08}")),
                    payment_intent_id: None,
                    expires_at: None,
                    mid_expire_at: None,
                    metadata: None,
                };
                ImportRow::new(
                    i + 1,
                    Some(format!("ord_{i:08}")),
                    Ok(payload),
                    BTreeMap::new(),
                )
            })
            .collect()
    }

    /// A fresh store in a temporary directory (kept alive by the returned guard), with
    /// the path of its database file.
    fn fresh() -> (tempfile::TempDir, PathBuf, Store) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let store = Store::open(&path).unwrap();
        (dir, path, store)
    }

    /// Begins an `enqueue` run (no lock); returns its id.
    async fn enqueue_run(store: &Store) -> i64 {
        let run = store.begin_run("enqueue", "{}".into(), false);
        run.await.unwrap()
    }

    /// Waits up to 20 s for `done`, which is about the database thread or the
    /// checkpointer catching up; panics with `what` if it does not happen.
    fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "still not so after 20 s: {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Chunks of rows take one statement; rows whose key is taken (inside the chunk,
    /// or by an earlier import) must still come out as duplicates, conflicts or fixes,
    /// exactly as one statement per row would have it.
    #[tokio::test(flavor = "multi_thread")]
    async fn chunked_imports_sort_out_taken_keys_row_by_row() {
        let (_dir, _, store) = fresh();
        let run = enqueue_run(&store).await;
        // Earlier: ord 50 as it will be re-imported, and ord 60, which then failed.
        let earlier = rows(50, 1).into_iter().chain(rows(60, 1)).collect();
        store.import(run, "a.csv".into(), earlier).await.unwrap();
        store
            .call(|c| {
                c.execute(
                    "UPDATE jobs SET state = 'failed' WHERE key = 'ord_00000060'",
                    [],
                )
            })
            .await
            .unwrap();
        // 300 rows (three full chunks): ord 0..300, except that row 120 repeats row 10
        // exactly, row 130 reuses row 20's key with another customer, and row 60 is
        // a fixed version of the failed job (another customer).
        let mut batch = rows(0, 300);
        batch[120] = rows(10, 1).remove(0);
        batch[120].line = 121;
        let mut other = rows(20, 1).remove(0);
        other.line = 131;
        if let Ok(p) = &mut other.outcome {
            p.customer_id = "cus_other".into();
        }
        batch[130] = other;
        if let Ok(p) = &mut batch[60].outcome {
            p.customer_id = "cus_fixed".into();
        }
        let (counts, _) = store.import(run, "b.csv".into(), batch).await.unwrap();
        assert_eq!(
            counts,
            ImportCounts {
                rows: 300,
                queued: 296, // 300 - 50 (already there) - 60 (fixed) - 120 - 130
                fixed: 1,
                duplicates: 2, // 50, 120
                conflicts: 1,  // 130
                invalid: 0,
                empty: 0,
            }
        );
        let facts: Vec<(String, String, i64)> = store
            .call(|c| {
                c.prepare(
                    "SELECT key, state || ' ' || customer_id, line FROM jobs \
                     WHERE key IN ('ord_00000010', 'ord_00000020', 'ord_00000060', 'ord_00000120', \
                     'ord_00000130') ORDER BY key",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
            })
            .await
            .unwrap();
        assert_eq!(
            facts,
            [
                ("ord_00000010".into(), "pending cus_00000010".into(), 11),
                ("ord_00000020".into(), "pending cus_00000020".into(), 21),
                ("ord_00000060".into(), "pending cus_fixed".into(), 61),
            ]
        );
        let total: i64 = store
            .call(|c| c.query_row("SELECT count(*) FROM jobs", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(total, 298); // 0..300 without 120 and 130
    }

    /// Once invalid rows with keys exist, valid rows still go in a chunk at a time,
    /// and a row that fixes an invalid one takes its place (no second job).
    #[tokio::test(flavor = "multi_thread")]
    async fn fixes_of_invalid_rows_replace_them_on_every_path() {
        let (_dir, _, store) = fresh();
        let run = enqueue_run(&store).await;
        let invalid = |i: u64| {
            ImportRow::new(
                i + 1,
                Some(format!("ord_{i:08}")),
                Err("customerId is empty".into()),
                BTreeMap::from([("orderId".to_owned(), format!("ord_{i:08}"))]),
            )
        };
        // ord 5 (fixed below in a full chunk) and ord 250 (fixed row by row).
        store
            .import(run, "a.csv".into(), vec![invalid(5), invalid(250)])
            .await
            .unwrap();
        let ids_before: Vec<i64> = store
            .call(|c| {
                c.prepare("SELECT id FROM jobs ORDER BY id")?
                    .query_map([], |r| r.get(0))?
                    .collect()
            })
            .await
            .unwrap();
        // 0..200 in two full chunks, then 200..260 with an invalid row at 230 (the
        // rest of that chunk goes row by row).
        let mut batch = rows(0, 260);
        batch[230] = invalid(230);
        let (counts, _) = store.import(run, "b.csv".into(), batch).await.unwrap();
        assert_eq!(
            (counts.rows, counts.queued, counts.fixed, counts.invalid),
            (260, 257, 2, 1)
        );
        let facts: Vec<(i64, String)> = store
            .call(|c| {
                c.prepare(
                    "SELECT id, state FROM jobs WHERE key IN ('ord_00000005', 'ord_00000250') \
                     ORDER BY id",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
            })
            .await
            .unwrap();
        // The fixes took the invalid jobs' places.
        assert_eq!(
            facts,
            ids_before
                .iter()
                .map(|id| (*id, "pending".to_owned()))
                .collect::<Vec<_>>()
        );
        let total: i64 = store
            .call(|c| c.query_row("SELECT count(*) FROM jobs", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(total, 260); // 259 valid + the invalid row 230
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn run_facts_count_attempts_by_kind_and_class_and_span_the_send_window() {
        let (_dir, _, store) = fresh();
        let run = store.begin_run("run", "{}".into(), true).await.unwrap();
        store.import(run, "t.csv".into(), rows(0, 3)).await.unwrap();
        let at = |ms: i64| jiff::Timestamp::from_millisecond(1_800_000_000_000 + ms).unwrap();
        let attempts = [
            (1, RequestKind::CheckOrder, 0, 5.0, "ok"),
            (1, RequestKind::Create, 10, 7.9, "retry"),
            (2, RequestKind::Create, 20, 3.0, "ok"),
            (3, RequestKind::Create, 30, 40.6, "ok"),
            (3, RequestKind::FetchGroup, 5, 1.0, "retry"),
        ];
        for (job, kind, start, latency, class) in attempts {
            let attempt = Attempt {
                kind,
                started_at: at(start),
                latency: std::time::Duration::try_from_secs_f64(latency / 1000.0).unwrap(),
                status: Some(200),
                class,
                error: None,
            };
            store
                .record(run, job, Some(attempt), Transition::Keep)
                .await
                .unwrap();
        }
        let facts = store.run_facts(run).await.unwrap().unwrap();
        let owned = |v: &[(&str, i64)]| -> Vec<(String, i64)> {
            v.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect()
        };
        assert_eq!(
            facts.attempts_by_kind,
            owned(&[("check_order", 1), ("create", 3), ("fetch_group", 1)])
        );
        assert_eq!(facts.attempts_by_class, owned(&[("ok", 3), ("retry", 2)]));
        // First start 0 ms; last end 30 + 40 (whole milliseconds) = 70 ms.
        let (first, last) = facts.send_window_ms.unwrap();
        assert_eq!(last - first, 70);
        let mut latencies = facts.latencies_ms.clone();
        latencies.sort_by(f64::total_cmp);
        assert_eq!(latencies.len(), 5);
        assert!((latencies[4] - 40.6).abs() < 1e-9, "{latencies:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_run_list_counts_each_runs_jobs() {
        let (_dir, _, store) = fresh();
        let first = enqueue_run(&store).await;
        store
            .import(first, "a.csv".into(), rows(0, 5))
            .await
            .unwrap();
        let second = enqueue_run(&store).await;
        store
            .import(second, "b.csv".into(), rows(5, 3))
            .await
            .unwrap();
        store
            .call(|c| c.execute("UPDATE jobs SET state = 'succeeded' WHERE id IN (1, 7)", []))
            .await
            .unwrap();
        let _empty = enqueue_run(&store).await;
        let listed: Vec<(i64, i64, i64)> = store
            .list_runs(10)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.run_id, r.jobs, r.succeeded))
            .collect();
        assert_eq!(listed, [(3, 0, 0), (second, 3, 1), (first, 5, 1)]);
        // The oldest listed run bounds what is counted.
        let newest_two: Vec<i64> = store
            .list_runs(2)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.jobs)
            .collect();
        assert_eq!(newest_two, [0, 3]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_failed_task_leaves_nothing_behind_and_the_store_goes_on() {
        let (_dir, _, store) = fresh();
        let half_done = store
            .call(|c| {
                c.execute("INSERT INTO sources (name) VALUES ('half')", [])?;
                c.execute("INSERT INTO no_such_table VALUES (1)", [])
            })
            .await;
        let err = half_done.unwrap_err().to_string();
        assert!(err.contains("no_such_table"), "{err}");
        store
            .call(|c| c.execute("INSERT INTO sources (name) VALUES ('whole')", []))
            .await
            .unwrap();
        let names: Vec<String> = store
            .call(|c| {
                c.prepare("SELECT name FROM sources ORDER BY id")?
                    .query_map([], |r| r.get(0))?
                    .collect()
            })
            .await
            .unwrap();
        assert_eq!(names, ["whole"]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn last_records_are_written_without_waiting_and_a_failure_stops_the_store() {
        let (_dir, _, store) = fresh();
        let run = store.begin_run("run", "{}".into(), true).await.unwrap();
        store.import(run, "t.csv".into(), rows(0, 4)).await.unwrap();
        assert_eq!(store.claim_pending(run, 0, 10).await.unwrap().len(), 4);
        let succeeded = |id: &str| Transition::Succeeded {
            obtained: Obtained::Created,
            group: crate::job::Group {
                id: id.into(),
                raw: format!(r#"{{"id":"{id}"}}"#),
                ..Default::default()
            },
        };
        // Two records wait in the outbox; an awaited call's transaction writes them.
        store.record_last(run, 1, None, succeeded("pg_1")).unwrap();
        store.record_last(run, 2, None, succeeded("pg_2")).unwrap();
        let states = || async {
            store
                .call(|c| {
                    c.prepare("SELECT state FROM jobs ORDER BY id")?
                        .query_map([], |r| r.get::<_, String>(0))?
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .await
                .unwrap()
        };
        assert_eq!(
            states().await,
            ["succeeded", "succeeded", "pending", "pending"]
        );
        // With no other call, the owner wakes for the outbox by itself.
        store.record_last(run, 3, None, succeeded("pg_3")).unwrap();
        eventually("three groups", || {
            let n: i64 = rusqlite::Connection::open(store.path())
                .unwrap()
                .query_row("SELECT count(*) FROM groups", [], |r| r.get(0))
                .unwrap();
            n == 3
        });
        // A last record that cannot be written makes every later call fail.
        store
            .call(|c| c.execute_batch("DROP TABLE groups"))
            .await
            .unwrap();
        store.record_last(run, 4, None, succeeded("pg_9")).unwrap();
        let err = store.flush().await.unwrap_err().to_string();
        assert!(err.contains("not saved") && err.contains("groups"), "{err}");
        assert!(store.record_last(run, 2, None, succeeded("pg_8")).is_err());
        assert!(store.run_facts(run).await.is_err());
    }

    /// Payloads with every optional field present or not, text that needs escaping,
    /// and metadata of any shape.
    fn arb_payloads() -> impl proptest::strategy::Strategy<Value = Vec<Payload>> {
        use proptest::prelude::*;
        let text = "[a-zA-Z0-9_ \"\\\\/\u{e9}\u{1F600}\n\t\u{1}]{0,12}";
        let value = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            text.prop_map(serde_json::Value::String),
            proptest::collection::vec(text, 0..3).prop_map(serde_json::Value::from),
        ];
        let metadata = proptest::option::of(
            proptest::collection::btree_map(text, value, 0..4)
                .prop_map(|m| m.into_iter().collect::<serde_json::Map<_, _>>()),
        );
        let payload = (
            text,
            proptest::option::of(text),
            proptest::option::of(text),
            proptest::option::of(text),
            metadata,
        )
            .prop_map(
                |(customer_id, payment_intent_id, expires_at, mid_expire_at, metadata)| Payload {
                    customer_id,
                    order_id: None,
                    payment_intent_id,
                    expires_at,
                    mid_expire_at,
                    metadata,
                },
            );
        (proptest::collection::vec((payload, any::<bool>()), 1..40)).prop_map(|list| {
            list.into_iter()
                .enumerate()
                .map(|(i, (mut p, with_order))| {
                    // Unique keys, so that every row becomes a job.
                    if with_order || p.payment_intent_id.is_none() {
                        p.order_id = Some(format!("ord_{i}"));
                    } else {
                        p.payment_intent_id = Some(format!("pi_{i}"));
                    }
                    p
                })
                .collect()
        })
    }

    #[test]
    fn bodies_read_back_as_the_payload_serializes_them() {
        use proptest::prelude::*;
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let mut runner =
            proptest::test_runner::TestRunner::new(proptest::test_runner::Config::with_cases(24));
        runner
            .run(&arb_payloads(), |payloads| {
                let (_dir, _, store) = fresh();
                let rows: Vec<ImportRow> = payloads
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        ImportRow::new(
                            i as u64 + 2,
                            Some(p.key().to_owned()),
                            Ok(p.clone()),
                            BTreeMap::new(),
                        )
                    })
                    .collect();
                let jobs = runtime.block_on(async {
                    let run = enqueue_run(&store).await;
                    store.import(run, "t.csv".into(), rows).await.unwrap();
                    store.claim_pending(run, 0, 1_000).await.unwrap()
                });
                prop_assert_eq!(jobs.len(), payloads.len());
                for (job, p) in jobs.iter().zip(&payloads) {
                    prop_assert_eq!(&job.body, &crate::job::SendBody::from(p));
                }
                Ok(())
            })
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_wal_is_copied_in_the_background_and_emptied_at_close() {
        let (_dir, path, store) = fresh();
        let run = enqueue_run(&store).await;
        // Well over CHECKPOINT_PAGES of WAL, well under WRITER_CHECKPOINT_PAGES: only the
        // checkpointer thread copies pages into the database file before the close.
        for batch in 0..30 {
            let (counts, _) = store
                .import(run, "t.csv".into(), rows(batch * 4_000, 4_000))
                .await
                .unwrap();
            assert_eq!(counts.queued, 4_000);
        }
        let db_len = || std::fs::metadata(&path).map_or(0, |m| m.len());
        let wal = path.with_file_name("k.db-wal");
        eventually("a database file of 4 MiB", || db_len() >= 4 << 20);
        store.close().await;
        assert_eq!(std::fs::metadata(&wal).map_or(0, |m| m.len()), 0);
        assert!(store.flush().await.is_err(), "a closed store refuses work");
        let conn = Connection::open(&path).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 120_000);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_checkpoint_can_be_asked_for_before_the_close() {
        let (_dir, path, store) = fresh();
        let run = enqueue_run(&store).await;
        // Fewer WAL pages than wake the checkpointer by themselves.
        store
            .import(run, "t.csv".into(), rows(0, 2_000))
            .await
            .unwrap();
        let db_len = || std::fs::metadata(&path).map_or(0, |m| m.len());
        let before = db_len();
        store.checkpoint_soon();
        eventually("pages copied into the database file", || db_len() > before);
        // The store goes on working, and closes as before.
        let (counts, _) = store
            .import(run, "t.csv".into(), rows(2_000, 10))
            .await
            .unwrap();
        assert_eq!(counts.queued, 10);
        store.close().await;
        let wal = path.with_file_name("k.db-wal");
        assert_eq!(std::fs::metadata(&wal).map_or(0, |m| m.len()), 0);
    }
}
