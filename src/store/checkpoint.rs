//! The checkpointer: a thread with its own connection that copies the WAL into the
//! database file, so the writer never stops for it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use rusqlite::{Connection, OpenFlags};

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
pub(super) struct Checkpointer {
    thread: std::thread::JoinHandle<()>,
    /// Wakes the thread (the WAL hook holds another; the thread ends when both are gone).
    wake: Option<std::sync::mpsc::SyncSender<()>>,
}

impl Checkpointer {
    /// Starts the thread and hooks the writer's commits to it.
    pub(super) fn start(
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
    pub(super) fn wake(&self) {
        if let Some(wake) = &self.wake {
            let _ = wake.try_send(());
        }
    }

    /// Unhooks the writer and waits for a checkpoint in progress to end.
    pub(super) fn stop(mut self, writer: &mut Connection) {
        self.wake = None;
        let _ = writer.wal_hook(None::<fn(&mut rusqlite::hooks::Wal, i32) -> rusqlite::Result<()>>);
        let _ = self.thread.join();
    }
}
