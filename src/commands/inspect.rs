//! The commands that only read: `validate` (a CSV, no database, no network),
//! `report` (a run, or the list of runs) and `export` (groups, failures).

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::Path;

use jiff::Timestamp;

use crate::cli::{ExportFormat, ExportWhat, Format};
use crate::error::{Error, Exit, Result};
use crate::report::Report;
use crate::source::{CsvOptions, CsvSource, canonical_header};
use crate::store::{JobExport, Store};

use super::out;
use crate::text::{count, escape};

fn io_error(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::File {
        action: "write",
        path: what.into(),
        source,
    }
}

/// `validate`: reads the CSV exactly as `run` would and prints, in one pass, the
/// request bodies (NDJSON on stdout with `--json`) and every invalid row.
pub fn validate(path: &Path, json: bool, opts: &CsvOptions) -> Result<Exit> {
    let mut source = CsvSource::open_with(path, opts)?;
    let name = source.name().to_owned();
    let now = Timestamp::now();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let err = io_error("standard output");
    let mut problems: Box<dyn Write> = if json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    // hash of the key -> (hash of the body, line): enough to tell duplicates from
    // conflicts in 24 bytes a row, so a million rows fit well under 100 MB. (Two keys
    // sharing a 64-bit hash would be reported as a conflict: odds about 1 in 10^7 for
    // a million rows, and `run` decides on the real keys anyway.)
    let mut seen: HashMap<u64, (u64, u64)> = HashMap::new();
    let digest = |text: &str| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        h.finish()
    };
    let (mut rows, mut valid, mut invalid, mut duplicates, mut conflicts) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let name = escape(&name).into_owned();
    if !source.unknown_columns.is_empty() {
        writeln!(
            problems,
            "{name}, line 1: {} not used (ignored): {}",
            count(
                source.unknown_columns.len() as u64,
                "column is",
                "columns are"
            ),
            escape(&crate::source::list_some(&source.unknown_columns))
        )
        .map_err(&err)?;
    }
    while let Some(row) = source.next_row(now)? {
        rows += 1;
        match row.outcome {
            Err(reason) => {
                invalid += 1;
                writeln!(problems, "{name}, line {}: {}", row.line, escape(&reason))
                    .map_err(&err)?;
            }
            Ok(body) => {
                let text = body.to_json();
                let (key_hash, body_hash) = (digest(body.key()), digest(&text));
                match seen.get(&key_hash) {
                    Some(&(d, first)) if d == body_hash => {
                        duplicates += 1;
                        writeln!(
                            problems,
                            "{name}, line {}: duplicate of line {first}; sent once",
                            row.line
                        )
                        .map_err(&err)?;
                    }
                    Some(&(_, first)) => {
                        conflicts += 1;
                        writeln!(
                            problems,
                            "{name}, line {}: key {} is also on line {first} with different data; \
                             this row would not be sent",
                            row.line,
                            escape(body.key())
                        )
                        .map_err(&err)?;
                    }
                    None => {
                        valid += 1;
                        seen.insert(key_hash, (body_hash, row.line));
                        if json {
                            writeln!(out, "{text}").map_err(&err)?;
                        }
                    }
                }
            }
        }
    }
    out.flush().map_err(&err)?;
    let empty = match source.empty_lines() {
        0 => String::new(),
        n => format!(", {} skipped", count(n, "empty line", "empty lines")),
    };
    writeln!(
        problems,
        "{name}: {}: {valid} would be sent, {invalid} invalid, {}, {}{empty}",
        count(rows, "row", "rows"),
        count(duplicates, "duplicate", "duplicates"),
        count(conflicts, "conflict", "conflicts")
    )
    .map_err(&err)?;
    Ok(if invalid + conflicts > 0 {
        Exit::RowsFailed
    } else {
        Exit::Success
    })
}

