//! One function per subcommand: they wire config, store, source, engine, API and
//! report together. Errors end here: each is printed once, with its exit code.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::Timestamp;
use tokio::sync::mpsc;

use crate::api::{ApiClient, ApiKey};
use crate::cli::{Cli, Command, LogFormat};
use crate::config::{self, SendConfig};
use crate::engine::{self, Control, StopReason};
use crate::error::{Error, Exit, Result};
use crate::report::Report;
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::source::{CsvSource, ImportRow};
use crate::store::{ImportCounts, Store};

/// Rows per import transaction.
const IMPORT_BATCH: usize = 2000;

/// Logs go to stderr, as text or JSON lines; `RUST_LOG` overrides the level.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Runs a parsed command line to its exit code.
pub async fn dispatch(cli: Cli) -> Exit {
    let env_key = std::env::var("KOHORTPAY_API_KEY").ok();
    let result = match cli.command {
        Command::Run(args) => match config::resolve_send(&args.send, cli.db, env_key) {
            Ok(cfg) => {
                let control = Arc::new(Control::default());
                listen_for_signals(control.clone());
                run(&cfg, &args.csv, control).await
            }
            Err(e) => Err(e),
        },
        Command::Sandbox(args) => match config::resolve_sandbox(&args) {
            Ok(cfg) => sandbox(cfg, args.listen).await,
            Err(e) => Err(e),
        },
        Command::Demo => demo().await,
    };
    match result {
        Ok(exit) => exit,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit()
        }
    }
}

/// First SIGINT/SIGTERM: stop starting requests; second: abandon those in flight.
fn listen_for_signals(control: Arc<Control>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            tracing::warn!("cannot listen for signals; ctrl-c will end the process at once");
            return;
        };
        loop {
            tokio::select! {
                _ = int.recv() => control.signal(),
                _ = term.recv() => control.signal(),
            }
        }
    });
}

/// `run`: import the CSVs, send every pending job, report.
pub async fn run(cfg: &SendConfig, csv: &[PathBuf], control: Arc<Control>) -> Result<Exit> {
    let store = Store::open(&cfg.db)?;
    let options = serde_json::json!({
        "api_base": cfg.api_base,
        "timeout_secs": cfg.timeout.as_secs_f64(),
        "engine": cfg.engine,
        "csv": csv,
    })
    .to_string();
    let run_id = store
        .begin_run("run", options, cfg.engine.settle.as_millis() as i64)
        .await?;
    tracing::info!(run = run_id, db = %cfg.db.display(), "run started");
    let outcome = async {
        if cfg.engine.resend_unknown {
            let n = store.requeue_unknown(run_id).await?;
            tracing::warn!(
                jobs = n,
                "re-sending rows whose earlier outcome is unknown (--include-unknown)"
            );
        }
        for path in csv {
            import_csv(&store, run_id, path).await?;
        }
        let api = ApiClient::new(&cfg.api_base, &cfg.key, cfg.timeout, cfg.ca_cert.as_deref())?;
        engine::drain(store.clone(), api, cfg.engine.clone(), control, run_id).await
    }
    .await;
    finish(&store, run_id, outcome, cfg.report_json.as_deref()).await
}

/// Records the end of a run, prints its report, and picks the exit code.
async fn finish(
    store: &Store,
    run_id: i64,
    outcome: Result<engine::Drained>,
    report_json: Option<&Path>,
) -> Result<Exit> {
    let (exit, stopped, error) = match outcome {
        Err(e) => (e.exit(), Some(e.to_string()), Some(e)),
        Ok(d) => match d.stopped {
            Some(StopReason::Api(why)) => (Exit::StoppedByApi, Some(why), None),
            Some(StopReason::Signal) => (
                Exit::Interrupted,
                Some("interrupted by a signal".to_owned()),
                None,
            ),
            None => (Exit::Success, None, None),
        },
    };
    let mut facts = store.run_facts(run_id).await?;
    let exit = if exit == Exit::Success {
        let bad = facts.states.iter().any(|(s, n)| *n > 0 && s != "succeeded")
            || !facts.conflicts.is_empty();
        if bad { Exit::RowsFailed } else { Exit::Success }
    } else {
        exit
    };
    store
        .finish_run(run_id, exit.code(), stopped.clone())
        .await?;
    facts.finished_at = Some(crate::store::now_text());
    facts.exit_code = Some(i64::from(exit.code()));
    facts.stopped = stopped;
    let report = Report::from_facts(facts);
    print!("{}", report.to_text());
    if let Some(path) = report_json {
        write_atomic(path, report.to_json().as_bytes())?;
    }
    match error {
        Some(e) => Err(e),
        None => Ok(exit),
    }
}

