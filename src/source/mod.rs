//! The CSV reader: streams an RFC 4180 file (or stdin) row by row, maps its
//! columns by header, and turns every row into a validated request body or a
//! recorded reason with its line number.
//!
//! Memory does not grow with the file: one record buffer is reused, and rows go
//! to the store in batches as they are read.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::{Arc, Mutex};

use jiff::Timestamp;

use crate::error::{Error, Result};
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

#[derive(Debug, Clone, PartialEq)]
enum Column {
    CustomerId,
    OrderId,
    PaymentIntentId,
    ExpiresAt,
    MidExpireAt,
    Metadata,
    MetadataKey(String),
    /// Columns that `export failures` adds; ignored on re-import.
    ExportOnly,
    Unknown,
}

fn column_for(header: &str) -> Column {
    let trimmed = header.trim();
    if let Some(rest) = trimmed
        .get(..9)
        .filter(|p| p.eq_ignore_ascii_case("metadata."))
        .map(|_| &trimmed[9..])
    {
        return Column::MetadataKey(rest.to_owned());
    }
    let norm: String = trimmed
        .chars()
        .filter(|c| !matches!(c, '_' | '-' | ' '))
        .flat_map(char::to_lowercase)
        .collect();
    match norm.as_str() {
        "customerid" => Column::CustomerId,
        "orderid" => Column::OrderId,
        "paymentintentid" => Column::PaymentIntentId,
        "expiresat" => Column::ExpiresAt,
        "midexpireat" => Column::MidExpireAt,
        "metadata" => Column::Metadata,
        "error" | "line" | "state" | "source" => Column::ExportOnly,
        _ => Column::Unknown,
    }
}

/// Notes where each line with content starts as the bytes stream past, so a
/// record's line number is right whatever the line endings and blank lines (the
/// csv crate counts a CRLF file's lines one short). Holds only the starts still
/// ahead of the parser: memory stays flat.
struct LineTap<R> {
    inner: R,
    offset: u64,
    line: u64,
    at_line_start: bool,
    prev_cr: bool,
    starts: Arc<Mutex<VecDeque<(u64, u64)>>>,
    /// An odd number of `"` read so far: the input is inside a quoted field (an
    /// escaped `""` counts twice, so a well-formed file ends outside).
    in_quotes: Arc<std::sync::atomic::AtomicBool>,
}

impl<R: Read> Read for LineTap<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if memchr::memchr_iter(b'"', &buf[..n]).count() % 2 == 1 {
            self.in_quotes
                .fetch_xor(true, std::sync::atomic::Ordering::Relaxed);
        }
        let mut q = self.starts.lock().unwrap_or_else(|e| e.into_inner());
        for (i, &b) in buf[..n].iter().enumerate() {
            // CR, LF and CRLF each end one line.
            match b {
                b'\n' => {
                    if !self.prev_cr {
                        self.line += 1;
                    }
                    self.at_line_start = true;
                }
                b'\r' => {
                    self.line += 1;
                    self.at_line_start = true;
                }
                _ if self.at_line_start => {
                    q.push_back((self.offset + i as u64, self.line));
                    self.at_line_start = false;
                }
                _ => {}
            }
            self.prev_cr = b == b'\r';
        }
        self.offset += n as u64;
        Ok(n)
    }
}

/// The canonical name of an input column (`customer_id` → `customerId`,
/// `Metadata.x` → `metadata.x`); `None` for columns that are not input.
pub fn canonical_header(header: &str) -> Option<String> {
    Some(match column_for(header) {
        Column::CustomerId => "customerId".to_owned(),
        Column::OrderId => "orderId".to_owned(),
        Column::PaymentIntentId => "paymentIntentId".to_owned(),
        Column::ExpiresAt => "expiresAt".to_owned(),
        Column::MidExpireAt => "midExpireAt".to_owned(),
        Column::Metadata => "metadata".to_owned(),
        Column::MetadataKey(k) => format!("metadata.{k}"),
        Column::ExportOnly | Column::Unknown => return None,
    })
}

/// What to do about a file that is not UTF-8.
const NOT_UTF8_FIX: &str = "this looks like Windows-1252 (what a spreadsheet in western \
     Europe saves as CSV): pass --encoding windows-1252, or save the file as UTF-8; \
     nothing from this file was imported";

