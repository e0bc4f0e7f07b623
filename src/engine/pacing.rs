//! Pacing: the concurrency cap, the rate limit, the shared `Retry-After` pause,
//! and the circuit breaker. Creates and existence checks go through the same gate.
//!
//! The cap and the rate are two separate things: a semaphore bounds requests in
//! flight; a GCRA limiter (governor) with a burst of one spaces request starts
//! evenly. A permit is taken first and the rate slot second, so a request starts
//! the moment its slot comes up and starts never bunch.
//!
//! A create first has to be marked `in_flight` (a committed write). With a rate
//! limit, the rate decides when requests start: a create takes its permit and rate
//! slot ([`Pacer::admit`]), is marked, and starts (a commit after its slot, as every
//! create). Without one, the request slots decide, and a create marked while holding
//! a slot would leave the API idle for a commit on every create. So it passes in two
//! steps: [`Pacer::ready`] (the pause, and a place in a waiting line), then, once
//! marked, [`Pacer::slot`] (the request slot). The line holds [`LINE_PER_SLOT`]
//! creates per request slot: enough that a slot never waits for a commit, few enough
//! that a crash leaves only that many unsent jobs to check.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Places in the waiting line per request slot. Measured (50,000 rows, no latency,
/// concurrency 64): 1 → 1.70 s, 2 → 1.53 s, 3 → 1.50 s, 4 → 1.42 s; longer lines
/// also mean fuller commits (1,900 → 1,000 transactions).
pub(crate) const LINE_PER_SLOT: usize = 4;

/// A create's place in the waiting line between [`Pacer::ready`] and [`Pacer::slot`].
#[derive(Debug)]
pub(crate) struct Ready(#[expect(dead_code, reason = "held for its drop")] OwnedSemaphorePermit);

async fn acquire(sem: &Arc<Semaphore>, stop: &CancellationToken) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        p = sem.clone().acquire_owned() => p.ok(),
        () = stop.cancelled() => None,
    }
}

/// The gate every request passes.
#[derive(Debug)]
pub struct Pacer {
    permits: Arc<Semaphore>,
    /// Places for creates that are admitted and being marked, not yet sending.
    ready: Arc<Semaphore>,
    limiter: Option<DefaultDirectRateLimiter>,
    paused_until: std::sync::Mutex<Option<Instant>>,
    /// Milliseconds of pause decided so far (see [`Pacer::paused_total`]).
    paused_ms: AtomicU64,
    streak: AtomicU32,
    breaker_threshold: u32,
}

impl Pacer {
    /// `rate` in requests per second (`None`: unlimited); `concurrency` ≥ 1.
    pub fn new(concurrency: usize, rate: Option<f64>, breaker_threshold: u32) -> Pacer {
        let limiter = rate.and_then(|r| {
            // The rate is checked to lie in config::limits::RATE; a nonsense one means
            // no limit rather than a panic.
            let period = Duration::try_from_secs_f64(1.0 / r).ok()?;
            Quota::with_period(period).map(|q| RateLimiter::direct(q.allow_burst(NonZeroU32::MIN)))
        });
        Pacer {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            ready: Arc::new(Semaphore::new(concurrency.max(1) * LINE_PER_SLOT)),
            limiter,
            paused_until: std::sync::Mutex::new(None),
            paused_ms: AtomicU64::new(0),
            streak: AtomicU32::new(0),
            breaker_threshold: breaker_threshold.max(1),
        }
    }

    /// Waits for a free slot, the end of any pause, and the next rate slot.
    /// `None` if `stop` fires first: the request must not start.
    pub(crate) async fn admit(&self, stop: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        let permit = acquire(&self.permits, stop).await?;
        self.pause_and_rate(stop).await?;
        Some(permit)
    }

    /// Whether a rate limit paces requests (see the module notes).
    pub(crate) fn rate_limited(&self) -> bool {
        self.limiter.is_some()
    }

    /// The first step of a create without a rate limit: a place in the waiting line
    /// and the end of any pause. `None` if `stop` fires first.
    pub(crate) async fn ready(&self, stop: &CancellationToken) -> Option<Ready> {
        let place = acquire(&self.ready, stop).await?;
        self.pause_and_rate(stop).await?;
        Some(Ready(place))
    }

