//! The run report: built from the database (so `report` shows the same thing
//! later), rendered as readable text or as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::Exit;
use serde::Serialize;

use crate::store::{FailureReason, ImportCounts, JobState, RequestKind, RunFacts};
use crate::text::{count, escape};

/// How many failure reasons the report lists, and examples per reason.
const TOP_REASONS: usize = 5;
const EXAMPLES: usize = 3;

/// Everything a person or a monitor wants to know about one run.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub(crate) struct Report {
    pub run_id: i64,
    pub command: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub duration_secs: Option<f64>,
    /// `None` while the run has not finished (or its process was killed).
    #[serde(rename = "exit_code")]
    pub exit: Option<Exit>,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
    pub imported: Option<ImportCounts>,
    /// Final state of every job this run touched.
    pub jobs: BTreeMap<String, i64>,
    /// How the succeeded jobs got their group: created, existing, recovered.
    pub obtained: BTreeMap<String, i64>,
    pub requests: Requests,
    pub latency_ms: Option<Latency>,
    /// The most common reasons rows did not succeed.
    pub top_failures: Vec<FailureGroup>,
    /// Further reasons, beyond those listed.
    #[serde(default)]
    pub more_reasons: usize,
    /// Rows not imported because their key was taken by different data.
    pub conflicts: usize,
    /// `retry-failed`: how many jobs its filters put back to pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requeued: Option<u64>,
    /// Jobs of earlier runs not done when this one finished (failed, unknown,
    /// invalid, pending), database-wide: what is left to do.
    #[serde(default)]
    pub backlog: BTreeMap<String, i64>,
    /// Groups of this run that have no share id (yet): nothing to hand the customer.
    #[serde(default)]
    pub no_share_id: i64,
    /// How long jobs cleared by a check waited for their create to leave (the
    /// window a check exists to close), when this run checked any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_to_create: Option<crate::engine::Gaps>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub(crate) struct Requests {
    pub total: i64,
    pub creates: i64,
    /// Existence checks: order lookups, lists of orders and group fetches.
    pub checks: i64,
    /// Of the checks, `GET /orders?search=` lists (each for up to 25 orders).
    #[serde(default)]
    pub lists: i64,
    /// Exchanges that failed transiently and were retried (or gave up on).
    pub transient_failures: i64,
    pub by_class: BTreeMap<String, i64>,
    /// Requests per second over the sending window.
    pub rate_per_sec: f64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub(crate) struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub(crate) struct FailureGroup {
    pub state: String,
    pub reason: String,
    pub count: usize,
    /// Row keys or line numbers, to find them.
    pub examples: Vec<String>,
}

