//! Unclosed quotes: an unclosed quote folds the rows after it into one field, so
//! a record is checked for fields that span lines where they cannot, and the last
//! row for an input that ends inside a quoted field.

use super::header::{Column, canonical_header};
use super::lines::line_breaks;
use super::reader::CsvSource;
use super::row::ImportRow;
use crate::job::Field;

impl CsvSource {
    /// The last row, made invalid if the input ended inside a quoted field.
    pub(super) fn checked_last(&self, mut row: ImportRow) -> ImportRow {
        if !self.in_quotes.load(std::sync::atomic::Ordering::Relaxed) {
            return row;
        }
        let why = format!(
            "the file ends inside a quoted field of this row (the quote is never closed): \
             check for an unclosed quote on line {}",
            row.line
        );
        match &row.outcome {
            Ok(payload) => {
                row.raw = payload.input_cells().into_iter().collect();
                row.key = Some(payload.key().to_owned());
                row.outcome = Err(why);
            }
            Err(reason) => row.outcome = Err(format!("{reason}; {why}")),
        }
        row.metadata_json = None;
        row
    }

    /// Quoted fields of the current record (which starts on `line`) that span lines
    /// and cannot be what the file meant: an id (ids are one line), or any field whose
    /// later lines look like rows of this file (as many commas as the header). Both are
    /// what an unclosed quote does: it folds the rows after it into one field. Gives
    /// the column's canonical name (or header) and the message.
    pub(super) fn fields_spanning_lines(&self, line: u64) -> Vec<(String, String)> {
        let mut found = Vec::new();
        let mut begins = line;
        let commas = self.headers.len().saturating_sub(1);
        for (i, cell) in self.record.iter().enumerate() {
            let breaks = line_breaks(cell);
            if breaks == 0 {
                continue;
            }
            let (Some(header), Some(column)) = (self.headers.get(i), self.columns.get(i)) else {
                break;
            };
            let is_id = matches!(
                column,
                Column::Field(Field::CustomerId | Field::OrderId | Field::PaymentIntentId)
            );
            let looks_like_rows = || {
                cell.split(|b| *b == b'\n' || *b == b'\r')
                    .skip(1)
                    .any(|seg| commas > 0 && seg.iter().filter(|b| **b == b',').count() == commas)
            };
            if is_id || looks_like_rows() {
                let name = canonical_header(header).unwrap_or_else(|| header.clone());
                let what = if is_id {
                    "an id cannot span lines"
                } else {
                    "its lines look like rows of this file"
                };
                found.push((
                    name.clone(),
                    format!(
                        "{name} is a quoted field that begins on line {begins} and spans {} \
                         lines ({what}): check for an unclosed quote on line {begins}",
                        // Lines with content: an unclosed quote runs to the file's end.
                        line_breaks(cell.trim_ascii_end()) + 1
                    ),
                ));
            }
            begins += breaks;
        }
        found
    }
}
