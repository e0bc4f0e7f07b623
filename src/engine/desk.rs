//! The check desk: existence checks gathered into `GET /orders?search=` lists of up
//! to 25 orders, sent just ahead of the creates they clear.
//!
//! Workers hand in an order id and wait for its [`Lookup`]. The desk sends a list
//! when it has a full one (or when no more ids came for [`LINGER`]), re-checks
//! first, and sends fresh checks only while fewer than one list's worth of cleared
//! jobs are waiting to create: so checks run at most one list ahead of creates, and
//! a run stopped after N requests has created about N × 25/26 groups.
//!
//! Only what the API promises is used (`docs/api-notes.md#list-and-search-grammar`):
//! an order in the answer that was not asked for is ignored, an asked order missing
//! from it (or listed without saying whether it has a group) is checked on its own,
//! and a list request refused for good (a 4xx), or answered with a 2xx that is not a
//! list, turns batching off for the rest of the run.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::ctx::Ctx;
use crate::api::{Class, LIST_TAKE, ListedOrder};
use crate::store::{Attempt, RequestKind};

/// How long a short list waits for more ids before it is sent anyway.
pub(crate) const LINGER: Duration = Duration::from_millis(20);

/// What the list said about one order.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// The order is listed with this group.
    Grouped(String),
    /// The order is listed without a group: the job may create. Holding the token
    /// counts the job as cleared until its create has left.
    Clear(Cleared),
    /// Check it on its own: the answer does not list it, or does not say whether it
    /// has a group; the list route was refused or is off.
    Single,
    /// The list request failed transiently: retry the check later.
    Failed {
        retry_after: Option<Duration>,
        error: String,
    },
    /// The run stopped first.
    Stopped,
}

/// One list request, as each job it served records it (its `batch` names the
/// request).
pub(crate) type Listing = Attempt;

/// A job cleared by a list whose create has not left yet; dropping it says it has.
#[derive(Debug)]
pub(crate) struct Cleared(Arc<Desk>);

impl Drop for Cleared {
    fn drop(&mut self) {
        self.0.cleared.fetch_sub(1, Ordering::AcqRel);
        self.0.wake.notify_one();
    }
}

struct Waiter {
    order_id: String,
    answer: oneshot::Sender<(Lookup, Option<Listing>)>,
}

#[derive(Default)]
struct Queues {
    /// The desk has stopped: no more ids are taken.
    closed: bool,
    rechecks: VecDeque<Waiter>,
    fresh: VecDeque<Waiter>,
    /// When the oldest fresh id arrived.
    fresh_since: Option<Instant>,
}

/// Shared by the workers and the desk's own task.
#[derive(Default)]
pub(crate) struct Desk {
    queues: Mutex<Queues>,
    wake: Notify,
    cleared: AtomicUsize,
    batching: AtomicBool,
    batches: AtomicI64,
}

