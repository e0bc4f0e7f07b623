//! The reads: what the report, the exports and the tests need to know.

use rusqlite::{Connection, OptionalExtension, named_params};
use serde::Serialize;

use super::body::read_body;
use super::types::{ImportCounts, JobState, Obtained, StateCounts};
use crate::job::Payload;

/// A failed, unknown or invalid row of a run (for the report's reasons).
#[derive(Debug, Clone, Serialize)]
pub struct FailureReason {
    pub state: String,
    pub key: Option<String>,
    pub source: String,
    pub line: Option<i64>,
    pub reason: String,
}

/// The raw facts of one run, from which the report is built.
#[derive(Debug, Clone, Default)]
pub struct RunFacts {
    pub run_id: i64,
    pub command: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub exit_code: Option<i64>,
    pub stopped: Option<String>,
    pub imported: Option<ImportCounts>,
    /// Final states of the jobs this run touched.
    pub states: StateCounts,
    /// How the succeeded jobs got their groups.
    pub obtained: Vec<(String, i64)>,
    /// Attempts by request kind.
    pub attempts_by_kind: Vec<(String, i64)>,
    /// Attempts by outcome class.
    pub attempts_by_class: Vec<(String, i64)>,
    /// Latency of every attempt, in milliseconds.
    pub latencies_ms: Vec<f64>,
    /// First request start and last request end, unix ms.
    pub send_window_ms: Option<(i64, i64)>,
    /// Time within the send window that requests were held by `Retry-After` pauses.
    pub paused_ms: i64,
    /// Groups of this run's jobs recorded without a share id.
    pub no_share_id: i64,
    pub failures: Vec<FailureReason>,
    /// Rows not imported because their key was taken by different data.
    pub conflicts: Vec<FailureReason>,
}

/// What sending the pending jobs would take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendPlan {
    /// Jobs that would be sent.
    pub jobs: i64,
    /// Of those, checked first in lists of orders (their ids are plain).
    pub listed: i64,
    /// Of those, checked first on their own.
    pub single: i64,
}

/// A check is due as the protocol decides (`engine/protocol.rs`); a plain order id
/// (the rule of `api::searchable`, in SQL) is checked in a list, any other alone.
pub(super) fn send_plan(c: &Connection, precheck_always: bool) -> rusqlite::Result<SendPlan> {
    c.query_row(
        "SELECT count(*), coalesce(sum(due AND plain), 0), coalesce(sum(due AND NOT plain), 0) \
         FROM (SELECT (needs_check = 1 OR (:precheck_always AND creates = 0)) \
                      AND order_id IS NOT NULL AND payment_intent_id IS NULL AS due, \
                      (order_id NOT GLOB '*[^A-Za-z0-9_.-]*' AND length(order_id) \
                       BETWEEN 1 AND 256) AS plain \
               FROM jobs WHERE state = 'pending')",
        named_params! {":precheck_always": precheck_always},
        |r| {
            Ok(SendPlan {
                jobs: r.get(0)?,
                listed: r.get(1)?,
                single: r.get(2)?,
            })
        },
    )
}

/// The SQL rule of [`send_plan`] for a plain id (tests: it must agree with
/// `api::searchable`).
#[cfg(test)]
pub(super) fn plain_in_sql(c: &Connection, id: &str) -> bool {
    c.query_row(
        "SELECT (?1 NOT GLOB '*[^A-Za-z0-9_.-]*' AND length(?1) BETWEEN 1 AND 256)",
        [id],
        |r| r.get(0),
    )
    .unwrap()
}

/// The report kept when the run finished (`None` for a run that did not finish, or
/// that an older version ran).
pub(super) fn saved_report(c: &Connection, run_id: i64) -> rusqlite::Result<Option<String>> {
    c.query_row(
        "SELECT report FROM runs WHERE id = :run_id",
        named_params! {":run_id": run_id},
        |r| r.get::<_, Option<String>>(0),
    )
    .optional()
    .map(Option::flatten)
}

