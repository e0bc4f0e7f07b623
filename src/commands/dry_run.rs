//! `--dry-run` of `run` and `retry-failed`: the same import, inbox move and requeue
//! as the command, on a copy of the database in a temporary directory (the database
//! itself is only read, no lock is taken, nothing is sent); then what sending
//! would take, as text and (with `--report-json`) as JSON.

use std::path::PathBuf;
use std::time::Duration;

use super::send::{check_inputs, import_csv};
use super::write_atomic;
use crate::config::SendConfig;
use crate::engine;
use crate::error::{Error, Exit, Result};
use crate::store::{ImportCounts, JobState, RetryFilter, StateCounts, Store};
use crate::text::count;

/// Runs the command's preparation on a copy of the database and says what
/// sending would take.
pub(super) async fn dry_run(
    cfg: &SendConfig,
    command: &str,
    csv: &[PathBuf],
    retry: Option<RetryFilter>,
) -> Result<Exit> {
    check_inputs(csv, &cfg.csv)?;
    let plan = plan_on_copy(cfg, command, csv, retry.as_ref()).await?;
    super::out::report(&plan.to_text(cfg))?;
    if let Some(path) = &cfg.report_json {
        write_atomic(
            path,
            serde_json::to_string_pretty(&plan.to_json(cfg))
                .unwrap_or_default()
                .as_bytes(),
        )?;
    }
    Ok(if plan.imported.invalid + plan.imported.conflicts > 0 {
        Exit::RowsFailed
    } else {
        Exit::Success
    })
}

/// What the copy of the database holds once the command prepared it.
struct Plan<'a> {
    command: &'a str,
    imported: ImportCounts,
    /// `retry-failed`: how many failed jobs its filters put back.
    requeued: Option<u64>,
    /// Jobs that would be sent, how many of them are checked first, and the
    /// requests those checks take (lists of 25, and single checks).
    jobs: i64,
    checked: i64,
    check_requests: i64,
    /// Jobs by state in the copy.
    states: StateCounts,
}

/// Requeues, imports and moves the inbox as the command would, on a copy of the
/// database that is dropped afterwards.
async fn plan_on_copy<'a>(
    cfg: &SendConfig,
    command: &'a str,
    csv: &[PathBuf],
    retry: Option<&RetryFilter>,
) -> Result<Plan<'a>> {
    let dir = tempfile::tempdir()
        .map_err(|e| Error::internal_from("cannot make a temporary directory", e))?;
    let copy = dir.path().join("dry-run.db");
    Store::snapshot(&cfg.db, &copy, cfg.ca_cert.as_deref()).await?;
    let store = Store::open(&copy)?;
    let run_id = store.begin_run(command, "{}".into(), true).await?;
    let requeued = match retry {
        Some(filter) => Some(store.requeue_failed(run_id, filter.clone()).await? as u64),
        None if cfg.engine.resend_unknown => {
            store.requeue_unknown(run_id).await?;
            None
        }
        None => None,
    };
    let mut imported = ImportCounts::default();
    for path in csv {
        imported += import_csv(&store, run_id, path, &cfg.csv).await?;
    }
    imported += super::send::move_inbox_rows(&store, run_id).await?;
    let always = cfg.engine.precheck == engine::Precheck::Always;
    let plan = store.send_plan(always).await?;
    let (jobs, listed, single) = (plan.jobs, plan.listed, plan.single);
    // Plain ids are checked in lists of 25, the rest one request each.
    let take = crate::api::LIST_TAKE as i64;
    let check_requests = (listed + take - 1) / take + single;
    let states = store.state_counts().await?;
    store.close().await;
    Ok(Plan {
        command,
        imported,
        requeued,
        jobs,
        checked: listed + single,
        check_requests,
        states,
    })
}

impl Plan<'_> {
    fn in_copy(&self, state: JobState) -> i64 {
        self.states.get(state)
    }

    fn requests(&self) -> i64 {
        self.jobs + self.check_requests
    }

    /// Seconds sending would take at the configured rate; `None` without a rate.
    fn estimated_secs(&self, cfg: &SendConfig) -> Option<f64> {
        cfg.engine.rate.map(|r| self.requests() as f64 / r)
    }

    fn to_json(&self, cfg: &SendConfig) -> serde_json::Value {
        serde_json::json!({
            "dry_run": true,
            "command": self.command,
            "imported": self.imported,
            "requeued": self.requeued,
            "jobs_to_send": self.jobs,
            "checked_first": self.checked,
            "check_requests": self.check_requests,
            "already_succeeded": self.in_copy(JobState::Succeeded),
            "invalid": self.in_copy(JobState::Invalid),
            "failed": self.in_copy(JobState::Failed),
            "unknown": self.in_copy(JobState::Unknown),
            "conflicts": self.imported.conflicts,
            "requests": self.requests(),
            "rate_per_sec": cfg.engine.rate,
            "concurrency": cfg.engine.concurrency,
            "estimated_secs": self.estimated_secs(cfg),
        })
    }

    fn to_text(&self, cfg: &SendConfig) -> String {
        let (command, imported) = (self.command, &self.imported);
        let (jobs, checks, requests) = (self.jobs, self.check_requests, self.requests());
        let mut text = format!(
            "kohort-batch {command} --dry-run: nothing was changed, nothing was sent\n\
             \x20 Imported   {}: {} queued, {} fixed, {} invalid, {}, {}\n",
            count(imported.rows, "row", "rows"),
            imported.queued,
            imported.fixed,
            imported.invalid,
            count(imported.duplicates, "duplicate", "duplicates"),
            count(imported.conflicts, "conflict", "conflicts"),
        );
        if let Some(n) = self.requeued {
            text.push_str(&format!(
                "  Retry      {} would go back to pending\n",
                count(n, "failed job", "failed jobs")
            ));
        }
        text.push_str(&format!(
            "  Would send {} ({} checked first for an existing group); {} already succeeded\n\
             \x20 Requests   about {requests} ({jobs} creates, {checks} for checks, 25 orders to a \
             list; a check that finds a group fetches it instead of creating one)\n",
            count(jobs.max(0) as u64, "job", "jobs"),
            self.checked,
            self.in_copy(JobState::Succeeded),
        ));
        text.push_str(&match self.estimated_secs(cfg) {
            Some(secs) => format!(
                "  Time       about {} at --rate {}/s (--concurrency {})\n",
                crate::text::human(Duration::from_secs(secs.ceil() as u64)),
                cfg.engine.rate.unwrap_or(0.0),
                cfg.engine.concurrency
            ),
            None => "  Time       no --rate: as fast as the API answers\n".to_owned(),
        });
        text
    }
}
