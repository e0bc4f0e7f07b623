//! The exactly-once protocol of one job, as a pure state machine.
//!
//! [`Protocol::step`] takes what just happened ([`Event`]) and says what to do next
//! ([`Action`]). It does no I/O and reads no clock: the worker (`worker.rs`) carries
//! the actions out, and the tests below drive it with made-up events. The rules are
//! those of `docs/design.md#exactly-once-protocol`:
//!
//! - a row with a checkable `orderId` is checked before its first create
//!   (`--precheck always`), and after any outcome that may have created a group;
//! - a create is preceded by its in-flight mark (the worker commits it first);
//! - an ambiguous create is never followed by another create without a check in
//!   between, and that check waits out the settle delay;
//! - a row whose earlier create may have succeeded but that cannot be checked ends
//!   `unknown`, unless a person chose `--include-unknown` (`resend_unknown`);
//! - every path ends with one final record ([`Action::Finish`]) or leaves the job
//!   for the next run ([`Action::Leave`], [`Action::Release`]).

use std::time::Duration;

use super::Precheck;
use super::retry::Backoff;
use crate::job::Group;
use crate::store::{FailureClass, Obtained};

/// The settings the protocol follows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    pub precheck: Precheck,
    /// Send a row whose earlier outcome is unknown and cannot be checked.
    pub resend_unknown: bool,
    /// How long an ambiguous create may still be completed by the server.
    pub settle: Duration,
    /// Attempts per job and run, for the give-up message.
    pub max_attempts: u32,
}

/// What the job was when the run took it up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Start {
    /// The job has an `orderId` the API can be asked about.
    pub checkable: bool,
    /// An earlier create may have succeeded (ambiguous outcome, crash in flight).
    pub needs_check: bool,
    /// No create was ever sent for the job.
    pub never_sent: bool,
    /// How long until the job may be sent (its `next_attempt_at`, from now).
    pub wait: Duration,
}

/// What an existence check found.
#[derive(Debug, Clone)]
pub(crate) enum Checked {
    /// The order has this group.
    Found(Group),
    /// The order exists and has no group.
    Absent,
    /// The order does not exist: the row can never succeed as written.
    OrderMissing(String),
    /// No usable answer; try again after the hint, if the API gave one.
    Failed {
        retry_after: Option<Duration>,
        error: String,
    },
    /// Leave the job as it is: the run stops (the key refused, a signal), or the job
    /// is no longer this run's.
    Stopped,
}

/// What a create's reply said, by its class.
#[derive(Debug, Clone)]
pub(crate) enum Created {
    Ok(Group),
    /// The API rejected the row for good (a 4xx).
    Rejected {
        status: Option<u16>,
        reason: String,
    },
    /// Not processed: safe to send again.
    Retry {
        retry_after: Option<Duration>,
        error: String,
    },
    /// May have been processed: check (after the settle delay) before sending again.
    Ambiguous {
        retry_after: Option<Duration>,
        error: String,
    },
    /// The request was refused as every other would be (the key): the run stops.
    Stopped(String),
}

/// What just happened to the job.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// The job was taken up, or the last wait ended.
    Ready,
    Checked(Checked),
    Created(Created),
    /// The group fetched again after a create without a share id (the group as
    /// created when the fetch showed nothing better).
    Refetched(Group),
}

/// How a job ends in this run.
#[derive(Debug, Clone)]
pub(crate) enum Final {
    Succeeded { obtained: Obtained, group: Group },
    Failed { reason: String, class: FailureClass },
    Unknown { reason: String },
}

/// What to do next.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    /// Wait, then [`Event::Ready`].
    Wait(Duration),
    /// Ask whether the order has a group, then [`Event::Checked`]; `recheck` when an
    /// earlier create may have made one (such checks go first).
    Check { recheck: bool },
    /// Mark the job in flight (committed), send `POST /groups`, then [`Event::Created`].
    Create,
    /// Record the job pending until `after` from now (`needs_check` if a group may
    /// exist), wait that long, then [`Event::Ready`].
    Retry {
        after: Duration,
        needs_check: bool,
        reason: String,
    },
    /// Record the create and fetch its group again for the share id, then
    /// [`Event::Refetched`].
    Refetch(Group),
    /// The final record.
    Finish(Final),
    /// The run stops: the job stays as it is for the next run.
    Leave,
    /// The run stops and this create was refused unprocessed: pending again, with
    /// the reason, nothing to check.
    Release(String),
}

/// One job's protocol state.
#[derive(Debug)]
pub(crate) struct Protocol<J> {
    rules: Rules,
    checkable: bool,
    /// A group may exist: check before any create.
    needs_check: bool,
    /// A check found no group, and nothing was sent since that could have made one.
    checked_clean: bool,
    never_sent: bool,
    /// The wait before the first step, taken once.
    wait: Option<Duration>,
    last_error: String,
    backoff: Backoff<J>,
}