pub(super) fn run_facts(c: &Connection, run_id: i64) -> rusqlite::Result<Option<RunFacts>> {
    let facts = c.query_row(
        "SELECT id, command, started_at, finished_at, exit_code, stopped, imported, \
         coalesce(paused_ms, 0) FROM runs WHERE id = :run_id",
        named_params! {":run_id": run_id},
        |r| {
            let imported: Option<String> = r.get(6)?;
            Ok(RunFacts {
                run_id: r.get(0)?,
                command: r.get(1)?,
                started_at: r.get(2)?,
                finished_at: r.get(3)?,
                exit_code: r.get(4)?,
                stopped: r.get(5)?,
                imported: imported.and_then(|s| serde_json::from_str(&s).ok()),
                paused_ms: r.get(7)?,
                ..RunFacts::default()
            })
        },
    );
    let mut facts = match facts.optional()? {
        Some(f) => f,
        None => return Ok(None),
    };
    (facts.states, facts.obtained) = job_counts(c, run_id)?;
    facts.no_share_id = c.query_row(
        "SELECT count(*) FROM groups WHERE (share_id IS NULL OR share_id = '') \
         AND job_id IN (SELECT id FROM jobs WHERE last_run_id = :run_id)",
        named_params! {":run_id": run_id},
        |r| r.get(0),
    )?;
    attempt_facts(c, run_id, &mut facts)?;
    let unfinished = [JobState::Failed, JobState::Unknown, JobState::Invalid]
        .into_iter()
        .any(|s| facts.states.get(s) > 0);
    facts.failures = if !unfinished {
        Vec::new()
    } else {
        failure_rows(
            c,
            "SELECT j.state, coalesce(j.key, j.row_key), s.name, j.line, coalesce(j.error, '') \
         FROM jobs j JOIN sources s ON s.id = j.source_id \
         WHERE j.last_run_id = :run_id AND j.state IN ('failed', 'unknown', 'invalid') ORDER BY j.id",
            run_id,
        )?
    };
    facts.conflicts = failure_rows(
        c,
        "SELECT 'conflict', key, source, line, reason FROM import_issues \
         WHERE run_id = :run_id AND kind = 'conflict' ORDER BY id",
        run_id,
    )?;
    Ok(Some(facts))
}

/// The run's jobs by state, and its succeeded jobs by how they got their group, in
/// one pass over `jobs` and without sorting it (a million-row import is reported in
/// a fraction of the time a `GROUP BY` takes). Only counts above zero are listed.
fn job_counts(c: &Connection, run_id: i64) -> rusqlite::Result<(StateCounts, Vec<(String, i64)>)> {
    let mut tally = JobTally::default();
    // One pass, tallied here: a GROUP BY sorts the whole table, and a count(*) FILTER
    // per name evaluates nine aggregates on every row.
    let mut stmt = c.prepare("SELECT state, obtained FROM jobs WHERE last_run_id = :run_id")?;
    let mut rows = stmt.query(named_params! {":run_id": run_id})?;
    while let Some(r) = rows.next()? {
        tally.add(r.get_ref(0)?.as_str()?, r.get_ref(1)?.as_str_or_null()?, 1);
    }
    Ok(tally.finish())
}

/// Jobs by state, and succeeded jobs by how they got their group (both backends
/// count a run's jobs with this).
#[derive(Debug, Default)]
pub(super) struct JobTally {
    by_state: StateCounts,
    by_obtained: [i64; Obtained::ALL.len()],
}

impl JobTally {
    /// Counts `n` jobs in `state`, obtained as `obtained`.
    pub(super) fn add(&mut self, state: &str, obtained: Option<&str>, n: i64) {
        let Some(state) = JobState::parse(state) else {
            return;
        };
        self.by_state.add(state, n);
        if state == JobState::Succeeded
            && let Some(o) = obtained
            && let Some(j) = Obtained::ALL.iter().position(|name| name.as_str() == o)
        {
            self.by_obtained[j] += n;
        }
    }

    /// The counts by state, and by how groups were obtained (only those above zero).
    pub(super) fn finish(self) -> (StateCounts, Vec<(String, i64)>) {
        let obtained = Obtained::ALL
            .iter()
            .zip(self.by_obtained)
            .filter(|(_, n)| *n > 0)
            .map(|(o, n)| (o.as_str().to_owned(), n))
            .collect();
        (self.by_state, obtained)
    }
}

