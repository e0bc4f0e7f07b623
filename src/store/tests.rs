use std::collections::BTreeMap;
use std::path::PathBuf;

use rusqlite::Connection;

use super::*;
use crate::job::Payload;
use crate::source::ImportRow;
/// The SQLite backend itself: these tests reach into its connection.
use handle::Sqlite as Store;

fn rows(from: u64, n: u64) -> Vec<ImportRow> {
    (from..from + n)
        .map(|i| {
            let payload = Payload {
                customer_id: format!("cus_{i:08}"),
                order_id: Some(format!("ord_{i:08}")),
                payment_intent_id: None,
                expires_at: None,
                mid_expire_at: None,
                metadata: None,
            };
            ImportRow::new(
                i + 1,
                Some(format!("ord_{i:08}")),
                Ok(payload),
                BTreeMap::new(),
            )
        })
        .collect()
}

/// A fresh store in a temporary directory (kept alive by the returned guard), with
/// the path of its database file.
fn fresh() -> (tempfile::TempDir, PathBuf, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.db");
    let store = Store::open_with(&path, Access::Write, DEFAULT_BUSY_TIMEOUT).unwrap();
    (dir, path, store)
}

/// Begins an `enqueue` run (no lock); returns its id.
async fn enqueue_run(store: &Store) -> i64 {
    let run = store.begin_run("enqueue", "{}".into(), false);
    run.await.unwrap()
}

