//! Exactly once beyond one process: the run lock the kernel holds, jobs claimed by
//! their run, and input that cannot silently lose or merge rows.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kohort_batch::api::ApiClient;
use kohort_batch::engine::{self, Control};
use kohort_batch::sandbox::SandboxConfig;
use kohort_batch::store::Store;

use crate::util::*;

/// A `run` of the real binary in the background, slow enough to be caught sending.
fn slow_run(s: &Scene) -> std::process::Child {
    s.bin_run()
        .args(["--rate", "0", "--concurrency", "1"])
        .command()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until the lock file names a holder (the first run is past its start).
async fn wait_for_holder(db: &std::path::Path) -> String {
    let lock = kohort_batch::store::lock_path(db);
    for _ in 0..400 {
        if let Ok(text) = std::fs::read_to_string(&lock)
            && text.contains("pid")
        {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the first run never took the lock");
}

/// Whether this machine lets us start a process in a new PID namespace.
fn unshare_works() -> bool {
    Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_run_exits_5_even_from_another_pid_namespace_and_producers_still_write() {
    let s = Scene::new(slow(200), &csv_rows(40)).await;
    let mut first = slow_run(&s);
    let holder = wait_for_holder(&s.db).await;
    assert!(holder.contains(&format!("pid {}", first.id())), "{holder}");

    // Same namespace: run and retry-failed both exit 5, naming the holder.
    for second in [s.bin_run_queue(), s.bin_retry_failed()] {
        let cmd = second.argv()[0].clone();
        let out = second.output().await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{cmd}: {err}");
        assert!(err.contains(&format!("pid {}", first.id())), "{err}");
    }
    // Another PID namespace cannot see the holder's pid; the kernel's lock holds anyway.
    if unshare_works() {
        let mut unshared = s
            .bin_run_queue()
            .wrapped("unshare", &["--pid", "--fork", "--mount-proc"]);
        let out = tokio::task::spawn_blocking(move || unshared.output().unwrap())
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{err}");
        assert!(err.contains("in use by another kohort-batch run"), "{err}");
    } else {
        println!("skipped the PID-namespace case: unshare --pid is refused on this machine");
    }
    // A producer inserts while the run holds the lock, and is not blocked by it.
    let conn = rusqlite::Connection::open(&s.db).unwrap();
    conn.busy_timeout(Duration::from_secs(60)).unwrap();
    conn.execute(
        "INSERT INTO inbox (customer_id, order_id) VALUES ('cus_p', 'ord_p')",
        [],
    )
    .unwrap();
    drop(conn);

    first.kill().unwrap(); // SIGKILL: the kernel drops the lock with the process
    first.wait().unwrap();
    // A lock row naming a live, unrelated process (a reused pid) blocks nothing.
    let conn = rusqlite::Connection::open(&s.db).unwrap();
    conn.execute("UPDATE lock SET pid = ?1", [i64::from(std::process::id())])
        .unwrap();
    drop(conn);
    let out = s.bin_run_queue().args(["--rate", "0"]).output().await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let mut all = orders(40);
    all.push("ord_p".into());
    assert_one_group_each(&s.sb, all);
    // The killed run's report says how it ended.
    let out = s.report(&["--run", "1"]).output().await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("the process ended before the run finished"),
        "{text}"
    );
}

/// Two engines on one database with the run lock bypassed (as a broken lock would
/// leave them): the claims keep every order to one group, by the sandbox's count,
/// and the older run's sends of jobs the newer one took over are refused.
#[tokio::test(flavor = "multi_thread")]
async fn two_engines_without_the_lock_never_duplicate() {
    const N: usize = 300;
    let latency = Duration::from_millis(5);
    let s = Scene::new(
        SandboxConfig {
            latency: (latency, latency),
            lost_response: 0.1,
            seed: 5,
            ..SandboxConfig::default()
        },
        &csv_rows(N),
    )
    .await;
    assert_eq!(
        kohort_batch::commands::enqueue(&s.db.clone().into(), std::slice::from_ref(&s.csv))
            .await
            .unwrap(),
        kohort_batch::Exit::Success
    );
    let engine = |rate: f64| {
        let mut a = s.args();
        a.rate = rate;
        let cfg = s.config(&a);
        let db = s.db.clone();
        async move {
            let store = Store::open(&db).unwrap();
            // Not exclusive: no run lock, as if it had failed.
            let run = store.begin_run("run", "{}".into(), false).await.unwrap();
            let api = ApiClient::new(&cfg.api_base, &cfg.key, cfg.timeout, None).unwrap();
            let control = Arc::new(Control::default());
            let drained = engine::drain(store.clone(), api, cfg.engine, control, run, None)
                .await
                .unwrap();
            store.close().await;
            drained
        }
    };
    // The first engine is slow; the second starts once the first is sending.
    let first = tokio::spawn(engine(100.0));
    let mut waited = 0;
    while s.sb.stats(false).groups_total < 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
        assert!(waited < 1_500, "the first engine never sent");
    }
    let second = tokio::spawn(engine(0.0)).await.unwrap();
    let first = first.await.unwrap();
    assert!(
        first.claims_lost > 0,
        "the first engine's sends of taken-over jobs were not refused"
    );
    assert_eq!(second.claims_lost, 0);
    assert_one_group_each(&s.sb, orders(N));
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM jobs WHERE state = 'succeeded'"),
        N as i64
    );
    assert_eq!(count(&s.db, "SELECT count(*) FROM groups"), N as i64);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unclosed_quote_makes_the_row_invalid_and_sends_nothing_of_it() {
    let s = Scene::new(
        SandboxConfig::default(),
        "customerId,orderId\ncus_1,ord_1\ncus_2,\"ord_2\ncus_3,ord_3\n",
    )
    .await;
    let out = s.validate().output().await;
    let text = all_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("line 3") && text.contains("check for an unclosed quote on line 3"),
        "{text}"
    );
    let out = s.run_bin(&[]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Only ord_1 got a group; no order id with a line break was ever sent.
    let stats = s.sb.stats(true);
    let per = stats.groups_per_key.unwrap();
    assert_eq!(per.keys().collect::<Vec<_>>(), ["ord_1"]);
    // The swallowed row is in the record, for export failures.
    let out = s.export("failures", &[]).output().await;
    let exported = String::from_utf8_lossy(&out.stdout);
    assert!(exported.contains("cus_3,ord_3"), "{exported}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stray_quote_in_metadata_is_reported_not_merged() {
    let text = "customerId,orderId,metadata.note\n\
                cus_1,ord_1,\"oops\n\
                cus_2,ord_2,fine\n\
                cus_3,ord_3,end\"\n\
                cus_4,ord_4,fine\n";
    let s = Scene::new(SandboxConfig::default(), text).await;
    let out = s.validate().output().await;
    let all = all_text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("metadata.note is a quoted field that begins on line 2")
            && all.contains("unclosed quote"),
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_columns_for_one_field_stop_before_anything_is_imported() {
    for (header, named) in [
        (
            "customerId,orderId,orderId",
            "columns 2 (\"orderId\") and 3 (\"orderId\")",
        ),
        (
            "customerId,Order ID,Customer ID",
            "columns 1 (\"customerId\") and 3 (\"Customer ID\")",
        ),
        (
            "customerId,order_id,orderId",
            "columns 2 (\"order_id\") and 3 (\"orderId\")",
        ),
    ] {
        let s = Scene::new(
            SandboxConfig::default(),
            &format!("{header}\ncus_1,ord_1,9999\n"),
        )
        .await;
        for cmd in [s.validate().key(KEY), s.bin_run()] {
            let out = cmd.output().await;
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{header}: {err}");
            assert!(err.contains(named) && err.contains("line 1"), "{err}");
        }
        assert_eq!(s.sb.stats(false).groups_total, 0);
        if s.db.exists() {
            assert_eq!(count(&s.db, "SELECT count(*) FROM jobs"), 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn conflicting_rows_from_a_csv_and_the_inbox_are_kept_and_exported() {
    let s = Scene::new(
        SandboxConfig::default(),
        "customerId,orderId,metadata.campaign\ncus_1,ord_1,spring\ncus_2,ord_2,spring\n",
    )
    .await;
    let run = |csv: &std::path::Path| {
        s.bin_run_queue()
            .args(["--rate", "0"])
            .flag("--csv", csv)
            .output()
    };
    assert_eq!(run(&s.csv).await.status.code(), Some(0));
    // The same orders with other data: line 3 of a second file, and inbox row 1.
    let other = s.write(
        "other.csv",
        "customerId,orderId,metadata.campaign\ncus_1,ord_1,spring\ncus_9,ord_2,autumn\n",
    );
    let conn = rusqlite::Connection::open(&s.db).unwrap();
    conn.execute(
        "INSERT INTO inbox (customer_id, order_id, metadata) VALUES ('cus_8', 'ord_1', '{\"x\":1}')",
        [],
    )
    .unwrap();
    drop(conn);
    let out = run(&other).await;
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains("ord_2 (") && report.contains("other.csv line 3"),
        "{report}"
    );
    assert!(report.contains("ord_1 (inbox line 1)"), "{report}");

    let out = s.export("failures", &["--format", "json"]).output().await;
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let conflicts: Vec<_> = rows.iter().filter(|r| r["state"] == "conflict").collect();
    assert_eq!(conflicts.len(), 2, "{rows:#?}");
    let csv_row = conflicts.iter().find(|r| r["orderId"] == "ord_2").unwrap();
    assert_eq!(csv_row["customerId"], "cus_9");
    assert_eq!(csv_row["metadata.campaign"], "autumn");
    assert_eq!(csv_row["line"], "3");
    assert!(csv_row["source"].as_str().unwrap().ends_with("other.csv"));
    let inbox_row = conflicts.iter().find(|r| r["orderId"] == "ord_1").unwrap();
    assert_eq!(inbox_row["customerId"], "cus_8");
    assert_eq!(inbox_row["metadata"], "{\"x\":1}");
    assert_eq!(inbox_row["source"], "inbox");
    assert_eq!(inbox_row["line"], "1");
    // Nothing of the conflicting data was sent.
    assert_one_group_each(&s.sb, ["ord_1".to_owned(), "ord_2".to_owned()]);
}
