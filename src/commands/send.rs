//! The commands that write jobs: `run`, `retry-failed` (both send) and `enqueue`
//! (import only). They share one shape: begin a run, prepare the queue, drain,
//! then finish (record the end, print the report, pick the exit code).

use std::collections::BTreeMap;
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
use crate::store::{
    Access, Db, FailureClass, ImportCounts, JobState, RetryFilter, RunFacts, StateCounts, Store,
};

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

/// One sending run: begin it, prepare the queue (requeue, import, inbox), drain,
/// finish.
async fn session(
    cfg: &SendConfig,
    command: &str,
    csv: &[PathBuf],
    retry: Option<RetryFilter>,
    control: Arc<Control>,
) -> Result<Exit> {
    if cfg.dry_run {
        return super::dry_run::dry_run(cfg, command, csv, retry).await;
    }
    let (api, store, run_id) = match begin(cfg, command, csv, retry.as_ref()).await {
        Ok(started) => started,
        Err(e) => {
            write_early_metrics(cfg, &e);
            return Err(e);
        }
    };
    tracing::info!(run = run_id, command, db = %cfg.db, "run started");
    let mut requeued = None;
    let outcome = async {
        requeued = requeue(cfg, &store, run_id, retry.as_ref()).await?;
        for path in csv {
            import_csv(&store, run_id, path, &cfg.csv).await?;
        }
        move_inbox(&store, run_id).await?;
        send_pending(cfg, &store, api, control, run_id).await
    }
    .instrument(tracing::info_span!("run", run = run_id))
    .await;
    let paused = outcome.as_ref().map_or(Duration::ZERO, |d| d.paused);
    let check_gaps = outcome.as_ref().ok().and_then(|d| d.check_gaps);
    let outcome = outcome.map(|d| d.stopped);
    let outputs = Outputs {
        report_json: cfg.report_json.as_deref(),
        metrics_file: cfg.metrics_file.as_deref(),
        paused,
        check_gaps,
        requeued,
    };
    finish(&store, run_id, outcome, true, outputs).await
}

/// What a run was asked to do, kept with it (`runs.options`, JSON).
#[derive(serde::Serialize)]
struct RunOptions<'a> {
    api_base: &'a str,
    timeout_secs: f64,
    engine: &'a crate::engine::EngineConfig,
    csv: &'a [PathBuf],
    retry_filter: Option<&'a RetryFilter>,
}

/// Checks everything that can be checked before the database is opened or
/// changed, then opens the API client and the database and records the run.
async fn begin(
    cfg: &SendConfig,
    command: &str,
    csv: &[PathBuf],
    retry: Option<&RetryFilter>,
) -> Result<(ApiClient, Store, i64)> {
    check_inputs(csv, &cfg.csv)?;
    let api = ApiClient::new(&cfg.api_base, &cfg.key, cfg.timeout, cfg.ca_cert.as_deref())?;
    let store = Store::connect(
        &cfg.db,
        Access::Write,
        cfg.busy_timeout,
        cfg.ca_cert.as_deref(),
    )
    .await?;
    let options = RunOptions {
        api_base: &cfg.api_base,
        timeout_secs: cfg.timeout.as_secs_f64(),
        engine: &cfg.engine,
        csv,
        retry_filter: retry,
    };
    let options = serde_json::to_string(&options)
        .map_err(|e| Error::internal_from("cannot write the run's options", e))?;
    let run_id = store.begin_run(command, options, true).await?;
    Ok((api, store, run_id))
}

/// A run that could not start still says so to monitoring (exit 5, 74, …).
fn write_early_metrics(cfg: &SendConfig, e: &Error) {
    if let Some(path) = &cfg.metrics_file {
        let text = crate::metrics::render(&crate::metrics::Finished::early(e.exit()));
        if let Err(m) = super::write_readable(path, text.as_bytes()) {
            tracing::warn!(error = %m, "cannot write the metrics file");
        }
    }
}

/// Puts jobs back to pending before the run sends: the failed ones `retry`
/// matches (how many, for the report), else with `--include-unknown` those whose
/// outcome is unknown.
async fn requeue(
    cfg: &SendConfig,
    store: &Store,
    run_id: i64,
    retry: Option<&RetryFilter>,
) -> Result<Option<u64>> {
    match retry {
        Some(filter) => {
            let n = store.requeue_failed(run_id, filter.clone()).await?;
            tracing::info!(jobs = n, "put failed jobs back to pending");
            Ok(Some(n as u64))
        }
        None if cfg.engine.resend_unknown => {
            let n = store.requeue_unknown(run_id).await?;
            tracing::warn!(
                jobs = n,
                "re-sending rows whose earlier outcome is unknown (--include-unknown)"
            );
            Ok(None)
        }
        None => Ok(None),
    }
}

