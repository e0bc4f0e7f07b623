//! The seam between the program and its record: [`Backend`], every call the rest of
//! the program makes to a database, and [`Store`], a handle to one backend (SQLite
//! by default, PostgreSQL for `--db postgres://…`).
//!
//! What does not depend on the database is written once, above the seam: the
//! protocol, import validation, the report, the exit rule. Below it each backend
//! keeps its own SQL, held to the same contract by the same tests
//! (`tests/it/postgres.rs` runs the workflows on both).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use super::reads::SendPlan;
use super::{
    Access, Attempt, Db, ImportCounts, Job, JobExport, JobState, RetryFilter, RunFacts,
    RunListEntry, StateCounts, Transition,
};
use crate::error::Result;
use crate::job::RowFields;
use crate::source::ImportRow;

/// Every call the program makes to its database. Both backends keep the same
/// promises; see each method.
#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// What sending the pending jobs would take.
    async fn send_plan(&self, precheck_always: bool) -> Result<SendPlan>;

    /// Starts a run. An `exclusive` run (one that sends) first takes the run lock,
    /// or fails with `Error::Locked` naming its holder, and turns jobs left
    /// `in_flight` by a crash into pending jobs that are checked before any
    /// re-send. Returns the run id.
    async fn begin_run(&self, command: &str, options: String, exclusive: bool) -> Result<i64>;

    /// Records the end of a run (with the time its requests were held by pauses) and
    /// releases the lock. Returns the finish time as stored.
    async fn finish_run(
        &self,
        run_id: i64,
        exit_code: u8,
        stopped: Option<String>,
        paused: std::time::Duration,
    ) -> Result<String>;

    /// Imports a batch of rows in one transaction. The rows come back, to be freed by
    /// the thread that made them.
    async fn import(
        &self,
        run_id: i64,
        source: String,
        rows: Vec<ImportRow>,
    ) -> Result<(ImportCounts, Vec<ImportRow>)>;

    /// Rows the importer hands over per [`import`](Self::import) call: each is one
    /// transaction.
    fn import_batch_rows(&self) -> usize;

    /// Groups in the whole database recorded without a share id.
    async fn groups_without_share_id(&self) -> Result<i64>;

    /// Adds to the run's import counts (rows the reader skipped, say).
    async fn add_import_counts(&self, run_id: i64, counts: ImportCounts) -> Result<()>;

    /// Puts `unknown` jobs back to pending (a person decided to re-send them).
    /// Returns how many.
    async fn requeue_unknown(&self, run_id: i64) -> Result<usize>;

    /// The id of the last inbox row present now, if any: a run moves the rows up to
    /// it and leaves later ones for the next run.
    async fn inbox_last(&self) -> Result<Option<i64>>;

    /// Up to `limit` inbox rows after `after` and up to `last`, in id order, as the
    /// cells producers wrote. Never waits for producers.
    async fn inbox_page(
        &self,
        after: i64,
        last: i64,
        limit: usize,
    ) -> Result<Vec<(i64, RowFields)>>;

    /// Imports inbox rows (validated, as CSV rows are) and deletes them from the inbox,
    /// in one transaction. SQLite deletes every row up to `through` (its writers are
    /// serialized: none can commit below it later); PostgreSQL deletes exactly the
    /// rows it imported, skipping any another session holds locked.
    async fn import_inbox(
        &self,
        run_id: i64,
        rows: Vec<ImportRow>,
        through: i64,
    ) -> Result<ImportCounts>;

    /// Puts failed jobs that match `filter` back to pending. Returns how many.
    async fn requeue_failed(&self, run_id: i64, filter: RetryFilter) -> Result<usize>;

    /// Up to `limit` jobs in the given states with an id above `after_id`, with their
    /// groups (exports page through the table so memory stays flat).
    async fn jobs_page(
        &self,
        states: &'static [JobState],
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<JobExport>>;

    /// Up to `limit` conflicting rows (not imported: their key was taken by other
    /// data) with an id above `after_id`, as jobs in state `conflict`.
    async fn conflicts_page(&self, after_id: i64, limit: usize) -> Result<Vec<JobExport>>;

    /// Claims up to `limit` pending jobs with an id above `after_id` for the run, and
    /// returns them in id order. Only the run that claimed a job may mark it in flight
    /// or record its outcome; a newer run takes over the claims of older ones.
    async fn claim_pending(&self, run_id: i64, after_id: i64, limit: usize) -> Result<Vec<Job>>;

    /// Records one HTTP exchange (if any) and the job's new state in one transaction,
    /// durable when this returns. False when the job's state was left alone because
    /// another run claimed it since (the attempt is recorded all the same).
    async fn record(
        &self,
        run_id: i64,
        job_id: i64,
        attempt: Option<Attempt>,
        transition: Transition,
    ) -> Result<bool>;

    /// Everything the report needs about one run (`None`: no such run).
    async fn run_facts(&self, run_id: i64) -> Result<Option<RunFacts>>;

    /// When the newest run that exited 0 finished (unix seconds).
    async fn last_success(&self) -> Result<Option<f64>>;

    /// The id of the newest run, if any.
    async fn last_run_id(&self) -> Result<Option<i64>>;

    /// Keeps the report of a finished run as it was printed.
    async fn save_report(&self, run_id: i64, json: String) -> Result<()>;

    /// The report kept when the run finished.
    async fn saved_report(&self, run_id: i64) -> Result<Option<String>>;

    /// Recent runs, newest first.
    async fn list_runs(&self, limit: usize) -> Result<Vec<RunListEntry>>;

    /// Job counts by state over the whole database.
    async fn state_counts(&self) -> Result<StateCounts>;

    /// Every job with its group (for exports and tests), in id order.
    async fn jobs(&self) -> Result<Vec<JobExport>>;

    /// Records a job's last change in this run without waiting: it is written soon,
    /// and [`flush`](Self::flush) waits for it. A crash before then leaves the job as
    /// it was (`pending`, or `in_flight` after a create), as a crash just before an
    /// awaited record would. A failure to write it makes every later call fail.
    fn record_last(
        &self,
        run_id: i64,
        job_id: i64,
        attempt: Option<Attempt>,
        transition: Transition,
    ) -> Result<()>;

    /// Waits until everything recorded so far is durable.
    async fn flush(&self) -> Result<()>;

    /// A hint that the writing is done: housekeeping may start in the background.
    fn checkpoint_soon(&self);

    /// Ends the session: everything queued is committed and the connections close.
    async fn close(&self);
}

