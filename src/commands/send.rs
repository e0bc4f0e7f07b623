//! The commands that write jobs: `run`, `retry-failed` (both send) and `enqueue`
//! (import only). They share one shape: begin a run, prepare the queue, drain,
//! then finish (record the end, print the report, pick the exit code).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::write_atomic;
use crate::api::ApiClient;
use crate::config::SendConfig;
use crate::engine::{self, Control, StopReason};
use crate::error::{Error, Exit, Result};
use crate::report::Report;
use crate::source::{CsvEncoding, CsvOptions, CsvSource, ImportRow};
use crate::store::{Access, ImportCounts, RetryFilter, Store};

/// Rows per import transaction.
const IMPORT_BATCH: usize = 4_000;

/// `run`: import the CSVs and the inbox, send every pending job, report.
pub async fn run(cfg: &SendConfig, csv: &[PathBuf], control: Arc<Control>) -> Result<Exit> {
    session(cfg, "run", csv, None, control).await
}

/// `retry-failed`: put matching failed jobs back to pending, then send like `run`.
pub async fn retry_failed(
    cfg: &SendConfig,
    mut filter: RetryFilter,
    control: Arc<Control>,
) -> Result<Exit> {
    filter.include_unknown = cfg.engine.resend_unknown;
    session(cfg, "retry-failed", &[], Some(filter), control).await
}

async fn session(
    cfg: &SendConfig,
    command: &str,
    csv: &[PathBuf],
    retry: Option<RetryFilter>,
    control: Arc<Control>,
) -> Result<Exit> {
    if cfg.dry_run {
        return dry_run(cfg, command, csv, retry).await;
    }
    let started = async {
        // Everything that can be checked is, before the database is opened or changed.
        check_inputs(csv, &cfg.csv)?;
        if let Some(filter) = &retry {
            check_classes(&filter.classes)?;
        }
        let api = ApiClient::new(&cfg.api_base, &cfg.key, cfg.timeout, cfg.ca_cert.as_deref())?;
        let store = Store::open_with(&cfg.db, Access::Write, cfg.busy_timeout)?;
        let options = serde_json::json!({
            "api_base": cfg.api_base,
            "timeout_secs": cfg.timeout.as_secs_f64(),
            "engine": cfg.engine,
            "csv": csv,
            "retry_filter": retry.as_ref().map(|f| format!("{f:?}")),
        })
        .to_string();
        let run_id = store.begin_run(command, options, true).await?;
        Ok::<_, Error>((api, store, run_id))
    }
    .await;
    let (api, store, run_id) = match started {
        Ok(started) => started,
        Err(e) => {
            // A run that could not start still says so to monitoring (exit 5, 74, …).
            if let Some(path) = &cfg.metrics_file {
                let text =
                    crate::metrics::render(&crate::metrics::Finished::early(e.exit().code()));
                if let Err(m) = super::write_readable(path, text.as_bytes()) {
                    tracing::warn!(error = %m, "cannot write the metrics file");
                }
            }
            return Err(e);
        }
    };
    tracing::info!(run = run_id, command, db = %cfg.db.display(), "run started");
    let mut requeued = None;
    let outcome = async {
        match &retry {
            Some(filter) => {
                let n = store.requeue_failed(run_id, filter.clone()).await?;
                tracing::info!(jobs = n, "put failed jobs back to pending");
                requeued = Some(n as u64);
            }
            None if cfg.engine.resend_unknown => {
                let n = store.requeue_unknown(run_id).await?;
                tracing::warn!(
                    jobs = n,
                    "re-sending rows whose earlier outcome is unknown (--include-unknown)"
                );
            }
            None => {}
        }
        for path in csv {
            import_csv(&store, run_id, path, &cfg.csv).await?;
        }
        let moved = store.move_inbox(run_id, Timestamp::now()).await?;
        if moved.rows > 0 {
            tracing::info!(
                rows = moved.rows,
                queued = moved.queued,
                invalid = moved.invalid,
                "moved the inbox into jobs"
            );
        }
        // Counting the pending jobs reads the whole table: only for a bar that shows.
        let bar = if super::progress::wanted() {
            let pending = store
                .state_counts()
                .await?
                .into_iter()
                .find(|(s, _)| s == "pending")
                .map_or(0, |(_, n)| n as u64);
            super::progress::start(pending)
        } else {
            None
        };
        let on_done = bar
            .clone()
            .map(|b| Arc::new(move || b.inc(1)) as engine::OnDone);
        let drained = engine::drain(
            store.clone(),
            api,
            cfg.engine.clone(),
            control,
            run_id,
            on_done,
        )
        .await;
        super::progress::finish(bar);
        drained
    }
    .instrument(tracing::info_span!("run", run = run_id))
    .await;
    let paused = outcome.as_ref().map_or(Duration::ZERO, |d| d.paused);
    let outcome = outcome.map(|d| d.stopped);
    let outputs = Outputs {
        report_json: cfg.report_json.as_deref(),
        metrics_file: cfg.metrics_file.as_deref(),
        paused,
        requeued,
    };
    finish(&store, run_id, outcome, true, outputs).await
}

