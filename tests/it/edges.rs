//! The edges users hit at 3 a.m., through the real binary: closed pipes, absurd
//! numbers, long pauses, redirects, refusing databases, foreign files, hostile URLs
//! and text, and mistakes found before anything is opened or sent.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kohort_batch::sandbox::SandboxConfig;

use crate::util::*;

/// Runs the binary with its stdout (and, with `both`, stderr) a pipe whose reader
/// is gone before the binary writes.
fn with_closed_pipe(cmd: &Cmd, both: bool) -> std::process::Output {
    let mut child = cmd
        .command()
        .stdout(Stdio::piped())
        .stderr(if both {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    if both {
        drop(child.stderr.take());
    }
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_pipe_is_not_an_error_and_a_run_finishes_its_work() {
    let s = Scene::new(SandboxConfig::default(), &csv_rows(3_000)).await;
    // A run whose stdout and stderr readers are gone: it sends everything, records
    // everything, and exits with its own code.
    let run = s.bin_run().args(["--rate", "0"]);
    let out = tokio::task::spawn_blocking(move || with_closed_pipe(&run, true))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM jobs WHERE state = 'succeeded'"),
        3_000
    );
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM runs WHERE exit_code = 0"),
        1
    );
    // Readers that stop early: report, export (more than a pipe's buffer), validate, config.
    for cmd in [
        s.report(&[]),
        s.report(&["--last"]),
        s.export("groups", &[]),
        s.export("groups", &["--format", "json"]),
        s.validate().arg("--json"),
        Cmd::new(&["config"]),
    ] {
        let args = cmd.argv();
        let out = with_closed_pipe(&cmd, false);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn absurd_numbers_are_refused_up_front_naming_the_flag_and_range() {
    let s = Scene::offline("");
    for (flag, value, says) in [
        (
            "--timeout",
            "1e300",
            "--timeout 1e300: accepted from 1ms to 1h",
        ),
        ("--timeout", "0", "--timeout 0: accepted from 1ms to 1h"),
        ("--rate", "1e-20", "accepted from 0.001 to 100000"),
        ("--rate", "NaN", "is not a request rate"),
        (
            "--concurrency",
            "100000",
            "--concurrency 100000: accepted from 1 to 1024",
        ),
        ("--concurrency", "0", "accepted from 1 to 1024"),
        ("--max-attempts", "0", "accepted from 1 to 100"),
        ("--settle", "1e20", "accepted from 0s to 24h"),
        ("--grace=-1s", "", "is not a duration"),
        ("--max-pause", "48h", "accepted from 0s to 24h"),
        ("--busy-timeout", "abc", "is not a duration"),
    ] {
        for cmd in ["run", "config"] {
            let argv = s.on_db(&[cmd]).arg(flag);
            let argv = if value.is_empty() {
                argv
            } else {
                argv.arg(value)
            };
            let out = argv.key(KEY).output_blocking();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} {flag} {value}: {err}");
            assert!(err.contains(says), "{cmd} {flag} {value}: {err}");
            assert!(!err.contains("panicked"), "{err}");
        }
        assert!(!s.db.exists(), "{flag} {value}: a database was opened");
    }
    // `config` checks exactly as `run` does, and says where each value came from.
    let out = bin(
        &[
            "config",
            "--timeout",
            "abc",
            "--rate",
            "NaN",
            "--concurrency",
            "0",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let out = bin(&["config", "--rate", "2", "--timeout", "5s"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", all_text(&out));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["sources"]["rate"], "command line");
    assert_eq!(shown["sources"]["concurrency"], "default");
    assert_eq!(
        shown["sources"]["settle"],
        "computed: the larger of 2 × timeout and 45s"
    );
    assert_eq!(shown["settings"]["engine"]["settle"], 45.0);
    assert_eq!(shown["settings"]["engine"]["rate"], 2.0);
    // A settle shorter than the hosting router's 30 s (and a margin) is the user's
    // call, with a warning that says why it may duplicate (not for the sandbox).
    let out = bin(&["config", "--settle", "1s"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("--settle 1s is shorter than 45s") && err.contains("sent twice"),
        "{err}"
    );
    let out = bin(
        &[
            "config",
            "--settle",
            "1s",
            "--api-base",
            "http://127.0.0.1:9",
        ],
        &[],
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("shorter than"));
}

/// A sandbox whose every answer is a 503 with this `Retry-After`.
async fn unavailable_for(retry_after_secs: u64) -> Scene {
    Scene::new(
        SandboxConfig {
            error_503: 1.0,
            retry_after_secs,
            ..SandboxConfig::default()
        },
        &csv_rows(4),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_beyond_max_pause_stops_the_run_saying_when_to_come_back() {
    for secs in [3_600, u64::MAX] {
        let s = unavailable_for(secs).await;
        let out = s.run_bin(&[]).await;
        let text = all_text(&out);
        assert_eq!(out.status.code(), Some(3), "{text}");
        assert!(
            text.contains("the API asked to wait")
                && text.contains("longer than --max-pause 5m")
                && text.contains("run again after")
                && text.contains("4 rows stay pending"),
            "{text}"
        );
        assert!(!text.contains("panicked"), "{text}");
        if secs == u64::MAX {
            assert!(text.contains("asked to wait at least 168h"), "{text}");
        }
        assert_eq!(
            count(&s.db, "SELECT count(*) FROM jobs WHERE state = 'pending'"),
            4
        );
        assert_eq!(
            count(&s.db, "SELECT count(*) FROM jobs WHERE state <> 'pending'"),
            0
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_pause_is_logged_with_its_length_cause_and_end() {
    let s = Scene::new(some_503s(0.3, 1, 3), &csv_rows(10)).await;
    let out = s.run_bin(&["--rate", "0", "--settle", "100ms"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("pausing every request for 1s (HTTP 503 with Retry-After); sending again at"),
        "{err}"
    );
    assert_one_group_each(&s.sb, orders(10));
}

/// A stub API on loopback: every request gets `status` (with `location` if given),
/// and is counted.
async fn stub(status: u16, location: Option<&'static str>) -> (String, Arc<AtomicU64>) {
    let hits = Arc::new(AtomicU64::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut resp = axum::response::Response::new(axum::body::Body::from(
                r#"{"statusCode":401,"message":"Invalid API key provided."}"#,
            ));
            *resp.status_mut() = axum::http::StatusCode::from_u16(status).unwrap();
            if let Some(l) = location {
                resp.headers_mut()
                    .insert("location", axum::http::HeaderValue::from_static(l));
            }
            resp
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, hits)
}

#[tokio::test(flavor = "multi_thread")]
async fn no_request_leaves_after_a_401() {
    let (url, hits) = stub(401, None).await;
    let s = Scene::against(url, &csv_rows(50));
    for i in 0..20 {
        let before = hits.load(Ordering::SeqCst);
        let db = s.path(&format!("k{i}.db"));
        let mut a = s.args();
        a.concurrency = 1;
        let exit = run(&a, &db, std::slice::from_ref(&s.csv)).await;
        assert_eq!(exit, kohort_batch::Exit::StoppedByApi);
        assert_eq!(hits.load(Ordering::SeqCst) - before, 1, "run {i}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_is_named_as_such_with_its_location() {
    let (url, _) = stub(301, Some("https://api.example.test/v2/orders")).await;
    let s = Scene::against(url, &csv_rows(3));
    let out = s.run_bin(&[]).await;
    let text = all_text(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains("redirect")
            && text.contains("https://api.example.test/v2/orders")
            && text.contains("--api-base"),
        "{text}"
    );
    assert!(!text.contains("rejected the key"), "{text}");
}

/// Whether the tests run as root (who may write any file).
fn root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_locked_past_the_busy_timeout_exits_74_with_rows_pending() {
    let s = Scene::new(SandboxConfig::default(), &csv_rows(5)).await;
    let dbs = s.db.display().to_string();
    assert_eq!(s.enqueue().output().await.status.code(), Some(0));
    // A producer's transaction left open.
    let holder = rusqlite::Connection::open(&s.db).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let out = s
        .bin_run_queue()
        .args(["--busy-timeout", "200ms"])
        .output()
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{err}");
    assert!(
        err.contains(&dbs) && err.contains("locked") && err.contains("--busy-timeout"),
        "{err}"
    );
    assert_eq!(
        err.trim()
            .lines()
            .filter(|l| l.starts_with("error:"))
            .count(),
        1,
        "{err}"
    );
    holder.execute_batch("ROLLBACK").unwrap();
    drop(holder);
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM jobs WHERE state = 'pending'"),
        5
    );
    assert_eq!(s.sb.stats(false).groups_total, 0);
}

#[test]
fn a_full_disk_exits_74() {
    let s = Scene::offline(&csv_rows(20_000));
    // A 256 KiB file size limit stands in for a full disk (SIGXFSZ ignored, so the
    // write fails with EFBIG as on a full file system).
    let out = s
        .enqueue()
        .wrapped(
            "sh",
            &["-c", "ulimit -f 256; trap '' XFSZ; exec \"$0\" \"$@\""],
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{err}");
    assert!(
        err.contains("full disk") && err.contains("check free space"),
        "{err}"
    );
}

#[test]
fn a_database_this_user_cannot_write_exits_74() {
    let s = Scene::offline(&csv_rows(2));
    let out = s.enqueue().output_blocking();
    assert_eq!(out.status.code(), Some(0));
    if !root() {
        println!("skipped the other-user case: it needs root to switch users");
        return;
    }
    // The same database, as a user who may read but not write it or its directory.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["k.db", "o.csv"] {
        std::fs::set_permissions(s.path(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = s
        .enqueue()
        .wrapped(
            "setpriv",
            &["--reuid=65534", "--regid=65534", "--clear-groups"],
        )
        .output();
    let Ok(out) = out else {
        println!("skipped the other-user case: setpriv is not installed");
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("setpriv:") {
        println!("skipped the other-user case: {err}");
        return;
    }
    assert_eq!(out.status.code(), Some(74), "{err}");
    assert!(
        err.contains("cannot write") && err.contains("owner and mode"),
        "{err}"
    );
}

/// A SQLite file of another application: a `jobs` table and a user_version of its own.
fn foreign_database(path: &Path) -> Vec<u8> {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, title TEXT);
         INSERT INTO jobs (title) VALUES ('keep me');
         PRAGMA user_version = 3;",
    )
    .unwrap();
    drop(conn);
    std::fs::read(path).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn another_applications_database_is_refused_unchanged() {
    let s = Scene::new(SandboxConfig::default(), &csv_rows(2)).await;
    let other = s.path("other.db");
    let before = foreign_database(&other);
    let csv = s.csv.display().to_string();
    for cmd in [
        s.report(&[]),
        s.export("groups", &[]),
        s.enqueue(),
        s.bin_run(),
    ] {
        let cmd = cmd.set("--db", &other).key(KEY);
        let args = cmd.argv().to_vec();
        let out = cmd.output().await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("not a kohort-batch database"), "{err}");
        assert_eq!(
            std::fs::read(&other).unwrap(),
            before,
            "{args:?} changed it"
        );
        assert!(!s.path("other.db-wal").exists());
    }
    assert_eq!(s.sb.stats(false).groups_total, 0);
    // Not SQLite at all (a CSV given as --db), a directory, a missing file for a reader.
    for (db, says, code) in [
        (csv.clone(), "not a SQLite database", 2),
        (s.dir.path().display().to_string(), "is a directory", 2),
        (
            s.path("missing.db").display().to_string(),
            "there is no database",
            2,
        ),
    ] {
        let out = s.report(&[]).set("--db", &db).output().await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{db}: {err}");
        assert!(err.contains(says), "{db}: {err}");
    }
    assert!(
        !s.path("missing.db").exists(),
        "a reader created a database"
    );
    assert_eq!(std::fs::read_to_string(&s.csv).unwrap(), csv_rows(2));
    // A database of a newer kohort-batch is refused too, unchanged.
    let newer = s.path("newer.db");
    let out = s.enqueue().set("--db", &newer).output().await;
    assert_eq!(out.status.code(), Some(0));
    rusqlite::Connection::open(&newer)
        .unwrap()
        .execute_batch("PRAGMA user_version = 99")
        .unwrap();
    let out = s.report(&[]).set("--db", &newer).output().await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("newer kohort-batch (schema 99"), "{err}");
}

#[test]
fn urls_with_credentials_or_a_hidden_host_are_refused() {
    for base in [
        "http://[::1]@192.0.2.2:18090",
        "http://127.0.0.1:18080@evil.example",
        "https://user:pass@api.kohortpay.com",
    ] {
        let out = bin(&["config", "--api-base", base], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{base}: {err}");
        assert!(err.contains("--api-base"), "{base}: {err}");
        assert!(!err.contains("pass@") || base.contains("pass"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn text_from_the_input_cannot_drive_the_terminal_or_forge_log_lines() {
    // ESC (colour), CR, LF (a forged INFO line) and an OSC title sequence, in fields
    // that end up in the log, the report and `report --last`.
    let text = "customerId,orderId,metadata\n\
                cus_1,ord_\u{1b}[31mred,{}\n\
                cus_2,\"ord_2\r\n2026-01-01T00:00:00Z  INFO forged line\",{}\n\
                cus_3,ord_3,\"{\u{1b}]0;pwned\u{7}\"\n";
    let s = Scene::new(SandboxConfig::default(), text).await;
    let out = s.run_bin(&[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", all_text(&out));
    let last = s.report(&["--last"]).output().await;
    for (what, bytes) in [
        ("stdout", &out.stdout),
        ("stderr", &out.stderr),
        ("report --last", &last.stdout),
    ] {
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\r') && !text.contains('\u{7}'),
            "{what}: {text:?}"
        );
        assert!(
            !text.lines().any(|l| l.starts_with("2026-01-01T00:00:00Z")),
            "{what}: a forged line: {text}"
        );
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ord_\\u{1b}[31mred"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mistakes_are_found_before_the_database_is_opened() {
    let s = Scene::new(SandboxConfig::default(), &csv_rows(2)).await;
    let key_file = |name: &str, text: &str| {
        let p = s.write(name, text);
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        p.display().to_string()
    };
    let empty = key_file("empty-key", "\n");
    let assignment = key_file("env-key", "KOHORTPAY_API_KEY=sk_test_abc\n");
    let publishable = key_file("pk-key", "pk_test_abc\n");
    let cases: [([&str; 2], &str); 7] = [
        (
            ["--report-json", "/nonexistent/dir/r.json"],
            "--report-json /nonexistent/dir/r.json: cannot write in /nonexistent/dir",
        ),
        (
            ["--metrics-file", "/nonexistent/m.prom"],
            "--metrics-file /nonexistent/m.prom",
        ),
        (["--csv", "/nonexistent/o.csv"], "/nonexistent/o.csv"),
        (["--ca-cert", "/nonexistent/ca.pem"], "--ca-cert"),
        (["--api-key-file", &empty], "is empty"),
        (["--api-key-file", &assignment], "NAME=value"),
        (["--api-key-file", &publishable], "publishable key (pk_…)"),
    ];
    for (extra, says) in cases {
        let out = s.run_bin(&extra).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: {err}");
        assert_eq!(err.matches("error:").count(), 1, "said once: {err}");
        assert!(!err.contains("abc"), "the key is never shown: {err}");
        assert!(!s.db.exists(), "{extra:?}: the database was opened");
    }
    let out = s.bin_run().key("pk_live_abc").output().await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        s.sb.stats(false).requests.values().sum::<u64>(),
        0,
        "nothing was sent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_with_nothing_to_send_says_so() {
    let s = Scene::new(SandboxConfig::default(), "customerId,orderId\n").await;
    let out = s.run_bin(&[]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("no job to send"), "{text}");
    assert!(
        !text.contains("every job succeeded") && !text.contains("req/s"),
        "{text}"
    );
}

#[test]
fn many_unknown_columns_make_one_line() {
    let mut header = String::from("customerId,orderId");
    for i in 0..5_000 {
        header.push_str(&format!(",extra_{i}"));
    }
    let s = Scene::offline(&format!("{header}\n"));
    let out = s.validate().output_blocking();
    let mut text = String::new();
    out.stdout.as_slice().read_to_string(&mut text).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("not used")).collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("5000 columns are not used") && lines[0].contains("and 4980 more"));
}

/// Runs `cmd` under a small Python parent that reads the peak memory from the
/// kernel: (exit code, peak RSS in KiB). A bound on memory, not a timing.
async fn peak_memory(cmd: Cmd) -> (i32, u64) {
    let script = "import resource, subprocess, sys\n\
         r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n\
         print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)";
    let out = tokio::task::spawn_blocking(move || {
        cmd.wrapped("python3", &["-c", script]).output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (code, kib) = text
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("{}", all_text(&out)));
    (code.parse().unwrap(), kib.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_does_not_follow_the_concurrency_setting() {
    // Peak memory of one-row runs at the lowest and the highest concurrency, read
    // from the kernel by a small Python parent (a bound on memory, not a timing).
    let s = Scene::new(SandboxConfig::default(), &csv_rows(1)).await;
    let mut peaks = Vec::new();
    for concurrency in ["1", "1024"] {
        let argv = s
            .bin_run()
            .set("--db", s.path(&format!("c{concurrency}.db")))
            .args(["--rate", "0", "--concurrency", concurrency]);
        let (code, kib) = peak_memory(argv).await;
        assert_eq!(code, 0);
        peaks.push(kib);
    }
    let (low, high) = (peaks[0], peaks[1]);
    // Measured: about 14 MB and 21 MB. 1,024 slots may cost at most 32 MB more.
    assert!(high < low + 32 * 1024, "1: {low} KiB, 1024: {high} KiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn conventions_quiet_verbose_version_completions_man_and_help() {
    let s = Scene::new(SandboxConfig::default(), &csv_rows(2)).await;
    let csv = s.csv.display().to_string();
    // -q: no report on stdout; -v: debug lines on stderr.
    let out = s.run_bin(&["-q", "-v"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", all_text(&out));
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("DEBUG"));
    // Without a terminal no colour codes reach the logs; on one, NO_COLOR turns them off.
    assert!(!out.stderr.contains(&0x1b));
    let on_a_terminal = |no_color: bool| {
        let db = s.path(&format!("tty-{no_color}.db"));
        let cmd = format!(
            "{}{BIN} enqueue --db {} --csv {csv}",
            if no_color { "NO_COLOR=1 " } else { "" },
            db.display()
        );
        Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .output()
            .ok()
            .map(|o| o.stdout.contains(&0x1b))
    };
    if let (Some(coloured), Some(plain)) = (on_a_terminal(false), on_a_terminal(true)) {
        assert!(coloured, "no colours on a terminal");
        assert!(!plain, "NO_COLOR was ignored");
    } else {
        println!("skipped the terminal case: `script` is not installed");
    }
    let version = bin(&["--version"], &[]);
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(version.starts_with("kohort-batch 0."), "{version}");
    if Path::new(env!("CARGO_MANIFEST_DIR")).join(".git").exists() {
        assert!(version.contains("(commit "), "{version}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = bin(&["completions", shell], &[]);
        assert_eq!(out.status.code(), Some(0));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("retry-failed"),
            "{shell}"
        );
    }
    let man = bin(&["man"], &[]);
    assert!(String::from_utf8_lossy(&man.stdout).contains(".TH kohort-batch 1"));
    // Each command's help shows only the options it uses.
    for (cmd, has_db) in [
        ("sandbox", false),
        ("validate", false),
        ("run", true),
        ("report", true),
        ("init", true),
    ] {
        let help = bin(&[cmd, "--help"], &[]);
        let text = String::from_utf8_lossy(&help.stdout);
        assert_eq!(text.contains("--db"), has_db, "{cmd}: {text}");
    }
    let out = s.validate().flag("--db", &s.db).output_blocking();
    assert_eq!(out.status.code(), Some(2), "validate takes no --db");
}

#[test]
fn demo_keeps_its_database_where_asked() {
    let s = Scene::offline("");
    let demo = s.on_db(&["demo"]);
    let out = demo.output_blocking();
    assert_eq!(out.status.code(), Some(0), "{}", all_text(&out));
    assert!(count(&s.db, "SELECT count(*) FROM jobs WHERE state = 'succeeded'") > 0);
    let again = demo.output_blocking();
    assert_eq!(
        again.status.code(),
        Some(2),
        "an existing file is not reused"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_50_mb_response_is_not_read_and_its_create_is_checked_not_resent() {
    let oversized = SandboxConfig {
        oversized: 1.0,
        ..SandboxConfig::default()
    };
    let s = Scene::new(oversized, &csv_rows(3)).await;
    let (code, peak_kib) =
        peak_memory(s.bin_run().args(["--rate", "0", "--settle", "100ms"])).await;
    assert_eq!(code, 0);
    // A run's usual peak is 14–50 MB; a 50 MB body held whole would add at least 50.
    assert!(peak_kib < 48 * 1024, "{peak_kib} KiB");
    // Each group was made once, and found by the check after the unread reply.
    assert_one_group_each(&s.sb, orders(3));
    assert_eq!(
        count(
            &s.db,
            "SELECT count(*) FROM jobs WHERE obtained = 'recovered'"
        ),
        3
    );
    let errors = column(&s.db, "SELECT error FROM attempts WHERE kind = 'create'");
    assert!(
        errors
            .iter()
            .all(|e| e.contains("over 1 MiB and was not read")),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn uris_symlinks_bad_certificates_and_odd_keys_are_handled() {
    let s = Scene::new(SandboxConfig::default(), &csv_rows(2)).await;
    // A SQLite URI would open another file than the one the lock is taken beside.
    let out = s
        .bin_run()
        .set("--db", "file:uri.db?nolock=1")
        .output()
        .await;
    assert_eq!(out.status.code(), Some(2), "{}", all_text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a SQLite URI"));
    // A report written through a symlink lands in its target; the link stays a link.
    let target = s.path("target.json");
    let link = s.path("link.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = s
        .run_bin(&["--report-json", &link.display().to_string()])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", all_text(&out));
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(
        std::fs::read_to_string(&target)
            .unwrap()
            .contains("\"run_id\"")
    );
    // Certificates that cannot be used are a flag error (2), found before anything runs.
    let broken = s.write(
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let none = s.write("none.pem", "just text\n");
    let fresh = s.bin_run().set("--db", s.path("fresh.db"));
    for (pem, says) in [(&broken, "cannot be used"), (&none, "no PEM certificate")] {
        let out = fresh.clone().flag("--ca-cert", pem).output().await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{err}");
    }
    // Keys with characters no key has; `config` checks the CSV files like `run`.
    for key in ["sk_test_abc\u{e9}", "sk_test_abc\u{1b}[31m"] {
        let out = fresh.clone().key(key).output().await;
        assert_eq!(out.status.code(), Some(2), "{}", all_text(&out));
        assert!(!String::from_utf8_lossy(&out.stderr).contains("abc"));
    }
    assert!(!s.path("fresh.db").exists());
    let out = Cmd::new(&["config", "--csv", "/nonexistent.csv"])
        .output()
        .await;
    assert_eq!(out.status.code(), Some(2));
    let out = Cmd::new(&["run", "--version"]).output().await;
    assert_eq!(out.status.code(), Some(0));
}
