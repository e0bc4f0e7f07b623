//! The clock as the store writes it: text timestamps and unix milliseconds.

/// Now, in the fixed-width text form stored everywhere (sorts as time does).
pub(super) fn now_text() -> String {
    ts_text(jiff::Timestamp::now())
}

/// A time as the text columns hold it: RFC 3339 in UTC with microseconds, e.g.
/// `2026-11-24T13:51:21.015000Z` (the same as `strftime("%Y-%m-%dT%H:%M:%S%.6fZ")`,
/// without parsing a format on every row).
pub(super) fn ts_text(ts: jiff::Timestamp) -> String {
    format!("{ts:.6}")
}

/// Now, unix milliseconds (`updated_ms`).
/// A stored timestamp as unix seconds (`None`: none, or not one).
pub(super) fn unix_seconds(stored: Option<&str>) -> Option<f64> {
    stored
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .map(|t| t.as_millisecond() as f64 / 1000.0)
}

pub(super) fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

#[cfg(test)]
mod tests {
    use jiff::Timestamp;

    use super::ts_text;

    #[test]
    fn time_text_is_the_strftime_format() {
        for (secs, nanos) in [
            (0, 0),
            (1_795_000_000, 0),
            (1_795_000_000, 999_999_999),
            (1_795_000_000, 1_500),
            (1_795_000_000, 123_456_789),
            (4_102_444_799, 999_999_000),
        ] {
            let ts = Timestamp::new(secs, nanos).unwrap();
            let expected = ts.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
            assert_eq!(ts_text(ts), expected, "{secs}.{nanos:09}");
        }
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..10_000 {
            let ts = Timestamp::new(rng.i64(0..4_102_444_800), rng.i32(0..1_000_000_000)).unwrap();
            assert_eq!(
                ts_text(ts),
                ts.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
            );
        }
    }
}
