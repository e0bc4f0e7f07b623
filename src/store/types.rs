//! The values that cross the store boundary: jobs, attempts, groups and state changes.

use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;

pub use crate::job::Group as GroupRec;
use crate::job::SendBody;

/// A job's state (`docs/design.md#job-states`); [`Transition`] lists the changes
/// between states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    InFlight,
    Succeeded,
    Failed,
    Unknown,
    Invalid,
}

impl JobState {
    /// Every state, in report order.
    pub const ALL: [JobState; 6] = [
        JobState::Succeeded,
        JobState::Failed,
        JobState::Unknown,
        JobState::Invalid,
        JobState::Pending,
        JobState::InFlight,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::InFlight => "in_flight",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Unknown => "unknown",
            JobState::Invalid => "invalid",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Its place in [`JobState::ALL`].
    fn index(self) -> usize {
        JobState::ALL
            .iter()
            .position(|s| *s == self)
            .unwrap_or_default()
    }
}

/// Jobs counted by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts([i64; JobState::ALL.len()]);

impl StateCounts {
    /// How many jobs are in `state`.
    pub fn get(&self, state: JobState) -> i64 {
        self.0[state.index()]
    }

    /// Counts one more job in `state`.
    pub fn add(&mut self, state: JobState, n: i64) {
        self.0[state.index()] += n;
    }

    /// The states with at least one job, in report order.
    pub fn listed(&self) -> impl Iterator<Item = (JobState, i64)> + '_ {
        JobState::ALL
            .into_iter()
            .map(|s| (s, self.get(s)))
            .filter(|(_, n)| *n > 0)
    }
}

impl<const N: usize> From<[(JobState, i64); N]> for StateCounts {
    fn from(counts: [(JobState, i64); N]) -> Self {
        let mut c = StateCounts::default();
        for (s, n) in counts {
            c.add(s, n);
        }
        c
    }
}

/// How a succeeded job got its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Obtained {
    /// This worker's `POST /groups` created it.
    Created,
    /// The order already had a group before anything was sent.
    Existing,
    /// An ambiguous create (timeout, 5xx, crash) had in fact created it.
    Recovered,
}

impl Obtained {
    /// Every way, in report order.
    pub const ALL: [Obtained; 3] = [Obtained::Created, Obtained::Existing, Obtained::Recovered];

    pub fn as_str(self) -> &'static str {
        match self {
            Obtained::Created => "created",
            Obtained::Existing => "existing",
            Obtained::Recovered => "recovered",
        }
    }
}

/// Which request an attempt was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Create,
    CheckOrder,
    FetchGroup,
    /// A `GET /orders?search=` list that checked this job among others.
    ListOrders,
}

impl RequestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Create => "create",
            RequestKind::CheckOrder => "check_order",
            RequestKind::FetchGroup => "fetch_group",
            RequestKind::ListOrders => "list_orders",
        }
    }
}

/// A job as the engine sees it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub key: String,
    /// The `POST /groups` body.
    pub body: SendBody,
    /// HTTP exchanges over all runs.
    pub attempts: u32,
    /// `POST /groups` requests sent over all runs.
    pub creates: u32,
    /// A group may exist: check before any create.
    pub needs_check: bool,
    /// Unix milliseconds before which nothing may be sent for this job.
    pub next_attempt_at: Option<i64>,
    pub line: Option<i64>,
    /// The input it came from: a file name, `<stdin>` or `inbox`.
    pub source: std::sync::Arc<str>,
}

/// One HTTP exchange.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub kind: RequestKind,
    pub started_at: Timestamp,
    pub latency: Duration,
    pub status: Option<u16>,
    pub class: crate::api::Class,
    pub error: Option<String>,
    /// For a list request: the run's number for it, shared by the jobs it checked.
    pub batch: Option<i64>,
}

impl Attempt {
    /// The attempt a reply records (no `batch`: one job's own request).
    pub(crate) fn of<T>(kind: RequestKind, reply: &crate::api::Reply<T>) -> Attempt {
        Attempt {
            kind,
            started_at: reply.started_at,
            latency: reply.latency,
            status: reply.status,
            class: reply.class,
            error: reply.error.clone(),
            batch: None,
        }
    }
}

