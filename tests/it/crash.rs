//! Crashes and signals against the real binary (issue 3): graceful shutdown on the
//! first signal, abandonment on the second, and the SIGKILL campaign. Duplicates
//! are counted by the sandbox, independently of the worker's database.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kohort_batch::sandbox::SandboxConfig;

use crate::util::*;

/// The real binary's `run` on the scene, with JSON logs and `extra`, in the background.
fn spawn_run(s: &Scene, extra: &[&str]) -> Child {
    spawn_run_on(s, None, extra)
}

/// [`spawn_run`] on another database than the scene's (a PostgreSQL URL).
pub fn spawn_run_on(s: &Scene, db: Option<&str>, extra: &[&str]) -> Child {
    let cmd = match db {
        Some(db) => s.bin_run().set("--db", db),
        None => s.bin_run(),
    };
    cmd.args(["--rate", "0", "--log-format", "json"])
        .args(extra)
        .command()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

pub async fn wait(child: Child) -> std::process::Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn first_signal_finishes_in_flight_requests_then_reports_and_exits_4() {
    let s = Scene::new(slow(400), &csv_rows(40)).await;
    let child = spawn_run(&s, &["--concurrency", "4", "--precheck", "ambiguous"]);
    until("four groups", || s.sb.stats(false).groups_total >= 4).await;
    signal(&child, "-TERM");
    let out = wait(child).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("interrupted"), "{stdout}");
    // Requests in flight were allowed to finish and were recorded.
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM jobs WHERE state = 'in_flight'"),
        0
    );
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM jobs WHERE state = 'failed'"),
        0
    );
    let done = count(&s.db, "SELECT count(*) FROM jobs WHERE state = 'succeeded'");
    assert!(done > 0 && done < 40, "{done}");
    assert_eq!(s.sb.stats(false).groups_total, done as u64);
    // Creates that were marked but still waiting for a request slot were put back, and
    // the record counts only the creates that left.
    assert_eq!(count(&s.db, "SELECT sum(creates) FROM jobs"), done);
}

#[tokio::test(flavor = "multi_thread")]
async fn second_signal_abandons_in_flight_requests_and_the_next_run_resolves_them() {
    let s = Scene::new(slow(1500), &csv_rows(12)).await;
    let child = spawn_run(
        &s,
        &[
            "--concurrency",
            "4",
            "--precheck",
            "ambiguous",
            "--timeout",
            "5s",
            "--settle",
            "2s",
        ],
    );
    until("four requests in flight", || {
        s.sb.stats(false).peak_concurrency >= 4
    })
    .await;
    signal(&child, "-INT");
    tokio::time::sleep(Duration::from_millis(100)).await;
    signal(&child, "-INT");
    let out = wait(child).await;
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Abandoned, not waited for: had they been waited for, they would be recorded.
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM jobs WHERE state = 'in_flight'"),
        4
    );

    let rerun = spawn_run(
        &s,
        &["--concurrency", "4", "--timeout", "5s", "--settle", "2s"],
    );
    let out = wait(rerun).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_one_group_each(&s.sb, orders(12));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_campaign_never_duplicates_and_never_loses_a_row() {
    let (rows, kills) = campaign_size(2000, 20);
    let s = campaign_scene(rows).await;
    let code = campaign(&s, None, kills, || true).await;
    let succeeded = count(&s.db, "SELECT count(*) FROM jobs WHERE state = 'succeeded'");
    let recovered = count(
        &s.db,
        "SELECT count(*) FROM jobs WHERE obtained = 'recovered'",
    );
    campaign_verdict(&s, rows, kills, code, succeeded, recovered);
    assert_eq!(column(&s.db, "PRAGMA integrity_check"), ["ok"]);
}

/// Rows and kills of a campaign: `KB_CAMPAIGN_ROWS` and `KB_CAMPAIGN_KILLS` (the
/// script's), else the test's own.
pub fn campaign_size(rows: usize, kills: usize) -> (usize, usize) {
    let var = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    (
        var("KB_CAMPAIGN_ROWS", rows),
        var("KB_CAMPAIGN_KILLS", kills),
    )
}

/// The campaign's scene: `rows` orders, an API with latency, 503s, 429s, lost
/// responses and resets.
pub async fn campaign_scene(rows: usize) -> Scene {
    Scene::new(
        SandboxConfig {
            latency: (Duration::from_millis(1), Duration::from_millis(8)),
            error_503: 0.02,
            error_429: 0.02,
            retry_after_secs: 0,
            lost_response: 0.03,
            reset: 0.02,
            seed: 42,
            ..SandboxConfig::default()
        },
        &csv_rows(rows),
    )
    .await
}

/// SIGKILLs the test build's `run` (on `db`, else the scene's) `kills` times at
/// random moments, then runs it to completion; returns the final exit code. After
/// each kill it waits for `lock_free` (PostgreSQL frees a killed run's lock when the
/// server notices its session ended, a moment later; the kernel frees SQLite's at once).
pub async fn campaign(
    s: &Scene,
    db: Option<&str>,
    kills: usize,
    lock_free: impl Fn() -> bool,
) -> i32 {
    let opts = [
        "--concurrency",
        "8",
        "--timeout",
        "1s",
        "--settle",
        "300ms",
        "--breaker",
        "1000",
        "--max-attempts",
        "20",
    ];
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..kills {
        let mut child = spawn_run_on(s, db, &opts);
        tokio::time::sleep(Duration::from_millis(rng.u64(100..600))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        until("the killed run's lock to be freed", &lock_free).await;
    }
    let mut finals = 0;
    loop {
        finals += 1;
        let out = wait(spawn_run_on(s, db, &opts)).await;
        match out.status.code() {
            Some(0) => break 0,
            other if finals >= 3 => panic!(
                "final run exit {other:?}: {}",
                String::from_utf8_lossy(&out.stdout)
            ),
            _ => continue,
        }
    }
}

/// The campaign's proof, from the sandbox's own count: every order has exactly one
/// group, and the record says every job succeeded.
pub fn campaign_verdict(
    s: &Scene,
    rows: usize,
    kills: usize,
    code: i32,
    succeeded: i64,
    recovered: i64,
) {
    let stats = s.sb.stats(true);
    let per = stats.groups_per_key.clone().unwrap();
    let lost = orders(rows)
        .iter()
        .filter(|o| per.get(*o).copied().unwrap_or(0) == 0)
        .count();
    println!(
        "crash campaign: kills={kills} rows={rows} duplicates={} lost={lost} recovered={recovered} \
         groups={} final_exit={code}",
        stats.duplicate_keys, stats.groups_total
    );
    assert_eq!(stats.duplicate_keys, 0, "{:?}", stats.duplicates);
    assert_eq!(lost, 0);
    assert_eq!(succeeded as usize, rows);
    assert_eq!(stats.groups_total as usize, rows);
}
