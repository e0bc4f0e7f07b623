//! The progress bar of a run: rows done, rate and ETA, on a terminal only (never
//! under cron, systemd or a pipe). Log lines are written around it, not through it.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

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
        "{bar:30.cyan/blue} {pos}/{len} rows · {pace} · ETA {pace_eta} · {elapsed}"
    } else {
        "{bar:30} {pos}/{len} rows · {pace} · ETA {pace_eta} · {elapsed}"
    };
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("pace", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let per_sec = s.pos() as f64 / s.elapsed().as_secs_f64().max(0.001);
            let _ = write!(w, "{per_sec:.1}/s");
        })
        .with_key(
            "pace_eta",
            |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let eta = eta(s.pos(), s.len().unwrap_or(0), s.elapsed());
                let _ = w.write_str(&eta.map_or_else(|| "?".to_owned(), crate::text::human));
            },
        );
    bar.set_style(style);
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
    Some(bar)
}

/// The time left at the pace achieved so far (rows done over the time since the
/// start, waits and pauses included); `None` before the first row is done.
fn eta(done: u64, total: u64, elapsed: Duration) -> Option<Duration> {
    if done == 0 {
        return None;
    }
    let left = total.saturating_sub(done) as f64;
    Duration::try_from_secs_f64(left * elapsed.as_secs_f64() / done as f64).ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_follows_the_pace_achieved() {
        let s = Duration::from_secs;
        assert_eq!(eta(0, 100, s(60)), None);
        // 25 rows in 50 s: 75 left take 150 s, however fast the last few came.
        assert_eq!(eta(25, 100, s(50)), Some(s(150)));
        assert_eq!(eta(100, 100, s(50)), Some(Duration::ZERO));
        assert_eq!(eta(7, 3, s(1)), Some(Duration::ZERO));
        // Huge numbers give no ETA rather than a panic.
        let _ = eta(1, u64::MAX, Duration::MAX);
    }
}
