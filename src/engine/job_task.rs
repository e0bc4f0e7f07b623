//! One job's life in a run: the exactly-once protocol of the design, step by step.
//!
//! check (if due) → mark `in_flight` (committed) → create → classify → record, and
//! on a retryable outcome wait and go round again. An ambiguous outcome is never
//! followed by a blind re-send: the job waits the settle delay, then is checked.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::{Ctx, Precheck, StopReason};
use crate::api::{Class, Reply};
use crate::error::Result;
use crate::job::Group;
use crate::store::{Attempt, Job, Obtained, RequestKind, Transition};

fn unix_ms_in(d: Duration) -> i64 {
    jiff::Timestamp::now().as_millisecond() + d.as_millis() as i64
}

fn attempt_of<T>(kind: RequestKind, reply: &Reply<T>) -> Attempt {
    Attempt {
        kind,
        started_at: reply.started_at,
        latency: reply.latency,
        status: reply.status,
        class: reply.class.as_str(),
        error: reply.error.clone(),
    }
}

/// Requests made for one job in this run, for its log line.
#[derive(Debug, Default)]
struct Tally {
    sent: u32,
    last_latency: Option<Duration>,
}

impl Tally {
    fn note<T>(&mut self, reply: &Reply<T>) {
        self.sent += 1;
        self.last_latency = Some(reply.latency);
    }

    /// The one log line of a row that did not succeed (in the run's span).
    fn warn(&self, span: &tracing::Span, run_id: i64, job: &Job, outcome: &str, reason: &str) {
        tracing::warn!(
            parent: span,
            run = run_id,
            source = %job.source,
            key = %job.key,
            line = job.line,
            outcome,
            // Every request for the row in this run, checks included (not the retry
            // budget that "gave up after N attempts" counts).
            requests = self.sent,
            latency_ms = self.last_latency.map(crate::text::ms),
            %reason,
            "row failed"
        );
    }
}

/// What an existence check found.
enum Check {
    Found(Group, Attempt),
    Absent,
    /// The order does not exist: the job can never succeed as written.
    OrderMissing(String, Attempt),
    /// Try again later (after `delay_hint`, if the API gave one).
    Retry(Option<Duration>, String),
    /// Leave the job as it is: the run stops, or another run claimed the job.
    Stopped,
}

