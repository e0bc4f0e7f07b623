//! What every worker shares: the store, the API, the gate, the stop switch, and
//! what one reply means for the whole run (pause, breaker, stop), decided once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::desk::Desk;
use super::{Control, EngineConfig, Pacer, StopReason};
use crate::api::{ApiClient, Class, Reply};
use crate::error::Result;
use crate::store::{Attempt, Job, Store, Transition};

/// Everything a worker needs to see a job through.
#[derive(Debug)]
pub(crate) struct Ctx {
    /// The run's span, for the log lines about jobs.
    pub span: tracing::Span,
    pub store: Store,
    pub api: ApiClient,
    pub pacer: Pacer,
    pub cfg: EngineConfig,
    pub control: Arc<Control>,
    pub run_id: i64,
    /// Jobs left alone because a newer run claimed them (see [`Store::record`]).
    pub claims_lost: AtomicU64,
    /// Where existence checks are gathered into lists.
    pub desk: Arc<Desk>,
    /// Milliseconds from a check that cleared a job to its create leaving.
    pub check_gaps: Mutex<Histogram<u64>>,
}

/// What one reply means for the run as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunVerdict {
    /// Stop the run, for this reason.
    pub stop: Option<String>,
    /// Hold every request this long (a `Retry-After` on this status).
    pub pause: Option<(Duration, u16)>,
    /// The reply suggests the API is down (counts towards the breaker); otherwise
    /// it shows the API is up.
    pub outage: bool,
}

/// Reads one reply's class, status and `Retry-After` for the run: a refused key or
/// a redirect stops it, a `Retry-After` on a 429 or 503 pauses it (or stops it when
/// longer than `max_pause`), and no response or a 5xx counts as an outage.
pub(crate) fn verdict<T>(reply: &Reply<T>, max_pause: Duration) -> RunVerdict {
    let mut stop = (reply.class == Class::Stop).then(|| stop_message(reply));
    let mut pause = None;
    if let (Some(wait), Some(status @ (429 | 503))) = (reply.retry_after, reply.status) {
        if wait > max_pause {
            let after = crate::text::local_time_after(wait);
            let capped = wait >= crate::api::RETRY_AFTER_CAP;
            stop.get_or_insert(format!(
                "the API asked to wait {}{} (HTTP {status} with Retry-After), longer than \
                 --max-pause {}; no row was failed: run again after {after}",
                if capped { "at least " } else { "" },
                crate::text::human(wait),
                crate::text::human(max_pause)
            ));
        } else {
            pause = Some((wait, status));
        }
    }
    let outage = matches!(reply.class, Class::Retry | Class::Ambiguous)
        && reply.status.is_none_or(|s| s >= 500);
    RunVerdict {
        stop,
        pause,
        outage,
    }
}