/// Writes a file so readers never see half of it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let io = |source| Error::File {
        action: "write",
        path: path.to_owned(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Streams a CSV into the store in batches; reading happens on a blocking thread.
pub async fn import_csv(store: &Store, run_id: i64, path: &Path) -> Result<ImportCounts> {
    let (tx, mut rx) = mpsc::channel::<(String, Vec<ImportRow>)>(4);
    let path_owned = path.to_owned();
    let reader = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut source = CsvSource::open(&path_owned)?;
        let name = source.name().to_owned();
        if !source.unknown_columns.is_empty() {
            tracing::warn!(source = %name, columns = ?source.unknown_columns, "ignoring columns kohort-batch does not know");
        }
        let now = Timestamp::now();
        let mut batch = Vec::with_capacity(IMPORT_BATCH);
        while let Some(row) = source.next_row(now)? {
            if let Err(reason) = &row.outcome {
                tracing::warn!(source = %name, line = row.line, key = row.key.as_deref().unwrap_or("-"), %reason, "invalid row");
            }
            batch.push(row);
            if batch.len() == IMPORT_BATCH {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(IMPORT_BATCH));
                if tx.blocking_send((name.clone(), full)).is_err() {
                    return Ok(());
                }
            }
        }
        if !batch.is_empty() {
            let _ = tx.blocking_send((name, batch));
        }
        Ok(())
    });
    let mut counts = ImportCounts::default();
    while let Some((name, rows)) = rx.recv().await {
        counts += store.import(run_id, name, rows).await?;
    }
    reader
        .await
        .map_err(|e| Error::Internal(format!("the CSV reader failed: {e}")))??;
    tracing::info!(
        source = %path.display(),
        rows = counts.rows,
        queued = counts.queued,
        invalid = counts.invalid,
        duplicates = counts.duplicates,
        conflicts = counts.conflicts,
        "imported"
    );
    Ok(counts)
}

/// `sandbox`: serve until SIGINT/SIGTERM.
async fn sandbox(cfg: SandboxConfig, listen: std::net::SocketAddr) -> Result<Exit> {
    let sb = Sandbox::start(cfg, listen).await.map_err(|e| {
        Error::usage(format!(
            "cannot listen on {listen}: {e} (is the port taken? try --listen 127.0.0.1:0)"
        ))
    })?;
    println!("kohort-batch sandbox listening on {}", sb.url());
    println!(
        "  stats: {}/_sandbox/stats   keys: any sk_test_… or sk_live_…",
        sb.url()
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        }
        trigger.cancel();
    });
    sb.serve_until(stop).await;
    Ok(Exit::Success)
}

/// The embedded sample, so `demo` works from any directory.
const SAMPLE_CSV: &str = include_str!("../samples/orders.csv");

/// `demo`: the sandbox with mild faults, the sample CSV, a temporary database, and
/// the sandbox's own count proving one group per valid order.
async fn demo() -> Result<Exit> {
    let faults = SandboxConfig {
        latency: (
            std::time::Duration::from_millis(5),
            std::time::Duration::from_millis(40),
        ),
        error_503: 0.02,
        retry_after_secs: 1,
        seed: 2026,
        ..SandboxConfig::default()
    };
    let sb = Sandbox::start(faults, ([127, 0, 0, 1], 0).into())
        .await
        .map_err(|e| Error::Internal(format!("cannot start the sandbox on loopback: {e}")))?;
    let dir = tempfile::tempdir()
        .map_err(|e| Error::Internal(format!("cannot make a temporary directory: {e}")))?;
    let csv = dir.path().join("orders.csv");
    std::fs::write(&csv, SAMPLE_CSV).map_err(|source| Error::File {
        action: "write",
        path: csv.clone(),
        source,
    })?;
    let db = dir.path().join("demo.db");
    println!(
        "Demo: sandbox on {} (latency 5–40 ms, 2% 503 with Retry-After: 1)",
        sb.url()
    );
    println!("      importing samples/orders.csv into {}\n", db.display());
    let args = crate::cli::SendArgs {
        api_base: sb.url(),
        api_key_file: None,
        live: false,
        concurrency: 8,
        rate: 50.0,
        max_attempts: 8,
        timeout: "2s".into(),
        settle: None,
        precheck: crate::cli::PrecheckArg::Always,
        breaker: 30,
        include_unknown: false,
        report_json: None,
        grace: "5s".into(),
        seed: Some(7),
    };
    let mut cfg = config::resolve_send(&args, db.clone(), Some("sk_test_demo".into()))?;
    cfg.key = ApiKey::new("sk_test_demo".into());
    let control = Arc::new(Control::default());
    listen_for_signals(control.clone());
    let exit = run(&cfg, &[csv], control).await?;

    let stats = sb.stats(true);
    let per_key = stats.groups_per_key.clone().unwrap_or_default();
    let store = Store::open(&db)?;
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
    sb.shutdown().await;
    println!(
        "\nSandbox count: {} groups for {} valid orders; {} orders with more than one group.",
        stats.groups_total, valid, stats.duplicate_keys
    );
    if problems.is_empty() && stats.duplicate_keys == 0 && exit != Exit::Internal {
        println!(
            "Every valid row got exactly one group. (Invalid sample rows are explained in samples/README.md.)"
        );
        Ok(Exit::Success)
    } else {
        for p in &problems {
            println!("  problem: {p}");
        }
        Ok(Exit::RowsFailed)
    }
}
