//! Sees one job through its protocol: carries out each [`Action`] and feeds back
//! what happened, recording every request and state change on the way.

use tokio::time::Instant;

use super::ctx::Ctx;
use super::desk::Cleared;
use super::protocol::{Action, Checked, Event, Final, Protocol, Rules, Start};
use super::requests::{self, Tally, unix_ms_in};
use crate::error::Result;
use crate::store::{Attempt, Job, Transition};

/// Runs one job until it succeeds, fails, becomes unknown, or the run stops.
pub(super) async fn see_through(ctx: &Ctx, job: Job) -> Result<()> {
    let mut protocol = protocol_for(ctx, &job);
    let mut worker = Worker {
        ctx,
        job: &job,
        tally: Tally::default(),
        unrecorded: None,
        cleared: None,
        cleared_at: None,
    };
    let mut event = Event::Ready;
    loop {
        match worker.act(protocol.step(event)).await? {
            Some(next) => event = next,
            None => return Ok(()),
        }
    }
}

/// One job's requests and records in this run.
struct Worker<'a> {
    ctx: &'a Ctx,
    job: &'a Job,
    tally: Tally,
    /// The last request's attempt, recorded with the state change that follows it.
    unrecorded: Option<Attempt>,
    /// Counts the job as cleared by a list until its create leaves.
    cleared: Option<Cleared>,
    /// When a check last cleared the job to create.
    cleared_at: Option<Instant>,
}

impl Worker<'_> {
    /// Carries out one action; the event it led to, or `None` when the job's part in
    /// this run is over (recorded, or left as it is because the run stops).
    async fn act(&mut self, action: Action) -> Result<Option<Event>> {
        let (ctx, job) = (self.ctx, self.job);
        let alone = matches!(
            action,
            Action::Wait(_)
                | Action::Check { .. }
                | Action::Create
                | Action::Refetch(_)
                | Action::Leave
        );
        if alone
            && let Some(attempt) = self.unrecorded.take()
            && !ctx.record(job, Some(attempt), Transition::Keep).await?
        {
            return Ok(None);
        }
        Ok(match action {
            Action::Wait(d) => ctx.sleep(d).await.then_some(Event::Ready),
            Action::Check { recheck } => Some(self.check(recheck).await?),
            Action::Create => self.create().await?,
            Action::Refetch(group) => {
                let (group, attempt) = requests::refetch(ctx, job, group, &mut self.tally).await;
                self.unrecorded = attempt;
                Some(Event::Refetched(group))
            }
            Action::Retry {
                after,
                needs_check,
                reason,
            } => {
                let t = pending(Some(unix_ms_in(after)), needs_check, reason);
                let mine = ctx.record(job, self.unrecorded.take(), t).await?;
                (mine && ctx.sleep(after).await).then_some(Event::Ready)
            }
            Action::Release(reason) => {
                let t = pending(None, false, reason);
                ctx.record(job, self.unrecorded.take(), t).await?;
                None
            }
            Action::Leave => None,
            Action::Finish(end) => {
                let attempt = self.unrecorded.take();
                finish(ctx, job, &self.tally, attempt, end)?;
                None
            }
        })
    }

    /// Checks the job's order (in a list when it can), noting when a check cleared it.
    async fn check(&mut self, recheck: bool) -> Result<Event> {
        let (ctx, job) = (self.ctx, self.job);
        let order = job.body.checkable_order().unwrap_or_default();
        let cleared = &mut self.cleared;
        let (checked, attempt) =
            requests::check(ctx, job, order, recheck, &mut self.tally, cleared).await?;
        if let Checked::Absent = checked {
            self.cleared_at = Some(Instant::now());
        }
        self.unrecorded = attempt;
        Ok(Event::Checked(checked))
    }

    /// Sends the create; when it leaves, the job no longer counts as cleared and the
    /// time since its check is noted. `None` if the run stopped first.
    async fn create(&mut self) -> Result<Option<Event>> {
        let ctx = self.ctx;
        let (cleared, cleared_at) = (&mut self.cleared, self.cleared_at.take());
        let left = || {
            drop(cleared.take());
            if let Some(at) = cleared_at {
                ctx.note_check_gap(at.elapsed());
            }
        };
        let created = requests::create(ctx, self.job, &mut self.tally, left).await?;
        Ok(created.map(|(created, attempt)| {
            self.unrecorded = Some(attempt);
            Event::Created(created)
        }))
    }
}

fn pending(next_attempt_at: Option<i64>, needs_check: bool, reason: String) -> Transition {
    Transition::Pending {
        next_attempt_at,
        needs_check,
        reason: (!reason.is_empty()).then_some(reason),
    }
}

/// The protocol for `job`, with its backoff seeded per job when the run has a seed.
fn protocol_for(ctx: &Ctx, job: &Job) -> Protocol<impl FnMut() -> f64 + use<>> {
    let seed = ctx.cfg.seed.map(|s| s ^ job.id as u64);
    let mut rng = seed.map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
    let rules = Rules {
        precheck: ctx.cfg.precheck,
        resend_unknown: ctx.cfg.resend_unknown,
        settle: ctx.cfg.settle,
        max_attempts: ctx.cfg.retry.max_attempts,
    };
    let wait = job
        .next_attempt_at
        .map_or(0, |at| at - jiff::Timestamp::now().as_millisecond());
    let start = Start {
        checkable: job.body.checkable_order().is_some(),
        needs_check: job.needs_check,
        never_sent: job.creates == 0,
        wait: std::time::Duration::from_millis(wait.max(0).unsigned_abs()),
    };
    Protocol::new(rules, start, ctx.cfg.retry.backoff(move || rng.f64()))
}

/// The job's final record, and the log line of a row that did not succeed.
fn finish(ctx: &Ctx, job: &Job, tally: &Tally, attempt: Option<Attempt>, end: Final) -> Result<()> {
    let t = match end {
        Final::Succeeded { obtained, group } => Transition::Succeeded { obtained, group },
        Final::Failed { reason, class } => {
            warn_failed(ctx, job, tally, "failed", &reason);
            Transition::Failed { reason, class }
        }
        Final::Unknown { reason } => {
            warn_failed(ctx, job, tally, "unknown", &reason);
            Transition::Unknown { reason }
        }
    };
    ctx.store.record_last(ctx.run_id, job.id, attempt, t)
}

/// The one log line of a row that did not succeed (in the run's span).
fn warn_failed(ctx: &Ctx, job: &Job, tally: &Tally, outcome: &str, reason: &str) {
    tracing::warn!(
        parent: &ctx.span,
        run = ctx.run_id,
        source = %job.source,
        key = %job.key,
        line = job.line,
        outcome,
        // Every request for the row in this run, checks included (not the retry
        // budget that "gave up after N attempts" counts).
        requests = tally.sent,
        latency_ms = tally.last_latency.map(crate::text::ms),
        %reason,
        "row failed"
    );
}