/// `--dry-run`: the same import, inbox move and requeue as the command, on a copy
/// of the database in a temporary directory (the database itself is only read, no
/// lock is taken, nothing is sent); then what sending would take.
async fn dry_run(
    cfg: &SendConfig,
    command: &str,
    csv: &[PathBuf],
    retry: Option<RetryFilter>,
) -> Result<Exit> {
    check_inputs(csv, &cfg.csv)?;
    if let Some(filter) = &retry {
        check_classes(&filter.classes)?;
    }
    let dir = tempfile::tempdir()
        .map_err(|e| Error::Internal(format!("cannot make a temporary directory: {e}")))?;
    let copy = dir.path().join("dry-run.db");
    if cfg.db.exists() {
        Store::snapshot(&cfg.db, &copy)?;
    }
    let store = Store::open(&copy)?;
    let run_id = store.begin_run(command, "{}".into(), true).await?;
    let requeued = match &retry {
        Some(filter) => Some(store.requeue_failed(run_id, filter.clone()).await? as u64),
        None if cfg.engine.resend_unknown => {
            store.requeue_unknown(run_id).await?;
            None
        }
        None => None,
    };
    let mut imported = ImportCounts::default();
    for path in csv {
        imported += import_csv(&store, run_id, path, &cfg.csv).await?;
    }
    imported += store.move_inbox(run_id, Timestamp::now()).await?;
    let always = cfg.engine.precheck == engine::Precheck::Always;
    let (jobs, checks) = store.send_plan(always).await?;
    let states = store.state_counts().await?;
    store.close().await;
    let in_copy = |s: &str| states.iter().find(|(n, _)| n == s).map_or(0, |(_, n)| *n);
    let requests = jobs + checks;
    let estimate = cfg.engine.rate.map(|r| requests as f64 / r);
    let plan = serde_json::json!({
        "dry_run": true,
        "command": command,
        "imported": imported,
        "requeued": requeued,
        "jobs_to_send": jobs,
        "checked_first": checks,
        "already_succeeded": in_copy("succeeded"),
        "invalid": in_copy("invalid"),
        "failed": in_copy("failed"),
        "unknown": in_copy("unknown"),
        "conflicts": imported.conflicts,
        "requests": requests,
        "rate_per_sec": cfg.engine.rate,
        "concurrency": cfg.engine.concurrency,
        "estimated_secs": estimate,
    });
    let mut text = format!(
        "kohort-batch {command} --dry-run: nothing was changed, nothing was sent\n\
         \x20 Imported   {}: {} queued, {} fixed, {} invalid, {}, {}\n",
        crate::text::count(imported.rows, "row", "rows"),
        imported.queued,
        imported.fixed,
        imported.invalid,
        crate::text::count(imported.duplicates, "duplicate", "duplicates"),
        crate::text::count(imported.conflicts, "conflict", "conflicts"),
    );
    if let Some(n) = requeued {
        text.push_str(&format!(
            "  Retry      {} would go back to pending\n",
            crate::text::count(n, "failed job", "failed jobs")
        ));
    }
    text.push_str(&format!(
        "  Would send {} ({} checked first for an existing group); {} already succeeded\n\
         \x20 Requests   about {requests} ({jobs} creates, {checks} checks; a check that finds a \
         group fetches it instead of creating one)\n",
        crate::text::count(jobs.max(0) as u64, "job", "jobs"),
        checks,
        in_copy("succeeded"),
    ));
    text.push_str(&match estimate {
        Some(secs) => format!(
            "  Time       about {} at --rate {}/s (--concurrency {})\n",
            crate::text::human(Duration::from_secs(secs.ceil() as u64)),
            cfg.engine.rate.unwrap_or(0.0),
            cfg.engine.concurrency
        ),
        None => "  Time       no --rate: as fast as the API answers\n".to_owned(),
    });
    super::out::report(&text)?;
    if let Some(path) = &cfg.report_json {
        write_atomic(
            path,
            serde_json::to_string_pretty(&plan)
                .unwrap_or_default()
                .as_bytes(),
        )?;
    }
    Ok(if imported.invalid + imported.conflicts > 0 {
        Exit::RowsFailed
    } else {
        Exit::Success
    })
}

