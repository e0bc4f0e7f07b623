//! The PostgreSQL backend (`--db postgres://…`): the queue and the record in a
//! database other hosts can reach.
//!
//! A pool of connections (deadpool-postgres) serves the run's workers: each record
//! is its own transaction, committed before the call returns, and PostgreSQL flushes
//! concurrent commits together (one connection would make every commit wait for the
//! one before it). The run lock is a session-level advisory lock on a connection of
//! its own, held by the server and released when that connection closes, however
//! the process ends. Should that connection be lost, every later write fails: a run
//! never goes on without its lock.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | connecting (TLS, pool), the schema's checks, and every call of [`Backend`] |
//! | `schema.sql` | the tables, made in the first schema of the search path |
//! | `lock.rs` | the advisory run lock and its holder |
//! | `import.rs` | rows into jobs: `COPY` for new rows, the import rules for the rest |
//! | `reads.rs` | what the report, the exports and the dry run read |
//! | `snapshot.rs` | the dry run's copy into a temporary SQLite database |
//! | `tls.rs` | the URL read into the driver's settings, and TLS |
//! | `failure.rs` | PostgreSQL's errors sorted by remedy |

mod failure;
mod import;
mod lock;
mod reads;
mod snapshot;
mod tls;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::types::ToSql;

use super::failure::{DbCause, Failure};
use super::jobs::{INSERT_ATTEMPT, param, update_sql, warn_not_recorded};
use super::reads::{JobExport, RunFacts, RunListEntry, SendPlan};
use super::{
    Access, Attempt, Backend, ImportCounts, Job, JobState, PgUrl, RetryFilter, StateCounts,
    Transition,
};
use crate::error::{Error, Result};
use crate::job::RowFields;
use crate::source::ImportRow;

/// Connections in the pool: enough for the workers' records to be committed together.
const POOL_SIZE: usize = 16;

/// The schema version this build writes (`schema.sql`).
const VERSION: i64 = 1;

/// A PostgreSQL database holding the record.
#[derive(Debug)]
pub(crate) struct Postgres {
    pool: Pool,
    shown: String,
    /// The run lock's own connection, while this handle's run sends.
    lock: tokio::sync::Mutex<Option<lock::RunLock>>,
    /// Set when the lock's connection is lost: no write may follow.
    lock_lost: Arc<AtomicBool>,
    /// Records written without waiting ([`Backend::record_last`]).
    pending: Arc<Pending>,
    /// How connections are made (for the lock's own).
    connector: tls::Connector,
}

/// Records on their way, and the first failure among them.
#[derive(Debug)]
struct Pending {
    count: tokio::sync::watch::Sender<usize>,
    failure: std::sync::Mutex<Option<Failure>>,
}

impl Postgres {
    /// Connects, checks that the schema is ours (or empty), and for
    /// [`Access::Write`] makes or brings forward its tables.
    pub(crate) async fn connect(
        url: &PgUrl,
        access: Access,
        busy_timeout: std::time::Duration,
        ca_cert: Option<&Path>,
    ) -> Result<Postgres> {
        let shown = url.shown();
        let connector = tls::Connector::new(url, busy_timeout, ca_cert)?;
        let manager = connector.manager(ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .build()
            .map_err(|e| Error::internal_from("cannot make the PostgreSQL connection pool", e))?;
        let store = Postgres {
            pool,
            shown,
            lock: tokio::sync::Mutex::new(None),
            lock_lost: Arc::new(AtomicBool::new(false)),
            pending: Arc::new(Pending {
                count: tokio::sync::watch::Sender::new(0),
                failure: std::sync::Mutex::new(None),
            }),
            connector,
        };
        let mut client = store.client().await?;
        prepare(&mut client, access, store.connector.schema_named)
            .await
            .map_err(|f| store.error(f))?;
        Ok(store)
    }

    /// Copies what a dry run reads into a new SQLite database at `dest`.
    pub(crate) async fn snapshot(&self, dest: &Path) -> Result<()> {
        let mut client = self.client().await?;
        snapshot::copy_into(&mut client, dest)
            .await
            .map_err(|f| self.error(f.context("cannot copy it for the dry run")))
    }

    fn error(&self, failure: Failure) -> Error {
        failure.into_error(&self.shown)
    }

    /// Whether writes may go on: no record failed, and the run still holds its lock.
    fn healthy(&self) -> Result<()> {
        if let Some(f) = self
            .pending
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(self.error(f));
        }
        if self.lock_lost.load(Ordering::SeqCst) {
            return Err(self.error(Failure::new(
                DbCause::Connection,
                "the connection holding the run lock was lost (the server restarted or \
                 dropped it), so this run stopped writing",
            )));
        }
        Ok(())
    }