/// A cheap, cloneable handle to a database, whichever backend holds it. Its calls
/// are [`Backend`]'s.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Arc<dyn Backend>,
    db: Db,
}

impl std::ops::Deref for Store {
    type Target = dyn Backend;

    fn deref(&self) -> &Self::Target {
        &*self.backend
    }
}

impl Store {
    /// Opens the database `--db` names: a SQLite file (see [`Store::open`]) or a
    /// PostgreSQL database (its schema made or brought forward for [`Access::Write`]).
    /// `ca_cert` adds a root certificate for PostgreSQL's TLS.
    pub async fn connect(
        db: &Db,
        access: Access,
        busy_timeout: std::time::Duration,
        ca_cert: Option<&Path>,
    ) -> Result<Store> {
        let backend: Arc<dyn Backend> = match db {
            Db::File(path) => Arc::new(super::handle::Sqlite::open_with(
                path,
                access,
                busy_timeout,
            )?),
            Db::Postgres(url) => {
                Arc::new(super::pg::Postgres::connect(url, access, busy_timeout, ca_cert).await?)
            }
        };
        Ok(Store {
            backend,
            db: db.clone(),
        })
    }

    /// [`connect`](Self::connect) with the default busy timeout and no extra CA.
    pub async fn connect_plain(db: &Db, access: Access) -> Result<Store> {
        Store::connect(db, access, super::DEFAULT_BUSY_TIMEOUT, None).await
    }

    /// Opens (creating if needed) the SQLite database at `path` to write it, with the
    /// default busy timeout. A file that is not a kohort-batch database is refused
    /// before anything is written to it.
    pub fn open(path: &Path) -> Result<Store> {
        Ok(Store {
            backend: Arc::new(super::handle::Sqlite::open_with(
                path,
                Access::Write,
                super::DEFAULT_BUSY_TIMEOUT,
            )?),
            db: Db::File(path.to_owned()),
        })
    }

    /// Copies the database `--db` names into a new SQLite file `dest`, for a dry run,
    /// reading it only. False when there is nothing to copy (no such file yet).
    pub async fn snapshot(db: &Db, dest: &Path, ca_cert: Option<&Path>) -> Result<bool> {
        match db {
            Db::File(path) if !path.exists() => Ok(false),
            Db::File(path) => super::handle::Sqlite::snapshot(path, dest).map(|()| true),
            Db::Postgres(url) => {
                let pg = match super::pg::Postgres::connect(
                    url,
                    Access::Read,
                    super::DEFAULT_BUSY_TIMEOUT,
                    ca_cert,
                )
                .await
                {
                    Ok(pg) => pg,
                    // No run has used it yet: the plan starts from nothing, as for a
                    // SQLite file that does not exist yet.
                    Err(crate::error::Error::Database {
                        cause: super::DbCause::Empty,
                        ..
                    }) => return Ok(false),
                    Err(e) => return Err(e),
                };
                let copied = pg.snapshot(dest).await;
                pg.close().await;
                copied.map(|()| true)
            }
        }
    }

    /// The database, as `--db` names it.
    pub fn db(&self) -> &Db {
        &self.db
    }
}