/// Where a run's report and metrics go besides stdout.
#[derive(Debug, Default, Clone, Copy)]
struct Outputs<'a> {
    report_json: Option<&'a Path>,
    metrics_file: Option<&'a Path>,
    /// How long requests were held by pauses (recorded with the run).
    paused: Duration,
    /// `retry-failed`: how many jobs its filters put back.
    requeued: Option<u64>,
}

/// `enqueue`: import CSV rows as pending jobs; nothing is sent, no lock is taken.
pub async fn enqueue(db: &Path, csv: &[PathBuf]) -> Result<Exit> {
    enqueue_with(db, csv, &CsvOptions::default()).await
}

/// `enqueue` of CSV files read as `opts` say.
pub async fn enqueue_with(db: &Path, csv: &[PathBuf], opts: &CsvOptions) -> Result<Exit> {
    check_inputs(csv, opts)?;
    let store = Store::open(db)?;
    let options = serde_json::json!({ "csv": csv }).to_string();
    let run_id = store.begin_run("enqueue", options, false).await?;
    let mut outcome = Ok(None);
    for path in csv {
        if let Err(e) = import_csv(&store, run_id, path, opts).await {
            outcome = Err(e);
            break;
        }
    }
    finish(&store, run_id, outcome, false, Outputs::default()).await
}

