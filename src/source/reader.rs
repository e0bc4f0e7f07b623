//! [`CsvSource`]: opens an input, reads its header, and hands out its rows one at
//! a time with their line numbers.

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use jiff::Timestamp;

use super::encoding::{CsvEncoding, CsvOptions, NOT_UTF8_FIX, decoded, sniffed};
use super::header::{Column, check_columns, column_for};
use super::lines::{LineStarts, LineTap};
use super::row::ImportRow;
use crate::error::{Error, Result};

/// A streaming CSV input.
pub struct CsvSource {
    name: String,
    starts: LineStarts,
    last_line: u64,
    reader: csv::Reader<Box<dyn Read + Send>>,
    pub(super) headers: Vec<String>,
    pub(super) columns: Vec<Column>,
    pub(super) record: csv::ByteRecord,
    /// Header names that map to nothing (reported once, not an error).
    pub unknown_columns: Vec<String>,
    encoding: CsvEncoding,
    empty_lines: u64,
    /// Set while the input read so far ends inside a quoted field.
    pub(super) in_quotes: Arc<AtomicBool>,
    /// The row read ahead: a row is handed out once the next one is read, or the input
    /// ended outside a quoted field (see [`CsvSource::next_row`]).
    held: Option<ImportRow>,
}

impl std::fmt::Debug for CsvSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsvSource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl CsvSource {
    /// Opens a file, or standard input for `-`, read as `opts` say.
    pub(crate) fn open_with(path: &Path, opts: &CsvOptions) -> Result<Self> {
        if path.as_os_str() == "-" {
            return Self::from_reader_with(
                "<stdin>".to_owned(),
                Box::new(spool_stdin(opts)?),
                opts,
            );
        }
        let file = std::fs::File::open(path).map_err(|source| Error::File {
            action: "open CSV file",
            path: path.to_owned(),
            source,
        })?;
        Self::from_reader_with(path.display().to_string(), Box::new(file), opts)
    }

    /// Reads the header of any UTF-8 byte stream; fails if the columns cannot make a
    /// request.
    pub fn from_reader(name: String, input: Box<dyn Read + Send>) -> Result<Self> {
        Self::from_reader_with(name, input, &CsvOptions::default())
    }

    /// Reads the header of any byte stream, decoded and split as `opts` say.
    pub(crate) fn from_reader_with(
        name: String,
        input: Box<dyn Read + Send>,
        opts: &CsvOptions,
    ) -> Result<Self> {
        let input = decoded(input, opts.encoding);
        let (input, delimiter) = match opts.delimiter {
            Some(d) => (input, d),
            None => sniffed(&name, input)?,
        };
        let starts = LineStarts::default();
        let in_quotes = Arc::new(AtomicBool::new(false));
        let tap = LineTap::new(input, starts.clone(), in_quotes.clone());
        let input: Box<dyn Read + Send> = Box::new(BufReader::with_capacity(256 * 1024, tap));
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .has_headers(true)
            .delimiter(delimiter)
            .from_reader(input);
        let header_err = |message: String| Error::Input {
            source_name: name.clone(),
            line: 1,
            message,
        };
        let headers = read_headers(&mut reader).map_err(header_err)?;
        let columns: Vec<Column> = headers.iter().map(|h| column_for(h)).collect();
        check_columns(&headers, &columns).map_err(header_err)?;
        let unknown_columns = headers
            .iter()
            .zip(&columns)
            .filter(|(_, c)| **c == Column::Unknown)
            .map(|(h, _)| h.clone())
            .collect();
        Ok(CsvSource {
            name,
            starts,
            last_line: 1,
            reader,
            headers,
            columns,
            record: csv::ByteRecord::new(),
            unknown_columns,
            encoding: opts.encoding,
            empty_lines: 0,
            in_quotes,
            held: None,
        })
    }

    /// The name used in messages (the path, or `<stdin>`).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The next row, validated against `now`; `Ok(None)` at the end of the input.
    /// An `Err` is an I/O failure (or text of another encoding) that ends the
    /// import; a bad row is an `Ok` with a reason. Rows whose every field is empty
    /// are skipped and counted (`CsvSource::empty_lines`).
    pub fn next_row(&mut self, now: Timestamp) -> Result<Option<ImportRow>> {
        // One row of look-ahead: the last row is good only if the input ends outside
        // a quoted field; one that ends inside swallowed the rest of the file.
        loop {
            match (self.held.take(), self.next_filled(now)?) {
                (None, Some(first)) => self.held = Some(first),
                (Some(row), Some(next)) => {
                    self.held = Some(next);
                    return Ok(Some(row));
                }
                (Some(last), None) => return Ok(Some(self.checked_last(last))),
                (None, None) => return Ok(None),
            }
        }
    }

