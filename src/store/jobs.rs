//! A job's life once imported: claims, and the record of each attempt with the
//! state change it brings (the exactly-once protocol's writes).

use rusqlite::{Connection, params};

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
        "UPDATE jobs SET claim_run = ?1 WHERE id IN (SELECT id FROM jobs WHERE state = 'pending' \
         AND id > ?2 AND (claim_run IS NULL OR claim_run <= ?1) ORDER BY id LIMIT ?3) \
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
    let rows = stmt.query_map(params![run_id, after_id, limit as i64], |r| {
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
    })?;
    let mut jobs = rows.collect::<rusqlite::Result<Vec<Job>>>()?;
    // RETURNING gives no order.
    jobs.sort_unstable_by_key(|j| j.id);
    Ok(jobs)
}

/// `UPDATE jobs` for a state change: the columns every change sets (?1–?5), then
/// `$extra` (from ?6), as one literal (no formatting per call). Only the run that
/// claimed the job (?3) may change it, and only from the states in `$from`.
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
    let now_ms = now_ms();
    let (bump, status) = match attempt {
        Some(a) => {
            c.prepare_cached(
                "INSERT INTO attempts (job_id, run_id, kind, started_at, started_ms, latency_ms, \
                 status, class, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                job_id,
                run_id,
                a.kind.as_str(),
                ts_text(a.started_at),
                a.started_at.as_millisecond(),
                a.latency.as_secs_f64() * 1000.0,
                a.status,
                a.class,
                a.error
            ])?;
            (1, a.status)
        }
        None => (0, None),
    };
    let set_state = |sql: &'static str, extra: &[&dyn rusqlite::ToSql]| -> rusqlite::Result<bool> {
        let mut stmt = c.prepare_cached(sql)?;
        let common: [&dyn rusqlite::ToSql; 5] = [&bump, &status, &run_id, &now_ms, &job_id];
        for (i, value) in common.iter().chain(extra).enumerate() {
            stmt.raw_bind_parameter(i + 1, value)?;
        }
        Ok(stmt.raw_execute()? == 1)
    };
    let applied = match transition {
        Transition::Keep => set_state(set_state_sql!("", working!()), &[])?,
        Transition::InFlight {
            check_after,
            new_create: true,
        } => set_state(
            set_state_sql!(
                ", state = 'in_flight', creates = creates + 1, next_attempt_at = ?6",
                "state = 'pending'"
            ),
            &[check_after],
        )?,
        Transition::InFlight {
            check_after,
            new_create: false,
        } => set_state(
            set_state_sql!(", next_attempt_at = ?6", "state = 'in_flight'"),
            &[check_after],
        )?,
        Transition::Unsent => set_state(
            set_state_sql!(
                ", state = 'pending', creates = creates - 1, next_attempt_at = NULL",
                "state = 'in_flight'"
            ),
            &[],
        )?,
        Transition::Succeeded { obtained, group } => {
            let applied = set_state(
                set_state_sql!(
                    ", state = 'succeeded', obtained = ?6, group_id = ?7, needs_check = 0, \
                     next_attempt_at = NULL, error = NULL, error_class = NULL",
                    working!()
                ),
                &[&obtained.as_str(), &group.id],
            )?;
            if applied {
                insert_group(c, job_id, obtained.as_str(), group)?;
            }
            applied
        }
        Transition::Failed {
            reason,
            class,
            status: _,
        } => set_state(
            set_state_sql!(
                ", state = 'failed', error = ?6, error_class = ?7, next_attempt_at = NULL",
                working!()
            ),
            &[reason, class],
        )?,
        Transition::Unknown { reason } => set_state(
            set_state_sql!(
                ", state = 'unknown', error = ?6, error_class = 'ambiguous', needs_check = 1",
                working!()
            ),
            &[reason],
        )?,
        Transition::Pending {
            next_attempt_at,
            needs_check,
            reason,
        } => set_state(
            set_state_sql!(
                ", state = 'pending', next_attempt_at = ?6, needs_check = ?7, error = ?8",
                working!()
            ),
            &[next_attempt_at, needs_check, reason],
        )?,
    };
    if !applied {
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
    Ok(applied)
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
        .execute(params![
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
            now_text()
        ])?;
    if inserted == 0 {
        let kept: String = c
            .prepare_cached("SELECT id FROM groups WHERE job_id = ?1")?
            .query_row(params![job_id], |r| r.get(0))?;
        if kept != group.id {
            tracing::error!(
                job = job_id,
                kept = %kept,
                second = %group.id,
                "a second group was recorded for one job; the first is kept. Check both in \
                 the KohortPay dashboard"
            );
        }
    }
    Ok(())
}