/// The run's attempts by kind and by class, their latencies and the send window, in
/// one pass over them (four queries, two of them sorting, cost four times as much on
/// a run of a million rows).
fn attempt_facts(c: &Connection, run_id: i64, facts: &mut RunFacts) -> rusqlite::Result<()> {
    let mut tally = AttemptTally::default();
    let mut stmt = c.prepare(
        "SELECT kind, class, latency_ms, started_ms, batch FROM attempts WHERE run_id = :run_id",
    )?;
    let mut rows = stmt.query(named_params! {":run_id": run_id})?;
    while let Some(r) = rows.next()? {
        tally.add(
            r.get_ref(0)?.as_str()?,
            r.get_ref(1)?.as_str()?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
        );
    }
    tally.finish(facts);
    Ok(())
}

/// A run's attempts by kind and class, their latencies and send window (both
/// backends tally a run's attempts with this).
#[derive(Debug, Default)]
pub(super) struct AttemptTally {
    // A handful of distinct names: a few comparisons find one, cheaper than hashing.
    by_kind: std::collections::BTreeMap<String, i64>,
    by_class: std::collections::BTreeMap<String, i64>,
    window: Option<(i64, i64)>,
    latencies_ms: Vec<f64>,
    /// A list request is recorded with every job it checked: counted once.
    lists_seen: std::collections::HashSet<i64>,
}

impl AttemptTally {
    /// Counts one recorded attempt.
    pub(super) fn add(
        &mut self,
        kind: &str,
        class: &str,
        latency: f64,
        start: i64,
        batch: Option<i64>,
    ) {
        if let Some(batch) = batch
            && !self.lists_seen.insert(batch)
        {
            return;
        }
        for (map, name) in [(&mut self.by_kind, kind), (&mut self.by_class, class)] {
            match map.get_mut(name) {
                Some(n) => *n += 1,
                None => {
                    map.insert(name.to_owned(), 1);
                }
            }
        }
        let end = start + latency as i64;
        self.window = Some(
            self.window
                .map_or((start, end), |(a, b)| (a.min(start), b.max(end))),
        );
        self.latencies_ms.push(latency);
    }

    /// Puts the tallies into `facts`.
    pub(super) fn finish(self, facts: &mut RunFacts) {
        facts.attempts_by_kind = self.by_kind.into_iter().collect();
        let mut classes: Vec<(String, i64)> = self.by_class.into_iter().collect();
        // Most frequent first, then by name: what `ORDER BY count(*) DESC, class` gave.
        classes.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        facts.attempts_by_class = classes;
        facts.send_window_ms = self.window;
        facts.latencies_ms = self.latencies_ms;
    }
}

/// Rows of (state, key, source, line, reason) for one run (`sql` names it `:run_id`).
fn failure_rows(c: &Connection, sql: &str, run_id: i64) -> rusqlite::Result<Vec<FailureReason>> {
    let mut stmt = c.prepare(sql)?;
    let rows = stmt.query_map(named_params! {":run_id": run_id}, |r| {
        Ok(FailureReason {
            state: r.get(0)?,
            key: r.get(1)?,
            source: r.get(2)?,
            line: r.get(3)?,
            reason: r.get(4)?,
        })
    })?;
    rows.collect()
}

/// When the newest run that exited 0 finished, as unix seconds.
pub(super) fn last_success(c: &Connection) -> rusqlite::Result<Option<f64>> {
    let at: Option<String> = c.query_row(
        "SELECT max(finished_at) FROM runs WHERE exit_code = 0",
        [],
        |r| r.get(0),
    )?;
    Ok(super::clock::unix_seconds(at.as_deref()))
}

pub(super) fn last_run_id(c: &Connection) -> rusqlite::Result<Option<i64>> {
    c.query_row("SELECT max(id) FROM runs", [], |r| r.get(0))
        .optional()
        .map(Option::flatten)
}

/// One line of `report` without a run named.
#[derive(Debug, Clone, Serialize)]
pub struct RunListEntry {
    pub run_id: i64,
    pub command: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub exit_code: Option<i64>,
    pub jobs: i64,
    pub succeeded: i64,
}

