//! A job's life once imported: claims, and the record of each attempt with the
//! state change it brings (the exactly-once protocol's writes).

use rusqlite::{Connection, named_params};

use super::body::{BODY_COLUMNS, send_body};
use super::clock::{now_ms, now_text, ts_text};
use super::types::{Attempt, Job, Transition};

/// Claims up to `limit` pending jobs with an id above `after_id` for `run_id`, and
/// returns them in id order, as they are now. A job claimed by an older run (one
/// that ended, or crashed) is taken over; one claimed by a newer run is left to it.
pub(super) fn claim_pending(
    c: &Connection,
    run_id: i64,
    after_id: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Job>> {
    let mut stmt = c.prepare_cached(&format!(
        "UPDATE jobs SET claim_run = :run_id WHERE id IN (SELECT id FROM jobs \
         WHERE state = 'pending' AND id > :after_id \
         AND (claim_run IS NULL OR claim_run <= :run_id) ORDER BY id LIMIT :limit) \
         RETURNING id, key, attempts, creates, needs_check, next_attempt_at, line, {BODY_COLUMNS}, \
         source_id"
    ))?;
    // A handful of sources: their names are read once per page, shared by the jobs.
    let mut names: std::collections::HashMap<i64, std::sync::Arc<str>> = c
        .prepare_cached("SELECT id, name FROM sources")?
        .query_map([], |r| {
            Ok((r.get(0)?, std::sync::Arc::from(r.get::<_, String>(1)?)))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let rows = stmt.query_map(
        named_params! {":run_id": run_id, ":after_id": after_id, ":limit": limit as i64},
        |r| {
            let body = send_body(r, 7)?.ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    7,
                    rusqlite::types::Type::Null,
                    "a pending job without a request body".into(),
                )
            })?;
            Ok(Job {
                id: r.get(0)?,
                key: r.get(1)?,
                body,
                attempts: r.get(2)?,
                creates: r.get(3)?,
                needs_check: r.get(4)?,
                next_attempt_at: r.get(5)?,
                line: r.get(6)?,
                source: names
                    .entry(r.get(13)?)
                    .or_insert_with(|| std::sync::Arc::from("?"))
                    .clone(),
            })
        },
    )?;
    let mut jobs = rows.collect::<rusqlite::Result<Vec<Job>>>()?;
    // RETURNING gives no order.
    jobs.sort_unstable_by_key(|j| j.id);
    Ok(jobs)
}

/// `UPDATE jobs` for a state change: the columns every change sets (see
/// [`StateChange`]), then `$extra`, as one literal (no formatting per call). Only the
/// run that claimed the job (`:run_id`) may change it, and only from the states in
/// `$from`.
macro_rules! set_state_sql {
    ($extra:literal, $from:expr) => {
        concat!(
            "UPDATE jobs SET attempts = attempts + ?1, \
             last_status = CASE WHEN ?1 = 1 THEN ?2 ELSE last_status END, \
             last_run_id = ?3, updated_ms = ?4",
            $extra,
            " WHERE id = ?5 AND claim_run = ?3 AND ",
            $from
        )
    };
}

/// The numbered parameters of the statements on the busiest path of a run (a state
/// change, an attempt), by name; a group's insert binds its columns in order. Numbers, not `:names`: SQLite finds a name
/// by comparing it with every parameter of the statement, which cost 5% of a run's
/// instructions (`benches/instructions.sh`). The store's tests run every statement.
pub(super) mod param {
    // Every state change ([`update_sql`]).
    pub const BUMP: usize = 1;
    pub const STATUS: usize = 2;
    pub const RUN_ID: usize = 3;
    pub const NOW_MS: usize = 4;
    pub const JOB_ID: usize = 5;
    // What a transition adds: `?6` … `?8`.
    pub const CHECK_AFTER: usize = 6;
    pub const OBTAINED: usize = 6;
    pub const GROUP_ID: usize = 7;
    pub const REASON: usize = 6;
    pub const CLASS: usize = 7;
    pub const NEXT_ATTEMPT_AT: usize = 6;
    pub const NEEDS_CHECK: usize = 7;
    pub const PENDING_REASON: usize = 8;
}

/// `INSERT INTO attempts`, its parameters numbered as [`AttemptParam`] names them.
pub(super) const INSERT_ATTEMPT: &str = "INSERT INTO attempts (job_id, run_id, kind, started_at, \
     started_ms, latency_ms, status, class, error, batch) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

/// The parameters of [`INSERT_ATTEMPT`], in order.
#[derive(Clone, Copy)]
enum AttemptParam {
    JobId = 1,
    RunId,
    Kind,
    StartedAt,
    StartedMs,
    LatencyMs,
    Status,
    Class,
    Error,
    Batch,
}

/// The states a job a run is working on can be in.
macro_rules! working {
    () => {
        "(state = 'pending' OR state = 'in_flight')"
    };
}