/// Checks that a file read as UTF-8 is UTF-8 throughout, before any row of it is
/// imported; the error names the first line that is not. Streams: memory stays flat.
pub fn check_utf8(path: &Path) -> Result<()> {
    let mut file = std::fs::File::open(path).map_err(|source| Error::File {
        action: "open CSV file",
        path: path.to_owned(),
        source,
    })?;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut carried, mut line) = (0usize, 1u64);
    loop {
        let n = file
            .read(&mut buf[carried..])
            .map_err(|source| Error::File {
                action: "read CSV file",
                path: path.to_owned(),
                source,
            })?;
        let end = carried + n;
        let chunk = &buf[..end];
        let valid = match std::str::from_utf8(chunk) {
            Ok(_) => end,
            // A character cut at the chunk's end is read with the next chunk.
            Err(e) if e.error_len().is_none() && n > 0 => e.valid_up_to(),
            Err(e) => {
                let at = e.valid_up_to();
                line += memchr::memchr_iter(b'\n', &chunk[..at]).count() as u64;
                return Err(Error::Input {
                    source_name: path.display().to_string(),
                    line,
                    message: format!("not valid UTF-8 (byte 0x{:02X}): {NOT_UTF8_FIX}", chunk[at]),
                });
            }
        };
        line += memchr::memchr_iter(b'\n', &chunk[..valid]).count() as u64;
        if n == 0 {
            return Ok(());
        }
        buf.copy_within(valid..end, 0);
        carried = end - valid;
    }
}

/// How to read an input CSV: its separator (`None`: found from the header line)
/// and its character encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CsvOptions {
    pub delimiter: Option<u8>,
    pub encoding: CsvEncoding,
}

/// The character encodings an input may be in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CsvEncoding {
    #[default]
    Utf8,
    /// What Excel in western Europe saves as "CSV" (latin1 is read as this, as
    /// browsers do: it is a superset of ISO-8859-1 for text).
    Windows1252,
}

/// The separators a header may use, most common first.
const DELIMITERS: [u8; 3] = [b',', b';', b'\t'];

/// The separator of a file whose first bytes are `head`: the one that splits the
/// header line into a column that is `customerId` (the one column every file has);
/// a comma when none does (the header check then says what is missing).
fn sniff_delimiter(head: &[u8]) -> u8 {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
    DELIMITERS
        .into_iter()
        .find(|d| {
            line.split(|b| b == d).any(|cell| {
                let text = String::from_utf8_lossy(cell);
                column_for(text.trim_matches(|c: char| c == '"' || c.is_whitespace()))
                    == Column::CustomerId
            })
        })
        .unwrap_or(b',')
}

/// How a message names a separator.
pub fn delimiter_name(d: u8) -> &'static str {
    match d {
        b',' => "','",
        b';' => "';'",
        b'\t' => "a tab",
        _ => "another character",
    }
}

