//! Exactly once under faults (issue 3): the existence check, recovery of ambiguous
//! outcomes, late creates, unknown rows, and the circuit breaker. Every duplicate
//! assertion comes from the sandbox's own count of groups per order.

use std::time::Duration;

use kohort_batch::Exit;
use kohort_batch::cli::PrecheckArg;
use kohort_batch::sandbox::SandboxConfig;

use crate::util::*;

fn served(sb: &kohort_batch::sandbox::Sandbox, suffix: &str) -> u64 {
    sb.stats(false)
        .requests
        .iter()
        .filter(|(k, _)| k.ends_with(suffix))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_that_already_have_a_group_are_recorded_not_created() {
    let Scene { dir: _dir, db, csv, sb } = Scene::new(SandboxConfig::default(), "customerId,orderId\ncus_1,ord_checkout_1\ncus_2,ord_checkout_2\ncus_3,ord_3\ncus_4,ord_unknown_4\n").await;
    assert_eq!(run(&args(&sb.url()), &db, &[csv]).await, Exit::RowsFailed);
    assert_eq!(served(&sb, "POST /groups 201"), 1, "only ord_3 is created");
    assert_eq!(
        column(
            &db,
            "SELECT key || ' ' || state || ' ' || coalesce(obtained, '-') FROM jobs ORDER BY id"
        ),
        [
            "ord_checkout_1 succeeded existing",
            "ord_checkout_2 succeeded existing",
            "ord_3 succeeded created",
            "ord_unknown_4 failed -"
        ]
    );
    let why = column(&db, "SELECT error FROM jobs WHERE key = 'ord_unknown_4'");
    assert!(
        why[0].starts_with("order ord_unknown_4 was not found in KohortPay (HTTP 404"),
        "{why:?}"
    );
    assert_one_group_each(
        &sb,
        [
            "ord_checkout_1".into(),
            "ord_checkout_2".into(),
            "ord_3".into(),
        ],
    );
    // The existing group is recorded with its share id.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM groups WHERE obtained = 'existing' AND share_id LIKE 'KHT-%'"
        ),
        2
    );
}

