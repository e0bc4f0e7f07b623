//! The outbox: a job's last record in a run, written with the next transaction
//! without its caller waiting, and the latch that fails every later call once such
//! a record could not be written.

use rusqlite::Connection;

use super::failure::Failure;
use super::jobs;
use super::types::{Attempt, Transition};

/// A job's last record in a run, waiting for the next transaction.
#[derive(Debug)]
pub(super) struct Record {
    pub(super) run_id: i64,
    pub(super) job_id: i64,
    pub(super) attempt: Option<Attempt>,
    pub(super) transition: Transition,
}

/// Last records whose callers do not wait (see `Store::record_last`). The writer
/// writes them before each command of its next transaction and before its commit, so a
/// call sent after a record returned always sees that record.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    records: std::sync::Mutex<Vec<Record>>,
    /// Why a transaction holding outbox records failed. Their jobs stay `in_flight`
    /// (checked by the next run, as after a crash); every later call fails with this.
    failed: std::sync::Mutex<Option<Failure>>,
}

impl Outbox {
    /// Adds a record; true if the outbox was empty.
    pub(super) fn push(&self, record: Record) -> bool {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records.push(record);
        records.len() == 1
    }

    /// Writes every waiting record in the current transaction; returns how many.
    pub(super) fn write(&self, conn: &Connection) -> Result<usize, Failure> {
        let records = std::mem::take(&mut *self.records.lock().unwrap_or_else(|e| e.into_inner()));
        for r in &records {
            // A record refused because another run claimed the job is logged by `record`.
            jobs::record(conn, r.run_id, r.job_id, r.attempt.as_ref(), &r.transition)?;
        }
        Ok(records.len())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    pub(super) fn fail(&self, why: &Failure) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.get_or_insert_with(|| why.context("job outcomes were not saved"));
    }

    pub(super) fn failure(&self) -> Option<Failure> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
