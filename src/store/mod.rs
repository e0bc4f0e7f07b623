//! The record: the only place that holds SQL. [`Store`] is a handle to one of two
//! backends behind one trait, [`Backend`] (`backend.rs`): SQLite, a file, the
//! embedded default; or PostgreSQL (`pg/`), for `--db postgres://…` ([`Db`],
//! `target.rs`). The rest of this page is the SQLite backend; `pg/mod.rs` describes
//! the other.
//!
//! One thread, the writer, owns the SQLite connection. Everything else talks to it through a
//! [`Store`] handle over a bounded channel; the writer runs whatever has queued up
//! in one transaction (group commit) and answers each caller only after that
//! transaction is durable. So "`in_flight` is written before a request leaves"
//! holds while thousands of rows per second go by. If one command fails, its whole
//! transaction is rolled back and every command in it is told so. A job's last
//! record in a run need not be waited for: it goes to an outbox, written with the
//! next transaction (a crash before then leaves the job `in_flight`, to be checked).
//!
//! A second thread, with its own connection, copies the WAL into the database file
//! (checkpoints) so the writer never stops for it; [`Backend::close`] ends a session
//! with the WAL copied and emptied.
//!
//! # Rooms
//!
//! | file | owns |
//! |---|---|
//! | `backend.rs` | the [`Backend`] trait (every call the program makes) and the [`Store`] handle |
//! | `target.rs` | what `--db` names: a file or a PostgreSQL URL (its password never shown) |
//! | `handle.rs` | the SQLite backend: opening a file, and its [`Backend`] calls |
//! | `pg/` | the PostgreSQL backend |
//! | `writer.rs` | the writer thread: commands, group commit, the batch loop |
//! | `outbox.rs` | last records written without waiting, and their failure latch |
//! | `checkpoint.rs` | the checkpointer thread |
//! | `schema.rs` | the schema, its migrations, and the checks before opening |
//! | `runs.rs` | the `runs` table (and the lock row) |
//! | `import.rs` | rows into jobs: chunks, duplicates, conflicts, fixes, invalid rows |
//! | `queue.rs` | the inbox, and jobs put back to pending |
//! | `jobs.rs` | claims, attempts and state changes |
//! | `body.rs` | a job's request body in its columns |
//! | `reads.rs` | what the report, the exports and the tests read |
//! | `clock.rs` | timestamps as stored |
//! | `lock.rs` | the run lock file |
//! | `failure.rs` | database failures sorted by remedy |
//! | `types.rs` | the values that cross the store boundary |

mod backend;
mod body;
mod checkpoint;
mod clock;
mod failure;
mod handle;
mod import;
mod jobs;
mod lock;
mod outbox;
mod pg;
mod queue;
mod reads;
mod runs;
mod schema;
mod target;
mod types;
mod writer;

pub use backend::{Backend, Store};
pub use failure::DbCause;
#[cfg(test)]
pub(crate) use failure::Failure;
pub use handle::DEFAULT_BUSY_TIMEOUT;
pub use lock::lock_path;
pub use queue::RetryFilter;
pub use reads::SendPlan;
pub use reads::{FailureReason, JobExport, RunFacts, RunListEntry};
pub use schema::Access;
pub use target::{Db, PgUrl};
pub use types::{
    Attempt, FailureClass, GroupRec, ImportCounts, Job, JobState, Obtained, RequestKind,
    StateCounts, Transition,
};

#[cfg(test)]
mod tests;
