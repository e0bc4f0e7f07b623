//! Text for people: durations and clock times as they are written, counts with
//! the right plural, and text from input or from the API made safe to print on a
//! terminal or in a log line (no escape sequence, no forged line).

use std::borrow::Cow;
use std::time::Duration;

/// A time as the API writes and wants it: RFC 3339, UTC, milliseconds
/// (`2026-12-24T18:00:00.000Z`).
pub(crate) fn api_time(ts: jiff::Timestamp) -> String {
    ts.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// A duration as people write it (`1h`, `5m`, `30s`, `250ms`, `1.5s`).
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".to_owned(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms if ms < 1_000 => format!("{ms}ms"),
        _ => format!("{:.1}s", d.as_secs_f64()),
    }
}

/// The local clock time `d` from now, like `2026-12-01 02:41 CET` ("later" if it is
/// beyond any calendar).
pub(crate) fn local_time_after(d: Duration) -> String {
    let Ok(span) = jiff::SignedDuration::try_from(d) else {
        return "later".to_owned();
    };
    jiff::ZonedDateTime::now()
        .checked_add(span)
        .map(|z| z.strftime("%Y-%m-%d %H:%M %Z").to_string())
        .unwrap_or_else(|_| "later".to_owned())
}

/// `1 row`, `2 rows`: `n` and the noun, plural unless `n` is one.
pub(crate) fn count(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Text that came from an input file, a producer or the API, made safe to print:
/// control characters (ESC of terminal sequences, CR and LF that would start a
/// forged line, DEL, C1 controls) are written as `\n` or `\u{1b}`-style escapes.
/// Borrowed when there is nothing to escape, which is nearly always.
pub(crate) fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Control characters, and the Unicode ones that break or reorder a line on screen
/// (line and paragraph separators, bidirectional overrides and isolates).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// A number of milliseconds for a log line: three decimals at most (`0.321`, not
/// `0.32075099999999995`).
pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_people_write_them() {
        for (ms, text) in [
            (0, "0s"),
            (1, "1ms"),
            (250, "250ms"),
            (1_500, "1.5s"),
            (30_000, "30s"),
            (300_000, "5m"),
            (3_600_000, "1h"),
            (90 * 60_000, "90m"),
        ] {
            assert_eq!(human(Duration::from_millis(ms)), text);
        }
    }

    #[test]
    fn plurals() {
        assert_eq!(count(1u64, "row", "rows"), "1 row");
        assert_eq!(count(0u64, "row", "rows"), "0 rows");
        assert_eq!(count(2u32, "duplicate", "duplicates"), "2 duplicates");
    }

    #[test]
    fn control_characters_cannot_reach_a_terminal() {
        let nasty = "a\u{1b}[31mred\rCR\nINFO forged\u{1b}]0;title\u{7}\u{9b}x";
        let safe = escape(nasty);
        assert!(!safe.chars().any(char::is_control), "{safe}");
        assert_eq!(
            safe,
            "a\\u{1b}[31mred\\rCR\\nINFO forged\\u{1b}]0;title\\u{7}\\u{9b}x"
        );
        assert!(matches!(escape("plain ord_1 é €"), Cow::Borrowed(_)));
        assert_eq!(escape("a\u{2028}b\u{202e}c"), "a\\u{2028}b\\u{202e}c");
    }

    #[test]
    fn milliseconds_keep_three_decimals() {
        assert_eq!(ms(Duration::from_nanos(320_751)), 0.321);
        assert_eq!(ms(Duration::from_secs(2)), 2000.0);
    }

    #[test]
    fn clock_times_never_panic() {
        assert_ne!(local_time_after(Duration::from_secs(60)), "later");
        assert_eq!(local_time_after(Duration::MAX), "later");
    }
}