    /// A pooled connection, once [`healthy`](Self::healthy).
    async fn client(&self) -> Result<deadpool_postgres::Client> {
        self.healthy()?;
        self.pool
            .get()
            .await
            .map_err(|e| self.error(failure::from_pool(e)))
    }

    /// Runs `f` in a transaction on a pooled connection, committed before this returns.
    async fn in_tx<T, F>(&self, f: F) -> Result<T>
    where
        F: for<'t> FnOnce(
            &'t deadpool_postgres::Transaction<'t>,
        ) -> futures_util::future::BoxFuture<'t, Result<T, Failure>>,
    {
        let mut client = self.client().await?;
        let result = async {
            let tx = client.transaction().await?;
            let value = f(&tx).await?;
            tx.commit().await?;
            Ok::<T, Failure>(value)
        }
        .await;
        result.map_err(|f| self.error(f))
    }
}

/// Checks the schema of the connection's search path and, to write, makes its
/// tables (one process at a time: a transaction-level advisory lock). Where the URL
/// names no schema, a new record is refused if this database already holds one in
/// another schema (the URL would otherwise quietly start an empty record).
async fn prepare(
    client: &mut deadpool_postgres::Client,
    access: Access,
    schema_named: bool,
) -> Result<(), Failure> {
    let schema: Option<String> = client
        .query_one("SELECT current_schema()", &[])
        .await?
        .get(0);
    let schema = match schema {
        Some(schema) => schema,
        None => create_schema(client, access).await?,
    };
    let tx = client.transaction().await?;
    if access == Access::Write {
        tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&lock::KBAT])
            .await?;
    }
    // From the catalog, which lists every table whatever this role may do with it
    // (information_schema shows only tables the role has a privilege on).
    let tables: Vec<String> = tx
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if tables.iter().any(|t| t == "kohort_batch_schema") {
        check_version(&tx).await?;
    } else {
        refuse_foreign(&schema, &tables, access)?;
        if !schema_named {
            refuse_elsewhere(&tx, &schema).await?;
        }
        tx.batch_execute(include_str!("schema.sql")).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Makes the schema the search path names first, which does not exist yet (only
/// to write: reading makes nothing). Returns its name.
async fn create_schema(
    client: &deadpool_postgres::Client,
    access: Access,
) -> Result<String, Failure> {
    let wanted: String = client.query_one("SHOW search_path", &[]).await?.get(0);
    if access == Access::Read {
        return Err(Failure::new(
            DbCause::Empty,
            format!(
                "no schema of the search path ({wanted}) exists: no run has used this \
                 database yet (is --db the URL your runs use?)"
            ),
        ));
    }
    // The first entry as PostgreSQL reads it (case folded unless quoted).
    let first: Option<String> = match client
        .query_one(
            "SELECT (parse_ident(trim(split_part($1, ',', 1))))[1]",
            &[&wanted],
        )
        .await
    {
        Ok(row) => row.try_get(0)?,
        // Not a name PostgreSQL can read: said below, with what to do.
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE)
                || e.code() == Some(&tokio_postgres::error::SqlState::INVALID_NAME) =>
        {
            None
        }
        Err(e) => return Err(e.into()),
    };
    let unusable = || {
        Failure::new(
            DbCause::NotOurs,
            format!(
                "no schema of the search path ({wanted}) exists, and its first entry is not \
                 one kohort-batch can make: name one with ?options=-csearch_path%3DNAME"
            ),
        )
    };
    let name = first
        .filter(|n| !n.is_empty() && !n.starts_with('$'))
        .ok_or_else(unusable)?;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(&name)
        ))
        .await?;
    let now: Option<String> = client
        .query_one("SELECT current_schema()", &[])
        .await?
        .get(0);
    now.ok_or_else(unusable)
}