/// Why a reply of the `Stop` class stops the run, and what to do.
fn stop_message<T>(reply: &Reply<T>) -> String {
    let reason = reply.error.as_deref().unwrap_or_default();
    match reply.status {
        // No answer at all, yet every request would fail alike (an untrusted
        // certificate): the reason says what to do.
        None => format!("{reason}; no row was failed"),
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

impl Ctx {
    /// Records an attempt and a state change of `job`; false (and counted) when the
    /// job is no longer this run's (another run claimed it since): leave it be.
    pub(crate) async fn record(
        &self,
        job: &Job,
        attempt: Option<Attempt>,
        t: Transition,
    ) -> Result<bool> {
        let applied = self.store.record(self.run_id, job.id, attempt, t).await?;
        if !applied {
            self.claims_lost.fetch_add(1, Ordering::Relaxed);
        }
        Ok(applied)
    }

    /// Notes how long a cleared job waited for its create to leave.
    pub(crate) fn note_check_gap(&self, gap: Duration) {
        let ms = u64::try_from(gap.as_millis()).unwrap_or(u64::MAX);
        let mut h = self.check_gaps.lock().unwrap_or_else(|e| e.into_inner());
        h.saturating_record(ms);
    }

    /// Stops the run, logging in the run's span.
    pub(crate) fn stop(&self, reason: StopReason) {
        let _in_run = self.span.enter();
        self.control.stop(reason);
    }

    /// Sends one request through the gate (cap, rate, pause) and feeds its reply to
    /// the pause and the breaker. `None`: the run stopped before it could start.
    pub(crate) async fn paced<T>(
        &self,
        request: impl Future<Output = Reply<T>>,
    ) -> Option<Reply<T>> {
        self.paced_for(1, request).await
    }

    /// As [`Ctx::paced`], for a request made for `jobs` jobs at once (a list of
    /// orders): its failure counts towards the breaker once per job, as the requests
    /// it stands for would have.
    pub(crate) async fn paced_for<T>(
        &self,
        jobs: usize,
        request: impl Future<Output = Reply<T>>,
    ) -> Option<Reply<T>> {
        let permit = self.pacer.admit(&self.control.stop).await?;
        let reply = request.await;
        self.observe_for(jobs, &reply);
        drop(permit);
        Some(reply)
    }

    /// Sleeps unless the run stops first; false if it stopped.
    pub(crate) async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            // `sleep` caps a huge duration instead of overflowing an Instant.
            () = tokio::time::sleep(d) => true,
            () = self.control.stop.cancelled() => false,
        }
    }

    /// Acts on what one reply means for the run ([`verdict`]): called before the
    /// request's slot is given back, so a stop or pause holds the next request already.
    pub(crate) fn observe<T>(&self, reply: &Reply<T>) {
        self.observe_for(1, reply);
    }

    fn observe_for<T>(&self, jobs: usize, reply: &Reply<T>) {
        let verdict = verdict(reply, self.cfg.max_pause);
        if let Some(reason) = verdict.stop {
            self.stop(StopReason::Api(reason));
        }
        if let Some((wait, status)) = verdict.pause {
            self.pacer
                .pause_for(wait, &format!("HTTP {status} with Retry-After"));
        }
        if !verdict.outage {
            self.pacer.note_healthy();
        } else if self.pacer.note_outage_failures(jobs) {
            self.stop(StopReason::Api(format!(
                "the API looks unavailable: the last {} requests failed (a list of orders \
                 counts once for each order it asked about; last: {}); pending rows stay \
                 pending for the next run",
                self.cfg.breaker_threshold,
                reply.error.as_deref().unwrap_or("no response")
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(class: Class, status: Option<u16>, retry_after: Option<u64>) -> Reply<()> {
        Reply {
            class,
            status,
            started_at: jiff::Timestamp::UNIX_EPOCH,
            latency: Duration::ZERO,
            retry_after: retry_after.map(Duration::from_secs),
            error: Some("boom".into()),
            value: None,
        }
    }

    #[test]
    fn each_reply_means_one_thing_for_the_run() {
        let max = Duration::from_secs(300);
        let v = |class, status, ra| verdict(&reply(class, status, ra), max);
        // Up, nothing to do.
        assert_eq!(
            v(Class::Ok, Some(201), None),
            RunVerdict {
                stop: None,
                pause: None,
                outage: false
            }
        );
        assert!(!v(Class::Definitive, Some(422), None).outage);
        assert!(
            !v(Class::Ambiguous, Some(200), None).outage,
            "a bad 2xx body is no outage"
        );
        // Outages: no response, any 5xx.
        assert!(v(Class::Retry, None, None).outage);
        assert!(v(Class::Ambiguous, None, None).outage);
        assert!(v(Class::Ambiguous, Some(502), None).outage);
        assert!(!v(Class::Retry, Some(429), None).outage);
        // Pauses: Retry-After on a 429 or a 503 only.
        assert_eq!(
            v(Class::Retry, Some(429), Some(7)).pause,
            Some((Duration::from_secs(7), 429))
        );
        assert_eq!(
            v(Class::Ambiguous, Some(503), Some(7)).pause,
            Some((Duration::from_secs(7), 503))
        );
        assert_eq!(v(Class::Ambiguous, Some(500), Some(7)).pause, None);
        // Stops: the key, a redirect, a pause longer than allowed.
        let key = v(Class::Stop, Some(401), None);
        assert!(key.stop.unwrap().contains("rejected the key"));
        assert!(
            v(Class::Stop, Some(302), None)
                .stop
                .unwrap()
                .contains("redirect")
        );
        let long = v(Class::Retry, Some(429), Some(301));
        assert_eq!(long.pause, None);
        assert!(long.stop.unwrap().contains("longer than --max-pause 5m"));
    }
}
