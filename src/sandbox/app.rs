//! The state every handler shares: the knobs, the simulated world, the seeded
//! random source, the rate limiter, and the counters behind the stats endpoint.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use jiff::Timestamp;
use serde_json::Value;

use super::SandboxConfig;
use super::state::{Stats, World};

pub(super) struct App {
    /// Faults can change while serving (an outage that ends), so behind a lock.
    cfg: RwLock<SandboxConfig>,
    world: Mutex<World>,
    rng: Mutex<fastrand::Rng>,
    pub(super) limiter: Option<DefaultDirectRateLimiter>,
    pub(super) booted: Timestamp,
    clock: Instant,
    in_flight: AtomicU64,
    /// Order ids asked for in `GET /orders?search=` lists.
    pub(super) list_ids_asked: AtomicU64,
    peak: AtomicU64,
    /// Request start times, ms since boot (for the one-second window maximum).
    starts: Mutex<Vec<u64>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

/// A handler that panicked while holding a lock left data that is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl App {
    pub(super) fn new(cfg: SandboxConfig) -> App {
        let limiter = cfg.rate_limit.and_then(|r| {
            let burst = NonZeroU32::new(r.ceil() as u32).unwrap_or(NonZeroU32::MIN);
            Duration::try_from_secs_f64(1.0 / r)
                .ok()
                .and_then(Quota::with_period)
                .map(|q| RateLimiter::direct(q.allow_burst(burst)))
        });
        App {
            rng: Mutex::new(fastrand::Rng::with_seed(cfg.seed)),
            cfg: RwLock::new(cfg),
            world: Mutex::new(World::default()),
            limiter,
            booted: Timestamp::now(),
            clock: Instant::now(),
            in_flight: AtomicU64::new(0),
            list_ids_asked: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            starts: Mutex::new(Vec::new()),
        }
    }

    /// The knobs as they are now.
    pub(super) fn faults(&self) -> SandboxConfig {
        self.cfg.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn set_faults(&self, cfg: SandboxConfig) {
        *self.cfg.write().unwrap_or_else(|e| e.into_inner()) = cfg;
    }

    /// Counts one answer under "METHOD /route LABEL".
    pub(super) fn count(&self, what: String) {
        *lock(&self.world).requests.entry(what).or_default() += 1;
    }

    /// A uniform draw in `[0, 1)` from the seeded source.
    pub(super) fn roll(&self) -> f64 {
        lock(&self.rng).f64()
    }

    /// Reads the world.
    pub(super) fn world(&self) -> MutexGuard<'_, World> {
        lock(&self.world)
    }

    /// Changes the world with the random source at hand (locked in that order).
    pub(super) fn change<R>(&self, f: impl FnOnce(&mut World, &mut fastrand::Rng) -> R) -> R {
        let mut rng = lock(&self.rng);
        let mut w = lock(&self.world);
        f(&mut w, &mut rng)
    }

    /// Creates a group from a validated body, now.
    pub(super) fn create(&self, body: &Value, live: bool) -> Value {
        self.change(|w, rng| w.create(rng, body, live, Timestamp::now()))
    }

    pub(super) fn stats(&self, detail: bool) -> Stats {
        let w = lock(&self.world);
        let dup: BTreeMap<String, u32> = w
            .groups_per_key
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        let mut starts = lock(&self.starts).clone();
        Stats {
            requests: w.requests.clone(),
            groups_total: w.groups.len() as u64,
            keys_with_groups: w.groups_per_key.len() as u64,
            duplicate_keys: dup.len() as u64,
            duplicates: dup.into_iter().take(100).collect(),
            peak_concurrency: self.peak.load(Ordering::Relaxed),
            list_ids_asked: self.list_ids_asked.load(Ordering::Relaxed),
            max_starts_in_one_second: most_within(&mut starts, 1000) as u64,
            groups_per_key: detail.then(|| {
                w.groups_per_key
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect()
            }),
        }
    }
}

/// The most of `times` (sorted here) that fall within any window of `width`.
fn most_within(times: &mut [u64], width: u64) -> usize {
    times.sort_unstable();
    let (mut best, mut lo) = (0usize, 0usize);
    for hi in 0..times.len() {
        while times[hi] - times[lo] >= width {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// Middleware: counts requests in flight and their start times.
pub(super) async fn track(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let now = app.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    app.peak.fetch_max(now, Ordering::SeqCst);
    let ms = app.clock.elapsed().as_millis() as u64;
    lock(&app.starts).push(ms);
    let resp = next.run(req).await;
    app.in_flight.fetch_sub(1, Ordering::SeqCst);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_within_a_window() {
        assert_eq!(most_within(&mut [], 1000), 0);
        assert_eq!(most_within(&mut [5], 1000), 1);
        assert_eq!(most_within(&mut [2500, 1000, 0, 999, 10], 1000), 3);
        assert_eq!(most_within(&mut [0, 1000, 2000], 1000), 1);
    }
}