/// Refuses to start a record in `schema` when another schema of this database
/// holds one.
async fn refuse_elsewhere(
    tx: &deadpool_postgres::Transaction<'_>,
    schema: &str,
) -> Result<(), Failure> {
    let other: Option<String> = tx
        .query_opt(
            "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname = 'kohort_batch_schema' AND n.nspname <> current_schema() LIMIT 1",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    match other {
        None => Ok(()),
        Some(other) => Err(Failure::new(
            DbCause::NotOurs,
            format!(
                "this database holds a kohort-batch record in schema {other}, and this URL \
                 would start a new one in schema {schema}; nothing was changed. Name the \
                 schema of your runs with ?options=-csearch_path%3D{other} (or another on \
                 purpose, for a second record)"
            ),
        )),
    }
}

/// A schema without our mark: refused if it holds a table named as one of ours
/// (another application's), or if the command only reads.
fn refuse_foreign(schema: &str, tables: &[String], access: Access) -> Result<(), Failure> {
    let taken: Vec<&str> = tables
        .iter()
        .map(String::as_str)
        .filter(|t| OUR_TABLES.contains(t))
        .collect();
    if !taken.is_empty() {
        return Err(Failure::new(
            DbCause::NotOurs,
            format!(
                "schema {schema} holds tables of another application ({}); nothing in it \
                 was changed. Give kohort-batch a schema of its own with \
                 ?options=-csearch_path%3Dkohort_batch",
                taken.join(", ")
            ),
        ));
    }
    if access == Access::Read {
        return Err(Failure::new(
            DbCause::Empty,
            format!(
                "schema {schema} holds no kohort-batch tables: no run has used it yet \
                 (is --db the URL your runs use?)"
            ),
        ));
    }
    Ok(())
}

/// Refuses a schema written by a newer kohort-batch.
async fn check_version(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), Failure> {
    let version: i64 = tx
        .query_one("SELECT max(version) FROM kohort_batch_schema", &[])
        .await?
        .get::<_, Option<i64>>(0)
        .unwrap_or(0);
    if version > VERSION {
        return Err(Failure::new(
            DbCause::Version,
            format!(
                "written by a newer kohort-batch (schema {version}; this one knows up to \
                 {VERSION}): use that version or a newer one; nothing was changed"
            ),
        ));
    }
    Ok(())
}

/// The tables `schema.sql` makes.
const OUR_TABLES: [&str; 9] = [
    "kohort_batch_schema",
    "runs",
    "sources",
    "jobs",
    "attempts",
    "groups",
    "import_issues",
    "lock",
    "inbox",
];

/// A name as an SQL identifier, quoted.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// SQLite's numbered parameters (`?1`) as PostgreSQL's (`$1`): the protocol's state
/// changes are one SQL text for both backends (`jobs.rs`).
fn numbered(sql: &str) -> String {
    sql.replace('?', "$")
}

/// A value bound to a statement.
type Value = Box<dyn ToSql + Sync + Send>;

/// The parameters of [`update_sql`] for `transition`, in order.
fn state_change_params(
    bump: i64,
    status: Option<i64>,
    run_id: i64,
    job_id: i64,
    transition: &Transition,
) -> Vec<Value> {
    let mut values: Vec<(usize, Value)> = vec![
        (param::BUMP, Box::new(bump)),
        (param::STATUS, Box::new(status)),
        (param::RUN_ID, Box::new(run_id)),
        (param::NOW_MS, Box::new(super::clock::now_ms())),
        (param::JOB_ID, Box::new(job_id)),
    ];
    match transition {
        Transition::Keep | Transition::Unsent => {}
        Transition::InFlight { check_after, .. } => {
            values.push((param::CHECK_AFTER, Box::new(*check_after)));
        }
        Transition::Succeeded { obtained, group } => {
            values.push((param::OBTAINED, Box::new(obtained.as_str())));
            values.push((param::GROUP_ID, Box::new(group.id.clone())));
        }
        Transition::Failed { reason, class } => {
            values.push((param::REASON, Box::new(reason.clone())));
            values.push((param::CLASS, Box::new(class.to_string())));
        }
        Transition::Unknown { reason } => values.push((param::REASON, Box::new(reason.clone()))),
        Transition::Pending {
            next_attempt_at,
            needs_check,
            reason,
        } => {
            values.push((param::NEXT_ATTEMPT_AT, Box::new(*next_attempt_at)));
            values.push((param::NEEDS_CHECK, Box::new(i64::from(*needs_check))));
            values.push((param::PENDING_REASON, Box::new(reason.clone())));
        }
    }
    values.sort_by_key(|(i, _)| *i);
    values.into_iter().map(|(_, v)| v).collect()
}

/// Whether a record's commit waits until it is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// On disk before the call returns: a mark in flight, before its request leaves.
    Durable,
    /// A job's last record in a run: the server writes it within a moment
    /// (`synchronous_commit = off`). A server crash before then leaves the job as its
    /// last durable record has it (in flight: checked by the next run), as SQLite's
    /// outbox does; one flush less per job.
    Soon,
}

