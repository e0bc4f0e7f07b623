//! The reads on PostgreSQL: claims, the inbox's pages, the report's facts, the
//! exports and the dry run's plan. What is tallied from rows is tallied by the same
//! code as SQLite's (`store/reads.rs`).

use tokio_postgres::Row;

use crate::job::{Field, RowFields};
use crate::store::body::{BODY_COLUMNS, payload_of, send_body_of};
use crate::store::failure::{DbCause, Failure};
use crate::store::reads::{
    AttemptTally, FailureReason, JobExport, JobTally, RunFacts, RunListEntry, SendPlan,
    saved_counts,
};
use crate::store::{FailureClass, Job, JobState, RetryFilter, StateCounts};

type Client = deadpool_postgres::Client;

/// A column's value that cannot be what the schema says: a bug, or a hand edit.
fn bad(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::new(DbCause::Bug, format!("{what}: {e}"))
}

/// The six body columns of `r` starting at column `at`.
pub(super) fn texts(r: &Row, at: usize) -> Result<[Option<&str>; 6], Failure> {
    let mut texts = [None; 6];
    for (i, text) in texts.iter_mut().enumerate() {
        *text = r.try_get(at + i)?;
    }
    Ok(texts)
}

/// See SQLite's `reads::send_plan`: the plain-id rule of `api::searchable` as a
/// regular expression here.
pub(super) async fn send_plan(c: &Client, precheck_always: bool) -> Result<SendPlan, Failure> {
    let r = c
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE due AND plain), \
             count(*) FILTER (WHERE due AND NOT plain) \
             FROM (SELECT (needs_check = 1 OR ($1 AND creates = 0)) \
                          AND order_id IS NOT NULL AND payment_intent_id IS NULL AS due, \
                          coalesce(order_id !~ '[^A-Za-z0-9_.-]' \
                          AND length(order_id) BETWEEN 1 AND 256, false) AS plain \
                   FROM jobs WHERE state = 'pending') AS pending",
            &[&precheck_always],
        )
        .await?;
    Ok(SendPlan {
        jobs: r.try_get(0)?,
        listed: r.try_get(1)?,
        single: r.try_get(2)?,
    })
}

pub(super) async fn groups_without_share_id(c: &Client) -> Result<i64, Failure> {
    Ok(c.query_one(
        "SELECT count(*) FROM groups WHERE share_id IS NULL OR share_id = ''",
        &[],
    )
    .await?
    .try_get(0)?)
}

/// Up to `limit` inbox rows after `after` and up to `last`, in id order. A plain
/// read: it waits for no producer.
pub(super) async fn inbox_page(
    c: &Client,
    after: i64,
    last: i64,
    limit: usize,
) -> Result<Vec<(i64, RowFields)>, Failure> {
    let fields: Vec<Field> = Field::ALL.into_iter().filter(|f| f.in_inbox()).collect();
    let columns: Vec<&str> = fields.iter().map(|f| f.column()).collect();
    let sql = format!(
        "SELECT id, {} FROM inbox WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3",
        columns.join(", ")
    );
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let stmt = c.prepare_cached(&sql).await?;
    let rows = c.query(&stmt, &[&after, &last, &limit]).await?;
    rows.iter()
        .map(|r| {
            let mut row = RowFields::default();
            for (i, field) in fields.iter().enumerate() {
                *row.slot(*field) = r.try_get(i + 1)?;
            }
            Ok((r.try_get(0)?, row))
        })
        .collect()
}

/// See SQLite's `queue::requeue_failed`.
pub(super) async fn requeue_failed(
    c: &Client,
    run_id: i64,
    f: &RetryFilter,
) -> Result<usize, Failure> {
    let statuses: Vec<i64> = f.statuses.iter().map(|s| i64::from(*s)).collect();
    let classes: Vec<String> = f.classes.iter().map(FailureClass::to_string).collect();
    let n = c
        .execute(
            "UPDATE jobs SET state = 'pending', next_attempt_at = NULL, \
             needs_check = CASE WHEN needs_check = 1 OR creates > 0 THEN 1 ELSE 0 END, \
             last_run_id = $1, updated_ms = $2 \
             WHERE (state = 'failed' \
                    AND (cardinality($3::bigint[]) = 0 OR last_status = ANY($3)) \
                    AND (NOT $4 OR (last_status IS NULL AND error_class = $5)) \
                    AND (cardinality($6::text[]) = 0 OR error_class = ANY($6))) \
                OR ($7 AND state = 'unknown')",
            &[
                &run_id,
                &crate::store::clock::now_ms(),
                &statuses,
                &f.transport_only,
                &FailureClass::RetriesExhausted.to_string(),
                &classes,
                &f.include_unknown,
            ],
        )
        .await?;
    Ok(n as usize)
}

/// The columns [`job_export`] reads.
const JOB_COLUMNS: &str = "SELECT j.id, j.key, j.row_key, j.state, j.obtained, j.customer_id, \
     j.order_id, j.payment_intent_id, j.group_id, g.share_id, g.status, g.expires_at, \
     g.created_at, j.error, s.name, j.line, j.raw, j.attempts, j.creates, j.customer_id, \
     j.order_id, j.payment_intent_id, j.expires_at, j.mid_expire_at, j.metadata \
     FROM jobs j JOIN sources s ON s.id = j.source_id LEFT JOIN groups g ON g.job_id = j.id";