/// Runs one job until it succeeds, fails, becomes unknown, or the run stops.
pub(super) async fn process(ctx: Arc<Ctx>, job: Job) -> Result<()> {
    let seed = ctx.cfg.seed.map(|s| s ^ job.id as u64);
    let mut rng = seed.map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
    let mut backoff = ctx.cfg.retry.backoff(move || rng.f64());
    let mut needs_check = job.needs_check;
    let mut checked_clean = false;
    let mut not_before = job.next_attempt_at;
    let mut last_error = String::new();
    let mut tally = Tally::default();

    loop {
        if let Some(at) = not_before.take() {
            let wait = at - jiff::Timestamp::now().as_millisecond();
            if wait > 0 && !ctx.sleep(Duration::from_millis(wait as u64)).await {
                return Ok(()); // stopping: the job stays pending
            }
        }
        let order = job.body.checkable_order();
        if needs_check && order.is_none() && !ctx.cfg.resend_unknown {
            let reason = format!(
                "the outcome of an earlier create is unknown ({}) and this row has no orderId \
                 (or also a paymentIntentId), so the API cannot be asked whether its group \
                 exists; check in the KohortPay dashboard, then `retry-failed --include-unknown` \
                 to send it again",
                if last_error.is_empty() {
                    "interrupted mid-request"
                } else {
                    &last_error
                }
            );
            tally.warn(&ctx.span, ctx.run_id, &job, "unknown", &reason);
            return ctx
                .store
                .record_last(ctx.run_id, job.id, None, Transition::Unknown { reason });
        }
        let check_due = order.is_some()
            && (needs_check
                || (ctx.cfg.precheck == Precheck::Always && job.creates == 0 && !checked_clean));
        if let (true, Some(order_id)) = (check_due, order) {
            match check(&ctx, &job, order_id, &mut tally).await? {
                Check::Found(group, attempt) => {
                    let obtained = if needs_check {
                        Obtained::Recovered
                    } else {
                        Obtained::Existing
                    };
                    let t = Transition::Succeeded { obtained, group };
                    return ctx.store.record_last(ctx.run_id, job.id, Some(attempt), t);
                }
                Check::Absent => {
                    needs_check = false;
                    checked_clean = true;
                }
                Check::OrderMissing(reason, attempt) => {
                    tally.warn(&ctx.span, ctx.run_id, &job, "failed", &reason);
                    let t = Transition::Failed {
                        reason,
                        class: "order_not_found".into(),
                        status: attempt.status,
                    };
                    return ctx.store.record_last(ctx.run_id, job.id, Some(attempt), t);
                }
                Check::Stopped => return Ok(()),
                Check::Retry(hint, error) => {
                    last_error = error;
                    match backoff.next() {
                        Some(delay) => {
                            not_before = Some(unix_ms_in(hint.unwrap_or(delay)));
                            continue;
                        }
                        None => {
                            return give_up_after(&ctx, &job, &tally, &last_error, needs_check);
                        }
                    }
                }
            }
        }

        // Create.
        let Some(permit) = start_create(&ctx, &job).await? else {
            return Ok(());
        };
        let reply = ctx.api.create_group(&job.body).await;
        // Observed before the slot is given back: a stop or pause it causes holds the
        // next request already.
        ctx.observe(&reply);
        drop(permit);
        tally.note(&reply);
        let attempt = attempt_of(RequestKind::Create, &reply);
        match reply.class {
            Class::Ok => {
                let group = reply.value.unwrap_or_default();
                if group.share_id.is_none() && !group.id.is_empty() {
                    return with_share_id(&ctx, &job, group, attempt, &mut tally).await;
                }
                let t = Transition::Succeeded {
                    obtained: Obtained::Created,
                    group,
                };
                return ctx.store.record_last(ctx.run_id, job.id, Some(attempt), t);
            }
            Class::Definitive => {
                let reason = reply.error.unwrap_or_default();
                tally.warn(&ctx.span, ctx.run_id, &job, "failed", &reason);
                let t = Transition::Failed {
                    reason,
                    class: format!("http_{}", reply.status.unwrap_or(0)),
                    status: reply.status,
                };
                return ctx.store.record_last(ctx.run_id, job.id, Some(attempt), t);
            }
            Class::Stop => {
                let reason = reply.error.unwrap_or_default();
                let t = Transition::Pending {
                    next_attempt_at: None,
                    needs_check: false,
                    reason: Some(reason.clone()),
                };
                ctx.record(&job, Some(attempt), t).await?;
                // `observe` has stopped the run already.
                return Ok(());
            }
            Class::Retry | Class::Ambiguous => {
                let ambiguous = reply.class == Class::Ambiguous;
                last_error = reply.error.clone().unwrap_or_default();
                let Some(delay) = backoff.next() else {
                    if !ctx.record(&job, Some(attempt), Transition::Keep).await? {
                        return Ok(());
                    }
                    if ambiguous {
                        needs_check = true;
                    }
                    return give_up_after(&ctx, &job, &tally, &last_error, needs_check);
                };
                let mut wait = reply.retry_after.unwrap_or(delay);
                if ambiguous {
                    // The server may still create the group late: let it settle, then check.
                    needs_check = true;
                    wait = wait.max(ctx.cfg.settle);
                }
                let next = unix_ms_in(wait);
                let t = Transition::Pending {
                    next_attempt_at: Some(next),
                    needs_check,
                    reason: reply.error.clone(),
                };
                if !ctx.record(&job, Some(attempt), t).await? {
                    return Ok(());
                }
                not_before = Some(next);
            }
        }
    }
}

/// A group created without a share id (what a merchant hands the customer): the
/// create is recorded, the group is fetched once more (the API may assign it just
/// after), and the job succeeds with what that shows. A group still without one is
/// kept as it is, and counted by the report ("no share id yet").
async fn with_share_id(
    ctx: &Ctx,
    job: &Job,
    group: Group,
    created: Attempt,
    tally: &mut Tally,
) -> Result<()> {
    if !ctx.record(job, Some(created), Transition::Keep).await? {
        return Ok(());
    }
    let mut group = group;
    let mut attempt = None;
    if let Some(reply) = ctx.paced(ctx.api.group(&group.id)).await {
        tally.note(&reply);
        attempt = Some(attempt_of(RequestKind::FetchGroup, &reply));
        if let (Class::Ok, Some(Some(fetched))) = (reply.class, reply.value)
            && fetched.id == group.id
            && fetched.share_id.is_some()
        {
            group = fetched;
        }
    }
    if group.share_id.is_none() {
        tracing::warn!(parent: &ctx.span, run = ctx.run_id, key = %job.key, group = %group.id, "group created without a share id; kept, and counted in the report");
    }
    let t = Transition::Succeeded {
        obtained: Obtained::Created,
        group,
    };
    ctx.store.record_last(ctx.run_id, job.id, attempt, t)
}

