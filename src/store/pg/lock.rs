//! The run lock on PostgreSQL: a session-level advisory lock on a connection of its
//! own, keyed by the schema (two schemas of one database are two databases to
//! kohort-batch). The server releases it when that connection closes, however the
//! process ends. The `lock` row only names the holder, for a second run's message.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::record::numbered;
use super::tls::Connector;
use crate::error::{Error, Result};
use crate::store::clock::{now_ms, now_text};
use crate::store::failure::Failure;
use crate::store::runs;

/// The advisory locks' first key: "KBAT", kohort-batch's mark. The run lock's second
/// is the hash of the schema's name; the schema's creation takes `(KBAT, 0)`.
pub(super) const KBAT: i32 = 0x4B42_4154;

/// The run lock's two keys, as SQL.
fn run_lock_keys() -> String {
    format!("{KBAT}, hashtext(current_schema())")
}

/// The held lock: its connection, and whether we let it go.
#[derive(Debug)]
pub(super) struct RunLock {
    client: tokio_postgres::Client,
    backend: i64,
    released: Arc<AtomicBool>,
}

impl RunLock {
    /// Takes the lock without waiting, on a new connection; `Error::Locked` naming
    /// its holder if another session has it. `lost` is set should the connection
    /// close before [`release`](Self::release).
    pub(super) async fn acquire(
        connector: &Connector,
        shown: &str,
        lost: Arc<AtomicBool>,
    ) -> Result<RunLock> {
        let released = Arc::new(AtomicBool::new(false));
        let ours = released.clone();
        let db_err = |f: Failure| f.into_error(shown);
        let client = connector
            .connect(move || {
                if !ours.load(Ordering::SeqCst) {
                    tracing::error!(
                        "the connection holding the run lock closed (the PostgreSQL server \
                         restarted or dropped it): this run writes nothing more"
                    );
                    lost.store(true, Ordering::SeqCst);
                }
            })
            .await
            .map_err(db_err)?;
        // From here on, any return drops the lock's value, which marks it let go (see
        // `Drop`): a connection closed on the way out is not a lock lost.
        let mut held = RunLock {
            client,
            backend: 0,
            released,
        };
        let row = held
            .client
            .query_one(
                &format!(
                    "SELECT pg_try_advisory_lock({}), pg_backend_pid()",
                    run_lock_keys()
                ),
                &[],
            )
            .await
            .map_err(|e| db_err(e.into()))?;
        let got: bool = row.try_get(0).map_err(|e| db_err(e.into()))?;
        held.backend = i64::from(row.try_get::<_, i32>(1).map_err(|e| db_err(e.into()))?);
        if !got {
            let holder = holder(&held.client).await.map_err(db_err)?;
            return Err(Error::Locked {
                db: shown.to_owned(),
                holder,
                release: "The lock is a PostgreSQL advisory lock held by the server for that \
                          run's connection, released when the connection closes, however the \
                          run ends: nothing to clean up by hand"
                    .to_owned(),
            });
        }
        Ok(held)
    }

    /// The server process of the lock's connection.
    pub(super) fn backend_pid(&self) -> i64 {
        self.backend
    }

    /// Lets the lock go (closing its connection would too).
    pub(super) async fn release(self) {
        let _ = self
            .client
            .execute(
                &format!("SELECT pg_advisory_unlock({})", run_lock_keys()),
                &[],
            )
            .await;
    }
}

impl Drop for RunLock {
    /// Letting go of the lock (released, or dropped with its store) is not losing it.
    fn drop(&mut self) {
        self.released.store(true, Ordering::SeqCst);
    }
}

/// Who holds the lock: the run its row names, and the server's view of the session.
async fn holder(client: &tokio_postgres::Client) -> Result<String, Failure> {
    let named = client
        .query_opt(
            "SELECT run_id, pid, host, started_at FROM lock WHERE id = 1",
            &[],
        )
        .await?
        .map(|r| -> Result<String, Failure> {
            Ok(format!(
                "run {}, pid {} on {}, started {}",
                r.try_get::<_, i64>(0)?,
                r.try_get::<_, i64>(1)?,
                r.try_get::<_, String>(2)?,
                r.try_get::<_, String>(3)?
            ))
        })
        .transpose()?;
    let session = client
        .query_opt(
            "SELECT l.pid, coalesce('from ' || host(a.client_addr), \
                 CASE WHEN a.backend_start IS NULL THEN '(its details are hidden from this role)' \
                 ELSE 'from a local socket' END), \
                 coalesce(' since ' || a.backend_start::text, '') FROM pg_locks l \
                 LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND (l.classid, l.objid) = ($1::int::oid, hashtext(current_schema())::oid) \
                 LIMIT 1",
            &[&KBAT],
        )
        .await?
        .map(|r| -> Result<String, Failure> {
            Ok(format!(
                "PostgreSQL session {} {}{}",
                r.try_get::<_, Option<i32>>(0)?.unwrap_or_default(),
                r.try_get::<_, String>(1)?,
                r.try_get::<_, String>(2)?
            ))
        })
        .transpose()?;
    Ok(match (named, session) {
        (Some(n), Some(s)) => format!("{n}; {s}"),
        (Some(n), None) => n,
        (None, Some(s)) => format!("a run that is just starting; {s}"),
        (None, None) => "a run that is just starting".to_owned(),
    })
}

/// Records a run; for an `exclusive` run (holding the lock) also the lock row, and
/// turns jobs a crash left in flight into pending jobs checked before any re-send
/// (as SQLite's `runs::begin_run`). Returns the run id.
pub(super) async fn begin_run(
    tx: &deadpool_postgres::Transaction<'_>,
    command: &str,
    options: &str,
    exclusive: bool,
    backend: i64,
) -> Result<i64, Failure> {
    let started = now_text();
    let pid = i64::from(std::process::id());
    let run_id: i64 = tx
        .query_one(
            "INSERT INTO runs (command, started_at, pid, options) VALUES ($1, $2, $3, $4) \
             RETURNING id",
            &[&command, &started, &pid, &options],
        )
        .await?
        .try_get(0)?;
    if !exclusive {
        return Ok(run_id);
    }
    tx.execute("DELETE FROM lock", &[]).await?;
    tx.execute(
        "INSERT INTO lock (id, pid, run_id, started_at, host, backend) \
         VALUES (1, $1, $2, $3, $4, $5)",
        &[
            &pid,
            &run_id,
            &started,
            &crate::store::lock::host_name(),
            &backend,
        ],
    )
    .await?;
    tx.execute(&numbered(runs::ENDED_EARLIER), &[&run_id])
        .await?;
    let interrupted = tx
        .execute(&numbered(runs::INTERRUPTED), &[&now_ms()])
        .await?;
    runs::warn_interrupted(usize::try_from(interrupted).unwrap_or(usize::MAX));
    Ok(run_id)
}