/// Records the end of a run, prints its report, and picks the exit code.
async fn finish(
    store: &Store,
    run_id: i64,
    outcome: Result<Option<StopReason>>,
    sent: bool,
    outputs: Outputs<'_>,
) -> Result<Exit> {
    let (exit, stopped, error) = match outcome {
        Err(e) => (e.exit(), Some(e.to_string()), Some(e)),
        Ok(Some(StopReason::Api(why))) => (Exit::StoppedByApi, Some(why), None),
        Ok(Some(StopReason::Signal)) => (
            Exit::Interrupted,
            Some("interrupted by a signal".to_owned()),
            None,
        ),
        Ok(None) => (Exit::Success, None, None),
    };
    // The writing is done: the WAL can be copied while the report is read.
    store.checkpoint_soon();
    let mut facts = store
        .run_facts(run_id)
        .await?
        .ok_or_else(|| Error::Internal(format!("run {run_id} vanished from the database")))?;
    // What is left to do in the whole database, and how much of it is older than
    // this run (the report's backlog; the metrics' gauges).
    let all_states = store.state_counts().await?;
    let in_db = |s: &str| {
        all_states
            .iter()
            .find(|(n, _)| n == s)
            .map_or(0, |(_, n)| *n)
    };
    let this_run = |s: &str| {
        facts
            .states
            .iter()
            .find(|(n, _)| n == s)
            .map_or(0, |(_, n)| *n)
    };
    let backlog: std::collections::BTreeMap<String, i64> =
        ["failed", "unknown", "invalid", "pending"]
            .iter()
            .map(|s| ((*s).to_owned(), (in_db(s) - this_run(s)).max(0)))
            .collect();
    let exit = if exit == Exit::Success {
        // Without sending, pending is the expected end state of a row.
        let fine = |s: &str| s == "succeeded" || (!sent && s == "pending");
        let bad =
            facts.states.iter().any(|(s, n)| *n > 0 && !fine(s)) || !facts.conflicts.is_empty();
        // A retry whose filters matched nothing has not dealt with the failures left.
        let retried_nothing = outputs.requeued == Some(0) && in_db("failed") > 0;
        if bad || retried_nothing {
            Exit::RowsFailed
        } else {
            Exit::Success
        }
    } else {
        exit
    };
    // A run stopped early says how much is left for the next one.
    let stopped = match stopped {
        Some(why) if matches!(exit, Exit::StoppedByApi | Exit::Interrupted) => {
            let pending = (in_db("pending") + in_db("in_flight")).max(0) as u64;
            Some(format!(
                "{why}; {} pending, for the next run",
                crate::text::count(pending, "row stays", "rows stay")
            ))
        }
        other => other,
    };
    let finished_at = store
        .finish_run(run_id, exit.code(), stopped.clone(), outputs.paused)
        .await?;
    facts.finished_at = Some(finished_at);
    facts.paused_ms = i64::try_from(outputs.paused.as_millis()).unwrap_or(i64::MAX);
    facts.exit_code = Some(i64::from(exit.code()));
    facts.stopped = stopped;
    let mut report = Report::from_facts(facts);
    report.requeued = outputs.requeued;
    report.backlog = backlog;
    // `report --run` shows this very report later.
    store.save_report(run_id, report.to_json()).await?;
    let last_success = store.last_success().await?;
    let no_share_id = match outputs.metrics_file {
        Some(_) => Some(store.groups_without_share_id().await?),
        None => None,
    };
    store.close().await;
    tracing::info!(
        run = run_id,
        command = %report.command,
        exit_code = exit.code(),
        duration_secs = report.duration_secs.unwrap_or(0.0),
        succeeded = report.jobs.get("succeeded").copied().unwrap_or(0),
        failed = report.jobs.get("failed").copied().unwrap_or(0),
        unknown = report.jobs.get("unknown").copied().unwrap_or(0),
        invalid = report.jobs.get("invalid").copied().unwrap_or(0),
        pending = report.jobs.get("pending").copied().unwrap_or(0),
        requests = report.requests.total,
        "run finished"
    );
    super::out::report(&report.to_text())?;
    if let Some(path) = outputs.report_json {
        write_atomic(path, report.to_json().as_bytes())?;
    }
    if let Some(path) = outputs.metrics_file {
        let backlog: Vec<(String, i64)> = ["failed", "unknown", "invalid", "pending", "in_flight"]
            .iter()
            .map(|s| ((*s).to_owned(), in_db(s)))
            .collect();
        let mut finished = crate::metrics::Finished::of(&report, &backlog, last_success);
        finished.groups_without_share_id = no_share_id;
        let text = crate::metrics::render(&finished);
        super::write_readable(path, text.as_bytes())?;
    }
    match error {
        Some(e) => Err(e),
        None => Ok(exit),
    }
}

/// The failure classes `retry-failed --class` knows: those the engine records.
pub const FAILURE_CLASSES: &str =
    "retries_exhausted, order_not_found, http_400, http_404, http_422 (any http_NNN of a 4xx)";