/// Moves the rows producers wrote to the inbox into jobs.
async fn move_inbox(store: &Store, run_id: i64) -> Result<()> {
    let moved = move_inbox_rows(store, run_id).await?;
    if moved.rows > 0 {
        tracing::info!(
            rows = moved.rows,
            queued = moved.queued,
            invalid = moved.invalid,
            "moved the inbox into jobs"
        );
    }
    Ok(())
}

/// Moves the inbox rows present now into jobs, a page at a time: each page is
/// validated here, as CSV rows are, and imported and deleted from the inbox in one
/// transaction. Rows written meanwhile wait for the next run.
pub(super) async fn move_inbox_rows(store: &Store, run_id: i64) -> Result<ImportCounts> {
    const PAGE: usize = 2_000;
    let mut counts = ImportCounts::default();
    let Some(last) = store.inbox_last().await? else {
        return Ok(counts);
    };
    let mut after = 0;
    loop {
        let page = store.inbox_page(after, last, PAGE).await?;
        let Some(&(through, _)) = page.last() else {
            break;
        };
        let now = Timestamp::now();
        let rows: Vec<ImportRow> = page
            .iter()
            .map(|(id, fields)| ImportRow::from_fields(id.unsigned_abs(), fields, now))
            .collect();
        for row in &rows {
            if let Err(reason) = &row.outcome {
                let key = row.key.as_deref().unwrap_or("-");
                tracing::warn!(run = run_id, source = "inbox", inbox_id = row.line, key, %reason, "invalid row");
            }
        }
        counts += store.import_inbox(run_id, rows, through).await?;
        after = through;
    }
    Ok(counts)
}

