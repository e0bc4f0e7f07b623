//! The SQLite backend: opening a database file, and every call of [`Backend`], each
//! sent to the writer thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

use super::checkpoint::Checkpointer;
use super::failure::Failure;
use super::outbox::{Outbox, Record};
use super::reads::{self, JobExport, RunFacts, RunListEntry};
use super::writer::{FnCommand, Message, Writer};
use super::{Access, Attempt, ImportCounts, Job, JobState, RetryFilter, StateCounts, Transition};
use super::{Backend, import, jobs, lock, queue, runs, schema};
use crate::error::{Error, Result};
use crate::source::ImportRow;

/// How long a write waits for another process's transaction by default: at least
/// what the README tells producers to use.
pub const DEFAULT_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A handle to the SQLite database writer.
#[derive(Debug)]
pub(crate) struct Sqlite {
    tx: mpsc::Sender<Message>,
    path: PathBuf,
    outbox: Arc<Outbox>,
    /// The run lock, while this handle's run sends (see [`Store::begin_run`]).
    lock: Arc<std::sync::Mutex<Option<lock::RunLock>>>,
}

impl Sqlite {
    /// Opens the database at `path` and starts its writer thread. A file that is
    /// not a kohort-batch database is refused before anything is written to it.
    pub fn open_with(
        path: &Path,
        access: Access,
        busy_timeout: std::time::Duration,
    ) -> Result<Sqlite> {
        let shown = path.display().to_string();
        let db_err = |f: Failure| f.into_error(&shown);
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
        let outbox = Arc::new(Outbox::default());
        Writer::spawn(conn, rx, path, checkpointer, outbox.clone())
            .map_err(|e| Error::internal_from("cannot start the database thread", e))?;
        Ok(Sqlite {
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
        let shown = src.display().to_string();
        let err = |f: Failure| {
            f.context("cannot copy it for the dry run")
                .into_error(&shown)
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
        schema::prepare(&mut conn, Access::Read, DEFAULT_BUSY_TIMEOUT)
            .map_err(|f| f.into_error(&shown))?;
        conn.execute(
            "VACUUM INTO :dest",
            rusqlite::named_params! {":dest": dest.display().to_string()},
        )
        .map_err(|e| err(e.into()))?;
        Ok(())
    }

    /// The database file.
    #[cfg(test)]
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the writer thread inside the current batch, and returns its result once
    /// the batch is committed.
    pub(super) async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.outbox_ok()?;
        let (reply, reply_rx) = oneshot::channel::<Result<T, Failure>>();
        let command = Box::new(FnCommand::new(f, reply));
        let closed = || Error::internal("the database thread has stopped");
        self.tx
            .send(Message::Command(command))
            .await
            .map_err(|_| closed())?;
        reply_rx
            .await
            .map_err(|_| closed())?
            .map_err(|failure| self.error(failure))
    }

    /// The top-level error for a failure of this database.
    fn error(&self, failure: Failure) -> Error {
        failure.into_error(&self.path.display().to_string())
    }

    fn outbox_ok(&self) -> Result<()> {
        match self.outbox.failure() {
            None => Ok(()),
            Some(failure) => Err(self.error(failure)),
        }
    }
}

#[async_trait::async_trait]
impl Backend for Sqlite {
    /// A commit per 4,000 rows: more gains nothing measurable, and the rows held in
    /// memory grow with it.
    fn import_batch_rows(&self) -> usize {
        4_000
    }

    /// What sending the pending jobs would take.
    async fn send_plan(&self, precheck_always: bool) -> Result<reads::SendPlan> {
        self.call(move |c| reads::send_plan(c, precheck_always))
            .await
    }

    /// Starts a run. An `exclusive` run (one that sends) first takes the run lock
    /// (see `lock.rs`), or fails with [`Error::Locked`] naming its holder, and turns
    /// jobs left `in_flight` by a crash into pending jobs that are checked before any
    /// re-send. Returns the run id.
    async fn begin_run(&self, command: &str, options: String, exclusive: bool) -> Result<i64> {
        let held = if exclusive {
            Some(lock::RunLock::acquire(&self.path)?)
        } else {
            None
        };
        let command = command.to_owned();
        let (run_id, started_at) = self
            .call(move |c| runs::begin_run(c, &command, &options, exclusive))
            .await?;
        if let Some(mut held) = held {
            held.describe(run_id, &started_at);
            *self.lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(held);
        }
        Ok(run_id)
    }

    /// Records the end of a run (with the time its requests were held by pauses) and
    /// releases the lock. Returns the finish time as stored.
    async fn finish_run(
        &self,
        run_id: i64,
        exit_code: u8,
        stopped: Option<String>,
        paused: std::time::Duration,
    ) -> Result<String> {
        let paused_ms = i64::try_from(paused.as_millis()).unwrap_or(i64::MAX);
        let result = self
            .call(move |c| runs::finish_run(c, run_id, exit_code, stopped.as_deref(), paused_ms))
            .await;
        self.lock.lock().unwrap_or_else(|e| e.into_inner()).take();
        result
    }

    /// Imports a batch of rows in one transaction. The rows come back, to be freed by
    /// the thread that made them (freeing is cheaper there, and the database thread is
    /// the busiest one of an import).
    async fn import(
        &self,
        run_id: i64,
        source: String,
        rows: Vec<ImportRow>,
    ) -> Result<(ImportCounts, Vec<ImportRow>)> {
        self.call(move |c| {
            let counts = import::import(c, run_id, &source, &rows)?;
            runs::add_import_counts(c, run_id, counts)?;
            Ok((counts, rows))
        })
        .await
    }

    /// Groups in the whole database recorded without a share id.
    async fn groups_without_share_id(&self) -> Result<i64> {
        self.call(reads::groups_without_share_id).await
    }

    /// Adds to the run's import counts (rows the reader skipped, say).
    async fn add_import_counts(&self, run_id: i64, counts: ImportCounts) -> Result<()> {
        self.call(move |c| runs::add_import_counts(c, run_id, counts))
            .await
    }

    /// Puts `unknown` jobs back to pending (a person decided to re-send them). Returns how many.
    async fn requeue_unknown(&self, run_id: i64) -> Result<usize> {
        self.call(move |c| queue::requeue_unknown(c, run_id)).await
    }

    /// The id of the last inbox row present now, if any (see `Store::inbox_page`).
    async fn inbox_last(&self) -> Result<Option<i64>> {
        self.call(queue::inbox_last).await
    }

    /// Up to `limit` inbox rows after `after` and up to `last`, in id order, as the
    /// cells producers wrote.
    async fn inbox_page(
        &self,
        after: i64,
        last: i64,
        limit: usize,
    ) -> Result<Vec<(i64, crate::job::RowFields)>> {
        self.call(move |c| queue::inbox_page(c, after, last, limit))
            .await
    }

    /// Imports inbox rows (validated, as CSV rows are) and deletes the inbox rows up
    /// to `through`, in one transaction.
    async fn import_inbox(
        &self,
        run_id: i64,
        rows: Vec<ImportRow>,
        through: i64,
    ) -> Result<ImportCounts> {
        self.call(move |c| {
            let counts = queue::import_inbox(c, run_id, &rows, through)?;
            if counts.rows > 0 {
                runs::add_import_counts(c, run_id, counts)?;
            }
            Ok(counts)
        })
        .await
    }

    /// Puts failed jobs that match `filter` back to pending. Returns how many.
    async fn requeue_failed(&self, run_id: i64, filter: RetryFilter) -> Result<usize> {
        self.call(move |c| queue::requeue_failed(c, run_id, &filter))
            .await
    }

    /// Up to `limit` jobs in the given states with an id above `after_id`, with their
    /// groups (exports page through the table so memory stays flat).
    async fn jobs_page(
        &self,
        states: &'static [JobState],
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<JobExport>> {
        self.call(move |c| reads::jobs_page(c, states, after_id, limit))
            .await
    }

    /// Up to `limit` conflicting rows (not imported: their key was taken by other
    /// data) with an id above `after_id`, as jobs in state `conflict`.
    async fn conflicts_page(&self, after_id: i64, limit: usize) -> Result<Vec<JobExport>> {
        self.call(move |c| reads::conflicts_page(c, after_id, limit))
            .await
    }

    /// Claims up to `limit` pending jobs with an id above `after_id` for the run, and
    /// returns them in id order. Only the run that claimed a job may mark it in flight
    /// or record its outcome; a newer run takes over the claims of older ones.
    async fn claim_pending(&self, run_id: i64, after_id: i64, limit: usize) -> Result<Vec<Job>> {
        self.call(move |c| jobs::claim_pending(c, run_id, after_id, limit))
            .await
    }

    /// Records one HTTP exchange (if any) and the job's new state in one transaction.
    /// False when the job's state was left alone because another run claimed it since
    /// (the attempt is recorded all the same): the caller must leave the job be.
    async fn record(
        &self,
        run_id: i64,
        job_id: i64,
        attempt: Option<Attempt>,
        transition: Transition,
    ) -> Result<bool> {
        self.call(move |c| {
            let applied = jobs::record(c, run_id, job_id, attempt.as_ref(), &transition)?;
            // Both were made on the caller's thread: they go back to be freed there.
            Ok((applied, attempt, transition))
        })
        .await
        .map(|(applied, _, _)| applied)
    }

    /// Everything the report needs about one run (`None`: no such run).
    async fn run_facts(&self, run_id: i64) -> Result<Option<RunFacts>> {
        self.call(move |c| reads::run_facts(c, run_id)).await
    }

    /// When the newest run that exited 0 finished (unix seconds).
    async fn last_success(&self) -> Result<Option<f64>> {
        self.call(reads::last_success).await
    }

    /// The id of the newest run, if any.
    async fn last_run_id(&self) -> Result<Option<i64>> {
        self.call(reads::last_run_id).await
    }

    /// Keeps the report of a finished run as it was printed, so `report --run` shows
    /// exactly that later, whatever later runs do to its jobs.
    async fn save_report(&self, run_id: i64, json: String) -> Result<()> {
        self.call(move |c| runs::save_report(c, run_id, &json))
            .await
    }

    /// The report kept when the run finished (`None` for a run that did not finish,
    /// or that an older version ran).
    async fn saved_report(&self, run_id: i64) -> Result<Option<String>> {
        self.call(move |c| reads::saved_report(c, run_id)).await
    }

    /// Recent runs, newest first.
    async fn list_runs(&self, limit: usize) -> Result<Vec<RunListEntry>> {
        self.call(move |c| reads::list_runs(c, limit)).await
    }

    /// Job counts by state over the whole database.
    async fn state_counts(&self) -> Result<StateCounts> {
        self.call(reads::state_counts).await
    }

    /// Every job with its group (for exports and tests), in id order.
    async fn jobs(&self) -> Result<Vec<JobExport>> {
        self.call(reads::jobs).await
    }

    /// Records a job's last change in this run (an attempt, if any, and a final state)
    /// without waiting: it is written with the next transaction, whatever that is. A
    /// crash before then leaves the job as it was (`pending`, or `in_flight` after a
    /// create), as a crash just before an awaited record would, and the next run
    /// takes it up again (checking it first if it was in flight). A failure to write it makes every
    /// later call fail, [`flush`](Self::flush) included.
    fn record_last(
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
        // One message wakes an idle writer; later records ride with whatever comes
        // next. A full queue means the writer is busy and reaches the outbox soon.
        if first
            && let Err(mpsc::error::TrySendError::Closed(_)) = self.tx.try_send(Message::Outbox)
        {
            return Err(Error::internal("the database thread has stopped"));
        }
        Ok(())
    }

    /// Waits until everything queued so far (the outbox too) is committed.
    async fn flush(&self) -> Result<()> {
        self.call(|_| Ok(())).await?;
        self.outbox_ok()
    }

    /// Starts copying the WAL into the database file in the background, so that little
    /// is left for [`close`](Self::close) (call it once the writing is done).
    fn checkpoint_soon(&self) {
        // A full queue means the writer is busy writing anyway; the final checkpoint
        // then does it all.
        let _ = self.tx.try_send(Message::Checkpoint);
    }

    /// Ends the session: everything queued is committed, the WAL is copied into the
    /// database file and emptied, and the writer thread stops (every handle then
    /// fails). Returns when that is done, so the process can exit.
    async fn close(&self) {
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