/// Marks the job in flight (committed) and takes a request slot; `None` if the run
/// stops first, with the job as it was. See `pacing` for why the two orders.
async fn start_create(ctx: &Ctx, job: &Job) -> Result<Option<OwnedSemaphorePermit>> {
    // A create marked in flight may wait in line for its request slot. Its check after a
    // crash must not come before the settle delay has passed since it was *sent*, so
    // `check_after` gets a margin of a tenth of the delay, and a create that waited
    // longer than that is marked again before it leaves.
    let margin = ctx.cfg.settle / 10;
    let in_flight = |new_create| Transition::InFlight {
        check_after: unix_ms_in(ctx.cfg.settle + margin),
        new_create,
    };
    let stop = &ctx.control.stop;
    if ctx.pacer.rate_limited() {
        // The rate decides: start on the rate slot, marked in between.
        let Some(permit) = ctx.pacer.admit(stop).await else {
            return Ok(None);
        };
        let mine = ctx.record(job, None, in_flight(true)).await?;
        return Ok(mine.then_some(permit));
    }
    // The request slots decide: mark while waiting for one.
    let Some(ready) = ctx.pacer.ready(stop).await else {
        return Ok(None);
    };
    let marked_at = Instant::now();
    if !ctx.record(job, None, in_flight(true)).await? {
        return Ok(None);
    }
    let Some(permit) = ctx.pacer.slot(ready, stop).await else {
        ctx.record(job, None, Transition::Unsent).await?;
        return Ok(None);
    };
    if !margin.is_zero()
        && marked_at.elapsed() > margin
        && !ctx.record(job, None, in_flight(false)).await?
    {
        return Ok(None);
    }
    Ok(Some(permit))
}

fn give_up_after(
    ctx: &Ctx,
    job: &Job,
    tally: &Tally,
    last_error: &str,
    maybe_created: bool,
) -> Result<()> {
    let reason = format!(
        "gave up after {} attempts; last error: {last_error}{}",
        ctx.cfg.retry.max_attempts,
        if maybe_created {
            " (a group may exist: retry-failed checks before sending again)"
        } else {
            ""
        }
    );
    tally.warn(&ctx.span, ctx.run_id, job, "failed", &reason);
    let t = Transition::Failed {
        reason,
        class: "retries_exhausted".into(),
        status: None,
    };
    ctx.store.record_last(ctx.run_id, job.id, None, t)
}

/// Why a reply of the `Stop` class stops the run, and what to do.
fn stop_message<T>(reply: &Reply<T>) -> String {
    let reason = reply.error.as_deref().unwrap_or_default();
    match reply.status {
        Some(300..=399) => format!(
            "the API answered with a redirect ({reason}); redirects are not followed, as the \
             key would go to another address. --api-base is probably wrong: give the API's \
             own address (https://api.kohortpay.com). No row was failed"
        ),
        _ => format!(
            "the API rejected the key ({reason}); no row was failed. Check KOHORTPAY_API_KEY \
             or --api-key-file, then run again"
        ),
    }
}

/// `GET /orders/{id}`, then `GET /groups/{id}` when the order has a group.
async fn check(ctx: &Ctx, job: &Job, order_id: &str, tally: &mut Tally) -> Result<Check> {
    let Some(reply) = ctx.paced(ctx.api.order_group(order_id)).await else {
        return Ok(Check::Stopped);
    };
    tally.note(&reply);
    let attempt = attempt_of(RequestKind::CheckOrder, &reply);
    let group_id = match reply.class {
        Class::Ok => reply.value.clone().flatten(),
        Class::Definitive => {
            let reason = format!(
                "order {order_id} was not found in KohortPay ({}); create the order first, or \
                 fix orderId",
                reply.error.clone().unwrap_or_default()
            );
            return Ok(Check::OrderMissing(reason, attempt));
        }
        Class::Stop | Class::Retry | Class::Ambiguous => {
            return check_failed(ctx, job, attempt, reply).await;
        }
    };
    if !ctx.record(job, Some(attempt), Transition::Keep).await? {
        return Ok(Check::Stopped);
    }
    let Some(group_id) = group_id else {
        return Ok(Check::Absent);
    };

    let Some(reply) = ctx.paced(ctx.api.group(&group_id)).await else {
        return Ok(Check::Stopped);
    };
    tally.note(&reply);
    let attempt = attempt_of(RequestKind::FetchGroup, &reply);
    match reply.class {
        Class::Ok => {
            let group = reply.value.flatten().unwrap_or_else(|| {
                // The order names a group the lookup cannot show (the API's empty 200):
                // record what we know; `raw` is what was received, nothing.
                tracing::warn!(parent: &ctx.span, order = order_id, group = %group_id, "order names a group that GET /groups does not return");
                Group {
                    raw: String::new(),
                    id: group_id.clone(),
                    order_id: Some(order_id.to_owned()),
                    ..Group::default()
                }
            });
            Ok(Check::Found(group, attempt))
        }
        Class::Stop | Class::Definitive | Class::Retry | Class::Ambiguous => {
            check_failed(ctx, job, attempt, reply).await
        }
    }
}