impl Report {
    /// Builds the report from the stored facts of a run.
    pub(crate) fn from_facts(f: RunFacts) -> Report {
        let jobs: BTreeMap<String, i64> = JobState::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), f.states.get(*s)))
            .collect();
        let kind = |k: RequestKind| {
            f.attempts_by_kind
                .iter()
                .find(|(n, _)| n == k.as_str())
                .map_or(0, |(_, c)| *c)
        };
        let class = |k: &str| {
            f.attempts_by_class
                .iter()
                .find(|(n, _)| n == k)
                .map_or(0, |(_, c)| *c)
        };
        let total: i64 = f.attempts_by_kind.iter().map(|(_, c)| c).sum();
        // Over the time actually spent sending: the send window less any pauses. A
        // window under 10 ms says nothing about a rate.
        let sending_ms = f
            .send_window_ms
            .map_or(0, |(a, b)| (b - a).saturating_sub(f.paused_ms.max(0)));
        let rate_per_sec = if sending_ms >= 10 {
            total as f64 / (sending_ms as f64 / 1000.0)
        } else {
            0.0
        };
        let mut failures = f.failures;
        failures.extend(f.conflicts.iter().cloned());
        let (top_failures, more_reasons) = group_failures(&failures);
        Report {
            run_id: f.run_id,
            command: f.command,
            duration_secs: duration(&f.started_at, f.finished_at.as_deref()),
            started_at: f.started_at,
            finished_at: f.finished_at,
            exit: f.exit_code.and_then(Exit::from_code),
            stopped: f.stopped,
            imported: f.imported,
            jobs,
            obtained: f.obtained.into_iter().collect(),
            requests: Requests {
                total,
                creates: kind(RequestKind::Create),
                checks: kind(RequestKind::CheckOrder)
                    + kind(RequestKind::FetchGroup)
                    + kind(RequestKind::ListOrders),
                lists: kind(RequestKind::ListOrders),
                transient_failures: class("retry") + class("ambiguous"),
                by_class: f.attempts_by_class.into_iter().collect(),
                rate_per_sec: round2(rate_per_sec),
            },
            latency_ms: latency(&f.latencies_ms),
            top_failures,
            more_reasons,
            conflicts: f.conflicts.len(),
            requeued: None,
            backlog: BTreeMap::new(),
            no_share_id: f.no_share_id,
            check_to_create: None,
        }
    }

    /// The report as pretty JSON.
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The report as text for a terminal or a log.
    pub(crate) fn to_text(&self) -> String {
        let mut out = String::new();
        self.write_headline(&mut out);
        self.write_imported(&mut out);
        self.write_jobs(&mut out);
        self.write_requests(&mut out);
        self.write_problems(&mut out);
        self.write_backlog(&mut out);
        out
    }

    /// What the run came to, in a few words, from its exit code.
    fn verdict(&self) -> String {
        let nothing = self.jobs.values().all(|n| *n == 0);
        let none_matched = nothing && self.requeued == Some(0);
        match self.exit {
            // `enqueue` sends nothing: its success is that every row is queued.
            Some(Exit::Success) if self.command == "enqueue" => {
                "every row imported, to be sent".to_owned()
            }
            Some(Exit::Success) if none_matched => "no failed job matched the filters".to_owned(),
            Some(Exit::Success) if nothing => "no job to send".to_owned(),
            Some(Exit::Success) => "every job succeeded".to_owned(),
            Some(Exit::RowsFailed) if none_matched => {
                "no failed job matched the filters, and failed jobs remain".to_owned()
            }
            Some(Exit::RowsFailed) => "some rows did not succeed (see below)".to_owned(),
            Some(Exit::StoppedByApi) => "stopped by the API".to_owned(),
            Some(Exit::Interrupted) => "interrupted".to_owned(),
            Some(e) => format!("exit {}", e.code()),
            None => "not finished".to_owned(),
        }
    }

    /// The first line (command, run, verdict, time, exit code), then why it
    /// stopped early and what `retry-failed` put back.
    fn write_headline(&self, out: &mut String) {
        let took = self
            .duration_secs
            .map(|d| format!(" in {d:.1} s"))
            .unwrap_or_default();
        let code = self
            .exit
            .map(|e| format!(", exit {}", e.code()))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "kohort-batch {} #{}: {}{took}{code}",
            self.command,
            self.run_id,
            self.verdict()
        );
        if let Some(why) = &self.stopped {
            let _ = writeln!(out, "  Stopped    {}", escape(why));
        }
        if let Some(n) = self.requeued {
            let _ = writeln!(
                out,
                "  Retried    {} matched the filters and went back to pending",
                count(n, "failed job", "failed jobs")
            );
        }
    }

    fn write_imported(&self, out: &mut String) {
        let Some(i) = &self.imported else {
            return;
        };
        let _ = writeln!(
            out,
            "  Imported   {}: {} queued, {} fixed, {} invalid, {} (not sent again), {}",
            count(i.rows, "row", "rows"),
            i.queued,
            i.fixed,
            i.invalid,
            count(i.duplicates, "duplicate", "duplicates"),
            count(i.conflicts, "conflict", "conflicts")
        );
        if i.empty > 0 {
            let _ = writeln!(
                out,
                "             {} skipped (every field empty)",
                count(i.empty, "empty line", "empty lines")
            );
        }
    }

    /// Jobs by final state, and how the succeeded ones got their group.
    fn write_jobs(&self, out: &mut String) {
        let n = |s: &str| self.jobs.get(s).copied().unwrap_or(0);
        let how: Vec<String> = self
            .obtained
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let how = if how.is_empty() {
            String::new()
        } else {
            format!(" ({})", how.join(", "))
        };
        let _ = writeln!(
            out,
            "  Jobs       succeeded {}{how} · failed {} · unknown {} · invalid {} · pending {} · in flight {}",
            n("succeeded"),
            n("failed"),
            n("unknown"),
            n("invalid"),
            n("pending"),
            n("in_flight")
        );
    }

    /// Requests, groups without a share id, and latency.
    fn write_requests(&self, out: &mut String) {
        let r = &self.requests;
        // A rate over a few milliseconds of sending says nothing: it is left out.
        let rate = if r.rate_per_sec > 0.0 {
            format!(" · {:.1} req/s", r.rate_per_sec)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  Requests   {} (creates {}, checks {}{}) · {} retried{rate}",
            r.total,
            r.creates,
            r.checks,
            match r.lists {
                0 => String::new(),
                1 => ", 1 of them a list of orders".to_owned(),
                n => format!(", {n} of them lists of orders"),
            },
            count(
                r.transient_failures.max(0) as u64,
                "transient failure",
                "transient failures"
            )
        );
        if self.no_share_id > 0 {
            let _ = writeln!(
                out,
                "  Share ids  {} no share id yet: `kohort-batch export groups --missing-share-id` lists them",
                count(self.no_share_id.max(0) as u64, "group has", "groups have")
            );
        }
        if let Some(l) = &self.latency_ms {
            let _ = writeln!(
                out,
                "  Latency    p50 {:.0} ms · p95 {:.0} ms · p99 {:.0} ms · max {:.0} ms",
                l.p50, l.p95, l.p99, l.max
            );
        }
    }

    /// The most common failure reasons, with examples.
    fn write_problems(&self, out: &mut String) {
        if self.top_failures.is_empty() {
            return;
        }
        let _ = writeln!(out, "  Problems   most common first:");
        for g in &self.top_failures {
            let _ = writeln!(out, "    {:>6} {}: {}", g.count, g.state, escape(&g.reason));
            let _ = writeln!(out, "           e.g. {}", escape(&g.examples.join(", ")));
        }
        if self.more_reasons > 0 {
            let _ = writeln!(
                out,
                "           … and {} more {}",
                self.more_reasons,
                if self.more_reasons == 1 {
                    "reason"
                } else {
                    "reasons"
                }
            );
        }
    }

    /// What earlier runs left undone, and the commands that deal with it.
    fn write_backlog(&self, out: &mut String) {
        let left: Vec<String> = ["failed", "unknown", "invalid", "pending"]
            .iter()
            .filter_map(|s| {
                let n = self.backlog.get(*s).copied().unwrap_or(0);
                (n > 0).then(|| format!("{n} {s}"))
            })
            .collect();
        if !left.is_empty() {
            let _ = writeln!(
                out,
                "  Backlog    {} remain from earlier runs: `kohort-batch export failures` lists \
                 them, `kohort-batch retry-failed` sends failed ones again",
                join_and(&left)
            );
        }
    }
}

