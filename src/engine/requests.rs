//! The requests the protocol asks for, each turned into the event it reports:
//! an existence check, a create (with its in-flight mark), a refetch of a group.

use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::ctx::Ctx;
use super::desk::{Cleared, Lookup};
use super::protocol::{Checked, Created};
use crate::api::{Class, Reply, searchable};
use crate::error::Result;
use crate::job::Group;
use crate::store::{Attempt, Job, RequestKind, Transition};

/// Unix milliseconds `d` from now.
pub(super) fn unix_ms_in(d: Duration) -> i64 {
    let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    jiff::Timestamp::now().as_millisecond().saturating_add(ms)
}

/// Requests made for one job in this run, for its log line.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub sent: u32,
    pub last_latency: Option<Duration>,
}

impl Tally {
    fn note<T>(&mut self, reply: &Reply<T>) {
        self.count(reply.latency);
    }

    fn count(&mut self, latency: Duration) {
        self.sent += 1;
        self.last_latency = Some(latency);
    }
}

/// A check's finding and the attempt that showed it (not recorded yet).
pub(super) type CheckDone = (Checked, Option<Attempt>);

/// Asks whether the order has a group: in a list at the desk when the run batches
/// checks and the id can go in a search, else (or when the list does not show the
/// order) on its own. A job cleared by a list gets the token that counts it cleared.
pub(super) async fn check(
    ctx: &Ctx,
    job: &Job,
    order_id: &str,
    recheck: bool,
    tally: &mut Tally,
    cleared: &mut Option<Cleared>,
) -> Result<CheckDone> {
    if !(ctx.desk.batching() && searchable(order_id)) {
        return check_alone(ctx, job, order_id, tally).await;
    }
    let (lookup, listing) = ctx.desk.lookup(order_id, recheck).await;
    let attempt = listing.inspect(|l| tally.count(l.latency));
    match lookup {
        Lookup::Clear(token) => {
            *cleared = Some(token);
            Ok((Checked::Absent, attempt))
        }
        Lookup::Failed { retry_after, error } => {
            Ok((Checked::Failed { retry_after, error }, attempt))
        }
        Lookup::Stopped => Ok((Checked::Stopped, attempt)),
        Lookup::Grouped(group_id) => {
            if !ctx.record(job, attempt, Transition::Keep).await? {
                return Ok((Checked::Stopped, None));
            }
            fetch_found(ctx, order_id, group_id, tally).await
        }
        Lookup::Single => {
            if let Some(a) = attempt
                && !ctx.record(job, Some(a), Transition::Keep).await?
            {
                return Ok((Checked::Stopped, None));
            }
            check_alone(ctx, job, order_id, tally).await
        }
    }
}

/// `GET /orders/{id}`, then `GET /groups/{id}` when the order has a group.
async fn check_alone(ctx: &Ctx, job: &Job, order_id: &str, tally: &mut Tally) -> Result<CheckDone> {
    let Some(reply) = ctx.paced(ctx.api.order_group(order_id)).await else {
        return Ok((Checked::Stopped, None));
    };
    tally.note(&reply);
    let attempt = Attempt::of(RequestKind::CheckOrder, &reply);
    let group_id = match reply.class {
        Class::Ok => reply.value.clone().flatten(),
        Class::Definitive => {
            let reason = format!(
                "order {order_id} was not found in KohortPay ({}); create the order first, or \
                 fix orderId",
                reply.error.unwrap_or_default()
            );
            return Ok((Checked::OrderMissing(reason), Some(attempt)));
        }
        Class::Stop | Class::Retry | Class::Ambiguous => return Ok(unanswered(reply, attempt)),
    };
    let Some(group_id) = group_id else {
        return Ok((Checked::Absent, Some(attempt)));
    };
    if !ctx.record(job, Some(attempt), Transition::Keep).await? {
        return Ok((Checked::Stopped, None));
    }
    fetch_found(ctx, order_id, group_id, tally).await
}

/// `GET /groups/{id}` of the group an order names.
async fn fetch_found(
    ctx: &Ctx,
    order_id: &str,
    group_id: String,
    tally: &mut Tally,
) -> Result<CheckDone> {
    let Some(reply) = ctx.paced(ctx.api.group(&group_id)).await else {
        return Ok((Checked::Stopped, None));
    };
    tally.note(&reply);
    let attempt = Attempt::of(RequestKind::FetchGroup, &reply);
    if reply.class != Class::Ok {
        return Ok(unanswered(reply, attempt));
    }
    let group = reply.value.flatten().unwrap_or_else(|| {
        // The order names a group the lookup cannot show (the API's empty 200):
        // record what is known; `raw` is what was received, nothing.
        tracing::warn!(parent: &ctx.span, order = order_id, group = %group_id, "order names a group that GET /groups does not return");
        Group {
            raw: String::new(),
            id: group_id,
            order_id: Some(order_id.to_owned()),
            ..Group::default()
        }
    });
    Ok((Checked::Found(group), Some(attempt)))
}

/// A check that got no usable answer: the run stops (the key), or try again later.
fn unanswered<T>(reply: Reply<T>, attempt: Attempt) -> CheckDone {
    let checked = if reply.class == Class::Stop {
        Checked::Stopped
    } else {
        Checked::Failed {
            retry_after: reply.retry_after,
            error: reply.error.unwrap_or_default(),
        }
    };
    (checked, Some(attempt))
}

/// Marks the job in flight, sends `POST /groups` and reads the reply; `None` if the
/// run stopped before the request left (the job is as it was). `left` is told when
/// the request leaves.
pub(super) async fn create(
    ctx: &Ctx,
    job: &Job,
    tally: &mut Tally,
    left: impl FnOnce(),
) -> Result<Option<(Created, Attempt)>> {
    let Some(permit) = start_create(ctx, job).await? else {
        return Ok(None);
    };
    left();
    let reply = ctx.api.create_group(&job.body).await;
    // Observed before the slot is given back: a stop or pause it causes holds the
    // next request already.
    ctx.observe(&reply);
    drop(permit);
    tally.note(&reply);
    let attempt = Attempt::of(RequestKind::Create, &reply);
    let error = reply.error.unwrap_or_default();
    let retry_after = reply.retry_after;
    let created = match reply.class {
        Class::Ok => Created::Ok(reply.value.unwrap_or_default()),
        Class::Definitive => Created::Rejected {
            status: reply.status,
            reason: error,
        },
        Class::Retry => Created::Retry { retry_after, error },
        Class::Ambiguous => Created::Ambiguous { retry_after, error },
        Class::Stop => Created::Stopped(error),
    };
    Ok(Some((created, attempt)))
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

/// Fetches a group created without a share id (what a merchant hands the customer)
/// once more: the API may assign it just after. The group as created when the fetch
/// shows nothing better (as when the run stops first).
pub(super) async fn refetch(
    ctx: &Ctx,
    job: &Job,
    group: Group,
    tally: &mut Tally,
) -> (Group, Option<Attempt>) {
    let mut group = group;
    let reply = ctx.paced(ctx.api.group(&group.id)).await;
    let attempt = reply.map(|reply| {
        tally.note(&reply);
        let attempt = Attempt::of(RequestKind::FetchGroup, &reply);
        if let (Class::Ok, Some(Some(fetched))) = (reply.class, reply.value)
            && fetched.id == group.id
            && fetched.share_id.is_some()
        {
            group = fetched;
        }
        attempt
    });
    if group.share_id.is_none() {
        tracing::warn!(parent: &ctx.span, run = ctx.run_id, key = %job.key, group = %group.id, "group created without a share id; kept, and counted in the report");
    }
    (group, attempt)
}
