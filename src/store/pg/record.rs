//! A record on PostgreSQL: one attempt and the job's state change in one
//! transaction, with the protocol's state-change SQL shared with SQLite (`jobs.rs`,
//! its `?N` parameters read as `$N`).

use deadpool_postgres::Pool;
use tokio_postgres::types::ToSql;

use super::failure;
use crate::store::failure::Failure;
use crate::store::jobs::{INSERT_ATTEMPT, param, update_sql, warn_not_recorded};
use crate::store::{Attempt, Transition};

/// SQLite's numbered parameters (`?1`) as PostgreSQL's (`$1`): the protocol's state
/// changes are one SQL text for both backends (`jobs.rs`).
pub(super) fn numbered(sql: &str) -> String {
    sql.replace('?', "$")
}

/// A value bound to a statement.
type Value = Box<dyn ToSql + Sync + Send>;

/// The parameters of [`update_sql`] for `transition`, in order.
fn state_change_params(
    bump: i64,
    status: Option<i64>,
    run_id: i64,
    job_id: i64,
    transition: &Transition,
) -> Vec<Value> {
    let mut values: Vec<(usize, Value)> = vec![
        (param::BUMP, Box::new(bump)),
        (param::STATUS, Box::new(status)),
        (param::RUN_ID, Box::new(run_id)),
        (param::NOW_MS, Box::new(crate::store::clock::now_ms())),
        (param::JOB_ID, Box::new(job_id)),
    ];
    match transition {
        Transition::Keep | Transition::Unsent => {}
        Transition::InFlight { check_after, .. } => {
            values.push((param::CHECK_AFTER, Box::new(*check_after)));
        }
        Transition::Succeeded { obtained, group } => {
            values.push((param::OBTAINED, Box::new(obtained.as_str())));
            values.push((param::GROUP_ID, Box::new(group.id.clone())));
        }
        Transition::Failed { reason, class } => {
            values.push((param::REASON, Box::new(reason.clone())));
            values.push((param::CLASS, Box::new(class.to_string())));
        }
        Transition::Unknown { reason } => values.push((param::REASON, Box::new(reason.clone()))),
        Transition::Pending {
            next_attempt_at,
            needs_check,
            reason,
        } => {
            values.push((param::NEXT_ATTEMPT_AT, Box::new(*next_attempt_at)));
            values.push((param::NEEDS_CHECK, Box::new(i64::from(*needs_check))));
            values.push((param::PENDING_REASON, Box::new(reason.clone())));
        }
    }
    values.sort_by_key(|(i, _)| *i);
    values.into_iter().map(|(_, v)| v).collect()
}

/// Whether a record's commit waits until it is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Commit {
    /// On disk before the call returns: a mark in flight, before its request leaves.
    Durable,
    /// A job's last record in a run: the server writes it within a moment
    /// (`synchronous_commit = off`). A server crash before then leaves the job as its
    /// last durable record has it (in flight: checked by the next run), as SQLite's
    /// outbox does; one flush less per job.
    Soon,
}

/// Records one attempt and the job's state change in one transaction (see
/// `jobs::record`, SQLite's).
pub(super) async fn record(
    pool: &Pool,
    commit: Commit,
    run_id: i64,
    job_id: i64,
    attempt: Option<&Attempt>,
    transition: &Transition,
) -> Result<bool, Failure> {
    let mut client = pool.get().await.map_err(failure::from_pool)?;
    let tx = client.transaction().await?;
    if commit == Commit::Soon {
        tx.batch_execute("SET LOCAL synchronous_commit = off")
            .await?;
    }
    if let Some(a) = attempt {
        let stmt = tx.prepare_cached(&numbered(INSERT_ATTEMPT)).await?;
        tx.execute(
            &stmt,
            &[
                &job_id,
                &run_id,
                &a.kind.as_str(),
                &crate::store::clock::ts_text(a.started_at),
                &a.started_at.as_millisecond(),
                &(a.latency.as_secs_f64() * 1000.0),
                &a.status.map(i64::from),
                &a.class.as_str(),
                &a.error,
                &a.batch,
            ],
        )
        .await?;
    }
    let values = state_change_params(
        i64::from(attempt.is_some()),
        attempt.and_then(|a| a.status).map(i64::from),
        run_id,
        job_id,
        transition,
    );
    let params: Vec<&(dyn ToSql + Sync)> = values
        .iter()
        .map(|v| v.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let stmt = tx.prepare_cached(&numbered(update_sql(transition))).await?;
    let applied = tx.execute(&stmt, &params).await? == 1;
    if applied && let Transition::Succeeded { obtained, group } = transition {
        insert_group(&tx, job_id, obtained.as_str(), group).await?;
    }
    tx.commit().await?;
    if !applied {
        warn_not_recorded(run_id, job_id, transition);
    }
    Ok(applied)
}

/// Stores a job's group; a second one for the same job is logged, never stored over
/// the first (as SQLite's `jobs::insert_group`).
async fn insert_group(
    tx: &deadpool_postgres::Transaction<'_>,
    job_id: i64,
    obtained: &str,
    group: &crate::job::Group,
) -> Result<(), Failure> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO groups (id, job_id, share_id, status, customer_id, order_id, \
             expires_at, created_at, obtained, raw, recorded_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (job_id) DO NOTHING",
        )
        .await?;
    let inserted = tx
        .execute(
            &stmt,
            &[
                &group.id,
                &job_id,
                &group.share_id,
                &group.status,
                &group.customer_id,
                &group.order_id,
                &group.expires_at,
                &group.created_at,
                &obtained,
                &group.raw,
                &crate::store::clock::now_text(),
            ],
        )
        .await?;
    if inserted == 0 {
        let kept: String = tx
            .query_one("SELECT id FROM groups WHERE job_id = $1", &[&job_id])
            .await?
            .try_get(0)?;
        crate::store::jobs::warn_second_group(job_id, &kept, &group.id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_changes_bind_every_parameter_they_name() {
        let reason = String::from("r");
        for t in [
            Transition::Keep,
            Transition::InFlight {
                check_after: 1,
                new_create: true,
            },
            Transition::Unsent,
            Transition::Succeeded {
                obtained: crate::store::Obtained::Created,
                group: crate::job::Group::default(),
            },
            Transition::Failed {
                reason: reason.clone(),
                class: crate::store::FailureClass::OrderNotFound,
            },
            Transition::Unknown {
                reason: reason.clone(),
            },
            Transition::Pending {
                next_attempt_at: None,
                needs_check: true,
                reason: None,
            },
        ] {
            let sql = numbered(update_sql(&t));
            let highest = (1..=20)
                .rev()
                .find(|i| sql.contains(&format!("${i}")))
                .unwrap_or(0);
            assert_eq!(
                state_change_params(1, None, 1, 1, &t).len(),
                highest,
                "{}",
                t.name()
            );
            assert!(!sql.contains('?'), "{sql}");
        }
    }
}