/// Sends every pending job, with a progress bar when one shows.
async fn send_pending(
    cfg: &SendConfig,
    store: &Store,
    api: ApiClient,
    control: Arc<Control>,
    run_id: i64,
) -> Result<engine::Drained> {
    // Counting the pending jobs reads the whole table: only for a bar that shows.
    let bar = if super::progress::wanted() {
        let pending = store.state_counts().await?.get(JobState::Pending);
        super::progress::start(pending as u64)
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

/// Where a run's report and metrics go besides stdout.
#[derive(Debug, Default, Clone, Copy)]
struct Outputs<'a> {
    report_json: Option<&'a Path>,
    metrics_file: Option<&'a Path>,
    /// How long requests were held by pauses (recorded with the run).
    paused: Duration,
    /// How long cleared jobs waited for their creates.
    check_gaps: Option<crate::engine::Gaps>,
    /// `retry-failed`: how many jobs its filters put back.
    requeued: Option<u64>,
}

/// `enqueue`: import CSV rows as pending jobs; nothing is sent, no lock is taken.
pub async fn enqueue(db: &Db, csv: &[PathBuf]) -> Result<Exit> {
    enqueue_with(db, csv, &CsvOptions::default()).await
}

/// `enqueue` of CSV files read as `opts` say.
pub async fn enqueue_with(db: &Db, csv: &[PathBuf], opts: &CsvOptions) -> Result<Exit> {
    check_inputs(csv, opts)?;
    let store = Store::connect_plain(db, Access::Write).await?;
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
    let (exit, stopped, error) = ending(outcome);
    // The writing is done: the WAL can be copied while the report is read.
    store.checkpoint_soon();
    let mut facts = store
        .run_facts(run_id)
        .await?
        .ok_or_else(|| Error::internal(format!("run {run_id} vanished from the database")))?;
    let all_states = store.state_counts().await?;
    let in_db = |s: JobState| all_states.get(s);
    let backlog = backlog(&all_states, &facts.states);
    let exit = if exit == Exit::Success {
        judge(&facts, sent, outputs.requeued, in_db(JobState::Failed))
    } else {
        exit
    };
    // A run stopped early says how much is left for the next one.
    let stopped = match stopped {
        Some(why) if matches!(exit, Exit::StoppedByApi | Exit::Interrupted) => {
            let pending = (in_db(JobState::Pending) + in_db(JobState::InFlight)).max(0) as u64;
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
    report.check_to_create = outputs.check_gaps;
    report.backlog = backlog;
    // `report --run` shows this very report later.
    store.save_report(run_id, report.to_json()).await?;
    let last_success = store.last_success().await?;
    let no_share_id = match outputs.metrics_file {
        Some(_) => Some(store.groups_without_share_id().await?),
        None => None,
    };
    store.close().await;
    log_finished(run_id, &report, exit);
    super::out::report(&report.to_text())?;
    if let Some(path) = outputs.report_json {
        write_atomic(path, report.to_json().as_bytes())?;
    }
    if let Some(path) = outputs.metrics_file {
        let gauges: Vec<(String, i64)> = [
            JobState::Failed,
            JobState::Unknown,
            JobState::Invalid,
            JobState::Pending,
            JobState::InFlight,
        ]
        .into_iter()
        .map(|s| (s.as_str().to_owned(), in_db(s)))
        .collect();
        let mut finished = crate::metrics::Finished::of(&report, &gauges, last_success);
        finished.groups_without_share_id = no_share_id;
        let text = crate::metrics::render(&finished);
        super::write_readable(path, text.as_bytes())?;
    }
    match error {
        Some(e) => Err(e),
        None => Ok(exit),
    }
}

/// How the run ended, before its jobs are looked at: the exit code, why it
/// stopped (for the report), and the error to hand back.
fn ending(outcome: Result<Option<StopReason>>) -> (Exit, Option<String>, Option<Error>) {
    match outcome {
        Err(e) => (e.exit(), Some(e.to_string()), Some(e)),
        Ok(Some(StopReason::Api(why))) => (Exit::StoppedByApi, Some(why), None),
        Ok(Some(StopReason::Signal)) => (
            Exit::Interrupted,
            Some("interrupted by a signal".to_owned()),
            None,
        ),
        Ok(None) => (Exit::Success, None, None),
    }
}

/// The exit code of a run that ended normally: rows that did not succeed (or
/// conflicted) fail it, and so does a retry whose filters matched nothing while
/// `failed_in_db` failed jobs are left.
fn judge(facts: &RunFacts, sent: bool, requeued: Option<u64>, failed_in_db: i64) -> Exit {
    // Without sending, pending is the expected end state of a row.
    let fine = |s: JobState| s == JobState::Succeeded || (!sent && s == JobState::Pending);
    let bad = facts.states.listed().any(|(s, _)| !fine(s)) || !facts.conflicts.is_empty();
    let retried_nothing = requeued == Some(0) && failed_in_db > 0;
    if bad || retried_nothing {
        Exit::RowsFailed
    } else {
        Exit::Success
    }
}

/// What is left to do in the whole database that is older than this run: jobs
/// by state, less those of `this_run`.
fn backlog(all_states: &StateCounts, this_run: &StateCounts) -> BTreeMap<String, i64> {
    [
        JobState::Failed,
        JobState::Unknown,
        JobState::Invalid,
        JobState::Pending,
    ]
    .into_iter()
    .map(|s| {
        let older = all_states.get(s) - this_run.get(s);
        (s.as_str().to_owned(), older.max(0))
    })
    .collect()
}

fn log_finished(run_id: i64, report: &Report, exit: Exit) {
    let jobs = |s: JobState| report.jobs.get(s.as_str()).copied().unwrap_or(0);
    tracing::info!(
        run = run_id,
        command = %report.command,
        exit_code = exit.code(),
        duration_secs = report.duration_secs.unwrap_or(0.0),
        succeeded = jobs(JobState::Succeeded),
        failed = jobs(JobState::Failed),
        unknown = jobs(JobState::Unknown),
        invalid = jobs(JobState::Invalid),
        pending = jobs(JobState::Pending),
        requests = report.requests.total,
        "run finished"
    );
}

/// The failure classes `retry-failed --class` knows: those the engine records.
pub(crate) const FAILURE_CLASSES: &str =
    "retries_exhausted, order_not_found, http_400, http_404, http_422 (any http_NNN of a 4xx)";

/// The failure classes named by `--class`; a name no failed job can have is refused
/// (a typo would match nothing, silently).
pub(super) fn failure_classes(names: &[String]) -> Result<Vec<FailureClass>> {
    names
        .iter()
        .map(|name| {
            FailureClass::parse(name).ok_or_else(|| {
                Error::usage(format!(
                    "--class {name:?} is not a failure class; the classes are {FAILURE_CLASSES}"
                ))
            })
        })
        .collect()
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
    let batch_rows = store.import_batch_rows();
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
        let mut batch = Vec::with_capacity(batch_rows);
        while let Some(row) = source.next_row(now)? {
            if let Err(reason) = &row.outcome {
                tracing::warn!(run = run_id, source = %name, line = row.line, key = row.key.as_deref().unwrap_or("-"), %reason, "invalid row");
            }
            batch.push(row);
            if batch.len() == batch_rows {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_rows));
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
        .map_err(|e| Error::internal_from("the CSV reader failed", e))??;
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