pub(super) fn list_runs(c: &Connection, limit: usize) -> rusqlite::Result<Vec<RunListEntry>> {
    let mut stmt = c.prepare(
        "SELECT id, command, started_at, finished_at, exit_code, report FROM runs \
         ORDER BY id DESC LIMIT :limit",
    )?;
    // A finished run's counts are those of its saved report, as they were when it
    // finished; only older or unfinished runs are counted from the jobs.
    let mut frozen: std::collections::HashMap<i64, (i64, i64)> = Default::default();
    let mut runs: Vec<RunListEntry> = stmt
        .query_map(named_params! {":limit": limit as i64}, |r| {
            let run_id: i64 = r.get(0)?;
            Ok((
                RunListEntry {
                    run_id,
                    command: r.get(1)?,
                    started_at: r.get(2)?,
                    finished_at: r.get(3)?,
                    exit_code: r.get(4)?,
                    jobs: 0,
                    succeeded: 0,
                },
                r.get::<_, Option<String>>(5)?,
            ))
        })?
        .map(|row| {
            row.map(|(entry, report)| {
                if let Some(counts) = report.as_deref().and_then(saved_counts) {
                    frozen.insert(entry.run_id, counts);
                }
                entry
            })
        })
        .collect::<rusqlite::Result<_>>()?;
    // One pass over `jobs` for all the listed runs (a count per run would read the
    // whole table once for each).
    let unfrozen = runs.iter().filter(|r| !frozen.contains_key(&r.run_id));
    let Some(oldest) = unfrozen.map(|r| r.run_id).min() else {
        for run in &mut runs {
            (run.jobs, run.succeeded) = frozen.get(&run.run_id).copied().unwrap_or((0, 0));
        }
        return Ok(runs);
    };
    // Counted here rather than by `GROUP BY`, which would sort the table.
    let mut counts: std::collections::HashMap<i64, (i64, i64)> = Default::default();
    let mut stmt = c.prepare(
        "SELECT last_run_id, state = 'succeeded' FROM jobs WHERE last_run_id >= :oldest",
    )?;
    let mut rows = stmt.query(named_params! {":oldest": oldest})?;
    while let Some(r) = rows.next()? {
        let n = counts.entry(r.get(0)?).or_default();
        n.0 += 1;
        n.1 += r.get::<_, i64>(1)?;
    }
    for run in &mut runs {
        (run.jobs, run.succeeded) = frozen
            .get(&run.run_id)
            .or_else(|| counts.get(&run.run_id))
            .copied()
            .unwrap_or((0, 0));
    }
    Ok(runs)
}

/// (jobs, succeeded) of a saved report's JSON.
pub(super) fn saved_counts(json: &str) -> Option<(i64, i64)> {
    #[derive(serde::Deserialize)]
    struct Jobs {
        jobs: std::collections::BTreeMap<String, i64>,
    }
    let saved: Jobs = serde_json::from_str(json).ok()?;
    let total = saved.jobs.values().sum();
    Some((total, saved.jobs.get("succeeded").copied().unwrap_or(0)))
}

/// Jobs in the whole database by state, counted in one plain pass: a `GROUP BY`
/// sorts the table (a million jobs took 45 MB and a quarter of an import's time).
pub(super) fn state_counts(c: &Connection) -> rusqlite::Result<StateCounts> {
    let mut counts = StateCounts::default();
    let mut stmt = c.prepare("SELECT state FROM jobs")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        if let Some(state) = JobState::parse(r.get_ref(0)?.as_str()?) {
            counts.add(state, 1);
        }
    }
    Ok(counts)
}

/// A job with its group, flattened (exports, tests).
#[derive(Debug, Clone, Serialize)]
pub struct JobExport {
    pub id: i64,
    pub key: Option<String>,
    pub row_key: Option<String>,
    pub state: String,
    pub obtained: Option<String>,
    pub customer_id: Option<String>,
    pub order_id: Option<String>,
    pub payment_intent_id: Option<String>,
    pub group_id: Option<String>,
    pub share_id: Option<String>,
    pub group_status: Option<String>,
    pub expires_at: Option<String>,
    pub created_at: Option<String>,
    pub error: Option<String>,
    pub source: String,
    pub line: Option<i64>,
    pub raw: String,
    /// The request body, for valid rows.
    pub payload: Option<Payload>,
    pub attempts: i64,
    pub creates: i64,
}

