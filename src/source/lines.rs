//! Line numbers: where each line with content starts as the bytes stream past,
//! and whether the input so far ends inside a quoted field.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// Notes where each line with content starts as the bytes stream past, so a
/// record's line number is right whatever the line endings and blank lines (the
/// csv crate counts a CRLF file's lines one short). Holds only the starts still
/// ahead of the parser: memory stays flat.
pub(super) struct LineTap<R> {
    inner: R,
    offset: u64,
    line: u64,
    at_line_start: bool,
    prev_cr: bool,
    starts: LineStarts,
    /// An odd number of `"` read so far: the input is inside a quoted field (an
    /// escaped `""` counts twice, so a well-formed file ends outside).
    in_quotes: Arc<AtomicBool>,
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

/// Line breaks in a field (CR, LF or CRLF, each one), as [`LineTap`] counts them.
pub(super) fn line_breaks(cell: &[u8]) -> u64 {
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

/// Where lines with content start (byte offset, line number), shared by the
/// [`LineTap`] that notes them and the reader that looks them up.
pub(super) type LineStarts = Arc<Mutex<VecDeque<(u64, u64)>>>;

impl<R> LineTap<R> {
    pub(super) fn new(inner: R, starts: LineStarts, in_quotes: Arc<AtomicBool>) -> Self {
        LineTap {
            inner,
            offset: 0,
            line: 1,
            at_line_start: true,
            prev_cr: false,
            starts,
            in_quotes,
        }
    }
}
