//! Two of the commands that only read: `validate` (a CSV, no database, no network)
//! and `report` (a run, or the list of runs). `export` is in `export.rs`.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::Path;

use jiff::Timestamp;

use crate::cli::Format;
use crate::error::{Error, Exit, Result};
use crate::job::Payload;
use crate::report::Report;
use crate::source::{CsvOptions, CsvSource};
use crate::store::{Access, Db, Store};

use super::out;
use crate::text::{count, escape};

/// Maps a failed write to `what` to the error that names it.
pub(super) fn io_error(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::File {
        action: "write",
        path: what.into(),
        source,
    }
}

/// `validate`: reads the CSV exactly as `run` would and prints, in one pass, the
/// request bodies (NDJSON on stdout with `--json`) and every invalid row.
pub(crate) fn validate(path: &Path, json: bool, opts: &CsvOptions) -> Result<Exit> {
    let mut source = CsvSource::open_with(path, opts)?;
    let name = escape(source.name()).into_owned();
    let now = Timestamp::now();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let err = io_error("standard output");
    let mut problems: Box<dyn Write> = if json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
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
    let mut tally = Tally::default();
    while let Some(row) = source.next_row(now)? {
        match tally.add(row.line, row.outcome) {
            Ok(body) if json => writeln!(out, "{body}").map_err(&err)?,
            Ok(_) => {}
            Err(problem) => {
                writeln!(problems, "{name}, line {}: {problem}", row.line).map_err(&err)?;
            }
        }
    }
    out.flush().map_err(&err)?;
    writeln!(problems, "{}", tally.summary(&name, source.empty_lines())).map_err(&err)?;
    Ok(if tally.invalid + tally.conflicts > 0 {
        Exit::RowsFailed
    } else {
        Exit::Success
    })
}

/// What `validate` has seen so far: rows by verdict, and each key's first body.
#[derive(Default)]
struct Tally {
    /// Hash of the key → (hash of the body, line): enough to tell duplicates from
    /// conflicts in 24 bytes a row, so a million rows fit well under 100 MB. Two keys
    /// sharing a 64-bit hash would be reported as a conflict (odds about 1 in 10^7 for
    /// a million rows); `run` decides on the real keys anyway.
    seen: HashMap<u64, (u64, u64)>,
    rows: u64,
    valid: u64,
    invalid: u64,
    duplicates: u64,
    conflicts: u64,
}

impl Tally {
    /// Counts the row on `line`: its request body as JSON text if it would be sent,
    /// else the problem to print (escaped).
    fn add(&mut self, line: u64, outcome: Result<Payload, String>) -> Result<String, String> {
        self.rows += 1;
        let body = match outcome {
            Ok(body) => body,
            Err(reason) => {
                self.invalid += 1;
                return Err(escape(&reason).into_owned());
            }
        };
        let text = body.to_json();
        let (key_hash, body_hash) = (digest(body.key()), digest(&text));
        match self.seen.get(&key_hash) {
            Some(&(d, first)) if d == body_hash => {
                self.duplicates += 1;
                Err(format!("duplicate of line {first}; sent once"))
            }
            Some(&(_, first)) => {
                self.conflicts += 1;
                Err(format!(
                    "key {} is also on line {first} with different data; this row would not \
                     be sent",
                    escape(body.key())
                ))
            }
            None => {
                self.valid += 1;
                self.seen.insert(key_hash, (body_hash, line));
                Ok(text)
            }
        }
    }

    /// The last line: what the file `name` came to.
    fn summary(&self, name: &str, empty_lines: u64) -> String {
        let empty = match empty_lines {
            0 => String::new(),
            n => format!(", {} skipped", count(n, "empty line", "empty lines")),
        };
        format!(
            "{name}: {}: {} would be sent, {} invalid, {}, {}{empty}",
            count(self.rows, "row", "rows"),
            self.valid,
            self.invalid,
            count(self.duplicates, "duplicate", "duplicates"),
            count(self.conflicts, "conflict", "conflicts")
        )
    }
}

fn digest(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// `report`: one run (`--run ID`, `--last`), or the list of recent runs.
pub(crate) async fn report(db: &Db, run: Option<i64>, last: bool, format: Format) -> Result<Exit> {
    let store = Store::connect_plain(db, Access::Read).await?;
    let id = match (run, last) {
        (Some(id), _) => Some(id),
        (None, true) => Some(
            store
                .last_run_id()
                .await?
                .ok_or_else(|| Error::usage(format!("{db} has no runs yet")))?,
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
                "there is no run {id} in {db}; `kohort-batch report` lists the runs"
            ))
        })?),
    };
    match format {
        Format::Text => out::say(&report.to_text())?,
        Format::Json => out::say(&format!("{}\n", report.to_json()))?,
    }
    Ok(Exit::Success)
}