/// Up to 20 names, then how many more: a header of 100,000 unknown columns makes one
/// readable line, not 100,000.
pub fn list_some(names: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut text = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

/// A streaming CSV input.
pub struct CsvSource {
    name: String,
    starts: Arc<Mutex<VecDeque<(u64, u64)>>>,
    last_line: u64,
    reader: csv::Reader<Box<dyn Read + Send>>,
    headers: Vec<String>,
    columns: Vec<Column>,
    record: csv::ByteRecord,
    /// Header names that map to nothing (reported once, not an error).
    pub unknown_columns: Vec<String>,
    encoding: CsvEncoding,
    empty_lines: u64,
    in_quotes: Arc<std::sync::atomic::AtomicBool>,
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
    /// Opens a file, or standard input for `-`, as UTF-8 with the separator found
    /// in the header.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, &CsvOptions::default())
    }

    /// Opens a file, or standard input for `-`, read as `opts` say.
    pub fn open_with(path: &Path, opts: &CsvOptions) -> Result<Self> {
        if path.as_os_str() == "-" {
            return Self::from_reader_with("<stdin>".to_owned(), Box::new(std::io::stdin()), opts);
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
    pub fn from_reader_with(
        name: String,
        input: Box<dyn Read + Send>,
        opts: &CsvOptions,
    ) -> Result<Self> {
        let input: Box<dyn Read + Send> = match opts.encoding {
            CsvEncoding::Utf8 => input,
            // Decoded to UTF-8 as it streams (memory stays flat).
            CsvEncoding::Windows1252 => Box::new(
                encoding_rs_io::DecodeReaderBytesBuilder::new()
                    .encoding(Some(encoding_rs::WINDOWS_1252))
                    .build(input),
            ),
        };
        // The separator is found from the header line, read ahead here and put back
        // in front of the rest of the stream.
        let (input, delimiter) = match opts.delimiter {
            Some(d) => (input, d),
            None => {
                let mut input = input;
                let mut head = Vec::new();
                let mut chunk = [0u8; 8192];
                while !head.contains(&b'\n') && head.len() < 1 << 20 {
                    let n = input.read(&mut chunk).map_err(|e| Error::Input {
                        source_name: name.clone(),
                        line: 1,
                        message: format!("read error: {e}"),
                    })?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&chunk[..n]);
                }
                let found = sniff_delimiter(&head);
                if found != b',' {
                    tracing::info!(source = %name, separator = %delimiter_name(found), "the header is separated by {}; reading the file so", delimiter_name(found));
                }
                let input: Box<dyn Read + Send> = Box::new(std::io::Cursor::new(head).chain(input));
                (input, found)
            }
        };
        let starts = Arc::new(Mutex::new(VecDeque::new()));
        let in_quotes = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tap = LineTap {
            inner: input,
            offset: 0,
            line: 1,
            at_line_start: true,
            prev_cr: false,
            starts: starts.clone(),
            in_quotes: in_quotes.clone(),
        };
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
        let raw_headers = reader
            .byte_headers()
            .map_err(|e| header_err(csv_error_text(&e)))?;
        if raw_headers.is_empty() || (raw_headers.len() == 1 && raw_headers[0].is_empty()) {
            return Err(header_err(
                "the file is empty: expected a header line such as customerId,orderId".into(),
            ));
        }
        let mut headers = Vec::with_capacity(raw_headers.len());
        for (i, h) in raw_headers.iter().enumerate() {
            let text = std::str::from_utf8(h).map_err(|_| {
                header_err(format!(
                    "header column {} is not valid UTF-8: {NOT_UTF8_FIX}",
                    i + 1
                ))
            })?;
            headers.push(text.trim_start_matches('\u{feff}').to_owned());
        }
        let columns: Vec<Column> = headers.iter().map(|h| column_for(h)).collect();
        if let Some(message) = same_field_twice(&headers, &columns) {
            return Err(header_err(message));
        }
        let has = |c: Column| columns.contains(&c);
        let mut missing = Vec::new();
        if !has(Column::CustomerId) {
            missing.push("customerId column");
        }
        if !has(Column::OrderId) && !has(Column::PaymentIntentId) {
            missing.push("orderId (or paymentIntentId) column");
        }
        if !missing.is_empty() {
            return Err(header_err(format!(
                "the header has no {} (found: {}); the columns are customerId, orderId, \
                 paymentIntentId, expiresAt, midExpireAt, metadata, metadata.KEY",
                missing.join(" and no "),
                headers.join(", ")
            )));
        }
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
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next row, validated against `now`; `Ok(None)` at the end of the input.
    /// An `Err` is an I/O failure (or text of another encoding) that ends the
    /// import; a bad row is an `Ok` with a reason. Rows whose every field is empty
    /// are skipped and counted ([`CsvSource::empty_lines`]).
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

    /// The last row, made invalid if the input ended inside a quoted field.
    fn checked_last(&self, mut row: ImportRow) -> ImportRow {
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
    pub fn empty_lines(&self) -> u64 {
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

    fn convert(&self, line: u64, now: Timestamp) -> ImportRow {
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
                Column::CustomerId => &mut fields.customer_id,
                Column::OrderId => &mut fields.order_id,
                Column::PaymentIntentId => &mut fields.payment_intent_id,
                Column::ExpiresAt => &mut fields.expires_at,
                Column::MidExpireAt => &mut fields.mid_expire_at,
                Column::Metadata => &mut fields.metadata,
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
        // Only an invalid row's cells are kept (see store::ops::import), so only an
        // invalid row pays for collecting them.
        let (key, raw) = if outcome.is_err() {
            (fields.key(), self.raw_cells())
        } else {
            (None, BTreeMap::new())
        };
        ImportRow::new(line, key, outcome, raw)
    }

    /// Quoted fields of the current record (which starts on `line`) that span lines
    /// and cannot be what the file meant: an id (ids are one line), or any field whose
    /// later lines look like rows of this file (as many commas as the header). Both are
    /// what an unclosed quote does: it folds the rows after it into one field. Gives
    /// the column's canonical name (or header) and the message.
    fn fields_spanning_lines(&self, line: u64) -> Vec<(String, String)> {
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
                Column::CustomerId | Column::OrderId | Column::PaymentIntentId
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

    /// The current record's input cells by header, as written.
    fn raw_cells(&self) -> BTreeMap<String, String> {
        self.headers
            .iter()
            .zip(&self.columns)
            .zip(self.record.iter())
            .filter(|((_, column), _)| !matches!(column, Column::ExportOnly | Column::Unknown))
            .map(|((header, _), cell)| (header.clone(), String::from_utf8_lossy(cell).into_owned()))
            .collect()
    }
}

/// Two header columns that name one field (after case, space and snake/camel
/// folding): the message naming both, or `None`. Which one to send is the person's
/// call, never a silent pick.
fn same_field_twice(headers: &[String], columns: &[Column]) -> Option<String> {
    for (j, column) in columns.iter().enumerate() {
        if matches!(column, Column::ExportOnly | Column::Unknown) {
            continue;
        }
        if let Some(i) = columns[..j].iter().position(|c| c == column) {
            let field = canonical_header(&headers[j]).unwrap_or_else(|| headers[j].clone());
            return Some(format!(
                "columns {} ({:?}) and {} ({:?}) both give {field}: keep one of them (rename \
                 or delete the other) and run again; nothing was imported",
                i + 1,
                headers[i],
                j + 1,
                headers[j]
            ));
        }
    }
    None
}

/// Line breaks in a field (CR, LF or CRLF, each one), as [`LineTap`] counts them.
fn line_breaks(cell: &[u8]) -> u64 {
    let mut n = 0;
    let mut prev_cr = false;
    for &b in cell {
        match b {
            b'\n' if prev_cr => {}
            b'\n' | b'\r' => n += 1,
            _ => {}
        }
        prev_cr = b == b'\r';
    }
    n
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        "2026-11-24T12:00:00Z".parse().unwrap()
    }

    fn source(text: &[u8]) -> Result<CsvSource> {
        CsvSource::from_reader(
            "t.csv".into(),
            Box::new(std::io::Cursor::new(text.to_vec())),
        )
    }

    fn rows(text: &[u8]) -> Vec<ImportRow> {
        let mut s = source(text).unwrap();
        let mut out = Vec::new();
        while let Some(r) = s.next_row(now()).unwrap() {
            out.push(r);
        }
        out
    }

    #[test]
    fn headers_in_either_case_style_and_bom() {
        let out =
            rows(b"\xEF\xBB\xBFcustomer_id,OrderId,metadata.campaign\r\ncus_1,ord_1,spring\r\n");
        assert_eq!(out.len(), 1);
        let p = out[0].outcome.as_ref().unwrap();
        assert_eq!(
            p.to_json(),
            r#"{"customerId":"cus_1","orderId":"ord_1","metadata":{"campaign":"spring"}}"#
        );
        assert_eq!(out[0].line, 2);
    }

    #[test]
    fn line_numbers_are_right_for_lf_crlf_and_cr_endings() {
        for ending in ["\n", "\r\n", "\r"] {
            let text = [
                "customerId,orderId",
                "cus_1,ord_1",
                "cus_2,ord_2",
                "",
                "cus_3,ord_3",
                "",
            ]
            .join(ending);
            let lines: Vec<u64> = rows(text.as_bytes()).iter().map(|r| r.line).collect();
            assert_eq!(lines, [2, 3, 5], "ending {ending:?}");
        }
    }

    #[test]
    fn quoted_newlines_keep_line_numbers_right() {
        let out = rows(
            b"customerId,orderId,metadata\ncus_1,ord_1,\"{\n\"\"a\"\":\"\"b\"\"}\"\ncus_2,,\n",
        );
        assert!(out[0].outcome.is_ok(), "{:?}", out[0].outcome);
        assert_eq!(out[1].line, 4);
        assert!(
            out[1]
                .outcome
                .as_ref()
                .unwrap_err()
                .contains("orderId and paymentIntentId")
        );
    }

    #[test]
    fn header_without_required_columns_is_an_input_error() {
        let err = source(b"name,email\nx,y\n").unwrap_err().to_string();
        assert!(err.contains("t.csv, line 1"), "{err}");
        assert!(err.contains("no customerId column"), "{err}");
        let err = source(b"").unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn bad_rows_do_not_stop_good_ones() {
        let out = rows(b"customerId,orderId\ncus_1,ord_1,extra\ncus_3,ord_3\n");
        assert_eq!(out.len(), 2);
        assert!(
            out[0]
                .outcome
                .as_ref()
                .unwrap_err()
                .contains("3 fields but the header has 2")
        );
        assert!(out[1].outcome.is_ok());
    }

    #[test]
    fn text_that_is_not_utf8_stops_the_file_naming_the_encoding() {
        let bytes =
            b"customerId,orderId,metadata.ville\ncus_1,ord_1,Paris\ncus_2,ord_2,Orl\xe9ans\n";
        let mut s = source(bytes).unwrap();
        // The file is refused as soon as the bad line is read (rows are read one ahead).
        let err = s.next_row(now()).unwrap_err();
        assert_eq!(err.exit(), crate::Exit::Usage);
        let err = err.to_string();
        assert!(
            err.contains("t.csv, line 3") && err.contains("pass --encoding windows-1252"),
            "{err}"
        );
        // The same bytes read as Windows-1252.
        let opts = CsvOptions {
            delimiter: None,
            encoding: CsvEncoding::Windows1252,
        };
        let mut s = CsvSource::from_reader_with(
            "t.csv".into(),
            Box::new(std::io::Cursor::new(bytes.to_vec())),
            &opts,
        )
        .unwrap();
        s.next_row(now()).unwrap();
        let row = s.next_row(now()).unwrap().unwrap();
        assert_eq!(
            row.outcome.unwrap().metadata.unwrap()["ville"],
            "Orl\u{e9}ans"
        );
        // A file is checked whole before anything is imported.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.csv");
        let mut big = b"customerId,orderId\n".to_vec();
        for i in 0..100_000 {
            big.extend_from_slice(format!("cus_{i},ord_{i}\n").as_bytes());
        }
        big.extend_from_slice(b"cus_\x80,ord_x\n");
        std::fs::write(&path, &big).unwrap();
        let err = check_utf8(&path).unwrap_err().to_string();
        assert!(err.contains("line 100002") && err.contains("0x80"), "{err}");
        // Multi-byte characters cut by the read chunks are fine.
        let text = "customerId,orderId\n".to_owned() + &"cus_é€ç,ord_1\n".repeat(40_000);
        std::fs::write(&path, text).unwrap();
        check_utf8(&path).unwrap();
    }

    #[test]
    fn the_separator_is_found_from_the_header() {
        for (text, sep) in [
            (&b"customerId;orderId\ncus_1;ord_1\n"[..], b';'),
            (
                b"\xEF\xBB\xBF\"Customer ID\"\t\"Order ID\"\ncus_1\tord_1\n",
                b'\t',
            ),
            (b"customerId,orderId\ncus_1,ord_1\n", b','),
            (b"name;email\n", b','),
        ] {
            assert_eq!(
                sniff_delimiter(text),
                sep,
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
        let out = rows(b"customerId;orderId;metadata.note\ncus_1;ord_1;a,b\n");
        let p = out[0].outcome.as_ref().unwrap();
        assert_eq!(p.metadata.as_ref().unwrap()["note"], "a,b");
    }

    #[test]
    fn an_unclosed_quote_in_an_id_swallows_no_row_silently() {
        let out = rows(b"customerId,orderId\ncus_1,ord_1\ncus_2,\"ord_2\ncus_3,ord_3\n");
        assert_eq!(out.len(), 2);
        assert!(out[0].outcome.is_ok());
        assert_eq!(out[1].line, 3);
        let why = out[1].outcome.as_ref().unwrap_err();
        assert!(
            why.contains("orderId is a quoted field that begins on line 3 and spans 2 lines")
                && why.contains("check for an unclosed quote on line 3"),
            "{why}"
        );
        assert!(!why.contains("control character"), "said once: {why}");
        // The swallowed row is kept with the invalid one (exported for repair).
        assert!(out[1].raw["orderId"].contains("cus_3,ord_3"));
    }

    #[test]
    fn a_stray_quote_in_metadata_that_folds_rows_is_reported() {
        let text = b"customerId,orderId,metadata.note\n\
            cus_1,ord_1,\"oops\n\
            cus_2,ord_2,fine\n\
            cus_3,ord_3,x\"\n\
            cus_4,ord_4,fine\n";
        let out = rows(text);
        assert_eq!(out.len(), 2, "{out:?}");
        let why = out[0].outcome.as_ref().unwrap_err();
        assert!(
            why.contains("metadata.note is a quoted field that begins on line 2 and spans 3 lines")
                && why.contains("look like rows"),
            "{why}"
        );
        // A legitimate multi-line field whose lines do not look like rows is fine.
        let out = rows(b"customerId,orderId,metadata.note\ncus_1,ord_1,\"line one\nline, two\"\n");
        assert!(out[0].outcome.is_ok(), "{:?}", out[0].outcome);
        // Line numbers count the breaks of earlier fields.
        let out = rows(b"customerId,metadata.a,orderId\ncus_1,\"a\nb\",\"ord\n1\"\n");
        let why = out[0].outcome.as_ref().unwrap_err();
        assert!(why.contains("begins on line 3"), "{why}");
    }

    #[test]
    fn two_columns_for_one_field_are_an_error_naming_both() {
        for (header, first, second, field) in [
            (
                "customerId,orderId,orderId",
                "2 (\"orderId\")",
                "3 (\"orderId\")",
                "orderId",
            ),
            (
                "customerId,Order ID,Customer ID",
                "1 (\"customerId\")",
                "3 (\"Customer ID\")",
                "customerId",
            ),
            (
                "customerId,order_id,orderId",
                "2 (\"order_id\")",
                "3 (\"orderId\")",
                "orderId",
            ),
            (
                "customerId,orderId,metadata.a,Metadata.a",
                "3 (\"metadata.a\")",
                "4 (\"Metadata.a\")",
                "metadata.a",
            ),
        ] {
            let text = format!("{header}\ncus_1,ord_1,x,y\n");
            let err = source(text.as_bytes()).unwrap_err();
            assert_eq!(err.exit(), crate::Exit::Usage);
            let err = err.to_string();
            assert!(
                err.contains("t.csv, line 1")
                    && err.contains(&format!("columns {first} and {second} both give {field}")),
                "{header}: {err}"
            );
        }
        // Export-only and unknown columns may repeat.
        assert!(source(b"customerId,orderId,error,error,x,x\n").is_ok());
    }

    #[test]
    fn a_quote_left_open_at_the_end_of_the_file_makes_the_last_row_invalid() {
        let out = rows(b"customerId,orderId,metadata.c\ncus_1,ord_1,a\ncus_2,ord_2,\"unterminated");
        assert_eq!(out.len(), 2);
        assert!(out[0].outcome.is_ok());
        let why = out[1].outcome.as_ref().unwrap_err();
        assert!(
            why.contains("check for an unclosed quote on line 3"),
            "{why}"
        );
        assert_eq!(out[1].key.as_deref(), Some("ord_2"));
        assert_eq!(out[1].raw["metadata.c"], "unterminated");
        // Escaped quotes ("") are fine.
        let out = rows(b"customerId,orderId,metadata.c\ncus_1,ord_1,\"say \"\"hi\"\"\"\n");
        assert!(out[0].outcome.is_ok(), "{:?}", out[0].outcome);
    }

    #[test]
    fn export_columns_are_ignored_and_unknown_ones_listed() {
        let s = source(b"customerId,orderId,error,line,state,source,colour\n").unwrap();
        assert_eq!(s.unknown_columns, vec!["colour".to_owned()]);
    }
}
