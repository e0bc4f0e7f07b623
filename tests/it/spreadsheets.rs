//! Files as spreadsheets save them: another separator, another encoding, empty
//! trailing rows, ids Excel made into numbers, and cells far too large.

use std::path::{Path, PathBuf};

use kohort_batch::sandbox::SandboxConfig;

use crate::util::*;

/// The French sample: `;`-separated, Windows-1252 (é, ç, €), two trailing `;;;` rows.
fn french_sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/orders-excel-fr.csv")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_windows_1252_semicolon_file_is_refused_whole_until_its_encoding_is_given() {
    // The scene's CSV is a copy of the sample (not text: it is not UTF-8).
    let s = Scene::new(SandboxConfig::default(), "").await;
    std::fs::copy(french_sample(), &s.csv).unwrap();
    for cmd in [s.validate(), s.bin_run(), s.enqueue()] {
        let cmd = cmd.key(KEY);
        let argv = cmd.argv().to_vec();
        let out = cmd.output().await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{argv:?}: {err}");
        assert!(
            err.contains("line 2: not valid UTF-8") && err.contains("pass --encoding windows-1252"),
            "{err}"
        );
    }
    assert!(!s.db.exists(), "nothing of the file was imported");
    assert_eq!(s.sb.stats(false).requests.values().sum::<u64>(), 0);

    let out = s
        .bin_run()
        .args(["--encoding", "windows-1252"])
        .output()
        .await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("separated by ';'"), "{stderr}");
    assert!(stdout.contains("2 empty lines skipped"), "{stdout}");
    assert!(!stdout.contains("invalid 2"), "{stdout}");
    assert_one_group_each(&s.sb, (1..=3).map(|i| format!("ord_fr_{i:03}")));
    let cities = column(&s.db, "SELECT metadata FROM jobs ORDER BY id");
    assert!(
        cities[0].contains("Orléans") && cities[0].contains("10 €"),
        "{cities:?}"
    );
    assert!(cities[1].contains("Besançon") && cities[2].contains("Saint-Étienne"));
    // latin1 is read the same way; a separator may be given.
    let out = s
        .validate()
        .args(["--encoding", "latin1", "--delimiter", ";"])
        .output()
        .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s.validate().args(["--delimiter", "|"]).output().await;
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn excel_numbers_and_huge_cells_are_invalid_and_never_sent() {
    let huge = "x".repeat(20 << 20);
    let text = format!(
        "customerId,orderId,metadata.note\ncus_1,ord_1,fine\ncus_2,1.23457E+11,fine\ncus_3,ord_3,{huge}\n,,\n"
    );
    let s = Scene::new(SandboxConfig::default(), &text).await;
    let out = s.run_bin(&[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("looks like a number Excel reformatted"),
        "{stdout}"
    );
    assert!(
        stdout.contains("note is 20.0 MiB, over the limit of 64 KiB"),
        "{stdout}"
    );
    assert!(stdout.contains("1 empty line skipped"), "{stdout}");
    let stats = s.sb.stats(true);
    assert_eq!(
        stats.groups_per_key.unwrap().keys().collect::<Vec<_>>(),
        ["ord_1"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_success_has_a_share_id_or_says_why_not() {
    // cus_lateshare: the create's reply has no share id, a later GET has it.
    // cus_noshare: the group never gets one. ord_ghost: the order names a group that
    // the lookup answers with an empty 200.
    let text = "customerId,orderId\ncus_1,ord_1\ncus_lateshare_2,ord_2\ncus_noshare_3,ord_3\ncus_4,ord_ghost_4\n";
    let s = Scene::new(SandboxConfig::default(), text).await;
    let metrics = s.path("m.prom");
    let out = s
        .run_bin(&["--metrics-file", &metrics.display().to_string()])
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("Share ids  2 groups have no share id yet")
            && stdout.contains("export groups --missing-share-id"),
        "{stdout}"
    );
    let shares = column(
        &s.db,
        "SELECT coalesce(share_id, 'NULL') FROM groups ORDER BY job_id",
    );
    assert!(
        shares[0].starts_with("KHT-") && shares[1].starts_with("KHT-"),
        "{shares:?}"
    );
    assert_eq!(shares[2], "NULL");
    // The raw JSON stored is the bytes received (the GET's, for the late one; none
    // for the empty 200, never a JSON made up).
    let raw = column(&s.db, "SELECT raw FROM groups WHERE order_id = 'ord_2'");
    assert!(raw[0].contains("\"share_id\":\"KHT-"), "{raw:?}");
    let ghost = column(
        &s.db,
        "SELECT g.raw || '|' || j.obtained FROM groups g JOIN jobs j ON j.id = g.job_id \
         WHERE g.order_id = 'ord_ghost_4'",
    );
    assert_eq!(ghost, ["|existing"]);
    let m = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        m.contains("kohort_batch_groups_without_share_id 2\n"),
        "{m}"
    );
    let out = s.export("groups", &[]).output().await;
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(csv.lines().next().unwrap().ends_with(",note"), "{csv}");
    assert_eq!(
        csv.lines().filter(|l| l.ends_with(",no_share_id")).count(),
        2,
        "{csv}"
    );
    let out = s.export("groups", &["--missing-share-id"]).output().await;
    let only = String::from_utf8_lossy(&out.stdout);
    assert_eq!(only.lines().count(), 3, "{only}");
    assert!(
        only.contains("ord_3") && only.contains("ord_ghost_4"),
        "{only}"
    );
    assert_one_group_each(&s.sb, ["ord_1", "ord_2", "ord_3"].map(String::from));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_says_what_would_happen_and_changes_nothing() {
    let mut text = csv_rows(4);
    text.push_str("cus_unknown_5,ord_00005,it\n");
    let s = Scene::new(SandboxConfig::default(), &text).await;
    let out = s.run_bin(&[]).await;
    assert_eq!(out.status.code(), Some(1));
    // New rows, in a file and in the inbox.
    let more = s.write("more.csv", &format!("{}cus_8,ord_00001,it\n", csv_rows(7)));
    let conn = rusqlite::Connection::open(&s.db).unwrap();
    conn.execute(
        "INSERT INTO inbox (customer_id, order_id) VALUES ('cus_in', 'ord_inbox')",
        [],
    )
    .unwrap();
    drop(conn);
    let bytes = |p: &Path| std::fs::read(p).unwrap_or_default();
    let wal = s.path("k.db-wal");
    let (db_before, wal_before) = (bytes(&s.db), bytes(&wal));
    let requests_before = s.sb.stats(false).requests.values().sum::<u64>();
    let plan = s.path("plan.json");
    let out = s
        .bin_run()
        .set("--csv", &more)
        .args(["--dry-run", "--rate", "2"])
        .flag("--report-json", &plan)
        .output()
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // ord_00001 with another customer is a conflict: exit 1, as `validate` would say.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("nothing was changed, nothing was sent"),
        "{stdout}"
    );
    // 3 new rows from the file (ord 5..7 are new, 1..4 duplicates, ord 5 a fix of the
    // failed row) plus the inbox row.
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    assert_eq!(v["jobs_to_send"], 4, "{v}");
    assert_eq!(v["checked_first"], 4, "{v}");
    // Four orders checked in one list, four creates.
    assert_eq!(v["check_requests"], 1, "{v}");
    assert_eq!(v["requests"], 5, "{v}");
    assert_eq!(v["estimated_secs"], 2.5, "{v}");
    assert_eq!(v["conflicts"], 1, "{v}");
    let out = s.bin_retry_failed().arg("--dry-run").output().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("Retry      1 failed job would go back to pending"),
        "{stdout}"
    );
    // Nothing changed, nothing sent, no lock left.
    assert_eq!(bytes(&s.db), db_before, "the database file changed");
    assert_eq!(bytes(&wal), wal_before, "the WAL changed");
    assert_eq!(
        s.sb.stats(false).requests.values().sum::<u64>(),
        requests_before
    );
    assert_eq!(count(&s.db, "SELECT count(*) FROM inbox"), 1);
    let holder = std::fs::OpenOptions::new()
        .write(true)
        .open(kohort_batch::store::lock_path(&s.db))
        .unwrap();
    holder.try_lock().unwrap();
}

/// Standard input that is not UTF-8 is refused whole, like a file: 5,000 good rows
/// (more than one import batch) before the bad byte, and none of them goes in.
#[test]
fn standard_input_that_is_not_utf8_is_refused_before_any_row_goes_in() {
    use std::io::Write;
    let s = Scene::offline("");
    let mut text = csv_rows(5_000).into_bytes();
    text.extend_from_slice(b"cus_x,ord_caf\xe9,it\n");
    let mut child = s
        .on_db(&["enqueue", "--csv", "-"])
        .command()
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&text).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = all_text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("<stdin>, line 5002: not valid UTF-8"),
        "{said}"
    );
    let jobs = if s.db.exists() {
        count(&s.db, "SELECT count(*) FROM jobs")
    } else {
        0
    };
    assert_eq!(jobs, 0);
}