/// Records one attempt and the job's state change together. Returns false, with the
/// attempt recorded but the job unchanged, when the job is no longer this run's: its
/// claim was taken by a newer run (or it is not in a state this change starts from).
pub(super) fn record(
    c: &Connection,
    run_id: i64,
    job_id: i64,
    attempt: Option<&Attempt>,
    transition: &Transition,
) -> rusqlite::Result<bool> {
    let change = StateChange {
        bump: i64::from(attempt.is_some()),
        status: attempt.and_then(|a| a.status),
        run_id,
        now_ms: now_ms(),
        job_id,
    };
    if let Some(a) = attempt {
        insert_attempt(c, run_id, job_id, a)?;
    }
    let applied = change.apply(c, transition)?;
    if !applied {
        warn_not_recorded(run_id, job_id, transition);
    }
    Ok(applied)
}

/// One HTTP exchange of a job.
fn insert_attempt(c: &Connection, run_id: i64, job_id: i64, a: &Attempt) -> rusqlite::Result<()> {
    use AttemptParam as P;
    let mut stmt = c.prepare_cached(INSERT_ATTEMPT)?;
    stmt.raw_bind_parameter(P::JobId as usize, job_id)?;
    stmt.raw_bind_parameter(P::RunId as usize, run_id)?;
    stmt.raw_bind_parameter(P::Kind as usize, a.kind.as_str())?;
    stmt.raw_bind_parameter(P::StartedAt as usize, ts_text(a.started_at))?;
    stmt.raw_bind_parameter(P::StartedMs as usize, a.started_at.as_millisecond())?;
    stmt.raw_bind_parameter(P::LatencyMs as usize, a.latency.as_secs_f64() * 1000.0)?;
    stmt.raw_bind_parameter(P::Status as usize, a.status)?;
    stmt.raw_bind_parameter(P::Class as usize, a.class.as_str())?;
    stmt.raw_bind_parameter(P::Error as usize, &a.error)?;
    stmt.raw_bind_parameter(P::Batch as usize, a.batch)?;
    stmt.raw_execute().map(drop)
}

/// What every state change of a job sets: the attempt count (`bump`: one if an
/// attempt came with it), the last HTTP status, the run and the time.
struct StateChange {
    bump: i64,
    status: Option<u16>,
    run_id: i64,
    now_ms: i64,
    job_id: i64,
}

impl StateChange {
    /// Writes `transition` (and, for a success, the group). False if the job was not
    /// this run's to change.
    fn apply(&self, c: &Connection, transition: &Transition) -> rusqlite::Result<bool> {
        let mut stmt = c.prepare_cached(update_sql(transition))?;
        stmt.raw_bind_parameter(param::BUMP, self.bump)?;
        stmt.raw_bind_parameter(param::STATUS, self.status)?;
        stmt.raw_bind_parameter(param::RUN_ID, self.run_id)?;
        stmt.raw_bind_parameter(param::NOW_MS, self.now_ms)?;
        stmt.raw_bind_parameter(param::JOB_ID, self.job_id)?;
        bind_transition(&mut stmt, transition)?;
        let applied = stmt.raw_execute()? == 1;
        if applied && let Transition::Succeeded { obtained, group } = transition {
            insert_group(c, self.job_id, obtained.as_str(), group)?;
        }
        Ok(applied)
    }
}

/// The statement that writes `transition` (its own parameters are bound by
/// [`bind_transition`]).
pub(super) fn update_sql(transition: &Transition) -> &'static str {
    match transition {
        Transition::Keep => set_state_sql!("", working!()),
        Transition::InFlight {
            new_create: true, ..
        } => set_state_sql!(
            ", state = 'in_flight', creates = creates + 1, next_attempt_at = ?6",
            "state = 'pending'"
        ),
        Transition::InFlight {
            new_create: false, ..
        } => set_state_sql!(", next_attempt_at = ?6", "state = 'in_flight'"),
        Transition::Unsent => set_state_sql!(
            ", state = 'pending', creates = creates - 1, next_attempt_at = NULL",
            "state = 'in_flight'"
        ),
        Transition::Succeeded { .. } => set_state_sql!(
            ", state = 'succeeded', obtained = ?6, group_id = ?7, \
             needs_check = 0, next_attempt_at = NULL, error = NULL, error_class = NULL",
            working!()
        ),
        Transition::Failed { .. } => set_state_sql!(
            ", state = 'failed', error = ?6, error_class = ?7, next_attempt_at = NULL",
            working!()
        ),
        Transition::Unknown { .. } => set_state_sql!(
            ", state = 'unknown', error = ?6, error_class = 'ambiguous', needs_check = 1",
            working!()
        ),
        Transition::Pending { .. } => set_state_sql!(
            ", state = 'pending', next_attempt_at = ?6, \
             needs_check = ?7, error = ?8",
            working!()
        ),
    }
}

