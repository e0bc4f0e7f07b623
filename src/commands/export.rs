//! `export groups|failures`: what a run produced, from the database, as CSV or
//! one JSON array, streamed page by page (memory stays flat).

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;

use super::inspect::io_error;
use crate::cli::{ExportFormat, ExportWhat};
use crate::error::{Error, Exit, Result};
use crate::source::canonical_header;
use crate::store::{Access, Db, JobExport, JobState, Store};

/// Jobs read from the database per query.
const PAGE: usize = 2000;

/// Calls `each` for every job in `states`, page by page.
async fn for_each_job(
    store: &Store,
    states: &'static [JobState],
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
    for_each_job(
        store,
        &[JobState::Failed, JobState::Unknown, JobState::Invalid],
        &mut each,
    )
    .await?;
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
                    .ok_or_else(|| Error::internal("no JSON sink"))?;
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
        other => Error::internal(format!("cannot write CSV: {other:?}")),
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
pub(crate) async fn export(
    db: &Db,
    what: ExportWhat,
    format: ExportFormat,
    output: Option<&Path>,
    missing_share_id: bool,
) -> Result<Exit> {
    let store = Store::connect_plain(db, Access::Read).await?;
    match what {
        ExportWhat::Groups => export_groups(&store, format, output, missing_share_id).await?,
        ExportWhat::Failures => export_failures(&store, format, output).await?,
    }
    Ok(Exit::Success)
}

/// `export groups`: one record per succeeded job, with its group (only those
/// without a share id with `missing_share_id`).
async fn export_groups(
    store: &Store,
    format: ExportFormat,
    output: Option<&Path>,
    missing_share_id: bool,
) -> Result<()> {
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
    for_each_job(store, &[JobState::Succeeded], |j| {
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
    sink.finish()
}

/// `export failures`: the rows that did not succeed, in the input columns (so they
/// can be repaired and imported again), then why, where and in what state.
async fn export_failures(store: &Store, format: ExportFormat, output: Option<&Path>) -> Result<()> {
    // First pass: which metadata.KEY columns the failed rows had.
    let mut extra = BTreeSet::new();
    for_each_failure(store, |j| {
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
    for_each_failure(store, |j| {
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
    sink.finish()
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