    /// The next row with something in it; empty ones are counted and skipped.
    fn next_filled(&mut self, now: Timestamp) -> Result<Option<ImportRow>> {
        loop {
            let row = self.next_record(now)?;
            if row.is_none() || !self.record_is_empty() {
                return Ok(row);
            }
            self.empty_lines += 1;
        }
    }

    /// Rows skipped because every field was empty.
    pub(crate) fn empty_lines(&self) -> u64 {
        self.empty_lines
    }

    /// Whether the current record is a spreadsheet's leftover: fields, all empty.
    fn record_is_empty(&self) -> bool {
        !self.record.is_empty()
            && self
                .record
                .iter()
                .all(|c| c.iter().all(u8::is_ascii_whitespace))
    }

    fn next_record(&mut self, now: Timestamp) -> Result<Option<ImportRow>> {
        let more = match self.reader.read_byte_record(&mut self.record) {
            Ok(more) => more,
            Err(e) => {
                // The error row is not the record read before it.
                self.record.clear();
                let line = e.position().map_or(0, |p| self.line_at(p.byte()));
                return match e.kind() {
                    csv::ErrorKind::Io(_) => Err(Error::Input {
                        source_name: self.name.clone(),
                        line,
                        message: csv_error_text(&e),
                    }),
                    _ => Ok(Some(ImportRow::new(
                        line,
                        None,
                        Err(csv_error_text(&e)),
                        BTreeMap::new(),
                    ))),
                };
            }
        };
        if !more {
            return Ok(None);
        }
        let line = self.record.position().map_or(0, |p| p.byte());
        let line = self.line_at(line);
        // Text that is not UTF-8 in a file read as UTF-8 is another encoding, not a
        // bad row: half a file must not go out (see `check_utf8` for files).
        if self.encoding == CsvEncoding::Utf8
            && let Some(bad) = self.record.iter().find(|c| std::str::from_utf8(c).is_err())
        {
            let at = std::str::from_utf8(bad)
                .err()
                .map_or(0, |e| e.valid_up_to());
            return Err(Error::Input {
                source_name: self.name.clone(),
                line,
                message: format!(
                    "not valid UTF-8 (byte 0x{:02X}): {NOT_UTF8_FIX}",
                    bad.get(at).copied().unwrap_or(0)
                ),
            });
        }
        Ok(Some(self.convert(line, now)))
    }

    /// The line of the first content at or after `byte`, where the parser says a record
    /// starts (it may point at terminators before the record).
    fn line_at(&mut self, byte: u64) -> u64 {
        let mut q = self.starts.lock().unwrap_or_else(|e| e.into_inner());
        while q.front().is_some_and(|&(at, _)| at < byte) {
            q.pop_front();
        }
        if let Some(&(_, line)) = q.front() {
            self.last_line = line;
        }
        self.last_line
    }
}

/// How a message says what the csv parser could not read.
fn csv_error_text(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Io(io) => format!("read error: {io}"),
        csv::ErrorKind::Utf8 { err, .. } => {
            format!(
                "not valid UTF-8 (field {}): save the file as UTF-8",
                err.field() + 1
            )
        }
        _ => format!("malformed CSV: {e}"),
    }
}

/// The header's names (a byte-order mark dropped), or why it has none usable.
fn read_headers(
    reader: &mut csv::Reader<Box<dyn Read + Send>>,
) -> std::result::Result<Vec<String>, String> {
    let raw_headers = reader.byte_headers().map_err(|e| csv_error_text(&e))?;
    if raw_headers.is_empty() || (raw_headers.len() == 1 && raw_headers[0].is_empty()) {
        return Err("the file is empty: expected a header line such as customerId,orderId".into());
    }
    let mut headers = Vec::with_capacity(raw_headers.len());
    for (i, h) in raw_headers.iter().enumerate() {
        let text = std::str::from_utf8(h)
            .map_err(|_| format!("header column {} is not valid UTF-8: {NOT_UTF8_FIX}", i + 1))?;
        headers.push(text.trim_start_matches('\u{feff}').to_owned());
    }
    Ok(headers)
}

/// Standard input copied to an unnamed temporary file and checked as a named file
/// is before its first row is read: input that is not UTF-8 is refused whole, so
/// half of it never goes in.
fn spool_stdin(opts: &CsvOptions) -> Result<std::fs::File> {
    use std::io::Seek;
    let stdin_path = Path::new("<stdin>");
    let io_err = |action: &'static str| {
        move |source| Error::File {
            action,
            path: stdin_path.to_owned(),
            source,
        }
    };
    let mut spool = tempfile::tempfile().map_err(io_err("make a temporary copy of"))?;
    std::io::copy(&mut std::io::stdin().lock(), &mut spool).map_err(io_err("read"))?;
    spool.rewind().map_err(io_err("read back"))?;
    if opts.encoding == super::CsvEncoding::Utf8 {
        super::encoding::check_utf8_in(&mut spool, stdin_path)?;
        spool.rewind().map_err(io_err("read back"))?;
    }
    Ok(spool)
}