fn job_export(r: &Row) -> Result<JobExport, Failure> {
    Ok(JobExport {
        id: r.try_get(0)?,
        key: r.try_get(1)?,
        row_key: r.try_get(2)?,
        state: r.try_get(3)?,
        obtained: r.try_get(4)?,
        customer_id: r.try_get(5)?,
        order_id: r.try_get(6)?,
        payment_intent_id: r.try_get(7)?,
        group_id: r.try_get(8)?,
        share_id: r.try_get(9)?,
        group_status: r.try_get(10)?,
        expires_at: r.try_get(11)?,
        created_at: r.try_get(12)?,
        error: r.try_get(13)?,
        source: r.try_get(14)?,
        line: r.try_get(15)?,
        raw: r.try_get(16)?,
        attempts: r.try_get(17)?,
        creates: r.try_get(18)?,
        payload: payload_of(texts(r, 19)?).map_err(|e| bad("a stored request body", e))?,
    })
}

/// Jobs in `states` (all, for `None`) with an id above `after_id`, in id order.
pub(super) async fn jobs_page(
    c: &Client,
    states: Option<&[JobState]>,
    after_id: i64,
    limit: usize,
) -> Result<Vec<JobExport>, Failure> {
    let states: Vec<&str> = match states {
        Some(s) => s.iter().map(|s| s.as_str()).collect(),
        None => JobState::ALL.iter().map(|s| s.as_str()).collect(),
    };
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = c
        .query(
            &format!("{JOB_COLUMNS} WHERE j.state = ANY($1) AND j.id > $2 ORDER BY j.id LIMIT $3"),
            &[&states, &after_id, &limit],
        )
        .await?;
    rows.iter().map(job_export).collect()
}

/// See SQLite's `reads::conflicts_page`.
pub(super) async fn conflicts_page(
    c: &Client,
    after_id: i64,
    limit: usize,
) -> Result<Vec<JobExport>, Failure> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = c
        .query(
            "SELECT i.id, i.key, i.source, i.line, i.reason, coalesce(i.raw, '') \
             FROM import_issues i WHERE i.kind = 'conflict' AND i.id > $1 AND NOT EXISTS \
             (SELECT 1 FROM import_issues l WHERE l.kind = 'conflict' \
              AND l.key IS NOT DISTINCT FROM i.key AND l.raw IS NOT DISTINCT FROM i.raw \
              AND l.id > i.id) ORDER BY i.id LIMIT $2",
            &[&after_id, &limit],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(JobExport::conflict(
                r.try_get(0)?,
                r.try_get(1)?,
                r.try_get(2)?,
                r.try_get(3)?,
                r.try_get(4)?,
                r.try_get(5)?,
            ))
        })
        .collect()
}