/// Records one attempt and the job's state change in one transaction (see
/// `jobs::record`, SQLite's).
async fn record(
    pool: &Pool,
    commit: Commit,
    run_id: i64,
    job_id: i64,
    attempt: Option<&Attempt>,
    transition: &Transition,
) -> Result<bool, Failure> {
    let mut client = pool.get().await.map_err(failure::from_pool)?;
    let tx = client.transaction().await?;
    if commit == Commit::Soon {
        tx.batch_execute("SET LOCAL synchronous_commit = off")
            .await?;
    }
    if let Some(a) = attempt {
        let stmt = tx.prepare_cached(&numbered(INSERT_ATTEMPT)).await?;
        tx.execute(
            &stmt,
            &[
                &job_id,
                &run_id,
                &a.kind.as_str(),
                &super::clock::ts_text(a.started_at),
                &a.started_at.as_millisecond(),
                &(a.latency.as_secs_f64() * 1000.0),
                &a.status.map(i64::from),
                &a.class.as_str(),
                &a.error,
                &a.batch,
            ],
        )
        .await?;
    }
    let values = state_change_params(
        i64::from(attempt.is_some()),
        attempt.and_then(|a| a.status).map(i64::from),
        run_id,
        job_id,
        transition,
    );
    let params: Vec<&(dyn ToSql + Sync)> = values
        .iter()
        .map(|v| v.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let stmt = tx.prepare_cached(&numbered(update_sql(transition))).await?;
    let applied = tx.execute(&stmt, &params).await? == 1;
    if applied && let Transition::Succeeded { obtained, group } = transition {
        insert_group(&tx, job_id, obtained.as_str(), group).await?;
    }
    tx.commit().await?;
    if !applied {
        warn_not_recorded(run_id, job_id, transition);
    }
    Ok(applied)
}

/// Stores a job's group; a second one for the same job is logged, never stored over
/// the first (as SQLite's `jobs::insert_group`).
async fn insert_group(
    tx: &deadpool_postgres::Transaction<'_>,
    job_id: i64,
    obtained: &str,
    group: &crate::job::Group,
) -> Result<(), Failure> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO groups (id, job_id, share_id, status, customer_id, order_id, \
             expires_at, created_at, obtained, raw, recorded_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (job_id) DO NOTHING",
        )
        .await?;
    let inserted = tx
        .execute(
            &stmt,
            &[
                &group.id,
                &job_id,
                &group.share_id,
                &group.status,
                &group.customer_id,
                &group.order_id,
                &group.expires_at,
                &group.created_at,
                &obtained,
                &group.raw,
                &super::clock::now_text(),
            ],
        )
        .await?;
    if inserted == 0 {
        let kept: String = tx
            .query_one("SELECT id FROM groups WHERE job_id = $1", &[&job_id])
            .await?
            .get(0);
        super::jobs::warn_second_group(job_id, &kept, &group.id);
    }
    Ok(())
}

#[async_trait::async_trait]
impl Backend for Postgres {
    async fn send_plan(&self, precheck_always: bool) -> Result<SendPlan> {
        let client = self.client().await?;
        reads::send_plan(&client, precheck_always)
            .await
            .map_err(|f| self.error(f))
    }

    async fn begin_run(&self, command: &str, options: String, exclusive: bool) -> Result<i64> {
        let mut held = None;
        if exclusive {
            held = Some(
                lock::RunLock::acquire(&self.connector, &self.shown, self.lock_lost.clone())
                    .await?,
            );
        }
        let command = command.to_owned();
        let backend = held.as_ref().map_or(0, lock::RunLock::backend_pid);
        let run_id = self
            .in_tx(move |tx| {
                Box::pin(async move {
                    lock::begin_run(tx, &command, &options, exclusive, backend).await
                })
            })
            .await?;
        *self.lock.lock().await = held;
        Ok(run_id)
    }