/// `report`: one run (`--run ID`, `--last`), or the list of recent runs.
pub async fn report(db: &Path, run: Option<i64>, last: bool, format: Format) -> Result<Exit> {
    let store = Store::open_existing(db)?;
    let id = match (run, last) {
        (Some(id), _) => Some(id),
        (None, true) => Some(
            store
                .last_run_id()
                .await?
                .ok_or_else(|| Error::usage(format!("{} has no runs yet", db.display())))?,
        ),
        (None, false) => None,
    };
    let Some(id) = id else {
        let runs = store.list_runs(20).await?;
        let text = match format {
            Format::Json => format!(
                "{}\n",
                serde_json::to_string_pretty(&runs).unwrap_or_default()
            ),
            Format::Text => {
                let mut text = format!(
                    "{:>5}  {:<13} {:<27} {:>4}  {:>9}  jobs\n",
                    "run", "command", "started", "exit", "succeeded"
                );
                for r in &runs {
                    let exit = r.exit_code.map_or("…".to_owned(), |c| c.to_string());
                    text.push_str(&format!(
                        "{:>5}  {:<13} {:<27} {:>4}  {:>9}  {}\n",
                        r.run_id, r.command, r.started_at, exit, r.succeeded, r.jobs
                    ));
                }
                if runs.is_empty() {
                    text.push_str("(no runs yet)\n");
                } else {
                    text.push_str("\nShow one with: kohort-batch report --run ID (or --last)\n");
                }
                text
            }
        };
        out::say(&text)?;
        return Ok(Exit::Success);
    };
    // A finished run's report is the one printed when it finished (later runs may
    // have changed its jobs since); an unfinished or older run's is rebuilt.
    let saved = store
        .saved_report(id)
        .await?
        .and_then(|json| serde_json::from_str::<Report>(&json).ok());
    let report = match saved {
        Some(report) => report,
        None => Report::from_facts(store.run_facts(id).await?.ok_or_else(|| {
            Error::usage(format!(
                "there is no run {id} in {}; `kohort-batch report` lists the runs",
                db.display()
            ))
        })?),
    };
    match format {
        Format::Text => out::say(&report.to_text())?,
        Format::Json => out::say(&format!("{}\n", report.to_json()))?,
    }
    Ok(Exit::Success)
}

const PAGE: usize = 2000;

/// Calls `each` for every job in `states`, page by page.
async fn for_each_job(
    store: &Store,
    states: &'static [&'static str],
    mut each: impl FnMut(JobExport) -> Result<()>,
) -> Result<()> {
    let mut after = 0;
    loop {
        let page = store.jobs_page(states, after, PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = last.id;
        for job in page {
            each(job)?;
        }
    }
}

/// Every row `export failures` gives: failed, unknown and invalid jobs, then the
/// rows that conflicted with an imported key.
async fn for_each_failure(
    store: &Store,
    mut each: impl FnMut(JobExport) -> Result<()>,
) -> Result<()> {
    for_each_job(store, &["failed", "unknown", "invalid"], &mut each).await?;
    let mut after = 0;
    loop {
        let page = store.conflicts_page(after, PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = last.id;
        for row in page {
            each(row)?;
        }
    }
}

/// Writes records as CSV or as one JSON array, streaming.
struct Sink {
    format: ExportFormat,
    csv: Option<csv::Writer<Box<dyn Write>>>,
    json: Option<Box<dyn Write>>,
    first: bool,
    header: Vec<String>,
}

impl Sink {
    fn new(format: ExportFormat, header: Vec<String>, out: Box<dyn Write>) -> Result<Sink> {
        let mut sink = Sink {
            format,
            csv: None,
            json: None,
            first: true,
            header,
        };
        match format {
            ExportFormat::Csv => {
                let mut w = csv::Writer::from_writer(out);
                w.write_record(&sink.header).map_err(csv_err)?;
                sink.csv = Some(w);
            }
            ExportFormat::Json => {
                let mut out = out;
                out.write_all(b"[").map_err(io_error("the export"))?;
                sink.json = Some(out);
            }
        }
        Ok(sink)
    }

    fn row(&mut self, cells: &[String]) -> Result<()> {
        match self.format {
            ExportFormat::Csv => self
                .csv
                .as_mut()
                .map_or(Ok(()), |w| w.write_record(cells).map_err(csv_err)),
            ExportFormat::Json => {
                let obj: serde_json::Map<String, serde_json::Value> = self
                    .header
                    .iter()
                    .zip(cells)
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect();
                let sep = if self.first { "\n" } else { ",\n" };
                self.first = false;
                let out = self
                    .json
                    .as_mut()
                    .ok_or_else(|| Error::Internal("no JSON sink".into()))?;
                write!(out, "{sep}{}", serde_json::Value::Object(obj))
                    .map_err(io_error("the export"))
            }
        }
    }

    fn finish(self) -> Result<()> {
        if let Some(mut w) = self.csv {
            w.flush().map_err(io_error("the export"))?;
        }
        if let Some(mut out) = self.json {
            out.write_all(b"\n]\n")
                .and_then(|()| out.flush())
                .map_err(io_error("the export"))?;
        }
        Ok(())
    }
}

fn csv_err(e: csv::Error) -> Error {
    match e.into_kind() {
        csv::ErrorKind::Io(source) => Error::File {
            action: "write",
            path: "the export".into(),
            source,
        },
        other => Error::Internal(format!("cannot write CSV: {other:?}")),
    }
}

fn open_output(output: Option<&Path>) -> Result<Box<dyn Write>> {
    Ok(match output {
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).map_err(|source| Error::File {
                action: "create",
                path: path.to_owned(),
                source,
            })?,
        )),
    })
}

