//! The core run (issue 2): happy path, retries, Retry-After, auth stop, API
//! messages, invalid rows, reruns, and pacing — every duplicate check from the
//! sandbox's own count.

use std::time::{Duration, Instant};

use assert_cmd::Command;
use kohort_batch::Exit;
use kohort_batch::sandbox::SandboxConfig;

use crate::util::*;
use kohort_batch::cli::PrecheckArg;

#[tokio::test(flavor = "multi_thread")]
async fn happy_path_creates_one_group_per_order_and_records_it() {
    let s = Scene::new(SandboxConfig::default(), &csv_rows(40)).await;
    let mut a = s.args();
    a.report_json = Some(s.path("report.json"));
    assert_eq!(s.run(&a).await, Exit::Success);
    // The run ended with everything in the database file and an empty WAL.
    let wal = s.path("k.db-wal");
    assert_eq!(std::fs::metadata(&wal).map_or(0, |m| m.len()), 0);

    assert_one_group_each(&s.sb, orders(40));
    assert_eq!(s.sb.stats(false).groups_total, 40);
    assert_eq!(
        count(
            &s.db,
            "SELECT count(*) FROM jobs WHERE state = 'succeeded' AND obtained = 'created'"
        ),
        40
    );
    // Each group is stored with its share id and the raw JSON as received.
    assert_eq!(
        count(
            &s.db,
            "SELECT count(*) FROM groups WHERE share_id LIKE 'KHT-test-%' AND raw LIKE '{%'"
        ),
        40
    );
    // Precheck (default always): every row checked, in two lists of orders, and one
    // create per row.
    assert_eq!(
        count(
            &s.db,
            "SELECT count(*) FROM attempts WHERE kind = 'list_orders'"
        ),
        40
    );
    assert_eq!(recorded_requests(&s.db, "kind = 'list_orders'"), 2);
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM attempts WHERE kind = 'create'"),
        40
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("report.json")).unwrap()).unwrap();
    assert_eq!(report["jobs"]["succeeded"], 40);
    assert_eq!(report["exit_code"], 0);
    assert_eq!(report["requests"]["total"], 42);
    assert!(report["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_503s_are_retried_and_every_attempt_recorded() {
    let s = Scene::new(some_503s(0.3, 0, 11), &csv_rows(30)).await;
    let exit = s.run(&s.args()).await;
    let not_done = column(
        &s.db,
        "SELECT key || ': ' || state || ': ' || coalesce(error, '') FROM jobs WHERE state != 'succeeded'",
    );
    assert_eq!(exit, Exit::Success, "{not_done:?}");

    assert_one_group_each(&s.sb, orders(30));
    let stats = s.sb.stats(false);
    let served_503: u64 = stats
        .requests
        .iter()
        .filter(|(k, _)| k.ends_with(" 503"))
        .map(|(_, v)| v)
        .sum();
    assert!(served_503 > 0, "{:?}", stats.requests);
    // The worker's attempts match what the sandbox served, 503s included.
    assert_eq!(recorded_requests(&s.db, "status = 503") as u64, served_503);
    assert_eq!(
        recorded_requests(&s.db, "status = 503 AND class = 'ambiguous'") as u64,
        served_503
    );
    let total: u64 = stats.requests.values().sum();
    assert_eq!(recorded_requests(&s.db, "1") as u64, total);
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_on_429_delays_the_next_attempt() {
    let s = Scene::new(
        SandboxConfig {
            error_429: 0.5,
            retry_after_secs: 2,
            seed: 3,
            ..SandboxConfig::default()
        },
        &csv_rows(3),
    )
    .await;
    let mut a = s.args();
    a.precheck = PrecheckArg::Ambiguous;
    a.concurrency = 1;
    assert_eq!(s.run(&a).await, Exit::Success);
    assert_one_group_each(&s.sb, orders(3));

    let starts: Vec<(i64, i64, String)> = column(&s.db, "SELECT started_ms || ',' || CAST(latency_ms AS INTEGER) || ',' || coalesce(status, 0) FROM attempts ORDER BY started_ms")
        .iter()
        .map(|s| {
            let p: Vec<&str> = s.split(',').collect();
            (p[0].parse().unwrap(), p[1].parse().unwrap(), p[2].to_owned())
        })
        .collect();
    let limited: Vec<usize> = (0..starts.len())
        .filter(|&i| starts[i].2 == "429")
        .collect();
    assert!(
        !limited.is_empty(),
        "the seed must produce a 429: {starts:?}"
    );
    for i in limited {
        let (start, latency, _) = starts[i];
        let next = starts
            .get(i + 1)
            .expect("a 429 is followed by another attempt")
            .0;
        // Every sender pauses: the next request of any job waits the full Retry-After.
        assert!(
            next - (start + latency) >= 1990,
            "429 at {start}, next at {next}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_array_message_from_a_400_is_recorded_readably() {
    let s = Scene::new(
        SandboxConfig::default(),
        "customerId,orderId\ncus_reject_1,ord_1\ncus_unknown_2,ord_2\ncus_3,ord_unknown_3\ncus_4,ord_4\n",
    )
    .await;
    let mut a = s.args();
    a.precheck = PrecheckArg::Ambiguous;
    assert_eq!(s.run(&a).await, Exit::RowsFailed);
    let errors = column(
        &s.db,
        "SELECT key || ' | ' || state || ' | ' || error FROM jobs WHERE state != 'succeeded' ORDER BY key",
    );
    assert_eq!(
        errors,
        [
            "ord_1 | failed | HTTP 400: customerId cus_reject_1 is not a valid customer id; customerId must belong to this account (invalid_request_error)",
            "ord_2 | failed | HTTP 404: Customer cus_unknown_2 not found. (invalid_request_error)",
            "ord_unknown_3 | failed | HTTP 404: Object not found (invalid_request_error)",
        ]
    );
    // Permanent failures are not retried.
    assert_eq!(count(&s.db, "SELECT count(*) FROM attempts"), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_rows_are_recorded_with_line_numbers_and_never_sent() {
    let s = Scene::new(
        SandboxConfig::default(),
        "customerId,orderId,expiresAt,metadata\r\ncus_1,ord_1,,\r\n,ord_2,,\r\ncus_3,ord_3,yesterday,\r\ncus_4,ord_4,,\"[1]\"\r\ncus_5,ord_5,,\r\n",
    )
    .await;
    assert_eq!(s.run(&s.args()).await, Exit::RowsFailed);
    let invalid = column(
        &s.db,
        "SELECT line || ' ' || row_key || ': ' || error FROM jobs WHERE state = 'invalid' ORDER BY line",
    );
    assert_eq!(invalid.len(), 3, "{invalid:?}");
    assert!(
        invalid[0].starts_with("3 ord_2: customerId is empty"),
        "{invalid:?}"
    );
    assert!(
        invalid[1].starts_with("4 ord_3: expiresAt \"yesterday\" is not an RFC 3339"),
        "{invalid:?}"
    );
    assert!(
        invalid[2].starts_with("5 ord_4: metadata must be a JSON object"),
        "{invalid:?}"
    );
    assert_eq!(s.sb.stats(false).groups_total, 2);
    assert_one_group_each(&s.sb, ["ord_1".to_owned(), "ord_5".to_owned()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rerun_of_the_same_csv_sends_nothing_new() {
    let s = Scene::new(SandboxConfig::default(), &csv_rows(25)).await;
    assert_eq!(s.run(&s.args()).await, Exit::Success);
    let before: u64 = s.sb.stats(false).requests.values().sum();
    assert_eq!(s.run(&s.args()).await, Exit::Success);
    let after: u64 = s.sb.stats(false).requests.values().sum();
    assert_eq!(before, after, "the rerun sent requests");
    assert_one_group_each(&s.sb, orders(25));
    let imported = column(&s.db, "SELECT imported FROM runs ORDER BY id DESC LIMIT 1");
    let counts: serde_json::Value = serde_json::from_str(&imported[0]).unwrap();
    assert_eq!(counts["duplicates"], 25);
    assert_eq!(counts["queued"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_key_twice_is_a_duplicate_or_a_conflict() {
    let s = Scene::new(
        SandboxConfig::default(),
        "customerId,orderId\ncus_1,ord_1\ncus_1,ord_1\ncus_2,ord_1\n",
    )
    .await;
    assert_eq!(s.run(&s.args()).await, Exit::RowsFailed);
    assert_one_group_each(&s.sb, ["ord_1".to_owned()]);
    let issue = column(&s.db, "SELECT line || ': ' || reason FROM import_issues");
    assert_eq!(issue.len(), 1);
    assert!(
        issue[0].starts_with("4: key ord_1 was already imported with different data"),
        "{issue:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_cap_holds_at_the_server() {
    let s = Scene::new(
        SandboxConfig {
            latency: (Duration::from_millis(30), Duration::from_millis(30)),
            ..SandboxConfig::default()
        },
        &csv_rows(60),
    )
    .await;
    let mut a = s.args();
    a.concurrency = 3;
    assert_eq!(s.run(&a).await, Exit::Success);
    let stats = s.sb.stats(false);
    assert!(
        stats.peak_concurrency <= 3,
        "peak {}",
        stats.peak_concurrency
    );
    assert!(
        stats.peak_concurrency >= 2,
        "the cap was never reached: {}",
        stats.peak_concurrency
    );
    assert_one_group_each(&s.sb, orders(60));
}

#[tokio::test(flavor = "multi_thread")]
async fn request_starts_follow_the_rate_limit() {
    let s = Scene::new(SandboxConfig::default(), &csv_rows(30)).await;
    let mut a = s.args();
    a.rate = 20.0;
    a.concurrency = 16;
    a.precheck = PrecheckArg::Ambiguous;
    let start = Instant::now();
    assert_eq!(s.run(&a).await, Exit::Success);
    // 30 starts at 20/s, no burst: at least 29 intervals of 50 ms.
    assert!(
        start.elapsed() >= Duration::from_millis(1450),
        "{:?}",
        start.elapsed()
    );
    let stats = s.sb.stats(false);
    assert_eq!(stats.requests.values().sum::<u64>(), 30);
    assert!(
        stats.max_starts_in_one_second <= 21,
        "{}",
        stats.max_starts_in_one_second
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_401_stops_the_run_with_exit_3_and_fails_no_row() {
    let s = Scene::new(SandboxConfig::default(), &csv_rows(20)).await;
    let out = s
        .bin_run()
        .args(["--rate", "0"])
        .key("sk_test_revoked_123")
        .output()
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("the API rejected the key"), "{stdout}");
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM jobs WHERE state = 'failed'"),
        0
    );
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM jobs WHERE state = 'pending'"),
        20
    );
    assert_eq!(s.sb.stats(false).groups_total, 0);
    // A few requests raced the stop; most rows were never tried.
    assert!(recorded_requests(&s.db, "1") <= 8);
}

#[test]
fn usage_errors_exit_2_and_say_what_to_do() {
    let out = bin(
        &["run", "--api-base", "http://example.com"],
        &[("KOHORTPAY_API_KEY", "sk_test_x")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("plain http is allowed only for loopback")
    );
    let out = bin(&["run"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KOHORTPAY_API_KEY"));
    let out = bin(
        &["run", "--timeout", "soon"],
        &[("KOHORTPAY_API_KEY", "sk_test_x")],
    );
    assert_eq!(out.status.code(), Some(2));
    let out = bin(&["run", "--bogus"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let out = bin(&["run"], &[("KOHORTPAY_API_KEY", "sk_live_secret")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--live") && !err.contains("secret"), "{err}");
}

#[test]
fn demo_runs_end_to_end_and_proves_one_group_per_valid_order() {
    let s = Scene::offline("");
    let mut cmd = Command::cargo_bin("kohort-batch").unwrap();
    let out = cmd
        .arg("demo")
        .current_dir(s.dir.path())
        .env_remove("KOHORTPAY_API_KEY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Every valid row got exactly one group"),
        "{stdout}"
    );
    assert!(
        stdout.contains("0 orders with more than one group"),
        "{stdout}"
    );
}
