//! The writer thread: it owns the connection, runs the commands that have queued up
//! in one transaction (group commit) and answers each caller once that transaction
//! has ended.
//!
//! Commands run without savepoints of their own (they cost a copy of every page a
//! command touches): the first command that fails ends the batch, and the whole
//! transaction is rolled back. For the engine that is what a crash just before the
//! commit would be, which the exactly-once protocol is built to survive.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::checkpoint::Checkpointer;
use super::failure::{DbCause, Failure};
use super::outbox::Outbox;
use crate::error::Result;

/// Most commands run in one transaction before it is committed.
const MAX_BATCH: usize = 2048;

/// A unit of work for the writer, answered once its transaction has ended.
pub(super) trait Command: Send {
    /// Runs inside the current transaction; `Err` says why it failed (the
    /// transaction is then rolled back).
    fn run(&mut self, conn: &Connection) -> Result<(), Failure>;
    /// Answers the caller; `commit_error` says why the transaction did not commit.
    fn finish(self: Box<Self>, commit_error: Option<&Failure>);
}

/// A closure sent by `Store::call`, then its result until the caller
/// is answered.
pub(super) struct FnCommand<F, T> {
    f: Option<F>,
    result: Option<Result<T, Failure>>,
    reply: oneshot::Sender<Result<T, Failure>>,
}

impl<F, T> FnCommand<F, T> {
    pub(super) fn new(f: F, reply: oneshot::Sender<Result<T, Failure>>) -> FnCommand<F, T> {
        FnCommand {
            f: Some(f),
            result: None,
            reply,
        }
    }
}

impl<F, T> Command for FnCommand<F, T>
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

/// What the writer is asked to do.
pub(super) enum Message {
    Command(Box<dyn Command>),
    /// Start copying the WAL into the database file now, in the background.
    Checkpoint,
    /// Records wait in the outbox (sent when the first one arrives in an empty outbox).
    Outbox,
    /// Checkpoint the WAL into the database file and stop; answered when done.
    Close(oneshot::Sender<()>),
}

/// The writer thread's state: the connection and what it shares with the handles.
pub(super) struct Writer {
    conn: Connection,
    path: PathBuf,
    checkpointer: Checkpointer,
    outbox: Arc<Outbox>,
    /// The commands of the current transaction (kept between them for its capacity).
    commands: Vec<Box<dyn Command>>,
}

/// Where the commands of a transaction beyond its first come from.
struct Intake<'a> {
    rx: &'a mut mpsc::Receiver<Message>,
    /// Set when a close request arrives mid-batch: the loop ends after the commit.
    closing: &'a mut Option<oneshot::Sender<()>>,
}

impl Writer {
    /// Starts the writer thread, which owns `conn` until every handle is gone or the
    /// store is closed.
    pub(super) fn spawn(
        conn: Connection,
        rx: mpsc::Receiver<Message>,
        path: &Path,
        checkpointer: Checkpointer,
        outbox: Arc<Outbox>,
    ) -> std::io::Result<()> {
        let writer = Writer {
            conn,
            path: path.to_owned(),
            checkpointer,
            outbox,
            commands: Vec::with_capacity(MAX_BATCH),
        };
        std::thread::Builder::new()
            .name("kohort-store".into())
            .spawn(move || writer.run(rx))
            .map(drop)
    }

    fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        let mut closing: Option<oneshot::Sender<()>> = None;
        while closing.is_none() {
            let first = match rx.blocking_recv() {
                None => break,
                Some(Message::Checkpoint) => {
                    self.checkpointer.wake();
                    continue;
                }
                Some(Message::Close(done)) => {
                    closing = Some(done);
                    break;
                }
                Some(Message::Outbox) => None,
                Some(Message::Command(command)) => Some(command),
            };
            let intake = Intake {
                rx: &mut rx,
                closing: &mut closing,
            };
            self.transaction(first, Some(intake));
        }
        // Last records that came after the last transaction.
        self.transaction(None, None);
        self.close(closing);
    }

    /// The session is over (or every handle is gone): leaves no WAL behind.
    fn close(mut self, closing: Option<oneshot::Sender<()>>) {
        self.checkpointer.stop(&mut self.conn);
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!(db = %self.path.display(), error = %e, "final checkpoint failed; the next run completes it");
        }
        drop(self.conn);
        if let Some(done) = closing {
            let _ = done.send(());
        }
    }

    /// One transaction: the outbox's records, `first` and, with an `intake`, whatever
    /// else has queued up; then every command is answered.
    fn transaction(&mut self, first: Option<Box<dyn Command>>, intake: Option<Intake<'_>>) {
        if first.is_none() && intake.is_none() && self.outbox.is_empty() {
            return;
        }
        if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            let msg = Failure::from(e).context("cannot begin a transaction");
            tracing::error!(db = %self.path.display(), error = %msg, "cannot begin a transaction");
            // The outbox keeps its records for the next transaction.
            if let Some(command) = first {
                command.finish(Some(&msg));
            }
            return;
        }
        let mut batch = Batch {
            conn: &self.conn,
            outbox: &self.outbox,
            commands: std::mem::take(&mut self.commands),
            failure: None,
            outbox_written: false,
        };
        if let Some(command) = first {
            batch.add(command);
        }
        if let Some(intake) = intake {
            batch.gather(intake, &self.checkpointer);
        }
        // Records that came with the last command are written before the commit.
        batch.write_outbox();
        self.commands = batch.end(&self.path);
    }
}

/// The commands of one open transaction, and whether it can still commit.
struct Batch<'a> {
    conn: &'a Connection,
    outbox: &'a Outbox,
    commands: Vec<Box<dyn Command>>,
    /// The first failure: nothing more runs, and the transaction is rolled back.
    failure: Option<Failure>,
    /// Outbox records are in this transaction: its failure is theirs too.
    outbox_written: bool,
}

impl Batch<'_> {
    /// Writes the outbox, then runs `command` (unless something failed already); the
    /// command is answered at the end. The outbox goes first so that a caller that
    /// recorded something and then sent a command reads its own write.
    fn add(&mut self, mut command: Box<dyn Command>) {
        self.write_outbox();
        if self.failure.is_none() {
            self.failure = command.run(self.conn).err();
        }
        self.commands.push(command);
    }

    /// Writes the records waiting in the outbox, unless something failed already.
    fn write_outbox(&mut self) {
        if self.failure.is_some() {
            return;
        }
        match self.outbox.write(self.conn) {
            Ok(n) => self.outbox_written |= n > 0,
            Err(e) => {
                self.outbox_written = true;
                self.failure = Some(e);
            }
        }
    }

    /// Adds the commands already queued, up to [`MAX_BATCH`], until one fails or the
    /// queue is empty.
    fn gather(&mut self, intake: Intake<'_>, checkpointer: &Checkpointer) {
        let mut yielded = false;
        while self.failure.is_none() && self.commands.len() < MAX_BATCH {
            match intake.rx.try_recv() {
                Ok(Message::Command(command)) => self.add(command),
                // Written before the commit.
                Ok(Message::Outbox) => {}
                Ok(Message::Checkpoint) => checkpointer.wake(),
                Ok(Message::Close(done)) => {
                    *intake.closing = Some(done);
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

    /// Commits, or rolls back after a failure (which then fails the outbox if its
    /// records were in this transaction); answers every command. Returns the emptied
    /// list, for the next transaction.
    fn end(self, path: &Path) -> Vec<Box<dyn Command>> {
        let end = match self.failure {
            None => self.conn.execute_batch("COMMIT").map_err(|e| {
                let msg = Failure::from(e).context("commit failed");
                tracing::error!(db = %path.display(), error = %msg, "commit failed");
                msg
            }),
            Some(e) => Err(
                e.context("rolled back with the rest of its transaction, in which a write failed")
            ),
        };
        if let Err(e) = &end {
            let _ = self.conn.execute_batch("ROLLBACK");
            if self.outbox_written {
                self.outbox.fail(e);
            }
        }
        let mut commands = self.commands;
        for command in commands.drain(..) {
            command.finish(end.as_ref().err());
        }
        commands
    }
}