    async fn finish_run(
        &self,
        run_id: i64,
        exit_code: u8,
        stopped: Option<String>,
        paused: std::time::Duration,
    ) -> Result<String> {
        let paused_ms = i64::try_from(paused.as_millis()).unwrap_or(i64::MAX);
        let result = self
            .in_tx(move |tx| {
                Box::pin(async move {
                    let finished_at = super::clock::now_text();
                    tx.execute(
                        "UPDATE runs SET finished_at = $1, exit_code = $2, stopped = $3, \
                         paused_ms = $4 WHERE id = $5",
                        &[
                            &finished_at,
                            &i64::from(exit_code),
                            &stopped,
                            &paused_ms,
                            &run_id,
                        ],
                    )
                    .await?;
                    tx.execute("DELETE FROM lock WHERE run_id = $1", &[&run_id])
                        .await?;
                    Ok(finished_at)
                })
            })
            .await;
        if let Some(held) = self.lock.lock().await.take() {
            held.release().await;
        }
        result
    }

    async fn import(
        &self,
        run_id: i64,
        source: String,
        rows: Vec<ImportRow>,
    ) -> Result<(ImportCounts, Vec<ImportRow>)> {
        let mut client = self.client().await?;
        let counts = import::import_batch(&mut client, run_id, &source, &rows)
            .await
            .map_err(|f| self.error(f))?;
        Ok((counts, rows))
    }

    /// Larger than SQLite's: each batch is a round trip of statements around its
    /// `COPY`, and a commit waiting for the disk.
    fn import_batch_rows(&self) -> usize {
        10_000
    }

    async fn groups_without_share_id(&self) -> Result<i64> {
        let client = self.client().await?;
        reads::groups_without_share_id(&client)
            .await
            .map_err(|f| self.error(f))
    }

    async fn add_import_counts(&self, run_id: i64, counts: ImportCounts) -> Result<()> {
        self.in_tx(move |tx| Box::pin(import::add_import_counts(tx, run_id, counts)))
            .await
    }