impl<J: FnMut() -> f64> Protocol<J> {
    pub(crate) fn new(rules: Rules, start: Start, backoff: Backoff<J>) -> Self {
        Protocol {
            rules,
            checkable: start.checkable,
            needs_check: start.needs_check,
            checked_clean: false,
            never_sent: start.never_sent,
            wait: (!start.wait.is_zero()).then_some(start.wait),
            last_error: String::new(),
            backoff,
        }
    }

    /// The next action after `event`.
    pub(crate) fn step(&mut self, event: Event) -> Action {
        match event {
            Event::Ready => match self.wait.take() {
                Some(wait) => Action::Wait(wait),
                None => self.next_request(),
            },
            Event::Checked(checked) => self.on_checked(checked),
            Event::Created(created) => self.on_created(created),
            Event::Refetched(group) => Action::Finish(Final::Succeeded {
                obtained: Obtained::Created,
                group,
            }),
        }
    }

    /// Check, create, or give up on a row that can be neither.
    fn next_request(&mut self) -> Action {
        if self.needs_check && !self.checkable && !self.rules.resend_unknown {
            let earlier = if self.last_error.is_empty() {
                "interrupted mid-request"
            } else {
                &self.last_error
            };
            return Action::Finish(Final::Unknown {
                reason: format!(
                    "the outcome of an earlier create is unknown ({earlier}) and this row has \
                     no orderId (or also a paymentIntentId), so the API cannot be asked whether \
                     its group exists; check in the KohortPay dashboard, then `retry-failed \
                     --include-unknown` to send it again"
                ),
            });
        }
        let precheck_due =
            self.rules.precheck == Precheck::Always && self.never_sent && !self.checked_clean;
        if self.checkable && (self.needs_check || precheck_due) {
            Action::Check {
                recheck: self.needs_check,
            }
        } else {
            Action::Create
        }
    }

    fn on_checked(&mut self, checked: Checked) -> Action {
        match checked {
            Checked::Found(group) => {
                let obtained = if self.needs_check {
                    Obtained::Recovered
                } else {
                    Obtained::Existing
                };
                Action::Finish(Final::Succeeded { obtained, group })
            }
            Checked::Absent => {
                self.needs_check = false;
                self.checked_clean = true;
                self.next_request()
            }
            Checked::OrderMissing(reason) => Action::Finish(Final::Failed {
                reason,
                class: FailureClass::OrderNotFound,
            }),
            Checked::Failed { retry_after, error } => {
                self.last_error = error;
                match self.backoff.next() {
                    Some(delay) => {
                        self.wait = Some(retry_after.unwrap_or(delay));
                        self.step(Event::Ready)
                    }
                    None => self.give_up(),
                }
            }
            Checked::Stopped => Action::Leave,
        }
    }

    fn on_created(&mut self, created: Created) -> Action {
        // Whatever came back, a create was sent: no precheck is due any more.
        self.never_sent = false;
        self.checked_clean = false;
        let (retry_after, error, ambiguous) = match created {
            Created::Ok(group) if group.share_id.is_none() && !group.id.is_empty() => {
                return Action::Refetch(group);
            }
            Created::Ok(group) => {
                return Action::Finish(Final::Succeeded {
                    obtained: Obtained::Created,
                    group,
                });
            }
            Created::Rejected { status, reason } => {
                return Action::Finish(Final::Failed {
                    reason,
                    class: FailureClass::Http(status.unwrap_or(0)),
                });
            }
            Created::Stopped(reason) => return Action::Release(reason),
            Created::Retry { retry_after, error } => (retry_after, error, false),
            Created::Ambiguous { retry_after, error } => (retry_after, error, true),
        };
        // The server may still create the group late: let it settle, then check.
        self.needs_check |= ambiguous;
        self.last_error = error;
        let Some(delay) = self.backoff.next() else {
            return self.give_up();
        };
        let mut after = retry_after.unwrap_or(delay);
        if ambiguous {
            after = after.max(self.rules.settle);
        }
        Action::Retry {
            after,
            needs_check: self.needs_check,
            reason: self.last_error.clone(),
        }
    }

    fn give_up(&self) -> Action {
        let note = if self.needs_check {
            " (a group may exist: retry-failed checks before sending again)"
        } else {
            ""
        };
        Action::Finish(Final::Failed {
            reason: format!(
                "gave up after {} attempts; last error: {}{note}",
                self.rules.max_attempts, self.last_error
            ),
            class: FailureClass::RetriesExhausted,
        })
    }
}

#[cfg(test)]
mod tests;