/// A check that got no usable answer: record it, then stop the run or retry later.
async fn check_failed<T>(ctx: &Ctx, job: &Job, attempt: Attempt, reply: Reply<T>) -> Result<Check> {
    if !ctx.record(job, Some(attempt), Transition::Keep).await? {
        return Ok(Check::Stopped);
    }
    let error = reply.error.unwrap_or_default();
    if reply.class == Class::Stop {
        // `observe` has stopped the run already.
        return Ok(Check::Stopped);
    }
    Ok(Check::Retry(reply.retry_after, error))
}

impl Ctx {
    /// Records an attempt and a state change of `job`; false (and counted) when the
    /// job is no longer this run's (another run claimed it since): leave it be.
    async fn record(&self, job: &Job, attempt: Option<Attempt>, t: Transition) -> Result<bool> {
        let applied = self.store.record(self.run_id, job.id, attempt, t).await?;
        if !applied {
            self.claims_lost
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(applied)
    }

    /// Stops the run, logging in the run's span.
    pub(super) fn stop(&self, reason: StopReason) {
        let _in_run = self.span.enter();
        self.control.stop(reason);
    }

    /// Sends one request through the gate (cap, rate, pause) and feeds its reply to
    /// the pause and the breaker. `None`: the run stopped before it could start.
    pub(super) async fn paced<T>(
        &self,
        request: impl Future<Output = Reply<T>>,
    ) -> Option<Reply<T>> {
        let permit = self.pacer.admit(&self.control.stop).await?;
        let reply = request.await;
        self.observe(&reply);
        drop(permit);
        Some(reply)
    }

    /// Sleeps unless the run stops first; false if it stopped.
    pub(super) async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            // `sleep` caps a huge duration instead of overflowing an Instant.
            () = tokio::time::sleep(d) => true,
            () = self.control.stop.cancelled() => false,
        }
    }

    /// Feeds one reply to the shared pause and the circuit breaker.
    pub(super) fn observe<T>(&self, reply: &Reply<T>) {
        if reply.class == Class::Stop {
            // At once, before anything is recorded: no other request may start meanwhile.
            self.stop(StopReason::Api(stop_message(reply)));
        }
        if let (Some(wait), Some(status @ (429 | 503))) = (reply.retry_after, reply.status) {
            if wait > self.cfg.max_pause {
                let after = crate::text::local_time_after(wait);
                let capped = wait >= crate::api::RETRY_AFTER_CAP;
                self.stop(StopReason::Api(format!(
                    "the API asked to wait {}{} (HTTP {status} with Retry-After), longer than \
                     --max-pause {}; no row was failed: run again after {after}",
                    if capped { "at least " } else { "" },
                    crate::text::human(wait),
                    crate::text::human(self.cfg.max_pause)
                )));
            } else {
                self.pacer
                    .pause_for(wait, &format!("HTTP {status} with Retry-After"));
            }
        }
        let outage = match reply.status {
            None => true,
            Some(s) => (500..600).contains(&s),
        };
        if !outage {
            self.pacer.note_healthy();
        } else if self.pacer.note_outage_failure() {
            self.stop(StopReason::Api(format!(
                "the API looks unavailable: {} requests in a row failed (last: {}); pending \
                 rows stay pending for the next run",
                self.cfg.breaker_threshold,
                reply.error.as_deref().unwrap_or("no response")
            )));
        }
    }
}