/// Waits up to 20 s for `done`, which is about the database thread or the
/// checkpointer catching up; panics with `what` if it does not happen.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "still not so after 20 s: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Chunks of rows take one statement; rows whose key is taken (inside the chunk,
/// or by an earlier import) must still come out as duplicates, conflicts or fixes,
/// exactly as one statement per row would have it.
#[tokio::test(flavor = "multi_thread")]
async fn chunked_imports_sort_out_taken_keys_row_by_row() {
    let (_dir, _, store) = fresh();
    let run = enqueue_run(&store).await;
    // Earlier: ord 50 as it will be re-imported, and ord 60, which then failed.
    let earlier = rows(50, 1).into_iter().chain(rows(60, 1)).collect();
    store.import(run, "a.csv".into(), earlier).await.unwrap();
    store
        .call(|c| {
            c.execute(
                "UPDATE jobs SET state = 'failed' WHERE key = 'ord_00000060'",
                [],
            )
        })
        .await
        .unwrap();
    // 300 rows (three full chunks): ord 0..300, except that row 120 repeats row 10
    // exactly, row 130 reuses row 20's key with another customer, and row 60 is
    // a fixed version of the failed job (another customer).
    let mut batch = rows(0, 300);
    batch[120] = rows(10, 1).remove(0);
    batch[120].line = 121;
    let mut other = rows(20, 1).remove(0);
    other.line = 131;
    if let Ok(p) = &mut other.outcome {
        p.customer_id = "cus_other".into();
    }
    batch[130] = other;
    if let Ok(p) = &mut batch[60].outcome {
        p.customer_id = "cus_fixed".into();
    }
    let (counts, _) = store.import(run, "b.csv".into(), batch).await.unwrap();
    assert_eq!(
        counts,
        ImportCounts {
            rows: 300,
            queued: 296, // 300 - 50 (already there) - 60 (fixed) - 120 - 130
            fixed: 1,
            duplicates: 2, // 50, 120
            conflicts: 1,  // 130
            invalid: 0,
            empty: 0,
        }
    );
    let facts: Vec<(String, String, i64)> = store
        .call(|c| {
            c.prepare(
                "SELECT key, state || ' ' || customer_id, line FROM jobs \
                 WHERE key IN ('ord_00000010', 'ord_00000020', 'ord_00000060', 'ord_00000120', \
                 'ord_00000130') ORDER BY key",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect()
        })
        .await
        .unwrap();
    assert_eq!(
        facts,
        [
            ("ord_00000010".into(), "pending cus_00000010".into(), 11),
            ("ord_00000020".into(), "pending cus_00000020".into(), 21),
            ("ord_00000060".into(), "pending cus_fixed".into(), 61),
        ]
    );
    let total: i64 = store
        .call(|c| c.query_row("SELECT count(*) FROM jobs", [], |r| r.get(0)))
        .await
        .unwrap();
    assert_eq!(total, 298); // 0..300 without 120 and 130
}

/// Once invalid rows with keys exist, valid rows still go in a chunk at a time,
/// and a row that fixes an invalid one takes its place (no second job).
#[tokio::test(flavor = "multi_thread")]
async fn fixes_of_invalid_rows_replace_them_on_every_path() {
    let (_dir, _, store) = fresh();
    let run = enqueue_run(&store).await;
    let invalid = |i: u64| {
        ImportRow::new(
            i + 1,
            Some(format!("ord_{i:08}")),
            Err("customerId is empty".into()),
            BTreeMap::from([("orderId".to_owned(), format!("ord_{i:08}"))]),
        )
    };
    // ord 5 (fixed below in a full chunk) and ord 250 (fixed row by row).
    store
        .import(run, "a.csv".into(), vec![invalid(5), invalid(250)])
        .await
        .unwrap();
    let ids_before: Vec<i64> = store
        .call(|c| {
            c.prepare("SELECT id FROM jobs ORDER BY id")?
                .query_map([], |r| r.get(0))?
                .collect()
        })
        .await
        .unwrap();
    // 0..200 in two full chunks, then 200..260 with an invalid row at 230 (the
    // rest of that chunk goes row by row).
    let mut batch = rows(0, 260);
    batch[230] = invalid(230);
    let (counts, _) = store.import(run, "b.csv".into(), batch).await.unwrap();
    assert_eq!(
        (counts.rows, counts.queued, counts.fixed, counts.invalid),
        (260, 257, 2, 1)
    );
    let facts: Vec<(i64, String)> = store
        .call(|c| {
            c.prepare(
                "SELECT id, state FROM jobs WHERE key IN ('ord_00000005', 'ord_00000250') \
                 ORDER BY id",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect()
        })
        .await
        .unwrap();
    // The fixes took the invalid jobs' places.
    assert_eq!(
        facts,
        ids_before
            .iter()
            .map(|id| (*id, "pending".to_owned()))
            .collect::<Vec<_>>()
    );
    let total: i64 = store
        .call(|c| c.query_row("SELECT count(*) FROM jobs", [], |r| r.get(0)))
        .await
        .unwrap();
    assert_eq!(total, 260); // 259 valid + the invalid row 230
}

#[tokio::test(flavor = "multi_thread")]
async fn run_facts_count_attempts_by_kind_and_class_and_span_the_send_window() {
    let (_dir, _, store) = fresh();
    let run = store.begin_run("run", "{}".into(), true).await.unwrap();
    store.import(run, "t.csv".into(), rows(0, 3)).await.unwrap();
    let at = |ms: i64| jiff::Timestamp::from_millisecond(1_800_000_000_000 + ms).unwrap();
    use crate::api::Class;
    let attempts = [
        (1, RequestKind::CheckOrder, 0, 5.0, Class::Ok, None),
        (1, RequestKind::Create, 10, 7.9, Class::Retry, None),
        (2, RequestKind::Create, 20, 3.0, Class::Ok, None),
        (3, RequestKind::Create, 30, 40.6, Class::Ok, None),
        (3, RequestKind::FetchGroup, 5, 1.0, Class::Retry, None),
        // One list request that checked jobs 2 and 3: one request.
        (2, RequestKind::ListOrders, 1, 2.0, Class::Ok, Some(1)),
        (3, RequestKind::ListOrders, 1, 2.0, Class::Ok, Some(1)),
    ];
    for (job, kind, start, latency, class, batch) in attempts {
        let attempt = Attempt {
            kind,
            started_at: at(start),
            latency: std::time::Duration::try_from_secs_f64(latency / 1000.0).unwrap(),
            status: Some(200),
            class,
            error: None,
            batch,
        };
        store
            .record(run, job, Some(attempt), Transition::Keep)
            .await
            .unwrap();
    }
    let facts = store.run_facts(run).await.unwrap().unwrap();
    let owned = |v: &[(&str, i64)]| -> Vec<(String, i64)> {
        v.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect()
    };
    assert_eq!(
        facts.attempts_by_kind,
        owned(&[
            ("check_order", 1),
            ("create", 3),
            ("fetch_group", 1),
            ("list_orders", 1)
        ])
    );
    assert_eq!(facts.attempts_by_class, owned(&[("ok", 4), ("retry", 2)]));
    // First start 0 ms; last end 30 + 40 (whole milliseconds) = 70 ms.
    let (first, last) = facts.send_window_ms.unwrap();
    assert_eq!(last - first, 70);
    let mut latencies = facts.latencies_ms.clone();
    latencies.sort_by(f64::total_cmp);
    assert_eq!(latencies.len(), 6);
    assert!((latencies[5] - 40.6).abs() < 1e-9, "{latencies:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_run_list_counts_each_runs_jobs() {
    let (_dir, _, store) = fresh();
    let first = enqueue_run(&store).await;
    store
        .import(first, "a.csv".into(), rows(0, 5))
        .await
        .unwrap();
    let second = enqueue_run(&store).await;
    store
        .import(second, "b.csv".into(), rows(5, 3))
        .await
        .unwrap();
    store
        .call(|c| c.execute("UPDATE jobs SET state = 'succeeded' WHERE id IN (1, 7)", []))
        .await
        .unwrap();
    let _empty = enqueue_run(&store).await;
    let listed: Vec<(i64, i64, i64)> = store
        .list_runs(10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.run_id, r.jobs, r.succeeded))
        .collect();
    assert_eq!(listed, [(3, 0, 0), (second, 3, 1), (first, 5, 1)]);
    // The oldest listed run bounds what is counted.
    let newest_two: Vec<i64> = store
        .list_runs(2)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.jobs)
        .collect();
    assert_eq!(newest_two, [0, 3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_command_leaves_nothing_behind_and_the_store_goes_on() {
    let (_dir, _, store) = fresh();
    let half_done = store
        .call(|c| {
            c.execute("INSERT INTO sources (name) VALUES ('half')", [])?;
            c.execute("INSERT INTO no_such_table VALUES (1)", [])
        })
        .await;
    let err = half_done.unwrap_err().to_string();
    assert!(err.contains("no_such_table"), "{err}");
    store
        .call(|c| c.execute("INSERT INTO sources (name) VALUES ('whole')", []))
        .await
        .unwrap();
    let names: Vec<String> = store
        .call(|c| {
            c.prepare("SELECT name FROM sources ORDER BY id")?
                .query_map([], |r| r.get(0))?
                .collect()
        })
        .await
        .unwrap();
    assert_eq!(names, ["whole"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn last_records_are_written_without_waiting_and_a_failure_stops_the_store() {
    let (_dir, _, store) = fresh();
    let run = store.begin_run("run", "{}".into(), true).await.unwrap();
    store.import(run, "t.csv".into(), rows(0, 4)).await.unwrap();
    assert_eq!(store.claim_pending(run, 0, 10).await.unwrap().len(), 4);
    let succeeded = |id: &str| Transition::Succeeded {
        obtained: Obtained::Created,
        group: crate::job::Group {
            id: id.into(),
            raw: format!(r#"{{"id":"{id}"}}"#),
            ..Default::default()
        },
    };
    // Two records wait in the outbox; an awaited call's transaction writes them.
    store.record_last(run, 1, None, succeeded("pg_1")).unwrap();
    store.record_last(run, 2, None, succeeded("pg_2")).unwrap();
    let states = || async {
        store
            .call(|c| {
                c.prepare("SELECT state FROM jobs ORDER BY id")?
                    .query_map([], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await
            .unwrap()
    };
    assert_eq!(
        states().await,
        ["succeeded", "succeeded", "pending", "pending"]
    );
    // With no other call, the owner wakes for the outbox by itself.
    store.record_last(run, 3, None, succeeded("pg_3")).unwrap();
    eventually("three groups", || {
        let n: i64 = rusqlite::Connection::open(store.path())
            .unwrap()
            .query_row("SELECT count(*) FROM groups", [], |r| r.get(0))
            .unwrap();
        n == 3
    });
    // A last record that cannot be written makes every later call fail.
    store
        .call(|c| c.execute_batch("DROP TABLE groups"))
        .await
        .unwrap();
    store.record_last(run, 4, None, succeeded("pg_9")).unwrap();
    let err = store.flush().await.unwrap_err().to_string();
    assert!(err.contains("not saved") && err.contains("groups"), "{err}");
    assert!(store.record_last(run, 2, None, succeeded("pg_8")).is_err());
    assert!(store.run_facts(run).await.is_err());
}

/// Payloads with every optional field present or not, text that needs escaping,
/// and metadata of any shape.
fn arb_payloads() -> impl proptest::strategy::Strategy<Value = Vec<Payload>> {
    use proptest::prelude::*;
    let text = "[a-zA-Z0-9_ \"\\\\/\u{e9}\u{1F600}\n\t\u{1}]{0,12}";
    let value = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        text.prop_map(serde_json::Value::String),
        proptest::collection::vec(text, 0..3).prop_map(serde_json::Value::from),
    ];
    let metadata = proptest::option::of(
        proptest::collection::btree_map(text, value, 0..4)
            .prop_map(|m| m.into_iter().collect::<serde_json::Map<_, _>>()),
    );
    let payload = (
        text,
        proptest::option::of(text),
        proptest::option::of(text),
        proptest::option::of(text),
        metadata,
    )
        .prop_map(
            |(customer_id, payment_intent_id, expires_at, mid_expire_at, metadata)| Payload {
                customer_id,
                order_id: None,
                payment_intent_id,
                expires_at,
                mid_expire_at,
                metadata,
            },
        );
    (proptest::collection::vec((payload, any::<bool>()), 1..40)).prop_map(|list| {
        list.into_iter()
            .enumerate()
            .map(|(i, (mut p, with_order))| {
                // Unique keys, so that every row becomes a job.
                if with_order || p.payment_intent_id.is_none() {
                    p.order_id = Some(format!("ord_{i}"));
                } else {
                    p.payment_intent_id = Some(format!("pi_{i}"));
                }
                p
            })
            .collect()
    })
}

#[test]
fn bodies_read_back_as_the_payload_serializes_them() {
    use proptest::prelude::*;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut runner =
        proptest::test_runner::TestRunner::new(proptest::test_runner::Config::with_cases(24));
    runner
        .run(&arb_payloads(), |payloads| {
            let (_dir, _, store) = fresh();
            let rows: Vec<ImportRow> = payloads
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    ImportRow::new(
                        i as u64 + 2,
                        Some(p.key().to_owned()),
                        Ok(p.clone()),
                        BTreeMap::new(),
                    )
                })
                .collect();
            let jobs = runtime.block_on(async {
                let run = enqueue_run(&store).await;
                store.import(run, "t.csv".into(), rows).await.unwrap();
                store.claim_pending(run, 0, 1_000).await.unwrap()
            });
            prop_assert_eq!(jobs.len(), payloads.len());
            for (job, p) in jobs.iter().zip(&payloads) {
                prop_assert_eq!(&job.body, &crate::job::SendBody::from(p));
                // One writer serves both; serde's own serialization is the oracle.
                let serde = serde_json::to_string(p).unwrap();
                prop_assert_eq!(&job.body.json()[..], serde.as_bytes());
            }
            Ok(())
        })
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_wal_is_copied_in_the_background_and_emptied_at_close() {
    let (_dir, path, store) = fresh();
    let run = enqueue_run(&store).await;
    // Well over CHECKPOINT_PAGES of WAL, well under WRITER_CHECKPOINT_PAGES: only the
    // checkpointer thread copies pages into the database file before the close.
    for batch in 0..30 {
        let (counts, _) = store
            .import(run, "t.csv".into(), rows(batch * 4_000, 4_000))
            .await
            .unwrap();
        assert_eq!(counts.queued, 4_000);
    }
    let db_len = || std::fs::metadata(&path).map_or(0, |m| m.len());
    let wal = path.with_file_name("k.db-wal");
    eventually("a database file of 4 MiB", || db_len() >= 4 << 20);
    store.close().await;
    assert_eq!(std::fs::metadata(&wal).map_or(0, |m| m.len()), 0);
    assert!(store.flush().await.is_err(), "a closed store refuses work");
    let conn = Connection::open(&path).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 120_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_can_be_asked_for_before_the_close() {
    let (_dir, path, store) = fresh();
    let run = enqueue_run(&store).await;
    // Fewer WAL pages than wake the checkpointer by themselves.
    store
        .import(run, "t.csv".into(), rows(0, 2_000))
        .await
        .unwrap();
    let db_len = || std::fs::metadata(&path).map_or(0, |m| m.len());
    let before = db_len();
    store.checkpoint_soon();
    eventually("pages copied into the database file", || db_len() > before);
    // The store goes on working, and closes as before.
    let (counts, _) = store
        .import(run, "t.csv".into(), rows(2_000, 10))
        .await
        .unwrap();
    assert_eq!(counts.queued, 10);
    store.close().await;
    let wal = path.with_file_name("k.db-wal");
    assert_eq!(std::fs::metadata(&wal).map_or(0, |m| m.len()), 0);
}

#[test]
fn failure_classes_read_back_as_they_are_written() {
    use super::FailureClass;
    for name in [
        "order_not_found",
        "retries_exhausted",
        "http_400",
        "http_422",
        "http_499",
    ] {
        let class = FailureClass::parse(name).unwrap();
        assert_eq!(class.to_string(), name);
        assert_eq!(
            serde_json::to_string(&class).unwrap(),
            format!("\"{name}\"")
        );
    }
    for bad in [
        "http_500",
        "http_40",
        "http_+40",
        "http_4000",
        "HTTP_400",
        "ambiguous",
        "",
    ] {
        assert_eq!(FailureClass::parse(bad), None, "{bad}");
    }
}

/// The dry run's SQL for "this id goes in a list" agrees with the client's rule.
#[test]
fn the_dry_runs_plain_id_rule_is_the_clients() {
    let c = rusqlite::Connection::open_in_memory().unwrap();
    let long = "x".repeat(257);
    for id in [
        "ord_1", "A-b.c_9", "", "a b", "a,b", "a%b", "a:b", "a*b", "a[b", "ordé", &long, "a\nb",
        ".",
    ] {
        assert_eq!(
            super::reads::plain_in_sql(&c, id),
            crate::api::searchable(id),
            "{id:?}"
        );
    }
}