impl std::fmt::Debug for Desk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Desk")
            .field("cleared", &self.cleared.load(Ordering::Relaxed))
            .field("batching", &self.batching.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Desk {
    /// A desk that sends lists until the API refuses one.
    pub(crate) fn new() -> Arc<Desk> {
        let desk = Desk::default();
        desk.batching.store(true, Ordering::Relaxed);
        Arc::new(desk)
    }

    /// Whether checks still go in lists.
    pub(crate) fn batching(&self) -> bool {
        self.batching.load(Ordering::Acquire)
    }

    /// Hands in `order_id` and waits for what the list says; `recheck` for a job whose
    /// earlier create may have succeeded (served first). With the list request that
    /// answered it, if one did.
    pub(crate) async fn lookup(&self, order_id: &str, recheck: bool) -> (Lookup, Option<Listing>) {
        let (answer, answered) = oneshot::channel();
        {
            let mut q = self.lock();
            if q.closed {
                return (Lookup::Stopped, None);
            }
            let waiter = Waiter {
                order_id: order_id.to_owned(),
                answer,
            };
            if recheck {
                q.rechecks.push_back(waiter);
            } else {
                q.fresh_since.get_or_insert_with(Instant::now);
                q.fresh.push_back(waiter);
            }
        }
        self.wake.notify_one();
        answered.await.unwrap_or((Lookup::Stopped, None))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next list to send, re-checks first; fresh ids only while fewer than a
    /// list's worth of cleared jobs wait. `Err(wait)`: nothing yet, look again after
    /// `wait` (or when woken).
    fn take(&self) -> Result<Vec<Waiter>, Option<Duration>> {
        let mut q = self.lock();
        let mut batch: Vec<Waiter> = Vec::with_capacity(LIST_TAKE);
        while batch.len() < LIST_TAKE
            && let Some(w) = q.rechecks.pop_front()
        {
            batch.push(w);
        }
        let room = self.cleared.load(Ordering::Acquire) < LIST_TAKE;
        if room && batch.len() < LIST_TAKE {
            let lingering = q.fresh_since.map(|t| LINGER.saturating_sub(t.elapsed()));
            if batch.is_empty()
                && q.fresh.len() < LIST_TAKE
                && lingering.is_some_and(|l| !l.is_zero())
            {
                return Err(lingering);
            }
            while batch.len() < LIST_TAKE
                && let Some(w) = q.fresh.pop_front()
            {
                batch.push(w);
            }
            q.fresh_since = (!q.fresh.is_empty()).then(Instant::now);
        }
        if batch.is_empty() {
            Err(None)
        } else {
            Ok(batch)
        }
    }

    /// Answers every waiter still queued: the run stopped.
    fn close(&self) {
        let mut q = self.lock();
        let q = &mut *q;
        q.closed = true;
        for w in q.rechecks.drain(..).chain(q.fresh.drain(..)) {
            let _ = w.answer.send((Lookup::Stopped, None));
        }
    }
}

/// The desk's task: sends lists until the run stops or `done` fires.
pub(crate) async fn serve(
    ctx: Arc<Ctx>,
    desk: Arc<Desk>,
    done: tokio_util::sync::CancellationToken,
) {
    loop {
        let batch = loop {
            match desk.take() {
                Ok(batch) => break batch,
                Err(wait) => {
                    let linger = async {
                        match wait {
                            Some(d) => tokio::time::sleep(d).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        () = desk.wake.notified() => {}
                        () = linger => {}
                        () = ctx.control.stop.cancelled() => return desk.close(),
                        () = done.cancelled() => return desk.close(),
                    }
                }
            }
        };
        if desk.batching() {
            send(&ctx, &desk, batch).await;
        } else {
            // Turned off while these waited: each is checked on its own.
            for w in batch {
                let _ = w.answer.send((Lookup::Single, None));
            }
        }
    }
}

/// Sends one list and answers each of its waiters.
async fn send(ctx: &Ctx, desk: &Arc<Desk>, batch: Vec<Waiter>) {
    let ids: Vec<&str> = batch.iter().map(|w| w.order_id.as_str()).collect();
    let request = ctx.paced_for(ids.len(), ctx.api.list_orders(&ids));
    // A second signal (or the end of the grace) gives up waiting for the answer.
    let reply = tokio::select! {
        reply = request => reply,
        () = ctx.control.abandon.cancelled() => None,
    };
    let Some(reply) = reply else {
        for w in batch {
            let _ = w.answer.send((Lookup::Stopped, None));
        }
        return;
    };
    let listing = Attempt {
        batch: Some(desk.batches.fetch_add(1, Ordering::Relaxed) + 1),
        ..Attempt::of(RequestKind::ListOrders, &reply)
    };
    // Refused for good, or answered with a body that is not a list: the route is not
    // what the API notes say; check one order at a time from now on.
    let route_unusable = reply.class == Class::Definitive
        || (reply.class != Class::Ok && reply.status.is_some_and(|s| (200..300).contains(&s)));
    if route_unusable && desk.batching.swap(false, Ordering::AcqRel) {
        let what = match reply.class {
            Class::Definitive => "refused a list of orders",
            _ => "answered a list of orders with something that is not a list",
        };
        tracing::warn!(
            parent: &ctx.span,
            "the API {what} ({}); existence checks go one order at a time for the rest of \
             the run",
            reply.error.as_deref().unwrap_or("no reason given")
        );
    }
    let listed = reply.value.unwrap_or_default();
    let class = if route_unusable {
        Class::Definitive
    } else {
        reply.class
    };
    for w in batch {
        let lookup = answer_for(
            desk,
            &class,
            &reply.retry_after,
            &reply.error,
            &listed,
            &w.order_id,
        );
        let _ = w.answer.send((lookup, Some(listing.clone())));
    }
}

/// What the list said about `order_id`: only an entry with exactly that id counts,
/// and a group in any such entry wins.
fn answer_for(
    desk: &Arc<Desk>,
    class: &Class,
    retry_after: &Option<Duration>,
    error: &Option<String>,
    listed: &[ListedOrder],
    order_id: &str,
) -> Lookup {
    match class {
        Class::Ok => {}
        Class::Definitive => return Lookup::Single,
        Class::Stop => return Lookup::Stopped,
        Class::Retry | Class::Ambiguous => {
            return Lookup::Failed {
                retry_after: *retry_after,
                error: error.clone().unwrap_or_default(),
            };
        }
    }
    let mut entries = listed.iter().filter(|o| o.id == order_id).peekable();
    if entries.peek().is_none() {
        return Lookup::Single;
    }
    // A group in any entry wins; an entry that does not say sends the order to a
    // single check; only entries that all say "no group" clear it.
    let entries: Vec<&ListedOrder> = entries.collect();
    if let Some(group) = entries
        .iter()
        .find_map(|o| o.group_id.clone().ok().flatten())
    {
        return Lookup::Grouped(group);
    }
    match entries.iter().any(|o| o.group_id.is_err()) {
        true => Lookup::Single,
        false => {
            desk.cleared.fetch_add(1, Ordering::AcqRel);
            Lookup::Clear(Cleared(desk.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An id handed in after the desk closed is answered at once, never left waiting.
    #[tokio::test(start_paused = true)]
    async fn an_id_handed_in_after_the_desk_closed_is_answered_at_once() {
        let desk = Desk::new();
        let waiting = tokio::spawn({
            let desk = desk.clone();
            async move { desk.lookup("ord_1", false).await.0 }
        });
        tokio::task::yield_now().await;
        desk.close();
        assert!(matches!(waiting.await.unwrap(), Lookup::Stopped));
        assert!(matches!(
            desk.lookup("ord_2", true).await.0,
            Lookup::Stopped
        ));
    }

    /// Only an entry with the asked id counts; one that does not say whether the
    /// order has a group sends it to a single check; a group anywhere wins.
    #[test]
    fn what_a_list_says_about_one_order() {
        let desk = Desk::new();
        let listed = |entries: &[(&str, Result<Option<&str>, ()>)]| -> Vec<ListedOrder> {
            entries
                .iter()
                .map(|(id, g)| ListedOrder {
                    id: (*id).to_owned(),
                    group_id: g.map(|g| g.map(str::to_owned)).map_err(|()| "?".to_owned()),
                })
                .collect()
        };
        let say = |entries: &[(&str, Result<Option<&str>, ()>)]| {
            answer_for(&desk, &Class::Ok, &None, &None, &listed(entries), "o1")
        };
        assert!(matches!(say(&[("o2", Ok(None))]), Lookup::Single));
        assert!(matches!(say(&[("o1", Err(()))]), Lookup::Single));
        assert!(matches!(say(&[("o1", Ok(Some("g")))]), Lookup::Grouped(g) if g == "g"));
        assert!(matches!(
            say(&[("o1", Err(())), ("o1", Ok(Some("g")))]),
            Lookup::Grouped(_)
        ));
        let clear = say(&[("o1", Ok(None)), ("o2", Ok(Some("g")))]);
        assert!(matches!(clear, Lookup::Clear(_)));
        assert_eq!(desk.cleared.load(Ordering::Relaxed), 1);
        drop(clear);
        assert_eq!(desk.cleared.load(Ordering::Relaxed), 0);
        let refused = answer_for(&desk, &Class::Definitive, &None, &None, &[], "o1");
        assert!(matches!(refused, Lookup::Single));
    }
}
