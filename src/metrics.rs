//! The metrics file: a run's figures in Prometheus text format, for node_exporter's
//! textfile collector. Written whole and renamed into place, so a scrape never
//! sees half a file.

use std::fmt::Write as _;

use crate::Exit;
use crate::report::Report;

/// What the metrics file says about the run that just ended, whatever its exit.
#[derive(Debug)]
pub(crate) struct Finished<'a> {
    pub exit: Exit,
    /// Unix time.
    pub finished_at: f64,
    /// The run's report, when it got as far as one.
    pub report: Option<&'a Report>,
    /// Jobs in the whole database by state, when the database could be read.
    pub backlog: &'a [(String, i64)],
    /// When the newest run that exited 0 finished (unix time), if one did.
    pub last_success: Option<f64>,
    /// Groups in the database without a share id, when the database could be read.
    pub groups_without_share_id: Option<i64>,
}

impl<'a> Finished<'a> {
    /// A run that finished with a report.
    pub(crate) fn of(
        report: &'a Report,
        backlog: &'a [(String, i64)],
        last_success: Option<f64>,
    ) -> Self {
        let finished_at = report
            .finished_at
            .as_deref()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .unwrap_or_else(jiff::Timestamp::now);
        Finished {
            exit: report.exit.unwrap_or(Exit::Internal),
            finished_at: finished_at.as_millisecond() as f64 / 1000.0,
            report: Some(report),
            backlog,
            last_success,
            groups_without_share_id: None,
        }
    }

    /// A run that ended before it had a report (a held lock, a refusing database).
    pub(crate) fn early(exit: Exit) -> Self {
        Finished {
            exit,
            finished_at: jiff::Timestamp::now().as_millisecond() as f64 / 1000.0,
            report: None,
            backlog: &[],
            last_success: None,
            groups_without_share_id: None,
        }
    }
}

/// Renders the metrics of a finished run in Prometheus text format.
pub(crate) fn render(f: &Finished<'_>) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP kohort_batch_{name} {help}");
        let _ = writeln!(out, "# TYPE kohort_batch_{name} gauge");
        for (labels, value) in samples {
            let _ = writeln!(out, "kohort_batch_{name}{labels} {value}");
        }
    };
    metric(
        "last_run_finished_timestamp_seconds",
        "When the last run finished, whatever its exit code (unix time).",
        &[(String::new(), f.finished_at)],
    );
    metric(
        "last_run_exit_code",
        "Exit code of the last run (0 all succeeded, 1 some rows did not, 3 stopped by the \
         API, 4 signal, 5 locked, 2 configuration, 70 bug, 74 database or disk).",
        &[(String::new(), f64::from(f.exit.code()))],
    );
    if let Some(t) = f.last_success {
        metric(
            "last_success_timestamp_seconds",
            "When the newest run that exited 0 finished (unix time).",
            &[(String::new(), t)],
        );
    }
    if !f.backlog.is_empty() {
        let jobs: Vec<(String, f64)> = f
            .backlog
            .iter()
            .map(|(state, n)| (format!("{{state=\"{state}\"}}"), *n as f64))
            .collect();
        metric(
            "jobs",
            "Jobs in the whole database by state, after the last run (what is left to do).",
            &jobs,
        );
    }
    if let Some(n) = f.groups_without_share_id {
        metric(
            "groups_without_share_id",
            "Groups in the database with no share id (nothing to hand the customer yet).",
            &[(String::new(), n as f64)],
        );
    }
    let Some(report) = f.report else {
        return out;
    };
    let jobs: Vec<(String, f64)> = report
        .jobs
        .iter()
        .map(|(state, n)| (format!("{{state=\"{state}\"}}"), *n as f64))
        .collect();
    metric(
        "last_run_jobs",
        "Jobs the last run touched, by final state.",
        &jobs,
    );
    let r = &report.requests;
    metric(
        "last_run_requests",
        "HTTP requests of the last run, by kind.",
        &[
            ("{kind=\"create\"}".to_owned(), r.creates as f64),
            ("{kind=\"check\"}".to_owned(), r.checks as f64),
        ],
    );
    metric(
        "last_run_retries",
        "Requests of the last run that failed transiently and were retried.",
        &[(String::new(), r.transient_failures as f64)],
    );
    metric(
        "last_run_duration_seconds",
        "Wall-clock duration of the last run.",
        &[(String::new(), report.duration_secs.unwrap_or(0.0))],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition format, line by line: comments, then `name{labels} value`.
    pub(crate) fn assert_prometheus_text(text: &str) {
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                typed.insert(parts.next().unwrap().to_owned());
                assert!(matches!(parts.next(), Some("gauge" | "counter")), "{line}");
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("value of {line}"));
            let name = series.split('{').next().unwrap();
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            assert!(typed.contains(name), "{name} has no TYPE line");
            if let Some(labels) = series.strip_prefix(name)
                && !labels.is_empty()
            {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = pair.split_once('=').unwrap();
                    assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                    assert!(v.starts_with('"') && v.ends_with('"'), "{line}");
                }
            }
        }
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn metrics_are_valid_exposition_text() {
        let report: Report = serde_json::from_str(REPORT).unwrap();
        let backlog = [("failed".to_owned(), 2), ("unknown".to_owned(), 1)];
        let text = render(&Finished::of(&report, &backlog, Some(1_790_000_000.5)));
        assert_prometheus_text(&text);
        assert!(text.contains("kohort_batch_last_run_jobs{state=\"succeeded\"} 3\n"));
        assert!(text.contains("kohort_batch_last_run_exit_code 0\n"));
        assert!(text.contains("kohort_batch_last_success_timestamp_seconds 1790000000.5\n"));
        assert!(text.contains("kohort_batch_jobs{state=\"failed\"} 2\n"));
        assert!(text.contains("kohort_batch_jobs{state=\"unknown\"} 1\n"));
        assert!(
            text.contains("kohort_batch_last_run_finished_timestamp_seconds 1795507212.5\n"),
            "{text}"
        );
    }

    #[test]
    fn a_run_that_ended_early_still_says_when_and_how() {
        let text = render(&Finished::early(Exit::Locked));
        assert_prometheus_text(&text);
        assert!(text.contains("kohort_batch_last_run_exit_code 5\n"));
        assert!(text.contains("kohort_batch_last_run_finished_timestamp_seconds "));
        assert!(!text.contains("last_run_jobs"));
    }

    const REPORT: &str = r#"{"run_id":1,"command":"run","started_at":"2026-11-24T08:00:00.000000Z",
      "finished_at":"2026-11-24T08:00:12.500000Z","duration_secs":12.5,"exit_code":0,"stopped":null,
      "imported":null,"jobs":{"failed":0,"in_flight":0,"invalid":0,"pending":0,"succeeded":3,"unknown":0},
      "obtained":{"created":3},"requests":{"total":6,"creates":3,"checks":3,"transient_failures":1,
      "by_class":{"ok":6},"rate_per_sec":1.0},"latency_ms":null,"top_failures":[],"conflicts":0}"#;
}