/// A job's state change, written in the same transaction as its attempt.
#[derive(Debug, Clone)]
pub enum Transition {
    /// The attempt changes nothing (e.g. a check that found no group yet).
    Keep,
    /// A create is about to leave: written and committed before it does. If the job
    /// is later found still in flight, it is checked no earlier than `check_after`
    /// (unix ms): the server may still be working on the request.
    InFlight {
        check_after: i64,
        /// False when a create already marked is marked again with a later
        /// `check_after` (it waited long for its request slot): not a new create.
        new_create: bool,
    },
    /// A create marked in flight that never left (the run stopped while it waited
    /// for a request slot): pending again, as it was.
    Unsent,
    Succeeded {
        obtained: Obtained,
        group: GroupRec,
    },
    Failed {
        reason: String,
        class: FailureClass,
    },
    Unknown {
        reason: String,
    },
    /// Back to pending: retry at `next_attempt_at`; `needs_check` if a group may exist.
    Pending {
        next_attempt_at: Option<i64>,
        needs_check: bool,
        reason: Option<String>,
    },
}

impl Transition {
    /// The change's name, for log lines.
    pub fn name(&self) -> &'static str {
        match self {
            Transition::Keep => "attempt",
            Transition::InFlight { .. } => "in_flight",
            Transition::Unsent => "unsent",
            Transition::Succeeded { .. } => "succeeded",
            Transition::Failed { .. } => "failed",
            Transition::Unknown { .. } => "unknown",
            Transition::Pending { .. } => "pending",
        }
    }
}

/// What one import batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ImportCounts {
    /// Data rows read.
    pub rows: u64,
    /// New jobs queued to send.
    pub queued: u64,
    /// Rows that replaced an earlier invalid or failed version of the same key.
    pub fixed: u64,
    /// Rows identical to a job already in the database (not sent again).
    pub duplicates: u64,
    /// Rows whose key is already used by a different payload (not sent).
    pub conflicts: u64,
    /// Rows that failed validation.
    pub invalid: u64,
    /// Rows whose every field is empty (what spreadsheets leave at the end), skipped.
    #[serde(default)]
    pub empty: u64,
}

impl ImportCounts {
    /// These counts added to the totals `stored` (a run's `imported`, as JSON; none
    /// or unreadable: zero), as the JSON to store.
    pub(super) fn added_to(self, stored: Option<&str>) -> String {
        let mut total: ImportCounts = stored
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        total += self;
        serde_json::to_string(&total).unwrap_or_default()
    }
}

impl std::ops::AddAssign for ImportCounts {
    fn add_assign(&mut self, o: Self) {
        self.rows += o.rows;
        self.queued += o.queued;
        self.fixed += o.fixed;
        self.duplicates += o.duplicates;
        self.conflicts += o.conflicts;
        self.invalid += o.invalid;
        self.empty += o.empty;
    }
}

/// Why a job failed, as stored in `jobs.error_class` (and chosen by `retry-failed
/// --class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// The order the row names does not exist in KohortPay.
    OrderNotFound,
    /// Every attempt of the run failed transiently (or the outcome stayed unknown).
    RetriesExhausted,
    /// The API rejected the row with this 4xx status.
    Http(u16),
}

impl FailureClass {
    /// Parses a stored or typed name: `order_not_found`, `retries_exhausted`, `http_NNN`
    /// with a 4xx status.
    pub fn parse(s: &str) -> Option<FailureClass> {
        match s {
            "order_not_found" => Some(FailureClass::OrderNotFound),
            "retries_exhausted" => Some(FailureClass::RetriesExhausted),
            _ => {
                let digits = s.strip_prefix("http_")?;
                let status: u16 = digits.parse().ok()?;
                (digits.len() == 3 && (400..500).contains(&status))
                    .then_some(FailureClass::Http(status))
            }
        }
    }
}

impl Serialize for FailureClass {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureClass::OrderNotFound => f.write_str("order_not_found"),
            FailureClass::RetriesExhausted => f.write_str("retries_exhausted"),
            FailureClass::Http(status) => write!(f, "http_{status}"),
        }
    }
}