/// `a`, `a and b`, `a, b and c`.
fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn duration(start: &str, end: Option<&str>) -> Option<f64> {
    let a: jiff::Timestamp = start.parse().ok()?;
    let b: jiff::Timestamp = end?.parse().ok()?;
    Some(round2(b.duration_since(a).as_secs_f64()))
}

fn latency(ms: &[f64]) -> Option<Latency> {
    if ms.is_empty() {
        return None;
    }
    // Microsecond resolution, three significant figures, up to an hour.
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).ok()?;
    for &v in ms {
        let us = (v * 1000.0).round().max(1.0) as u64;
        h.saturating_record(us);
    }
    let q = |p: f64| round2(h.value_at_quantile(p) as f64 / 1000.0);
    Some(Latency {
        p50: q(0.50),
        p95: q(0.95),
        p99: q(0.99),
        max: round2(h.max() as f64 / 1000.0),
    })
}

/// The reason with row-specific values (ids, numbers, quoted text) masked, so rows
/// failing the same way group together.
pub(crate) fn reason_template(reason: &str) -> String {
    let mut out = Vec::new();
    let mut in_quote = false;
    for word in reason.split(' ') {
        let starts = word.starts_with('"');
        let ends = word.ends_with('"') && (word.len() > 1 || !starts);
        if in_quote {
            if ends {
                in_quote = false;
            }
            continue;
        }
        if starts {
            out.push("\"…\"".to_owned());
            in_quote = !ends;
            continue;
        }
        let bare = word.trim_end_matches(|c| ".,;:)".contains(c));
        let is_status = bare.len() == 3 && bare.bytes().all(|b| b.is_ascii_digit());
        let has_digit = word.bytes().any(|b| b.is_ascii_digit());
        let is_id = word.contains('_') && word.bytes().any(|b| b.is_ascii_alphanumeric());
        if (has_digit || is_id) && !is_status {
            let trail: String = word
                .chars()
                .rev()
                .take_while(|c| ".,;:)".contains(*c))
                .collect();
            out.push(format!("…{}", trail.chars().rev().collect::<String>()));
        } else {
            out.push(word.to_owned());
        }
    }
    out.join(" ")
}