/// Binds the parameters of [`update_sql`] that come from the transition itself.
fn bind_transition(
    stmt: &mut rusqlite::Statement<'_>,
    transition: &Transition,
) -> rusqlite::Result<()> {
    match transition {
        Transition::Keep | Transition::Unsent => {}
        Transition::InFlight { check_after, .. } => {
            stmt.raw_bind_parameter(param::CHECK_AFTER, check_after)?;
        }
        Transition::Succeeded { obtained, group } => {
            stmt.raw_bind_parameter(param::OBTAINED, obtained.as_str())?;
            stmt.raw_bind_parameter(param::GROUP_ID, &group.id)?;
        }
        Transition::Failed { reason, class } => {
            stmt.raw_bind_parameter(param::REASON, reason)?;
            stmt.raw_bind_parameter(param::CLASS, class.to_string())?;
        }
        Transition::Unknown { reason } => stmt.raw_bind_parameter(param::REASON, reason)?,
        Transition::Pending {
            next_attempt_at,
            needs_check,
            reason,
        } => {
            stmt.raw_bind_parameter(param::NEXT_ATTEMPT_AT, next_attempt_at)?;
            stmt.raw_bind_parameter(param::NEEDS_CHECK, needs_check)?;
            stmt.raw_bind_parameter(param::PENDING_REASON, reason)?;
        }
    }
    Ok(())
}

/// Logs a change refused because another run claimed the job since.
pub(super) fn warn_not_recorded(run_id: i64, job_id: i64, transition: &Transition) {
    let group = match transition {
        Transition::Succeeded { group, .. } => Some(group.id.as_str()),
        _ => None,
    };
    tracing::warn!(
        job = job_id,
        run = run_id,
        change = transition.name(),
        group,
        "not recorded: this job was claimed by another run since (a second run on this \
         database; the run lock should prevent that). That run records its outcome, \
         checking for a group first"
    );
}

/// Stores a job's group. A job has one group: should a second one ever be recorded
/// for it, the first is kept and the second is logged, never written over.
fn insert_group(
    c: &Connection,
    job_id: i64,
    obtained: &str,
    group: &crate::job::Group,
) -> rusqlite::Result<()> {
    let inserted = c
        .prepare_cached(
            "INSERT INTO groups (id, job_id, share_id, status, customer_id, order_id, \
             expires_at, created_at, obtained, raw, recorded_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
             ON CONFLICT (job_id) DO NOTHING",
        )?
        // In the columns' order (numbers, not names, as for [`param`]).
        .execute(rusqlite::params![
            group.id,
            job_id,
            group.share_id,
            group.status,
            group.customer_id,
            group.order_id,
            group.expires_at,
            group.created_at,
            obtained,
            group.raw,
            now_text(),
        ])?;
    if inserted == 0 {
        let kept: String = c
            .prepare_cached("SELECT id FROM groups WHERE job_id = :job_id")?
            .query_row(named_params! {":job_id": job_id}, |r| r.get(0))?;
        warn_second_group(job_id, &kept, &group.id);
    }
    Ok(())
}

/// Logs a second group for one job (the first, `kept`, stays recorded).
pub(super) fn warn_second_group(job_id: i64, kept: &str, second: &str) {
    if kept != second {
        tracing::error!(
            job = job_id,
            kept,
            second,
            "a second group was recorded for one job; the first is kept. Check both in \
             the KohortPay dashboard"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Obtained;

    /// Each statement has exactly the parameters its binder binds: a number bound
    /// that the SQL lacks is an error, one the SQL has and nothing binds is NULL.
    #[test]
    fn the_numbered_parameters_match_their_statements() {
        let mut c = Connection::open_in_memory().unwrap();
        crate::store::schema::migrate_for_tests(&mut c);
        let reason = String::from("r");
        let table = [
            (Transition::Keep, param::JOB_ID),
            (
                Transition::InFlight {
                    check_after: 1,
                    new_create: true,
                },
                param::CHECK_AFTER,
            ),
            (Transition::Unsent, param::JOB_ID),
            (
                Transition::Succeeded {
                    obtained: Obtained::Created,
                    group: crate::job::Group::default(),
                },
                param::GROUP_ID,
            ),
            (
                Transition::Failed {
                    reason: reason.clone(),
                    class: crate::store::FailureClass::OrderNotFound,
                },
                param::CLASS,
            ),
            (
                Transition::Unknown {
                    reason: reason.clone(),
                },
                param::REASON,
            ),
            (
                Transition::Pending {
                    next_attempt_at: None,
                    needs_check: false,
                    reason: None,
                },
                param::PENDING_REASON,
            ),
        ];
        for (t, last) in table {
            let mut stmt = c.prepare(update_sql(&t)).unwrap();
            assert_eq!(stmt.parameter_count(), last, "{}", t.name());
            bind_transition(&mut stmt, &t).unwrap();
        }
        let stmt = c.prepare(INSERT_ATTEMPT).unwrap();
        assert_eq!(stmt.parameter_count(), AttemptParam::Batch as usize);
    }
}
