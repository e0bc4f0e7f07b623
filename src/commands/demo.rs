//! `sandbox` (serve the simulated API) and `demo` (sandbox + samples end to end).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::out;
use super::{listen_for_signals, send};
use crate::api::ApiKey;
use crate::config;
use crate::engine::Control;
use crate::error::{Error, Exit, Result};
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::store::Store;

/// `sandbox`: serve until SIGINT/SIGTERM.
pub(crate) async fn sandbox(cfg: SandboxConfig, listen: std::net::SocketAddr) -> Result<Exit> {
    let sb = Sandbox::start(cfg, listen).await.map_err(|e| {
        Error::usage(format!(
            "cannot listen on {listen}: {e} (is the port taken? try --listen 127.0.0.1:0)"
        ))
    })?;
    out::say(&format!(
        "kohort-batch sandbox listening on {url}\n  stats: {url}/_sandbox/stats   keys: any sk_test_… or sk_live_…\n",
        url = sb.url()
    ))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let trigger = stop.clone();
    super::on_signals(move || trigger.cancel());
    sb.serve_until(stop).await;
    Ok(Exit::Success)
}

/// The embedded sample, so `demo` works from any directory.
const SAMPLE_CSV: &str = include_str!("../../samples/orders.csv");

/// `demo`: the sandbox with mild faults, the sample CSV, a temporary database (or a
/// new one at `keep`, kept afterwards), and the sandbox's own count proving one
/// group per valid order.
pub(crate) async fn demo(keep: Option<&Path>) -> Result<Exit> {
    if let Some(path) = keep
        && path.exists()
    {
        return Err(Error::usage(format!(
            "demo --db {}: that file exists; give a new path (the demo proves its count on \
             a fresh database)",
            path.display()
        )));
    }
    let sb = Sandbox::start(mild_faults(), ([127, 0, 0, 1], 0).into())
        .await
        .map_err(|e| Error::internal_from("cannot start the sandbox on loopback", e))?;
    let dir = tempfile::tempdir()
        .map_err(|e| Error::internal_from("cannot make a temporary directory", e))?;
    let csv = dir.path().join("orders.csv");
    std::fs::write(&csv, SAMPLE_CSV).map_err(|source| Error::File {
        action: "write",
        path: csv.clone(),
        source,
    })?;
    let db = keep.map_or_else(|| dir.path().join("demo.db"), Path::to_path_buf);
    out::say(&format!(
        "Demo: sandbox on {} (latency 5–40 ms, 2% 503 with Retry-After: 1)\n      importing samples/orders.csv into {}\n\n",
        sb.url(),
        db.display()
    ))?;
    let mut cfg = config::resolve_send(
        &send_args(sb.url()),
        db.clone(),
        Some("sk_test_demo".into()),
    )?;
    cfg.key = ApiKey::new("sk_test_demo".into());
    let control = Arc::new(Control::default());
    listen_for_signals(control.clone());
    let exit = send::run(&cfg, &[csv], control).await?;

    let stats = sb.stats(true);
    let per_key = stats.groups_per_key.clone().unwrap_or_default();
    let (valid, problems) = one_group_each(&db, &per_key).await?;
    sb.shutdown().await;
    out::say(&format!(
        "\nSandbox count: {} groups for {} valid orders; {} orders with more than one group.\n",
        stats.groups_total, valid, stats.duplicate_keys
    ))?;
    if problems.is_empty() && stats.duplicate_keys == 0 && exit != Exit::Internal {
        out::say(
            "Every valid row got exactly one group. (Invalid sample rows are explained in samples/README.md.)\n",
        )?;
        Ok(Exit::Success)
    } else {
        for p in &problems {
            out::say(&format!("  problem: {}\n", crate::text::escape(p)))?;
        }
        Ok(Exit::RowsFailed)
    }
}

/// The demo's sandbox: some latency and an occasional 503 with a short
/// Retry-After, so retries show; seeded, so every demo is the same.
fn mild_faults() -> SandboxConfig {
    SandboxConfig {
        latency: (
            std::time::Duration::from_millis(5),
            std::time::Duration::from_millis(40),
        ),
        error_503: 0.02,
        retry_after_secs: 1,
        seed: 2026,
        ..SandboxConfig::default()
    }
}

/// The flags the demo's `run` is given, against the sandbox at `api_base`.
fn send_args(api_base: String) -> crate::cli::SendArgs {
    crate::cli::SendArgs {
        api_base,
        api_key_file: None,
        live: false,
        concurrency: 8,
        rate: 50.0,
        max_attempts: 8,
        timeout: "2s".into(),
        // The sandbox has no hosting router that gives up early: a short settle.
        settle: Some("2s".into()),
        precheck: crate::cli::PrecheckArg::Always,
        breaker: 30,
        include_unknown: false,
        report_json: None,
        metrics_file: None,
        ca_cert: None,
        grace: "5s".into(),
        dry_run: false,
        max_pause: "5m".into(),
        busy_timeout: "60s".into(),
        seed: Some(7),
    }
}

/// How many valid jobs `db` holds, and each one that did not succeed or has other
/// than one group in the sandbox's count `per_key`.
async fn one_group_each(
    db: &Path,
    per_key: &BTreeMap<String, u32>,
) -> Result<(usize, Vec<String>)> {
    let store = Store::open(db)?;
    let jobs = store.jobs().await?;
    let mut valid = 0;
    let mut problems = Vec::new();
    for job in jobs.iter().filter(|j| j.state != "invalid") {
        valid += 1;
        let key = job.key.clone().unwrap_or_default();
        let groups = per_key.get(&key).copied().unwrap_or(0);
        if job.state != "succeeded" || groups != 1 {
            problems.push(format!(
                "{key}: state {}, {groups} groups in the sandbox",
                job.state
            ));
        }
    }
    Ok((valid, problems))
}