/// `export groups|failures`.
pub async fn export(
    db: &Path,
    what: ExportWhat,
    format: ExportFormat,
    output: Option<&Path>,
    missing_share_id: bool,
) -> Result<Exit> {
    let store = Store::open_existing(db)?;
    match what {
        ExportWhat::Groups => {
            let header = [
                "order_id",
                "payment_intent_id",
                "customer_id",
                "group_id",
                "share_id",
                "status",
                "expires_at",
                "created_at",
                "obtained",
                "note",
            ];
            let mut sink = Sink::new(
                format,
                header.map(String::from).to_vec(),
                open_output(output)?,
            )?;
            for_each_job(&store, &["succeeded"], |j| {
                let no_share_id = j.share_id.as_deref().is_none_or(str::is_empty);
                if missing_share_id && !no_share_id {
                    return Ok(());
                }
                let note = no_share_id.then(|| "no_share_id".to_owned());
                let cells = [
                    j.order_id,
                    j.payment_intent_id,
                    j.customer_id,
                    j.group_id,
                    j.share_id,
                    j.group_status,
                    j.expires_at,
                    j.created_at,
                    j.obtained,
                    note,
                ]
                .map(Option::unwrap_or_default);
                sink.row(&cells)
            })
            .await?;
            sink.finish()?;
        }
        ExportWhat::Failures => {
            // First pass: which metadata.KEY columns the failed rows had.
            let mut extra = BTreeSet::new();
            for_each_failure(&store, |j| {
                extra.extend(
                    row_cells(&j)
                        .into_keys()
                        .filter(|k| k.starts_with("metadata.")),
                );
                Ok(())
            })
            .await?;
            let mut header: Vec<String> = [
                "customerId",
                "orderId",
                "paymentIntentId",
                "expiresAt",
                "midExpireAt",
                "metadata",
            ]
            .map(String::from)
            .to_vec();
            header.extend(extra);
            header.extend(["error", "line", "state", "source"].map(String::from));
            let mut sink = Sink::new(format, header.clone(), open_output(output)?)?;
            for_each_failure(&store, |j| {
                let raw = row_cells(&j);
                let cells: Vec<String> = header
                    .iter()
                    .map(|h| match h.as_str() {
                        "error" => j.error.clone().unwrap_or_default(),
                        "line" => j.line.map(|l| l.to_string()).unwrap_or_default(),
                        "state" => j.state.clone(),
                        "source" => j.source.clone(),
                        other => raw.get(other).cloned().unwrap_or_default(),
                    })
                    .collect();
                sink.row(&cells)
            })
            .await?;
            sink.finish()?;
        }
    }
    Ok(Exit::Success)
}

/// A job's row in the input columns: as written for invalid rows, rebuilt from the
/// request body for the others. Metadata of string values comes back as
/// `metadata.KEY` columns (how a CSV gives it), anything else as the JSON column.
fn row_cells(j: &JobExport) -> HashMap<String, String> {
    if !j.raw.is_empty() {
        return serde_json::from_str::<HashMap<String, String>>(&j.raw)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| canonical_header(&k).map(|c| (c, v)))
            .collect();
    }
    j.payload
        .as_ref()
        .map(|p| p.input_cells().into_iter().collect())
        .unwrap_or_default()
}