async fn survives(
    fault: SandboxConfig,
    precheck: PrecheckArg,
    rows: usize,
) -> (
    kohort_batch::sandbox::Sandbox,
    std::path::PathBuf,
    tempfile::TempDir,
) {
    let Scene { dir, db, csv, sb } = Scene::new(fault, &csv_rows(rows)).await;
    let mut a = args(&sb.url());
    a.precheck = precheck;
    a.concurrency = 8;
    assert_eq!(run(&a, &db, &[csv]).await, Exit::Success);
    assert_one_group_each(&sb, orders(rows));
    assert_eq!(sb.stats(false).groups_total, rows as u64);
    (sb, db, dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn lost_responses_are_recovered_without_duplicates() {
    let fault = SandboxConfig {
        lost_response: 0.3,
        seed: 5,
        ..SandboxConfig::default()
    };
    let (sb, db, _dir) = survives(fault, PrecheckArg::Ambiguous, 60).await;
    let lost = served(&sb, "201 lost");
    assert!(lost > 5, "{:?}", sb.stats(false).requests);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM jobs WHERE obtained = 'recovered'"
        ) as u64,
        lost
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_2xx_bodies_are_never_resent_blindly() {
    let fault = SandboxConfig {
        truncated: 0.3,
        seed: 6,
        ..SandboxConfig::default()
    };
    let (sb, db, _dir) = survives(fault, PrecheckArg::Ambiguous, 60).await;
    let cut = served(&sb, "201 truncated");
    assert!(cut > 5);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM jobs WHERE obtained = 'recovered'"
        ) as u64,
        cut
    );
    assert!(
        count(
            &db,
            "SELECT count(*) FROM attempts WHERE status = 201 AND class = 'ambiguous' AND error LIKE '%could not be read%'"
        ) as u64
            == cut
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn resets_and_html_502s_are_checked_then_resent_once() {
    let fault = SandboxConfig {
        reset: 0.1,
        error_502_html: 0.1,
        error_500: 0.05,
        seed: 7,
        ..SandboxConfig::default()
    };
    let (sb, db, _dir) = survives(fault, PrecheckArg::Always, 60).await;
    assert!(served(&sb, "dropped") > 0);
    assert!(served(&sb, " 502") > 0);
    let html = column(
        &db,
        "SELECT DISTINCT error FROM attempts WHERE status = 502",
    );
    assert_eq!(html, ["HTTP 502: HTML error page \"Application Error\""]);
}

#[tokio::test(flavor = "multi_thread")]
async fn late_creates_are_found_after_a_settle_delay_that_outlasts_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("k.db");
    // The client gives up at 300 ms; the router answers at 400 ms; the app creates the
    // group at 800 ms. A settle of 600 ms after the answer checks at ~1,000 ms. (The
    // default, the larger of 2 × timeout and 45 s, is a config unit test: waiting it
    // out here would cost 45 s.)
    let sb = sandbox(SandboxConfig {
        late_create: 0.4,
        late_after: Duration::from_millis(400),
        seed: 8,
        ..SandboxConfig::default()
    })
    .await;
    let csv = write(dir.path(), "o.csv", &csv_rows(30));
    let mut a = args(&sb.url());
    a.timeout = "300ms".into();
    a.settle = Some("600ms".into());
    a.concurrency = 8;
    a.precheck = PrecheckArg::Ambiguous;
    assert_eq!(run(&a, &db, &[csv]).await, Exit::Success);
    assert!(
        served(&sb, "POST /groups late") > 3,
        "{:?}",
        sb.stats(false).requests
    );
    assert_one_group_each(&sb, orders(30));
    assert!(
        count(
            &db,
            "SELECT count(*) FROM jobs WHERE obtained = 'recovered'"
        ) > 3
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_that_cannot_be_checked_become_unknown_until_a_person_decides() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("k.db");
    let sb = sandbox(SandboxConfig {
        lost_response: 0.5,
        seed: 9,
        ..SandboxConfig::default()
    })
    .await;
    let mut text = String::from("customerId,paymentIntentId\n");
    for i in 1..=20 {
        text.push_str(&format!("cus_{i},pi_{i:03}\n"));
    }
    let csv = write(dir.path(), "o.csv", &text);
    let a = args(&sb.url());
    assert_eq!(run(&a, &db, &[csv]).await, Exit::RowsFailed);
    let unknown = count(&db, "SELECT count(*) FROM jobs WHERE state = 'unknown'");
    assert!(unknown > 0);
    assert_eq!(unknown as u64, served(&sb, "201 lost"));
    let why = column(
        &db,
        "SELECT error FROM jobs WHERE state = 'unknown' LIMIT 1",
    );
    assert!(why[0].contains("retry-failed --include-unknown"), "{why:?}");
    // A plain rerun does not touch them.
    let before = sb.stats(false).groups_total;
    assert_eq!(run(&a, &db, &[]).await, Exit::Success);
    assert_eq!(sb.stats(false).groups_total, before);
    assert_eq!(
        count(&db, "SELECT count(*) FROM jobs WHERE state = 'unknown'"),
        unknown
    );
    // retry-failed --include-unknown re-sends them (a person's decision: they may duplicate).
    let mut resend = args(&sb.url());
    resend.include_unknown = true;
    let control = std::sync::Arc::new(kohort_batch::engine::Control::default());
    let filter = kohort_batch::store::RetryFilter::default();
    let exit = kohort_batch::commands::retry_failed(&config(&resend, &db), filter, control)
        .await
        .unwrap();
    assert!(
        count(&db, "SELECT count(*) FROM jobs WHERE state = 'unknown'") < unknown,
        "{exit:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streak_of_5xx_opens_the_breaker_and_fails_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("k.db");
    let sb = sandbox(SandboxConfig {
        error_500: 1.0,
        ..SandboxConfig::default()
    })
    .await;
    let csv = write(dir.path(), "o.csv", &csv_rows(50));
    let mut a = args(&sb.url());
    a.breaker = 6;
    a.precheck = PrecheckArg::Ambiguous;
    assert_eq!(run(&a, &db, &[csv]).await, Exit::StoppedByApi);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM jobs WHERE state IN ('failed', 'unknown')"
        ),
        0
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM jobs WHERE state = 'pending'"),
        50
    );
    let stopped = column(&db, "SELECT stopped FROM runs");
    assert!(
        stopped[0].contains("the API looks unavailable"),
        "{stopped:?}"
    );
    assert!(count(&db, "SELECT count(*) FROM attempts") < 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_fault_at_once_still_gives_one_group_per_order() {
    let fault = SandboxConfig {
        latency: (Duration::ZERO, Duration::from_millis(10)),
        error_500: 0.03,
        error_502_html: 0.03,
        error_503: 0.03,
        error_429: 0.03,
        retry_after_secs: 0,
        reset: 0.03,
        lost_response: 0.05,
        truncated: 0.03,
        seed: 10,
        ..SandboxConfig::default()
    };
    let (_sb, db, _dir) = survives(fault, PrecheckArg::Always, 150).await;
    assert_eq!(column(&db, "PRAGMA integrity_check"), ["ok"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_pauses_every_sender_not_only_the_one_request() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("k.db");
    let sb = sandbox(SandboxConfig {
        latency: (Duration::from_millis(20), Duration::from_millis(20)),
        error_429: 0.15,
        error_503: 0.05,
        retry_after_secs: 1,
        seed: 12,
        ..SandboxConfig::default()
    })
    .await;
    let csv = write(dir.path(), "o.csv", &csv_rows(40));
    let mut a = args(&sb.url());
    a.concurrency = 6;
    a.precheck = PrecheckArg::Ambiguous;
    assert_eq!(run(&a, &db, &[csv]).await, Exit::Success);
    assert_one_group_each(&sb, orders(40));
    let rows = column(
        &db,
        "SELECT started_ms || ',' || CAST(latency_ms AS INTEGER) || ',' || coalesce(status, 0) FROM attempts ORDER BY started_ms",
    );
    let parsed: Vec<(i64, i64, &str)> = rows
        .iter()
        .map(|s| {
            let mut p = s.split(',');
            (
                p.next().unwrap().parse().unwrap(),
                p.next().unwrap().parse().unwrap(),
                p.next().unwrap(),
            )
        })
        .collect();
    let pauses: Vec<i64> = parsed
        .iter()
        .filter(|(_, _, st)| *st == "429" || *st == "503")
        .map(|(s, l, _)| s + l)
        .collect();
    assert!(pauses.len() >= 3, "{parsed:?}");
    for end in pauses {
        // No request of any job starts while the pause is on. The pause begins when
        // the worker has read and classified the reply, a little after its last byte
        // (`end`): a request admitted in between may start, so the first 150 ms are
        // not judged (a busy machine can take that long to schedule the worker).
        let inside: Vec<_> = parsed
            .iter()
            .filter(|(s, _, _)| *s > end + 150 && *s < end + 990)
            .collect();
        assert!(
            inside.is_empty(),
            "requests started during the pause after {end}: {inside:?}"
        );
    }
}
