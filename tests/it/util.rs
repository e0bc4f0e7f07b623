//! Shared helpers: a sandbox on loopback, configs, CSV files, the binary, and direct
//! looks into the database the worker wrote. A test's setup is a [`Scene`] (`scene.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kohort_batch::Exit;
use kohort_batch::cli::{PrecheckArg, SendArgs};
use kohort_batch::commands;
use kohort_batch::config::{self, SendConfig};
use kohort_batch::engine::Control;
use kohort_batch::sandbox::{Sandbox, SandboxConfig};

pub use crate::scene::{Cmd, Scene};

pub const KEY: &str = "sk_test_integration";

pub async fn sandbox(cfg: SandboxConfig) -> Sandbox {
    Sandbox::start(cfg, ([127, 0, 0, 1], 0).into())
        .await
        .unwrap()
}

/// A sandbox that answers a share `rate` of requests with a 503 and this
/// `Retry-After`, the faults drawn from `seed`.
pub fn some_503s(rate: f64, retry_after_secs: u64, seed: u64) -> SandboxConfig {
    SandboxConfig {
        error_503: rate,
        retry_after_secs,
        seed,
        ..SandboxConfig::default()
    }
}

/// Fast, test-friendly send options against `base`.
pub fn args(base: &str) -> SendArgs {
    SendArgs {
        api_base: base.to_owned(),
        api_key_file: None,
        live: false,
        concurrency: 4,
        rate: 0.0,
        // Fault tests run at 25–30% failure rates, where 8 attempts give up on about one
        // job in 200; the protocol, not the budget, is under test here.
        max_attempts: 20,
        // Generous: a loaded CI machine must not turn a slow answer into a timeout.
        timeout: "10s".into(),
        settle: Some("100ms".into()),
        precheck: PrecheckArg::Always,
        breaker: 1000,
        include_unknown: false,
        report_json: None,
        metrics_file: None,
        ca_cert: None,
        grace: "5s".into(),
        dry_run: false,
        max_pause: "5m".into(),
        busy_timeout: "60s".into(),
        seed: Some(1),
    }
}

pub fn config(args: &SendArgs, db: &Path) -> SendConfig {
    config::resolve_send(args, db.to_owned(), Some(KEY.into())).unwrap()
}

/// Runs `run` in-process.
pub async fn run(args: &SendArgs, db: &Path, csv: &[PathBuf]) -> Exit {
    commands::run(&config(args, db), csv, Arc::new(Control::default()))
        .await
        .unwrap()
}

/// A CSV with a header and `n` valid rows (ord_00001 …).
pub fn csv_rows(n: usize) -> String {
    let mut s = String::from("customerId,orderId,metadata.batch\n");
    for i in 1..=n {
        s.push_str(&format!("cus_{i:05},ord_{i:05},it\n"));
    }
    s
}

/// stdout then stderr of a finished binary, as text.
pub fn all_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// One column of every row a query returns, as text.
pub fn column(db: &Path, sql: &str) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    stmt.query_map([], |r| {
        let v: rusqlite::types::Value = r.get(0)?;
        Ok(match v {
            rusqlite::types::Value::Null => "NULL".to_owned(),
            rusqlite::types::Value::Integer(i) => i.to_string(),
            rusqlite::types::Value::Real(f) => f.to_string(),
            rusqlite::types::Value::Text(t) => t,
            rusqlite::types::Value::Blob(_) => "<blob>".to_owned(),
        })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Requests the worker recorded that match `condition` (SQL on `attempts`): a list
/// of orders, recorded with each job it checked, counts once.
pub fn recorded_requests(db: &Path, condition: &str) -> i64 {
    count(
        db,
        &format!(
            "SELECT count(DISTINCT coalesce('list ' || batch, 'one ' || id)) FROM attempts \
             WHERE {condition}"
        ),
    )
}

pub fn count(db: &Path, sql: &str) -> i64 {
    column(db, sql)[0].parse().unwrap()
}

/// A sandbox that answers every request after exactly `ms` milliseconds.
pub fn slow(ms: u64) -> SandboxConfig {
    let latency = std::time::Duration::from_millis(ms);
    SandboxConfig {
        latency: (latency, latency),
        ..SandboxConfig::default()
    }
}

/// Requests the sandbox counted under the "METHOD /route STATUS" labels `pick` takes.
pub fn sandbox_requests(sb: &Sandbox, pick: impl Fn(&str) -> bool) -> u64 {
    sb.stats(false)
        .requests
        .iter()
        .filter(|(k, _)| pick(k))
        .map(|(_, v)| v)
        .sum()
}

/// Asserts from the sandbox's own count that each of these orders has exactly one group.
pub fn assert_one_group_each(sb: &Sandbox, orders: impl IntoIterator<Item = String>) {
    let stats = sb.stats(true);
    assert_eq!(
        stats.duplicate_keys, 0,
        "duplicates: {:?}",
        stats.duplicates
    );
    let per = stats.groups_per_key.unwrap();
    for o in orders {
        assert_eq!(per.get(&o).copied(), Some(1), "order {o}");
    }
}

pub fn orders(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("ord_{i:05}")).collect()
}

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_kohort-batch");

/// Runs the real binary to completion. The key, API base, database and config
/// variables of the calling environment are cleared first, then `env` is set.
pub fn bin(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let cmd = env.iter().fold(Cmd::new(args), |c, (k, v)| c.env(k, *v));
    cmd.output_blocking()
}

/// Waits (polling, up to a minute) until `done` holds: tests wait for events, not for
/// a guessed time that a busy machine can overrun.
pub async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..3_000 {
        if done() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("waited a minute for {what}");
}