impl JobExport {
    /// A row not imported because its key was taken by other data (the import
    /// issue's id, the row's key, source, line, reason and cells as JSON).
    pub(super) fn conflict(
        id: i64,
        key: Option<String>,
        source: String,
        line: Option<i64>,
        reason: String,
        raw: String,
    ) -> JobExport {
        JobExport {
            id,
            key,
            row_key: None,
            state: "conflict".to_owned(),
            obtained: None,
            customer_id: None,
            order_id: None,
            payment_intent_id: None,
            group_id: None,
            share_id: None,
            group_status: None,
            expires_at: None,
            created_at: None,
            error: Some(reason),
            source,
            line,
            raw,
            payload: None,
            attempts: 0,
            creates: 0,
        }
    }
}

const JOB_COLUMNS: &str = "SELECT j.id, j.key, j.row_key, j.state, j.obtained, j.customer_id, \
     j.order_id, j.payment_intent_id, j.group_id, g.share_id, g.status, g.expires_at, \
     g.created_at, j.error, s.name, j.line, j.raw, j.attempts, j.creates, j.customer_id, \
     j.order_id, j.payment_intent_id, j.expires_at, j.mid_expire_at, j.metadata \
     FROM jobs j JOIN sources s ON s.id = j.source_id LEFT JOIN groups g ON g.job_id = j.id";

fn job_export(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobExport> {
    Ok(JobExport {
        id: r.get(0)?,
        key: r.get(1)?,
        row_key: r.get(2)?,
        state: r.get(3)?,
        obtained: r.get(4)?,
        customer_id: r.get(5)?,
        order_id: r.get(6)?,
        payment_intent_id: r.get(7)?,
        group_id: r.get(8)?,
        share_id: r.get(9)?,
        group_status: r.get(10)?,
        expires_at: r.get(11)?,
        created_at: r.get(12)?,
        error: r.get(13)?,
        source: r.get(14)?,
        line: r.get(15)?,
        raw: r.get(16)?,
        attempts: r.get(17)?,
        creates: r.get(18)?,
        payload: read_body(r, 19)?,
    })
}

pub(super) fn jobs(c: &Connection) -> rusqlite::Result<Vec<JobExport>> {
    let mut stmt = c.prepare(&format!("{JOB_COLUMNS} ORDER BY j.id"))?;
    let rows = stmt.query_map([], job_export)?;
    rows.collect()
}

pub(super) fn jobs_page(
    c: &Connection,
    states: &[JobState],
    after_id: i64,
    limit: usize,
) -> rusqlite::Result<Vec<JobExport>> {
    // The states' names are constants, never user text.
    let list = states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(",");
    let mut stmt = c.prepare_cached(&format!(
        "{JOB_COLUMNS} WHERE j.state IN ({list}) AND j.id > :after_id ORDER BY j.id \
         LIMIT :limit"
    ))?;
    let rows = stmt.query_map(
        named_params! {":after_id": after_id, ":limit": limit as i64},
        job_export,
    )?;
    rows.collect()
}

/// Up to `limit` rows that were not imported because their key was taken by other
/// data, with an id above `after_id`, as [`JobExport`]s in state `conflict` (the id is
/// the import issue's). A row re-imported unchanged is listed once, at its newest.
pub(super) fn conflicts_page(
    c: &Connection,
    after_id: i64,
    limit: usize,
) -> rusqlite::Result<Vec<JobExport>> {
    let mut stmt = c.prepare_cached(
        "SELECT i.id, i.key, i.source, i.line, i.reason, coalesce(i.raw, '') FROM import_issues i \
         WHERE i.kind = 'conflict' AND i.id > :after_id AND NOT EXISTS (SELECT 1 FROM import_issues l \
         WHERE l.kind = 'conflict' AND l.key IS i.key AND l.raw IS i.raw AND l.id > i.id) \
         ORDER BY i.id LIMIT :limit",
    )?;
    let rows = stmt.query_map(
        named_params! {":after_id": after_id, ":limit": limit as i64},
        |r| {
            Ok(JobExport::conflict(
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        },
    )?;
    rows.collect()
}

/// Groups in the whole database recorded without a share id.
pub(super) fn groups_without_share_id(c: &Connection) -> rusqlite::Result<i64> {
    c.query_row(
        "SELECT count(*) FROM groups WHERE share_id IS NULL OR share_id = ''",
        [],
        |r| r.get(0),
    )
}