    async fn requeue_unknown(&self, run_id: i64) -> Result<usize> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE jobs SET state = 'pending', last_run_id = $1, next_attempt_at = NULL \
                 WHERE state = 'unknown'",
                &[&run_id],
            )
            .await
            .map_err(|e| self.error(e.into()))?;
        Ok(n as usize)
    }

    async fn inbox_last(&self) -> Result<Option<i64>> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT max(id) FROM inbox", &[])
            .await
            .map_err(|e| self.error(e.into()))?;
        Ok(row.get(0))
    }

    async fn inbox_page(
        &self,
        after: i64,
        last: i64,
        limit: usize,
    ) -> Result<Vec<(i64, RowFields)>> {
        let client = self.client().await?;
        reads::inbox_page(&client, after, last, limit)
            .await
            .map_err(|f| self.error(f))
    }

    async fn import_inbox(
        &self,
        run_id: i64,
        rows: Vec<ImportRow>,
        _through: i64,
    ) -> Result<ImportCounts> {
        let mut client = self.client().await?;
        import::import_inbox(&mut client, run_id, rows)
            .await
            .map_err(|f| self.error(f))
    }

    async fn requeue_failed(&self, run_id: i64, filter: RetryFilter) -> Result<usize> {
        let client = self.client().await?;
        reads::requeue_failed(&client, run_id, &filter)
            .await
            .map_err(|f| self.error(f))
    }

    async fn jobs_page(
        &self,
        states: &'static [JobState],
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<JobExport>> {
        let client = self.client().await?;
        reads::jobs_page(&client, Some(states), after_id, limit)
            .await
            .map_err(|f| self.error(f))
    }

    async fn conflicts_page(&self, after_id: i64, limit: usize) -> Result<Vec<JobExport>> {
        let client = self.client().await?;
        reads::conflicts_page(&client, after_id, limit)
            .await
            .map_err(|f| self.error(f))
    }

    async fn claim_pending(&self, run_id: i64, after_id: i64, limit: usize) -> Result<Vec<Job>> {
        let client = self.client().await?;
        reads::claim_pending(&client, run_id, after_id, limit)
            .await
            .map_err(|f| self.error(f))
    }

    async fn record(
        &self,
        run_id: i64,
        job_id: i64,
        attempt: Option<Attempt>,
        transition: Transition,
    ) -> Result<bool> {
        self.healthy()?;
        record(
            &self.pool,
            Commit::Durable,
            run_id,
            job_id,
            attempt.as_ref(),
            &transition,
        )
        .await
        .map_err(|f| self.error(f))
    }

    async fn run_facts(&self, run_id: i64) -> Result<Option<RunFacts>> {
        let client = self.client().await?;
        reads::run_facts(&client, run_id)
            .await
            .map_err(|f| self.error(f))
    }

    async fn last_success(&self) -> Result<Option<f64>> {
        let client = self.client().await?;
        let at: Option<String> = client
            .query_one("SELECT max(finished_at) FROM runs WHERE exit_code = 0", &[])
            .await
            .map_err(|e| self.error(e.into()))?
            .get(0);
        Ok(at
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(|t| t.as_millisecond() as f64 / 1000.0))
    }

    async fn last_run_id(&self) -> Result<Option<i64>> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT max(id) FROM runs", &[])
            .await
            .map_err(|e| self.error(e.into()))?;
        Ok(row.get(0))
    }

    async fn save_report(&self, run_id: i64, json: String) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE runs SET report = $1 WHERE id = $2",
                &[&json, &run_id],
            )
            .await
            .map_err(|e| self.error(e.into()))?;
        Ok(())
    }

    async fn saved_report(&self, run_id: i64) -> Result<Option<String>> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT report FROM runs WHERE id = $1", &[&run_id])
            .await
            .map_err(|e| self.error(e.into()))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    async fn list_runs(&self, limit: usize) -> Result<Vec<RunListEntry>> {
        let client = self.client().await?;
        reads::list_runs(&client, limit)
            .await
            .map_err(|f| self.error(f))
    }

    async fn state_counts(&self) -> Result<StateCounts> {
        let client = self.client().await?;
        reads::state_counts(&client)
            .await
            .map_err(|f| self.error(f))
    }

    async fn jobs(&self) -> Result<Vec<JobExport>> {
        let client = self.client().await?;
        reads::jobs_page(&client, None, 0, usize::MAX)
            .await
            .map_err(|f| self.error(f))
    }

    fn record_last(
        &self,
        run_id: i64,
        job_id: i64,
        attempt: Option<Attempt>,
        transition: Transition,
    ) -> Result<()> {
        self.healthy()?;
        let pool = self.pool.clone();
        let pending = self.pending.clone();
        pending.count.send_modify(|n| *n += 1);
        tokio::spawn(async move {
            let result = record(
                &pool,
                Commit::Soon,
                run_id,
                job_id,
                attempt.as_ref(),
                &transition,
            )
            .await;
            if let Err(f) = result {
                let mut first = pending.failure.lock().unwrap_or_else(|e| e.into_inner());
                first.get_or_insert(f);
            }
            pending.count.send_modify(|n| *n -= 1);
        });
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let mut count = self.pending.count.subscribe();
        // The sender lives in `self`: waiting cannot fail.
        let _ = count.wait_for(|n| *n == 0).await;
        self.healthy()
    }

    fn checkpoint_soon(&self) {}

    async fn close(&self) {
        let _ = self.flush().await;
        if let Some(held) = self.lock.lock().await.take() {
            held.release().await;
        }
        self.pool.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_changes_bind_every_parameter_they_name() {
        let reason = String::from("r");
        for t in [
            Transition::Keep,
            Transition::InFlight {
                check_after: 1,
                new_create: true,
            },
            Transition::Unsent,
            Transition::Succeeded {
                obtained: super::super::Obtained::Created,
                group: crate::job::Group::default(),
            },
            Transition::Failed {
                reason: reason.clone(),
                class: super::super::FailureClass::OrderNotFound,
            },
            Transition::Unknown {
                reason: reason.clone(),
            },
            Transition::Pending {
                next_attempt_at: None,
                needs_check: true,
                reason: None,
            },
        ] {
            let sql = numbered(update_sql(&t));
            let highest = (1..=20)
                .rev()
                .find(|i| sql.contains(&format!("${i}")))
                .unwrap_or(0);
            assert_eq!(
                state_change_params(1, None, 1, 1, &t).len(),
                highest,
                "{}",
                t.name()
            );
            assert!(!sql.contains('?'), "{sql}");
        }
    }
}
