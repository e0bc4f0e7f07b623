//! One row of an input: the current CSV record turned into a request body or the
//! reasons it cannot be sent, with the cells kept for repair when it is invalid.

use std::collections::BTreeMap;

use jiff::Timestamp;

use super::header::Column;
use super::reader::CsvSource;
use crate::job::{self, Payload, RowFields};

/// One data row of an input, after validation.
#[derive(Debug, Clone)]
pub struct ImportRow {
    /// The line the record starts on (1 is the header).
    pub line: u64,
    /// The row's key, when it has one; left out for a valid row from a CSV (its body
    /// has it).
    pub key: Option<String>,
    /// The request body, or why the row cannot be sent.
    pub outcome: Result<Payload, String>,
    /// The row as written (header → cell), kept for invalid rows so they can be
    /// exported for repair; empty for valid rows (their request body says it all).
    pub raw: BTreeMap<String, String>,
    /// The body's metadata as JSON text, made here rather than by the database writer,
    /// which is the busiest thread of an import.
    pub metadata_json: Option<String>,
}

impl ImportRow {
    pub fn new(
        line: u64,
        key: Option<String>,
        outcome: Result<Payload, String>,
        raw: BTreeMap<String, String>,
    ) -> ImportRow {
        let metadata_json = outcome
            .as_ref()
            .ok()
            .and_then(|p| p.metadata.as_ref())
            .map(|m| serde_json::to_string(m).unwrap_or_default());
        ImportRow {
            line,
            key,
            outcome,
            raw,
            metadata_json,
        }
    }
}

impl ImportRow {
    /// A row given as fields (an inbox row), validated as a CSV row is; `line` is
    /// where it came from (the inbox id). An invalid row keeps its cells.
    pub(crate) fn from_fields(line: u64, fields: &RowFields, now: Timestamp) -> ImportRow {
        let outcome = job::validate(fields, now).map_err(|p| p.join("; "));
        let (key, raw) = match &outcome {
            Ok(_) => (fields.key(), BTreeMap::new()),
            Err(_) => (fields.key(), fields.cells()),
        };
        ImportRow::new(line, key, outcome, raw)
    }
}

impl CsvSource {
    pub(super) fn convert(&self, line: u64, now: Timestamp) -> ImportRow {
        let mut problems = Vec::new();
        let mut fields = RowFields::default();
        if self.record.len() != self.headers.len() {
            problems.push(format!(
                "the row has {} fields but the header has {}: check for a missing or extra \
                 comma, or an unclosed quote",
                self.record.len(),
                self.headers.len()
            ));
        }
        for (i, cell) in self.record.iter().enumerate() {
            let Some(header) = self.headers.get(i) else {
                break;
            };
            let text = match std::str::from_utf8(cell) {
                Ok(t) => t.to_owned(),
                Err(e) => {
                    problems.push(format!(
                        "column {header} is not valid UTF-8 (bad byte at offset {}): save the \
                         file as UTF-8",
                        e.valid_up_to()
                    ));
                    String::from_utf8_lossy(cell).into_owned()
                }
            };
            let slot = match &self.columns[i] {
                Column::Field(f) => fields.slot(*f),
                Column::MetadataKey(k) => {
                    fields.metadata_columns.push((k.clone(), text));
                    continue;
                }
                Column::ExportOnly | Column::Unknown => continue,
            };
            *slot = Some(text);
        }
        let spanning = self.fields_spanning_lines(line);
        let said_here = |p: &String| {
            spanning
                .iter()
                .any(|(name, _)| p.starts_with(&format!("{name} contains a control character")))
        };
        problems.extend(spanning.iter().map(|(_, message)| message.clone()));
        let outcome = if problems.is_empty() {
            job::validate(&fields, now).map_err(|p| p.join("; "))
        } else {
            if let Err(more) = job::validate(&fields, now) {
                problems.extend(more.into_iter().filter(|p| !said_here(p)));
            }
            Err(problems.join("; "))
        };
        // Only an invalid row's cells are kept (see store/import.rs), so only an
        // invalid row pays for collecting them.
        let (key, raw) = if outcome.is_err() {
            (fields.key(), self.raw_cells())
        } else {
            (None, BTreeMap::new())
        };
        ImportRow::new(line, key, outcome, raw)
    }

    /// The current record's input cells by header, as written.
    pub(super) fn raw_cells(&self) -> BTreeMap<String, String> {
        self.headers
            .iter()
            .zip(&self.columns)
            .zip(self.record.iter())
            .filter(|((_, column), _)| !matches!(column, Column::ExportOnly | Column::Unknown))
            .map(|((header, _), cell)| (header.clone(), String::from_utf8_lossy(cell).into_owned()))
            .collect()
    }
}
