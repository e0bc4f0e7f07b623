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
//! | `mod.rs` | the store: connecting (the pool), its health, transactions |
//! | `backend.rs` | every call of [`Backend`] |
//! | `schema.rs` | the schema's checks before opening, and its creation |
//! | `schema.sql` | the tables, made in `kohort_batch` or the schema the URL names |
//! | `record.rs` | an attempt and a state change in one transaction; groups |
//! | `lock.rs` | the advisory run lock and its holder |
//! | `import.rs` | rows into jobs: `COPY` for new rows, the import rules for the rest |
//! | `reads.rs` | what the report, the exports and the dry run read |
//! | `snapshot.rs` | the dry run's copy into a temporary SQLite database |
//! | `tls.rs` | the URL read into the driver's settings, and TLS |
//! | `failure.rs` | PostgreSQL's errors sorted by remedy |

mod backend;
mod failure;
mod import;
mod lock;
mod reads;
mod record;
mod schema;
mod snapshot;
mod tls;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod};

use super::failure::{DbCause, Failure};
use super::{Access, PgUrl};
use crate::error::{Error, Result};

/// Connections in the pool: enough for the workers' records to be committed together.
const POOL_SIZE: usize = 16;

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
        schema::prepare(&mut client, access, store.connector.schema_named)
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