/// Claims up to `limit` pending jobs above `after_id` for `run_id` with one
/// conditional `UPDATE … RETURNING` (see SQLite's `jobs::claim_pending`). Rows another
/// session holds are skipped, not waited for.
pub(super) async fn claim_pending(
    c: &Client,
    run_id: i64,
    after_id: i64,
    limit: usize,
) -> Result<Vec<Job>, Failure> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let stmt = c
        .prepare_cached(&format!(
            "UPDATE jobs j SET claim_run = $1 FROM sources s WHERE s.id = j.source_id \
             AND j.id IN (SELECT id FROM jobs WHERE state = 'pending' AND id > $2 \
             AND (claim_run IS NULL OR claim_run <= $1) ORDER BY id LIMIT $3 \
             FOR UPDATE SKIP LOCKED) \
             RETURNING j.id, j.key, j.attempts, j.creates, j.needs_check, j.next_attempt_at, \
             j.line, {}, s.name",
            BODY_COLUMNS
                .split(", ")
                .map(|c| format!("j.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .await?;
    let rows = c.query(&stmt, &[&run_id, &after_id, &limit]).await?;
    let mut names: std::collections::HashMap<String, std::sync::Arc<str>> = Default::default();
    let mut jobs = rows
        .iter()
        .map(|r| {
            let body = send_body_of(texts(r, 7)?)
                .map_err(|e| bad("a stored request body", e))?
                .ok_or_else(|| bad("a pending job", "it has no request body"))?;
            let name: String = r.try_get(13)?;
            let source = names
                .entry(name)
                .or_insert_with_key(|n| std::sync::Arc::from(n.as_str()))
                .clone();
            let count = |i: usize| -> Result<u32, Failure> {
                Ok(u32::try_from(r.try_get::<_, i64>(i)?).unwrap_or(u32::MAX))
            };
            Ok(Job {
                id: r.try_get(0)?,
                key: r.try_get(1)?,
                body,
                attempts: count(2)?,
                creates: count(3)?,
                needs_check: r.try_get::<_, i64>(4)? != 0,
                next_attempt_at: r.try_get(5)?,
                line: r.try_get(6)?,
                source,
            })
        })
        .collect::<Result<Vec<Job>, Failure>>()?;
    jobs.sort_unstable_by_key(|j| j.id);
    Ok(jobs)
}

/// See SQLite's `reads::run_facts`: the same facts, tallied by the same code.
pub(super) async fn run_facts(c: &Client, run_id: i64) -> Result<Option<RunFacts>, Failure> {
    let Some(r) = c
        .query_opt(
            "SELECT id, command, started_at, finished_at, exit_code, stopped, imported, \
             coalesce(paused_ms, 0) FROM runs WHERE id = $1",
            &[&run_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let imported: Option<String> = r.try_get(6)?;
    let mut facts = RunFacts {
        run_id: r.try_get(0)?,
        command: r.try_get(1)?,
        started_at: r.try_get(2)?,
        finished_at: r.try_get(3)?,
        exit_code: r.try_get(4)?,
        stopped: r.try_get(5)?,
        imported: imported.and_then(|s| serde_json::from_str(&s).ok()),
        paused_ms: r.try_get(7)?,
        ..RunFacts::default()
    };
    tally(c, run_id, &mut facts).await?;
    let reason = |r: &Row| -> Result<FailureReason, Failure> {
        Ok(FailureReason {
            state: r.try_get(0)?,
            key: r.try_get(1)?,
            source: r.try_get(2)?,
            line: r.try_get(3)?,
            reason: r.try_get(4)?,
        })
    };
    facts.failures = c
        .query(
            "SELECT j.state, coalesce(j.key, j.row_key), s.name, j.line, coalesce(j.error, '') \
             FROM jobs j JOIN sources s ON s.id = j.source_id WHERE j.last_run_id = $1 \
             AND j.state IN ('failed', 'unknown', 'invalid') ORDER BY j.id",
            &[&run_id],
        )
        .await?
        .iter()
        .map(reason)
        .collect::<Result<_, _>>()?;
    facts.conflicts = c
        .query(
            "SELECT 'conflict', key, source, line, reason FROM import_issues \
             WHERE run_id = $1 AND kind = 'conflict' ORDER BY id",
            &[&run_id],
        )
        .await?
        .iter()
        .map(reason)
        .collect::<Result<_, _>>()?;
    Ok(Some(facts))
}

/// The run's jobs and attempts, counted by the tallies SQLite's reads use.
async fn tally(c: &Client, run_id: i64, facts: &mut RunFacts) -> Result<(), Failure> {
    let mut jobs = JobTally::default();
    for r in c
        .query(
            "SELECT state, obtained, count(*) FROM jobs WHERE last_run_id = $1 GROUP BY 1, 2",
            &[&run_id],
        )
        .await?
    {
        jobs.add(r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
    }
    (facts.states, facts.obtained) = jobs.finish();
    facts.no_share_id = c
        .query_one(
            "SELECT count(*) FROM groups g JOIN jobs j ON j.id = g.job_id \
             WHERE (g.share_id IS NULL OR g.share_id = '') AND j.last_run_id = $1",
            &[&run_id],
        )
        .await?
        .try_get(0)?;
    let mut attempts = AttemptTally::default();
    for r in c
        .query(
            "SELECT kind, class, latency_ms, started_ms, batch FROM attempts WHERE run_id = $1",
            &[&run_id],
        )
        .await?
    {
        attempts.add(
            r.try_get(0)?,
            r.try_get(1)?,
            r.try_get(2)?,
            r.try_get(3)?,
            r.try_get(4)?,
        );
    }
    attempts.finish(facts);
    Ok(())
}

/// See SQLite's `reads::list_runs`: a finished run's counts are its saved report's.
pub(super) async fn list_runs(c: &Client, limit: usize) -> Result<Vec<RunListEntry>, Failure> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = c
        .query(
            "SELECT r.id, r.command, r.started_at, r.finished_at, r.exit_code, r.report, \
             (SELECT count(*) FROM jobs j WHERE j.last_run_id = r.id AND r.report IS NULL), \
             (SELECT count(*) FROM jobs j WHERE j.last_run_id = r.id AND r.report IS NULL \
              AND j.state = 'succeeded') \
             FROM runs r ORDER BY r.id DESC LIMIT $1",
            &[&limit],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let report: Option<String> = r.try_get(5)?;
            let counted = (r.try_get(6)?, r.try_get(7)?);
            let (jobs, succeeded) = report.as_deref().and_then(saved_counts).unwrap_or(counted);
            Ok(RunListEntry {
                run_id: r.try_get(0)?,
                command: r.try_get(1)?,
                started_at: r.try_get(2)?,
                finished_at: r.try_get(3)?,
                exit_code: r.try_get(4)?,
                jobs,
                succeeded,
            })
        })
        .collect()
}

pub(super) async fn state_counts(c: &Client) -> Result<StateCounts, Failure> {
    let mut counts = StateCounts::default();
    for r in c
        .query("SELECT state, count(*) FROM jobs GROUP BY state", &[])
        .await?
    {
        if let Some(state) = JobState::parse(r.try_get(0)?) {
            counts.add(state, r.try_get(1)?);
        }
    }
    Ok(counts)
}