    /// The second step of a create: a request slot, which frees its place in the line.
    /// A pause that began meanwhile is waited out, with a new rate slot after it (the
    /// creates that waited must not all start at once). `None` if `stop` fires first:
    /// the request must not start.
    pub(crate) async fn slot(
        &self,
        ready: Ready,
        stop: &CancellationToken,
    ) -> Option<OwnedSemaphorePermit> {
        let permit = acquire(&self.permits, stop).await;
        drop(ready);
        let permit = permit?;
        if self.paused() {
            self.pause_and_rate(stop).await?;
        }
        (!stop.is_cancelled()).then_some(permit)
    }

    fn paused(&self) -> bool {
        let until = *self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|t| t > Instant::now())
    }

    /// Waits out any pause, then the next rate slot; again if a pause began while it
    /// waited for the slot, so no request starts once a pause (or a stop) is decided.
    async fn pause_and_rate(&self, stop: &CancellationToken) -> Option<()> {
        loop {
            loop {
                let until = *self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
                match until {
                    Some(t) if t > Instant::now() => {
                        tokio::select! {
                            () = tokio::time::sleep_until(t) => {}
                            () = stop.cancelled() => return None,
                        }
                    }
                    _ => break,
                }
            }
            if let Some(limiter) = &self.limiter {
                tokio::select! {
                    () = limiter.until_ready() => {}
                    () = stop.cancelled() => return None,
                }
            }
            if !self.paused() {
                break;
            }
        }
        (!stop.is_cancelled()).then_some(())
    }

    /// Pauses every sender for `d` (a `Retry-After` on a 429 or 503, `cause`). A new
    /// pause, or one made longer by a second or more, is logged once with its length,
    /// cause and end.
    pub(crate) fn pause_for(&self, d: Duration, cause: &str) {
        let now = Instant::now();
        let Some(until) = now.checked_add(d) else {
            return;
        };
        let mut guard = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        let current = guard.filter(|t| *t > now);
        if current.is_some_and(|t| t >= until) {
            return;
        }
        let from = current.unwrap_or(now);
        let longer = until.duration_since(from);
        *guard = Some(until);
        drop(guard);
        self.paused_ms
            .fetch_add(longer.as_millis() as u64, Ordering::Relaxed);
        if current.is_none() || longer >= Duration::from_secs(1) {
            let ends = crate::text::local_time_after(d);
            tracing::warn!(
                pause_ms = d.as_millis() as u64,
                %cause,
                until = %ends,
                "pausing every request for {} ({cause}); sending again at {ends}",
                crate::text::human(d)
            );
        }
    }

    /// How long requests were held by pauses so far (a pause still running counts
    /// up to now).
    pub(crate) fn paused_total(&self) -> Duration {
        let total = Duration::from_millis(self.paused_ms.load(Ordering::Relaxed));
        let now = Instant::now();
        let ahead = self
            .paused_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .filter(|t| *t > now)
            .map_or(Duration::ZERO, |t| t.duration_since(now));
        total.saturating_sub(ahead)
    }

    /// Counts `n` failures that suggest the API is down (one request made for `n`
    /// jobs); true when the breaker opens.
    pub(crate) fn note_outage_failures(&self, n: usize) -> bool {
        let n = u32::try_from(n).unwrap_or(u32::MAX).max(1);
        let before = self.streak.fetch_add(n, Ordering::Relaxed);
        before.saturating_add(n) >= self.breaker_threshold
    }

    /// Any answer that shows the API is up closes the streak.
    pub(crate) fn note_healthy(&self) {
        self.streak.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn concurrency_cap_holds_without_rate_limit() {
        let pacer = Arc::new(Pacer::new(3, None, 10));
        let stop = CancellationToken::new();
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (pacer, stop, live, peak) =
                (pacer.clone(), stop.clone(), live.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = pacer.admit(&stop).await.unwrap();
                let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                live.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn rate_limit_spaces_starts_without_burst() {
        // 40/s with a generous cap: 11 starts need at least 10 periods = 250 ms. Only a
        // lower bound is asserted: a slow machine can be slower, never faster.
        let pacer = Pacer::new(100, Some(40.0), 10);
        let stop = CancellationToken::new();
        let start = std::time::Instant::now();
        for _ in 0..11 {
            drop(pacer.admit(&stop).await.unwrap());
        }
        assert!(
            start.elapsed() >= Duration::from_millis(245),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pause_holds_every_sender_until_it_passes() {
        let pacer = Pacer::new(4, None, 10);
        let stop = CancellationToken::new();
        pacer.pause_for(Duration::from_secs(2), "test");
        pacer.pause_for(Duration::from_secs(1), "test"); // a shorter pause never shortens a longer one
        let start = Instant::now();
        drop(pacer.admit(&stop).await.unwrap());
        assert!(start.elapsed() >= Duration::from_secs(2));
        assert_eq!(pacer.paused_total(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn paused_time_counts_what_has_passed_and_overflow_is_ignored() {
        let pacer = Pacer::new(1, None, 10);
        pacer.pause_for(Duration::from_secs(10), "test");
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(pacer.paused_total(), Duration::from_secs(4));
        // Extending by 5 s from now: 4 s passed + 11 s ahead in all.
        pacer.pause_for(Duration::from_secs(11), "test");
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(pacer.paused_total(), Duration::from_secs(15));
        pacer.pause_for(Duration::MAX, "test"); // no panic, no pause
        assert_eq!(pacer.paused_total(), Duration::from_secs(15));
    }

    /// A pause that begins while a request waits for its rate slot holds it too.
    #[tokio::test(start_paused = true)]
    async fn a_pause_decided_during_the_rate_wait_holds_the_request() {
        let pacer = Arc::new(Pacer::new(4, Some(1.0), 10));
        let stop = CancellationToken::new();
        drop(pacer.admit(&stop).await.unwrap()); // uses the first slot
        let start = Instant::now();
        let next = tokio::spawn({
            let (pacer, stop) = (pacer.clone(), stop.clone());
            async move {
                drop(pacer.admit(&stop).await.unwrap());
                Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        pacer.pause_for(Duration::from_secs(30), "test");
        let started = next.await.unwrap();
        assert!(started.duration_since(start) >= Duration::from_millis(30_500));
    }

    #[tokio::test(start_paused = true)]
    async fn stop_releases_waiters_without_a_permit() {
        let pacer = Pacer::new(1, None, 10);
        let stop = CancellationToken::new();
        let held = pacer.admit(&stop).await.unwrap();
        let waiter = {
            let stop = stop.clone();
            async move { pacer.admit(&stop).await.is_none() }
        };
        let handle = tokio::spawn(waiter);
        tokio::time::sleep(Duration::from_millis(10)).await;
        stop.cancel();
        assert!(handle.await.unwrap());
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn creates_wait_in_a_line_as_long_as_the_cap_and_send_within_it() {
        let pacer = Arc::new(Pacer::new(2, None, 10));
        let stop = CancellationToken::new();
        // Two requests in flight, a full line of creates marked and waiting: the next
        // create waits for a place.
        let sending = [
            pacer.admit(&stop).await.unwrap(),
            pacer.admit(&stop).await.unwrap(),
        ];
        let mut line = Vec::new();
        for _ in 0..2 * LINE_PER_SLOT {
            line.push(pacer.ready(&stop).await.unwrap());
        }
        let next = tokio::spawn({
            let (pacer, stop) = (pacer.clone(), stop.clone());
            async move { pacer.ready(&stop).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!next.is_finished());
        // A request ends: the first in line gets its slot and frees its place.
        let first = line.remove(0);
        let second = line.remove(0);
        drop(sending);
        let slot = pacer.slot(first, &stop).await;
        assert!(slot.is_some());
        assert!(next.await.unwrap());
        // Stopping: a marked create that has no slot yet must not send.
        let blocker = pacer.admit(&stop).await.unwrap();
        let waiter = tokio::spawn({
            let (pacer, stop) = (pacer.clone(), stop.clone());
            async move { pacer.slot(second, &stop).await.is_none() }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        stop.cancel();
        assert!(waiter.await.unwrap());
        drop((slot, blocker));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_that_begins_after_ready_still_holds_the_create() {
        let pacer = Pacer::new(4, None, 10);
        let stop = CancellationToken::new();
        let ready = pacer.ready(&stop).await.unwrap();
        pacer.pause_for(Duration::from_secs(3), "test");
        let start = Instant::now();
        drop(pacer.slot(ready, &stop).await.unwrap());
        assert!(start.elapsed() >= Duration::from_secs(3));
    }

    #[test]
    fn breaker_opens_after_a_streak_and_closes_on_health() {
        let pacer = Pacer::new(1, None, 3);
        assert!(!pacer.note_outage_failures(1));
        assert!(!pacer.note_outage_failures(1));
        pacer.note_healthy();
        assert!(!pacer.note_outage_failures(1));
        assert!(!pacer.note_outage_failures(1));
        assert!(pacer.note_outage_failures(1));
        // A list of 25 orders that failed counts as 25 checks that failed.
        let pacer = Pacer::new(1, None, 30);
        assert!(!pacer.note_outage_failures(25));
        assert!(pacer.note_outage_failures(25));
        pacer.note_healthy();
        assert!(pacer.note_outage_failures(usize::MAX), "no overflow");
    }
}
