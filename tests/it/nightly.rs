//! The nightly service as operators see it: reports that stay true, monitoring that
//! alerts, logs a machine can read, and a retry that says what it matched.

use std::os::unix::fs::PermissionsExt;

use kohort_batch::sandbox::SandboxConfig;

use crate::util::*;

/// Runs `cmd` with the test key; returns (exit code, stdout, stderr).
async fn kb(cmd: Cmd) -> (Option<i32>, String, String) {
    let out = cmd.key(KEY).output().await;
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runs_report_is_what_was_printed_whatever_later_runs_do() {
    // Three rows fail for good (unknown customers), two are invalid, the rest pass.
    let mut text = csv_rows(10);
    for i in 11..=13 {
        text.push_str(&format!("cus_unknown_{i},ord_{i:05},it\n"));
    }
    text.push_str(",ord_00014,it\n,ord_00015,it\n");
    let s = Scene::new(SandboxConfig::default(), &text).await;
    let first_json = s.path("first.json");
    let (code, printed, _) = kb(s.bin_run().flag("--report-json", &first_json)).await;
    assert_eq!(code, Some(1), "{printed}");
    // Two later runs touch the same rows: a fix of the invalid ones, and a retry.
    let fixes = s.write(
        "fix.csv",
        "customerId,orderId,metadata.batch\ncus_14,ord_00014,it\ncus_15,ord_00015,it\n",
    );
    let (code, fixed, _) = kb(s.bin_run().set("--csv", &fixes)).await;
    assert_eq!(code, Some(0), "{fixed}");
    assert!(
        fixed.contains("Backlog    3 failed remain from earlier runs"),
        "{fixed}"
    );
    let (code, second, _) = kb(s.bin_retry_failed()).await;
    assert_eq!(code, Some(1));
    assert!(
        second.contains("Retried    3 failed jobs matched the filters"),
        "{second}"
    );
    // run 1, as printed then, as JSON and as text.
    let (_, again, _) = kb(s.report(&["--run", "1", "--format", "json"])).await;
    let then: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&first_json).unwrap()).unwrap();
    let now: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(then, now);
    let (_, text_now, _) = kb(s.report(&["--run", "1"])).await;
    assert_eq!(text_now, printed);
    // The list keeps run 1's count of jobs too.
    let (_, list, _) = kb(s.report(&["--format", "json"])).await;
    let runs: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    let first = runs.iter().find(|r| r["run_id"] == 1).unwrap();
    assert_eq!(first["jobs"], 15, "{first}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_report_shows_what_is_left_and_a_retry_says_what_it_matched() {
    let mut text = csv_rows(3);
    text.push_str("cus_unknown_9,ord_00009,it\n");
    let s = Scene::new(SandboxConfig::default(), &text).await;
    let (code, _, _) = kb(s.bin_run()).await;
    assert_eq!(code, Some(1));
    // Re-importing the same file: the failed row is still failed; not "every job succeeded".
    let (code, again, _) = kb(s.bin_run()).await;
    assert_eq!(code, Some(1), "{again}");
    assert!(!again.contains("every job succeeded"), "{again}");
    assert!(again.contains("ord_00009"), "{again}");
    // A new night with nothing new: the backlog is shown, with the command to see it.
    let (code, empty, _) = kb(s.bin_run_queue()).await;
    assert_eq!(code, Some(0), "{empty}");
    assert!(
        empty.contains("Backlog    1 failed remain from earlier runs")
            && empty.contains("kohort-batch export failures"),
        "{empty}"
    );
    // A filter that matches nothing: said, and exit 1 while failures remain.
    let (code, none, _) = kb(s.bin_retry_failed().args(["--status", "503"])).await;
    assert_eq!(code, Some(1), "{none}");
    assert!(
        none.contains("Retried    0 failed jobs matched the filters")
            && none.contains("no failed job matched the filters"),
        "{none}"
    );
    // A class that does not exist is a typo, not an empty match.
    let (code, _, err) = kb(s.bin_retry_failed().args(["--class", "retries_exausted"])).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("retries_exhausted, order_not_found"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn more_reasons_than_listed_are_counted() {
    // Eight different reasons.
    let text = "customerId,orderId,expiresAt,midExpireAt,metadata\n\
                ,ord_1,,,\n\
                cus_2,,,,\n\
                cus_3,ord_3,x,,\n\
                cus_4,ord_4,2020-01-01T00:00:00Z,,\n\
                cus_5,ord_5,,,{bad\n\
                cus_6,ord_6,,,[1]\n\
                cus_8,ord_8,,,,extra\n\
                cus_9,ord_9,,tomorrow,\n";
    let s = Scene::new(SandboxConfig::default(), text).await;
    let (code, out, _) = kb(s.bin_run()).await;
    assert_eq!(code, Some(1));
    assert!(out.contains("           … and 3 more reasons\n"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_written_by_every_run_readable_and_with_the_backlog() {
    let mut text = csv_rows(3);
    text.push_str("cus_unknown_9,ord_00009,it\n");
    let s = Scene::new(SandboxConfig::default(), &text).await;
    let metrics = s.path("kb.prom");
    let (code, _, _) = kb(s.bin_run().flag("--metrics-file", &metrics)).await;
    assert_eq!(code, Some(1));
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        text.contains("kohort_batch_last_run_exit_code 1\n"),
        "{text}"
    );
    assert!(
        text.contains("kohort_batch_last_run_finished_timestamp_seconds "),
        "{text}"
    );
    assert!(
        text.contains("kohort_batch_jobs{state=\"failed\"} 1\n"),
        "{text}"
    );
    assert_eq!(
        std::fs::metadata(&metrics).unwrap().permissions().mode() & 0o777,
        0o644
    );
    // A run stopped by the API (a revoked key) still writes them, with its code.
    let out = s
        .bin_run()
        .flag("--metrics-file", &metrics)
        .key("sk_test_revoked_1")
        .output()
        .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "nothing was left to send: the backlog is the failed row"
    );
    // A run that could not start (the database held by another): exit 5 in the file.
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kohort_batch::store::lock_path(&s.db))
        .unwrap();
    holder.try_lock().unwrap();
    let (code, _, _) = kb(s.bin_run_queue().flag("--metrics-file", &metrics)).await;
    assert_eq!(code, Some(5));
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        text.contains("kohort_batch_last_run_exit_code 5\n"),
        "{text}"
    );
    drop(holder);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_end_with_one_run_finished_event_and_rows_name_their_run_and_file() {
    let mut text = csv_rows(2);
    text.push_str("cus_unknown_9,ord_00009,it\n,ord_00010,it\n");
    let s = Scene::new(SandboxConfig::default(), &text).await;
    let (code, _, err) = kb(s.bin_run().args(["--log-format", "json"])).await;
    assert_eq!(code, Some(1));
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let finished: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "run finished")
        .collect();
    assert_eq!(finished.len(), 1, "{err}");
    let f = finished[0];
    assert_eq!(f["level"], "INFO");
    assert_eq!(
        (f["run"].as_i64(), f["exit_code"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        (
            f["succeeded"].as_i64(),
            f["failed"].as_i64(),
            f["invalid"].as_i64()
        ),
        (Some(2), Some(1), Some(1))
    );
    assert!(f["duration_secs"].as_f64().is_some() && f["command"] == "run");
    let source = s.csv.display().to_string();
    for message in ["row failed", "invalid row"] {
        let row = lines.iter().find(|l| l["message"] == message).unwrap();
        assert_eq!(row["run"], 1, "{row}");
        assert_eq!(row["source"], source.as_str(), "{row}");
    }
}
