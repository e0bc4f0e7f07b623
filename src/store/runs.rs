//! The `runs` table: a run's start (with the lock row and the jobs a crash left in
//! flight), its end, its import totals and its saved report.

use rusqlite::{Connection, named_params};

use super::clock::{now_ms, now_text};
use super::types::ImportCounts;

/// Records a run; for an `exclusive` run (its caller holds the run lock) also the
/// lock row, which only names the holder (for older versions and for people). Returns
/// the run id and its start time.
pub(super) fn begin_run(
    c: &Connection,
    command: &str,
    options: &str,
    exclusive: bool,
) -> rusqlite::Result<(i64, String)> {
    let started = now_text();
    let pid = i64::from(std::process::id());
    let run_id: i64 = c.query_row(
        "INSERT INTO runs (command, started_at, pid, options) \
         VALUES (:command, :started_at, :pid, :options) RETURNING id",
        named_params! {
            ":command": command,
            ":started_at": started,
            ":pid": pid,
            ":options": options,
        },
        |r| r.get(0),
    )?;
    if !exclusive {
        // Import-only sessions (enqueue) never send, so they do not take the lock.
        return Ok((run_id, started));
    }
    c.execute("DELETE FROM lock", [])?;
    c.execute(
        "INSERT INTO lock (id, pid, run_id, started_at) VALUES (1, :pid, :run_id, :started_at)",
        named_params! {":pid": pid, ":run_id": run_id, ":started_at": started},
    )?;
    c.execute(ENDED_EARLIER, [run_id])?;
    warn_interrupted(c.execute(INTERRUPTED, [now_ms()])?);
    Ok((run_id, started))
}

/// Earlier sending runs that never finished ended with their process (the run lock
/// is ours, so none of them is still going): their reports say so. `?1`: this run.
/// Both backends run it when a sending run starts.
pub(super) const ENDED_EARLIER: &str = "UPDATE runs SET stopped = 'the process ended \
     before the run finished (killed, or the machine stopped); the next run checked its \
     jobs in flight' WHERE finished_at IS NULL AND stopped IS NULL AND id < ?1 \
     AND (command = 'run' OR command = 'retry-failed')";

/// A job still in flight was interrupted mid-request: its outcome is unknown, so it
/// must be checked (no earlier than the settle time set when it was sent). `?1`: now,
/// unix ms. Both backends run it when a sending run starts.
pub(super) const INTERRUPTED: &str = "UPDATE jobs SET state = 'pending', needs_check = 1, \
     error = 'interrupted while in flight', updated_ms = ?1 WHERE state = 'in_flight'";

/// Logs the jobs [`INTERRUPTED`] put back, if any.
pub(super) fn warn_interrupted(jobs: usize) {
    if jobs > 0 {
        tracing::warn!(
            jobs,
            "found jobs interrupted mid-request by an earlier run; they are checked before \
             any re-send"
        );
    }
}

/// Records the end of a run; returns its finish time as stored (the report printed
/// now and `report --run` later show the same one).
pub(super) fn finish_run(
    c: &Connection,
    run_id: i64,
    exit_code: u8,
    stopped: Option<&str>,
    paused_ms: i64,
) -> rusqlite::Result<String> {
    let finished_at = now_text();
    c.execute(
        "UPDATE runs SET finished_at = :finished_at, exit_code = :exit_code, \
         stopped = :stopped, paused_ms = :paused_ms WHERE id = :run_id",
        named_params! {
            ":finished_at": finished_at,
            ":exit_code": exit_code,
            ":stopped": stopped,
            ":paused_ms": paused_ms,
            ":run_id": run_id,
        },
    )?;
    c.execute(
        "DELETE FROM lock WHERE run_id = :run_id",
        named_params! {":run_id": run_id},
    )?;
    Ok(finished_at)
}

/// Adds a batch's counts to the run's import totals.
pub(super) fn add_import_counts(
    c: &Connection,
    run_id: i64,
    add: ImportCounts,
) -> rusqlite::Result<()> {
    let current: Option<String> = c.query_row(
        "SELECT imported FROM runs WHERE id = :run_id",
        named_params! {":run_id": run_id},
        |r| r.get(0),
    )?;
    let text = add.added_to(current.as_deref());
    c.execute(
        "UPDATE runs SET imported = :imported WHERE id = :run_id",
        named_params! {":imported": text, ":run_id": run_id},
    )?;
    Ok(())
}

/// Keeps the report of a finished run as it was printed.
pub(super) fn save_report(c: &Connection, run_id: i64, json: &str) -> rusqlite::Result<()> {
    c.execute(
        "UPDATE runs SET report = :report WHERE id = :run_id",
        named_params! {":report": json, ":run_id": run_id},
    )
    .map(drop)
}
