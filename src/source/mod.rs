//! The CSV reader: streams an RFC 4180 file (or stdin) row by row, maps its
//! columns by header, and turns every row into a validated request body or a
//! recorded reason with its line number.
//!
//! Memory does not grow with the file: one record buffer is reused, and rows go
//! to the store in batches as they are read.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | `reader` | [`CsvSource`]: opening an input, its header, the row loop, line lookup |
//! | `header` | what each column means; the checks a header must pass |
//! | `encoding` | [`CsvOptions`], the UTF-8 check, Windows-1252, finding the separator |
//! | `lines` | where each line starts as the bytes stream past |
//! | `row` | [`ImportRow`]: a record turned into a request body or its reasons |
//! | `quotes` | unclosed quotes: fields spanning lines, a file ending inside quotes |

mod encoding;
mod header;
mod lines;
mod quotes;
mod reader;
mod row;
#[cfg(test)]
mod tests;

pub use encoding::{CsvEncoding, CsvOptions, check_utf8, delimiter_name};
pub use header::{canonical_header, list_some};
pub use reader::CsvSource;
pub use row::ImportRow;