/// The most common failure reasons (at most [`TOP_REASONS`]), and how many more there are.
fn group_failures(rows: &[FailureReason]) -> (Vec<FailureGroup>, usize) {
    let mut groups: Vec<FailureGroup> = Vec::new();
    let mut index: BTreeMap<(String, String), usize> = BTreeMap::new();
    for row in rows {
        let template = reason_template(&row.reason);
        let at = *index
            .entry((row.state.clone(), template))
            .or_insert_with(|| {
                groups.push(FailureGroup {
                    state: row.state.clone(),
                    reason: row.reason.clone(),
                    count: 0,
                    examples: Vec::new(),
                });
                groups.len() - 1
            });
        let g = &mut groups[at];
        g.count += 1;
        if g.examples.len() < EXAMPLES {
            g.examples.push(match (&row.key, row.line) {
                (Some(k), Some(l)) => format!("{k} ({} line {l})", row.source),
                (None, Some(l)) => format!("{} line {l}", row.source),
                (Some(k), None) => k.clone(),
                (None, None) => row.source.clone(),
            });
        }
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.count));
    let more = groups.len().saturating_sub(TOP_REASONS);
    groups.truncate(TOP_REASONS);
    (groups, more)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StateCounts;

    fn facts() -> RunFacts {
        let fail = |state: &str, key: Option<&str>, line, reason: &str| FailureReason {
            state: state.into(),
            key: key.map(Into::into),
            source: "orders.csv".into(),
            line: Some(line),
            reason: reason.into(),
        };
        RunFacts {
            run_id: 7,
            command: "run".into(),
            started_at: "2026-11-24T08:00:00.000000Z".into(),
            finished_at: Some("2026-11-24T08:00:12.500000Z".into()),
            exit_code: Some(1),
            stopped: None,
            paused_ms: 0,
            no_share_id: 0,
            imported: Some(ImportCounts {
                rows: 210,
                queued: 203,
                fixed: 0,
                duplicates: 1,
                conflicts: 1,
                invalid: 5,
                empty: 0,
            }),
            states: StateCounts::from([
                (JobState::Succeeded, 200),
                (JobState::Failed, 3),
                (JobState::Invalid, 5),
            ]),
            obtained: vec![("created".into(), 197), ("existing".into(), 3)],
            attempts_by_kind: vec![("check_order".into(), 203), ("create".into(), 205)],
            attempts_by_class: vec![
                ("ok".into(), 400),
                ("ambiguous".into(), 5),
                ("definitive".into(), 3),
            ],
            latencies_ms: (1..=100).map(f64::from).collect(),
            send_window_ms: Some((0, 10_000)),
            failures: vec![
                fail(
                    "failed",
                    Some("ord_9"),
                    10,
                    "HTTP 404: Customer cus_unknown_9 not found.",
                ),
                fail(
                    "failed",
                    Some("ord_12"),
                    13,
                    "HTTP 404: Customer cus_unknown_12 not found.",
                ),
                fail(
                    "failed",
                    Some("ord_40"),
                    41,
                    "HTTP 400: customerId must be a string",
                ),
                fail(
                    "invalid",
                    None,
                    20,
                    "customerId is empty: every row needs the KohortPay customer id",
                ),
            ],
            conflicts: vec![fail(
                "conflict",
                Some("ord_3"),
                30,
                "key ord_3 was already imported",
            )],
        }
    }

    #[test]
    fn the_rate_counts_only_the_time_spent_sending() {
        // 408 requests in a 10 s window, 8 s of which were a Retry-After pause.
        let mut f = facts();
        f.paused_ms = 8_000;
        assert_eq!(Report::from_facts(f).requests.rate_per_sec, 204.0);
        // A window of a few milliseconds gives no rate at all, not thousands per second.
        let mut f = facts();
        f.send_window_ms = Some((0, 3));
        let r = Report::from_facts(f);
        assert_eq!(r.requests.rate_per_sec, 0.0);
        assert!(!r.to_text().contains("req/s"));
    }

    #[test]
    fn text_report_snapshot() {
        insta::assert_snapshot!(Report::from_facts(facts()).to_text());
    }

    #[test]
    fn json_report_snapshot() {
        insta::assert_snapshot!(Report::from_facts(facts()).to_json());
    }

    #[test]
    fn an_import_that_went_well_does_not_claim_jobs_succeeded() {
        let f = RunFacts {
            command: "enqueue".into(),
            exit_code: Some(0),
            states: StateCounts::from([(JobState::Pending, 3)]),
            ..facts()
        };
        let text = Report::from_facts(f).to_text();
        assert!(
            text.starts_with("kohort-batch enqueue #7: every row imported, to be sent"),
            "{text}"
        );
    }

    #[test]
    fn templates_group_rows_that_fail_alike() {
        assert_eq!(
            reason_template("HTTP 404: Customer cus_unknown_9 not found."),
            reason_template("HTTP 404: Customer cus_x2 not found.")
        );
        assert_ne!(
            reason_template("HTTP 404: Customer cus_1 not found."),
            reason_template("HTTP 400: Customer cus_1 not found.")
        );
        assert_eq!(
            reason_template("metadata \"a b c\" bad"),
            "metadata \"…\" bad"
        );
    }
}