/// Refuses a `--class` no failed job can have (a typo would match nothing, silently).
fn check_classes(classes: &[String]) -> Result<()> {
    for class in classes {
        let http = class.strip_prefix("http_").is_some_and(|n| {
            n.len() == 3 && n.starts_with('4') && n.bytes().all(|b| b.is_ascii_digit())
        });
        if !(http || class == "retries_exhausted" || class == "order_not_found") {
            return Err(Error::usage(format!(
                "--class {class:?} is not a failure class; the classes are {FAILURE_CLASSES}"
            )));
        }
    }
    Ok(())
}

/// Every CSV named can be opened and read, and its header is usable: checked before
/// a database is opened, so a typo records no run and changes nothing.
pub(super) fn check_inputs(csv: &[PathBuf], opts: &CsvOptions) -> Result<()> {
    for path in csv.iter().filter(|p| p.as_os_str() != "-") {
        if path.is_dir() {
            return Err(Error::usage(format!(
                "--csv {} is a directory: give the CSV file",
                path.display()
            )));
        }
        // Opening reads the header: a missing file, a bad header or two columns for
        // one field stop here.
        CsvSource::open_with(path, opts)?;
        // A file that is not UTF-8 is refused whole, before any row of it goes in.
        if opts.encoding == CsvEncoding::Utf8 {
            crate::source::check_utf8(path)?;
        }
    }
    Ok(())
}

/// Streams a CSV into the store in batches; reading happens on a blocking thread.
pub async fn import_csv(
    store: &Store,
    run_id: i64,
    path: &Path,
    opts: &CsvOptions,
) -> Result<ImportCounts> {
    let opts = *opts;
    let (tx, mut rx) = mpsc::channel::<(String, Vec<ImportRow>)>(2);
    // Imported batches go back to the reader, which frees them: freeing is much cheaper
    // on the thread that allocated (glibc arenas), and that thread has time to spare.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Vec<ImportRow>>();
    let path_owned = path.to_owned();
    let reader = tokio::task::spawn_blocking(move || -> Result<u64> {
        let mut source = CsvSource::open_with(&path_owned, &opts)?;
        let name = source.name().to_owned();
        if !source.unknown_columns.is_empty() {
            tracing::warn!(
                source = %name,
                count = source.unknown_columns.len(),
                columns = %crate::source::list_some(&source.unknown_columns),
                "ignoring columns kohort-batch does not know"
            );
        }
        let now = Timestamp::now();
        let mut batch = Vec::with_capacity(IMPORT_BATCH);
        while let Some(row) = source.next_row(now)? {
            if let Err(reason) = &row.outcome {
                tracing::warn!(run = run_id, source = %name, line = row.line, key = row.key.as_deref().unwrap_or("-"), %reason, "invalid row");
            }
            batch.push(row);
            if batch.len() == IMPORT_BATCH {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(IMPORT_BATCH));
                if tx.blocking_send((name.clone(), full)).is_err() {
                    return Ok(source.empty_lines());
                }
                done_rx.try_iter().for_each(drop);
            }
        }
        if !batch.is_empty() {
            let _ = tx.blocking_send((name, batch));
        }
        Ok(source.empty_lines())
    });
    let mut counts = ImportCounts::default();
    while let Some((name, rows)) = rx.recv().await {
        let (batch_counts, rows) = store.import(run_id, name, rows).await?;
        counts += batch_counts;
        // The reader may be done already: then the rows are freed here.
        let _ = done_tx.send(rows);
    }
    let empty = reader
        .await
        .map_err(|e| Error::Internal(format!("the CSV reader failed: {e}")))??;
    if empty > 0 {
        let skipped = ImportCounts {
            empty,
            ..ImportCounts::default()
        };
        store.add_import_counts(run_id, skipped).await?;
        counts += skipped;
    }
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
