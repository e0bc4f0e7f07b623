//! Nightly and repair workflows (issue 4): the inbox queue under a live producer,
//! one run per database, enqueue, retry-failed after an outage, validate, report,
//! and exports with a fix-and-reimport round trip.

use std::path::Path;
use std::process::{Command, Stdio};

use kohort_batch::Exit;
use kohort_batch::commands;
use kohort_batch::sandbox::SandboxConfig;
use kohort_batch::store::{RetryFilter, Store};

use kohort_batch::cli::PrecheckArg;

use crate::util::*;

fn create_db(db: &Path) {
    drop(Store::open(db).unwrap());
}

const PRODUCER: &str = r#"
import sqlite3, sys, time
db, n, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
con = sqlite3.connect(db, timeout=60, isolation_level=None)
for i in range(1, n + 1):
    con.execute(
        "INSERT INTO inbox (customer_id, order_id, metadata) VALUES (?, ?, ?)",
        ("cus_q%d" % i, "ord_q%05d" % i, '{"source": "shop"}'),
    )
    time.sleep(delay)
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_producer_keeps_inserting_while_runs_drain_nothing_lost_or_doubled() {
    let s = Scene::new(slow(40), "").await;
    create_db(&s.db);
    let producer = Command::new("python3")
        .args(["-c", PRODUCER])
        .arg(&s.db)
        .args(["300", "0.02"])
        .stdout(Stdio::null())
        .spawn()
        .expect("python3 runs the producer");
    // The run starts once the producer is under way, with most of its rows to come.
    until("the producer's first rows", || {
        count(&s.db, "SELECT count(*) FROM inbox") >= 5
    })
    .await;
    let mut a = s.args();
    a.concurrency = 2;
    assert_eq!(s.run_queue(&a).await, Exit::Success);
    let first = count(&s.db, "SELECT count(*) FROM jobs");
    let status = tokio::task::spawn_blocking(move || {
        let mut p = producer;
        p.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "the producer failed (a locked database?)");
    // Rows that arrived after the move waited in the inbox for the next run.
    assert!(first < 300, "the first run moved {first} rows");
    assert!(count(&s.db, "SELECT count(*) FROM inbox") > 0);
    assert_eq!(s.run_queue(&a).await, Exit::Success);
    assert_eq!(count(&s.db, "SELECT count(*) FROM inbox"), 0);
    assert_eq!(
        count(
            &s.db,
            "SELECT count(*) FROM jobs j JOIN sources s ON s.id = j.source_id \
             WHERE j.state = 'succeeded' AND s.name = 'inbox'"
        ),
        300
    );
    let orders: Vec<String> = (1..=300).map(|i| format!("ord_q{i:05}")).collect();
    assert_one_group_each(&s.sb, orders);
    assert_eq!(s.sb.stats(false).groups_total, 300);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_inbox_rows_are_recorded_with_their_inbox_id() {
    let s = Scene::new(SandboxConfig::default(), "").await;
    create_db(&s.db);
    let conn = rusqlite::Connection::open(&s.db).unwrap();
    conn.execute_batch(
        "INSERT INTO inbox (customer_id, order_id) VALUES ('cus_1', 'ord_1');
         INSERT INTO inbox (customer_id, order_id, metadata) VALUES ('cus_2', 'ord_2', '[1]');
         INSERT INTO inbox (customer_id, order_id, expires_at) VALUES ('cus_3', 'ord_3', 'tomorrow');",
    )
    .unwrap();
    drop(conn);
    assert_eq!(s.run_queue(&s.args()).await, Exit::RowsFailed);
    assert_eq!(
        column(
            &s.db,
            "SELECT s.name || ' ' || j.line || ' ' || j.state FROM jobs j \
             JOIN sources s ON s.id = j.source_id ORDER BY j.id"
        ),
        ["inbox 1 succeeded", "inbox 2 invalid", "inbox 3 invalid"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn enqueue_fills_the_queue_without_sending() {
    let s = Scene::new(SandboxConfig::default(), &csv_rows(15)).await;
    assert_eq!(
        commands::enqueue(&s.db.clone().into(), std::slice::from_ref(&s.csv))
            .await
            .unwrap(),
        Exit::Success
    );
    assert_eq!(s.sb.stats(false).requests.len(), 0);
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM jobs WHERE state = 'pending'"),
        15
    );
    assert_eq!(s.run_queue(&s.args()).await, Exit::Success);
    assert_one_group_each(&s.sb, orders(15));
}

#[tokio::test(flavor = "multi_thread")]
async fn after_an_outage_retry_failed_completes_every_row_without_duplicates() {
    // The outage: most requests get a 503; some creates succeed but lose their response.
    let outage = SandboxConfig {
        error_503: 0.7,
        lost_response: 0.5,
        retry_after_secs: 0,
        seed: 21,
        ..SandboxConfig::default()
    };
    let mut text = csv_rows(40);
    text.push_str("cus_unknown_1,ord_00041,it\n");
    let s = Scene::new(outage, &text).await;
    let mut a = s.args();
    a.max_attempts = 2;
    a.breaker = 10_000;
    // Creates go out unchecked, so some are lost in the outage.
    a.precheck = PrecheckArg::Ambiguous;
    assert_eq!(s.run(&a).await, Exit::RowsFailed);
    let failed = count(
        &s.db,
        "SELECT count(*) FROM jobs WHERE state = 'failed' AND error_class = 'retries_exhausted'",
    );
    assert!(failed > 10, "the outage left only {failed} failures");
    // Some of the failed rows do have a group (lost responses): retry must find, not re-create.
    let groups_before = s.sb.stats(false).groups_total;

    s.sb.set_faults(SandboxConfig::default());
    // A filter that matches nothing sends nothing, and says failed rows remain (exit 1).
    let exit = s
        .retry_failed(
            &s.args(),
            RetryFilter {
                statuses: vec![418],
                ..RetryFilter::default()
            },
        )
        .await;
    assert_eq!(exit, Exit::RowsFailed);
    assert_eq!(s.sb.stats(false).groups_total, groups_before);
    // Only the 503s: the 404 row stays failed and is not retried.
    let filter = RetryFilter {
        statuses: vec![503],
        ..RetryFilter::default()
    };
    let pending_503 = count(
        &s.db,
        "SELECT count(*) FROM jobs WHERE state = 'failed' AND last_status = 503",
    );
    assert!(pending_503 > 0);
    s.retry_failed(&s.args(), filter).await;
    assert_eq!(
        column(&s.db, "SELECT state FROM jobs WHERE key = 'ord_00041'"),
        ["failed"]
    );
    // Then everything else (transport failures included).
    s.retry_failed(&s.args(), RetryFilter::default()).await;
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM jobs WHERE state = 'succeeded'"),
        40
    );
    assert_one_group_each(&s.sb, orders(40));
    assert!(
        count(
            &s.db,
            "SELECT count(*) FROM jobs WHERE obtained = 'recovered'"
        ) > 0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn validate_prints_bodies_and_every_invalid_row_and_writes_nothing() {
    let s = Scene::offline(
        "customerId,order_id,metadata.c\ncus_1,ord_1,x\n,ord_2,\ncus_3,ord_3,\ncus_3,ord_3,\ncus_9,ord_3,\ncus_4,,\n",
    );
    let out = s.validate().arg("--json").key(KEY).output().await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bodies: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        bodies,
        [
            serde_json::json!({"customerId": "cus_1", "orderId": "ord_1", "metadata": {"c": "x"}}),
            serde_json::json!({"customerId": "cus_3", "orderId": "ord_3"}),
        ]
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("o.csv, line 3: customerId is empty"),
        "{stderr}"
    );
    assert!(stderr.contains("line 5: duplicate of line 4"), "{stderr}");
    assert!(
        stderr.contains("line 6: key ord_3 is also on line 4 with different data"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 7: orderId and paymentIntentId are both empty"),
        "{stderr}"
    );
    assert!(
        stderr.contains("6 rows: 2 would be sent, 2 invalid, 1 duplicate, 1 conflict"),
        "{stderr}"
    );
    assert!(!s.db.exists(), "validate wrote a database");
}

#[tokio::test(flavor = "multi_thread")]
async fn report_rebuilds_a_run_from_the_database() {
    let s = Scene::new(SandboxConfig::default(), &csv_rows(5)).await;
    let mut a = s.args();
    a.report_json = Some(s.path("r.json"));
    assert_eq!(s.run(&a).await, Exit::Success);
    let at_end: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("r.json")).unwrap()).unwrap();
    let out = s
        .report(&["--last", "--format", "json"])
        .key(KEY)
        .output()
        .await;
    let later: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in [
        "jobs",
        "obtained",
        "requests",
        "imported",
        "exit_code",
        "run_id",
    ] {
        assert_eq!(at_end[field], later[field], "{field}");
    }
    let text = s.report(&["--run", "1"]).key(KEY).output().await;
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("kohort-batch run #1: every job succeeded")
    );
    let list = s.report(&[]).key(KEY).output().await;
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("run") && list.lines().nth(1).unwrap().trim_start().starts_with('1'),
        "{list}"
    );
    let missing = s.report(&["--run", "9"]).key(KEY).output().await;
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("there is no run 9"));
    let nodb = Cmd::new(&["report", "--db", "/nonexistent/x.db"])
        .key(KEY)
        .output()
        .await;
    assert_eq!(nodb.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn export_groups_lists_share_ids_per_order() {
    let s = Scene::new(
        SandboxConfig::default(),
        "customerId,orderId\ncus_1,ord_1\ncus_2,ord_checkout_2\n",
    )
    .await;
    assert_eq!(s.run(&s.args()).await, Exit::Success);
    let out = s.export("groups", &[]).key(KEY).output().await;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(
            "order_id,payment_intent_id,customer_id,group_id,share_id,status,expires_at,created_at,obtained,note"
        )
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2);
    assert!(
        rows[0].starts_with("ord_1,,cus_1,pg_")
            && rows[0].contains(",KHT-test-")
            && rows[0].ends_with(",created,"),
        "{rows:?}"
    );
    assert!(rows[1].ends_with(",existing,"), "{rows:?}");
    let out = s
        .export("groups", &["--format", "json"])
        .key(KEY)
        .output()
        .await;
    let json: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["order_id"], "ord_1");
    assert!(
        json[0]["share_id"]
            .as_str()
            .unwrap()
            .starts_with("KHT-test-")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exported_failures_fixed_in_a_spreadsheet_import_and_succeed() {
    let s = Scene::new(
        SandboxConfig::default(),
        "customer_id,order_id,expires_at,metadata.campaign\n\
         cus_1,ord_1,,spring\n\
         cus_2,ord_2,next week,spring\n\
         cus_unknown_3,ord_3,,vip\n\
         cus_4,ord_4,,\n",
    )
    .await;
    assert_eq!(s.run(&s.args()).await, Exit::RowsFailed);
    let export = s.path("failures.csv");
    let out = s
        .export("failures", &[])
        .flag("-o", &export)
        .key(KEY)
        .output()
        .await;
    assert_eq!(out.status.code(), Some(0));
    let text = std::fs::read_to_string(&export).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "customerId,orderId,paymentIntentId,expiresAt,midExpireAt,metadata,metadata.campaign,error,line,state,source"
    );
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[1].starts_with("cus_2,ord_2,,next week,,,spring,")
            && lines[1].contains(",3,invalid,"),
        "{text}"
    );
    assert!(
        lines[2]
            .starts_with("cus_unknown_3,ord_3,,,,,vip,HTTP 404: Customer cus_unknown_3 not found."),
        "{text}"
    );
    // The person fixes the two rows in a spreadsheet and feeds the file back.
    let fixed = text
        .replace("next week", "")
        .replace("cus_unknown_3", "cus_3");
    let fixed = s.write("fixed.csv", &fixed);
    let out = s
        .bin_run_queue()
        .args(["--rate", "0"])
        .flag("--csv", &fixed)
        .output()
        .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM jobs WHERE state = 'succeeded'"),
        4
    );
    assert_eq!(count(&s.db, "SELECT count(*) FROM jobs"), 4);
    assert_one_group_each(&s.sb, orders_named(&["ord_1", "ord_2", "ord_3", "ord_4"]));
    assert_eq!(
        column(&s.db, "SELECT customer_id FROM jobs WHERE key = 'ord_3'"),
        ["cus_3"]
    );
    // Nothing left to export.
    let out = s.export("failures", &[]).key(KEY).output().await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

fn orders_named(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| (*k).to_owned()).collect()
}
