//! The progress bar of a run: rows done, rate and ETA, on a terminal only (never
//! under cron, systemd or a pipe). Log lines are written around it, not through it.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bar being drawn, if any, so log lines can step around it.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Whether a bar would be shown (stderr is a terminal); its total costs a count.
pub(super) fn wanted() -> bool {
    std::io::stderr().is_terminal()
}

/// Starts a bar for `total` rows when stderr is a terminal.
pub(super) fn start(total: u64) -> Option<ProgressBar> {
    if total == 0 || !wanted() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let template = if super::colours() {
        "{bar:30.cyan/blue} {pos}/{len} rows · {per_sec} · ETA {eta} · {elapsed}"
    } else {
        "{bar:30} {pos}/{len} rows · {per_sec} · ETA {eta} · {elapsed}"
    };
    let style =
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
    Some(bar)
}

/// Clears the bar before the report is printed.
pub(super) fn finish(bar: Option<ProgressBar>) {
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = None;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

/// stderr for the log subscriber: with a bar on screen, each line is written while
/// the bar is hidden, then the bar is redrawn below it.
pub(super) struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = BAR.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match bar {
            Some(b) => b
                .suspend(|| std::io::stderr().write_all(buf))
                .map(|()| buf.len()),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
