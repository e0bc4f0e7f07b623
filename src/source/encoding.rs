//! Encodings and separators: the options a CSV is read with, the UTF-8 check of a
//! whole file, decoding Windows-1252, and finding the separator from the header.

use std::io::Read;
use std::path::Path;

use super::header::{Column, column_for};
use crate::error::{Error, Result};

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

/// What to do about a file that is not UTF-8.
pub(super) const NOT_UTF8_FIX: &str = "this looks like Windows-1252 (what a spreadsheet in western \
     Europe saves as CSV): pass --encoding windows-1252, or save the file as UTF-8; \
     nothing from this file was imported";

/// Checks that a file read as UTF-8 is UTF-8 throughout, before any row of it is
/// imported; the error names the first line that is not. Streams: memory stays flat.
pub fn check_utf8(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|source| Error::File {
        action: "open CSV file",
        path: path.to_owned(),
        source,
    })?;
    check_utf8_in(file, path)
}

/// As [`check_utf8`], for any reader (`path` names it in messages).
pub(crate) fn check_utf8_in(mut file: impl Read, path: &Path) -> Result<()> {
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

/// The separators a header may use, most common first.
const DELIMITERS: [u8; 3] = [b',', b';', b'\t'];

/// The separator of a file whose first bytes are `head`: the one that splits the
/// header line into a column that is `customerId` (the one column every file has);
/// a comma when none does (the header check then says what is missing).
pub(super) fn sniff_delimiter(head: &[u8]) -> u8 {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
    DELIMITERS
        .into_iter()
        .find(|d| {
            line.split(|b| b == d).any(|cell| {
                let text = String::from_utf8_lossy(cell);
                column_for(text.trim_matches(|c: char| c == '"' || c.is_whitespace()))
                    == Column::Field(crate::job::Field::CustomerId)
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

/// `input` as UTF-8: decoded as it streams (memory stays flat) when it is in
/// another encoding.
pub(super) fn decoded(input: Box<dyn Read + Send>, encoding: CsvEncoding) -> Box<dyn Read + Send> {
    match encoding {
        CsvEncoding::Utf8 => input,
        CsvEncoding::Windows1252 => Box::new(
            encoding_rs_io::DecodeReaderBytesBuilder::new()
                .encoding(Some(encoding_rs::WINDOWS_1252))
                .build(input),
        ),
    }
}

/// The separator found from the header line, which is read ahead and put back in
/// front of the rest of the stream.
pub(super) fn sniffed(
    name: &str,
    mut input: Box<dyn Read + Send>,
) -> Result<(Box<dyn Read + Send>, u8)> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 8192];
    while !head.contains(&b'\n') && head.len() < 1 << 20 {
        let n = input.read(&mut chunk).map_err(|e| Error::Input {
            source_name: name.to_owned(),
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
    Ok((input, found))
}
