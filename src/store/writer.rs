//! The writer thread: it owns the connection, runs whatever has queued up in one
//! transaction (group commit) and answers each caller once that transaction ended.

use std::path::Path;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::checkpoint::Checkpointer;
use super::failure::{DbCause, Failure};
use super::outbox::Outbox;
use crate::error::Result;

/// Most tasks run in one transaction before it is committed.
const MAX_BATCH: usize = 2048;

/// A unit of work for the owner thread, answered once its transaction has ended.
pub(super) trait Work: Send {
    /// Runs inside the current transaction; `Err` says why it failed (the
    /// transaction is then rolled back).
    fn run(&mut self, conn: &Connection) -> Result<(), Failure>;
    /// Answers the caller; `commit_error` says why the transaction did not commit.
    fn finish(self: Box<Self>, commit_error: Option<&Failure>);
}

pub(super) type Task = Box<dyn Work>;

/// A [`Store::call`]: the function, then its result until the caller is answered.
pub(super) struct Call<F, T> {
    pub(super) f: Option<F>,
    pub(super) result: Option<Result<T, Failure>>,
    pub(super) reply: oneshot::Sender<Result<T, Failure>>,
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

/// What the owner thread is asked to do.
pub(super) enum Message {
    Task(Task),
    /// Start copying the WAL into the database file now, in the background.
    Checkpoint,
    /// Records wait in the outbox (sent when the first one arrives in an empty outbox).
    Outbox,
    /// Checkpoint the WAL into the database file and stop; answered when done.
    Close(oneshot::Sender<()>),
}

pub(super) fn owner_loop(
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
