//! Raw flags → resolved settings, in one fallible step. Durations, rates, URLs
//! and the key are checked here, so the rest of the crate works with typed values
//! and a bad flag is reported before anything is opened or sent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::ApiKey;
use crate::cli::{PrecheckArg, SandboxArgs, SendArgs};
use crate::engine::{EngineConfig, Precheck, RetryPolicy};
use crate::error::{Error, Result};
use crate::sandbox::SandboxConfig;
use crate::source::{CsvEncoding, CsvOptions};
use crate::text::human;

/// Everything a sending command needs.
#[derive(Debug, Clone)]
pub struct SendConfig {
    pub db: crate::store::Db,
    pub api_base: String,
    pub key: ApiKey,
    pub timeout: Duration,
    pub ca_cert: Option<PathBuf>,
    pub engine: EngineConfig,
    pub report_json: Option<PathBuf>,
    pub metrics_file: Option<PathBuf>,
    /// How long a database write waits for another process's transaction.
    pub busy_timeout: Duration,
    /// How the CSV files of `run` are read.
    pub csv: CsvOptions,
    /// Say what would happen, on a copy of the database; send nothing.
    pub dry_run: bool,
}

/// The accepted range of each bounded setting, as the README's option table gives
/// them: (flag, lowest, highest).
pub(crate) mod limits {
    use std::time::Duration;

    pub(crate) const TIMEOUT: (Duration, Duration) =
        (Duration::from_millis(1), Duration::from_secs(3_600));
    pub(crate) const SETTLE: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(86_400));
    pub(crate) const GRACE: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(3_600));
    pub(crate) const MAX_PAUSE: (Duration, Duration) =
        (Duration::ZERO, Duration::from_secs(86_400));
    pub(crate) const BUSY_TIMEOUT: (Duration, Duration) =
        (Duration::ZERO, Duration::from_secs(3_600));
    /// The sandbox's `--late-after`.
    pub(crate) const LATE_AFTER: (Duration, Duration) =
        (Duration::ZERO, Duration::from_secs(3_600));
    /// Requests per second, when not 0 (no limit).
    pub(crate) const RATE: (f64, f64) = (0.001, 100_000.0);
    pub(crate) const CONCURRENCY: (usize, usize) = (1, 1_024);
    pub(crate) const MAX_ATTEMPTS: (u32, u32) = (1, 100);
    pub(crate) const BREAKER: (u32, u32) = (1, 1_000_000);
}

/// A duration flag parsed and checked against its accepted range.
pub(crate) fn bounded_duration(
    flag: &str,
    text: &str,
    (lo, hi): (Duration, Duration),
) -> Result<Duration> {
    let too_big = text
        .trim()
        .parse::<f64>()
        .is_ok_and(|x| x.is_finite() && x > 0.0);
    let d = match parse_duration(flag, text) {
        Ok(d) => d,
        // A number too large for any duration is out of range, like any other.
        Err(_) if too_big => hi.saturating_add(Duration::from_secs(1)),
        Err(e) => return Err(e),
    };
    if d < lo || d > hi {
        return Err(Error::usage(format!(
            "--{flag} {text}: accepted from {} to {}",
            human(lo),
            human(hi)
        )));
    }
    Ok(d)
}

/// A number flag checked against its accepted range.
fn bounded<T: PartialOrd + std::fmt::Display + Copy>(
    flag: &str,
    value: T,
    (lo, hi): (T, T),
) -> Result<T> {
    if value < lo || value > hi {
        return Err(Error::usage(format!(
            "--{flag} {value}: accepted from {lo} to {hi}"
        )));
    }
    Ok(value)
}

/// Parses a duration written the usual way: `30s`, `500ms`, `2m`, `1h30m`, `1.5s`;
/// a bare number is seconds.
pub(crate) fn parse_duration(flag: &str, text: &str) -> Result<Duration> {
    let t = text.trim();
    let bad = || {
        Error::usage(format!(
            "--{flag} {text:?} is not a duration: write it like 30s, 500ms or 2m"
        ))
    };
    if let Ok(secs) = t.parse::<f64>() {
        // NaN, negative and too large for a Duration are all refused here.
        return Duration::try_from_secs_f64(secs).map_err(|_| bad());
    }
    let d: jiff::SignedDuration = t.parse().map_err(|_| bad())?;
    if d.is_negative() {
        return Err(bad());
    }
    d.try_into().map_err(|_| bad())
}

/// `10ms` or `10ms..80ms`.
fn parse_latency(text: &str) -> Result<(Duration, Duration)> {
    match text.split_once("..") {
        Some((a, b)) => {
            let (lo, hi) = (parse_duration("latency", a)?, parse_duration("latency", b)?);
            if lo > hi {
                return Err(Error::usage(format!(
                    "--latency {text:?}: the lower bound is above the upper one"
                )));
            }
            Ok((lo, hi))
        }
        None => {
            let d = parse_duration("latency", text)?;
            Ok((d, d))
        }
    }
}

fn probability(flag: &str, p: f64) -> Result<f64> {
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(Error::usage(format!(
            "--{flag} {p} is not a probability between 0 and 1"
        )))
    }
}

/// The shortest settle delay that outlasts the hosting router (it gives up at 30 s
/// while the application may still create the group), with a margin.
pub(crate) const MIN_SAFE_SETTLE: Duration = Duration::from_secs(45);

/// Whether a checked API base is on loopback (the sandbox, a rehearsal).
fn is_loopback(base: &str) -> bool {
    url::Url::parse(base).is_ok_and(|u| u.host().is_some_and(host_is_loopback))
}

fn host_is_loopback(host: url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    }
}

/// Checks the API base URL with a real URL parser: https, or plain http to a
/// loopback host only; no user name or password in it (they would be stored, printed
/// and sent as a second credential).
pub(crate) fn check_api_base(base: &str) -> Result<String> {
    let base = base.trim().trim_end_matches('/');
    let url = url::Url::parse(base).map_err(|e| {
        Error::usage(format!(
            "--api-base {base:?} is not a URL like https://api.kohortpay.com ({e})"
        ))
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::usage(
            "--api-base must not carry a user name or password (user@host): the key goes in \
             KOHORTPAY_API_KEY or --api-key-file, and nothing else is needed"
                .to_owned(),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(Error::usage(format!(
            "--api-base {base}: give the API's base address without ?query or #fragment"
        )));
    }
    let Some(host) = url.host() else {
        return Err(Error::usage(format!("--api-base {base:?} has no host")));
    };
    let loopback = host_is_loopback(host);
    match url.scheme() {
        "https" => Ok(base.to_owned()),
        "http" if loopback => Ok(base.to_owned()),
        "http" => Err(Error::usage(format!(
            "--api-base {base}: plain http is allowed only for loopback (the sandbox); use https"
        ))),
        _ => Err(Error::usage(format!(
            "--api-base {base}: the scheme must be https"
        ))),
    }
}

/// Reads the key from `--api-key-file`, else from `KOHORTPAY_API_KEY`.
pub(crate) fn load_key(file: Option<&Path>, env_key: Option<String>, live: bool) -> Result<ApiKey> {
    let key = match file {
        Some(path) => {
            warn_if_exposed(path);
            let text = std::fs::read_to_string(path).map_err(|source| Error::File {
                action: "read the API key file",
                path: path.to_owned(),
                source,
            })?;
            let key = text.trim().to_owned();
            if key.is_empty() {
                return Err(Error::usage(format!(
                    "the API key file {} is empty: write the secret key (sk_test_… or \
                     sk_live_…) into it, alone on one line",
                    path.display()
                )));
            }
            check_key_form(&key, &format!("the API key file {}", path.display()))?;
            key
        }
        None => {
            let key = env_key.map(|k| k.trim().to_owned()).unwrap_or_default();
            if !key.is_empty() {
                check_key_form(&key, "KOHORTPAY_API_KEY")?;
            }
            key
        }
    };
    if key.is_empty() {
        return Err(Error::usage(
            "no API key: set KOHORTPAY_API_KEY or pass --api-key-file PATH \
             (the key itself is never a flag: flags show in `ps`)",
        ));
    }
    let key = ApiKey::new(key);
    if key.is_live() && !live {
        return Err(Error::usage(
            "refusing a live key (sk_live_…) without --live: live groups email real customers. \
             Add --live if that is what you mean, or use an sk_test_ key to rehearse",
        ));
    }
    Ok(key)
}

/// Refuses a key that cannot be a secret key before anything is sent (the message
/// never shows the key).
fn check_key_form(key: &str, origin: &str) -> Result<()> {
    if key.contains('=') || key.chars().any(char::is_whitespace) {
        return Err(Error::usage(format!(
            "{origin} does not hold a bare key (it has '=' or spaces, like NAME=value or \
             two words): put only the secret key in it, e.g. sk_test_…"
        )));
    }
    if key.chars().any(|c| !c.is_ascii_graphic()) {
        return Err(Error::usage(format!(
            "{origin} holds characters a key never has (control or non-ASCII characters): \
             copy the secret key again from the KohortPay dashboard"
        )));
    }
    if key.starts_with("pk_") {
        return Err(Error::usage(format!(
            "{origin} holds a publishable key (pk_…), which cannot create groups: use the \
             secret key (sk_test_… or sk_live_…) from the KohortPay dashboard"
        )));
    }
    if !key.starts_with("sk_test_") && !key.starts_with("sk_live_") {
        return Err(Error::usage(format!(
            "{origin} does not hold a KohortPay secret key: those start with sk_test_ or \
             sk_live_"
        )));
    }
    Ok(())
}

#[cfg(unix)]
fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %path.display(),
            "the API key file is readable by other users; run: chmod 600 {}",
            path.display()
        );
    }
}

#[cfg(not(unix))]
fn warn_if_exposed(_path: &Path) {}

/// The settings of a sending command other than the database and the key, checked
/// as `run` checks them (`config` shows these).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub api_base: String,
    pub timeout: Duration,
    pub engine: EngineConfig,
    pub busy_timeout: Duration,
}

/// Resolves and checks every setting of a sending command but the key: ranges, the
/// URL, and that every file named exists (or, for outputs, can be written) before
/// anything is opened or sent.
pub(crate) fn resolve_settings(args: &SendArgs) -> Result<Settings> {
    let api_base = check_api_base(&args.api_base)?;
    let timeout = bounded_duration("timeout", &args.timeout, limits::TIMEOUT)?;
    let settle = resolve_settle(args.settle.as_deref(), timeout, &api_base)?;
    let concurrency = bounded("concurrency", args.concurrency, limits::CONCURRENCY)?;
    let rate = resolve_rate(args.rate)?;
    let max_attempts = bounded("max-attempts", args.max_attempts, limits::MAX_ATTEMPTS)?;
    let breaker = bounded("breaker", args.breaker, limits::BREAKER)?;
    let grace = bounded_duration("grace", &args.grace, limits::GRACE)?;
    let max_pause = bounded_duration("max-pause", &args.max_pause, limits::MAX_PAUSE)?;
    let busy_timeout = bounded_duration("busy-timeout", &args.busy_timeout, limits::BUSY_TIMEOUT)?;
    if let Some(ca) = &args.ca_cert {
        check_ca_cert(ca)?;
    }
    for (flag, path) in [
        ("report-json", &args.report_json),
        ("metrics-file", &args.metrics_file),
    ] {
        if let Some(path) = path {
            check_writable(flag, path)?;
        }
    }
    let retry = RetryPolicy {
        max_attempts,
        ..RetryPolicy::default()
    };
    Ok(Settings {
        api_base,
        timeout,
        busy_timeout,
        engine: EngineConfig {
            concurrency,
            rate,
            retry,
            precheck: match args.precheck {
                PrecheckArg::Always => Precheck::Always,
                PrecheckArg::Ambiguous => Precheck::Ambiguous,
            },
            settle,
            breaker_threshold: breaker,
            resend_unknown: args.include_unknown,
            grace,
            max_pause,
            seed: args.seed,
        },
    })
}

/// `--settle`, or by default the larger of twice the timeout and [`MIN_SAFE_SETTLE`];
/// a shorter one is allowed but warned about, unless the API is on loopback.
fn resolve_settle(settle: Option<&str>, timeout: Duration, api_base: &str) -> Result<Duration> {
    let Some(s) = settle else {
        return Ok((timeout * 2).max(MIN_SAFE_SETTLE));
    };
    let settle = bounded_duration("settle", s, limits::SETTLE)?;
    if settle < MIN_SAFE_SETTLE && !is_loopback(api_base) {
        tracing::warn!(
            settle = %s,
            "--settle {s} is shorter than {}: the API's hosting router gives up after \
             30 s while the application may still create the group, so a check that \
             soon can miss it and the row be sent twice",
            human(MIN_SAFE_SETTLE)
        );
    }
    Ok(settle)
}

/// `--rate`: requests per second, 0 for no limit (`None`).
fn resolve_rate(rate: f64) -> Result<Option<f64>> {
    if !rate.is_finite() || rate < 0.0 {
        return Err(Error::usage(format!(
            "--rate {rate} is not a request rate: give requests per second, like 5 or 0.5 (0 for no limit)"
        )));
    }
    if rate == 0.0 {
        return Ok(None);
    }
    bounded("rate", rate, limits::RATE).map(Some)
}

/// `--ca-cert` must name a readable file with a PEM certificate in it.
fn check_ca_cert(ca: &Path) -> Result<()> {
    let pem = std::fs::read(ca).map_err(|source| Error::File {
        action: "read the CA certificate (--ca-cert)",
        path: ca.to_owned(),
        source,
    })?;
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(Error::usage(format!(
            "--ca-cert {}: no PEM certificate in it (a '-----BEGIN CERTIFICATE-----' \
             block); give the root certificate in PEM form",
            ca.display()
        )));
    }
    Ok(())
}

/// An output file must be creatable where it is named: its directory exists and
/// takes a new file (tried with a temporary file, removed at once).
pub(crate) fn check_writable(flag: &str, path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if path.is_dir() {
        return Err(Error::usage(format!(
            "--{flag} {} is a directory: name a file in it",
            path.display()
        )));
    }
    tempfile::NamedTempFile::new_in(dir).map(drop).map_err(|e| {
        Error::usage(format!(
            "--{flag} {}: cannot write in {} ({e}); create the directory or pick another path",
            path.display(),
            dir.display()
        ))
    })
}

/// Resolves the options of a sending command.
pub fn resolve_send(
    args: &SendArgs,
    db: impl Into<crate::store::Db>,
    env_key: Option<String>,
) -> Result<SendConfig> {
    let settings = resolve_settings(args)?;
    let key = load_key(args.api_key_file.as_deref(), env_key, args.live)?;
    Ok(SendConfig {
        db: db.into(),
        api_base: settings.api_base,
        key,
        timeout: settings.timeout,
        ca_cert: args.ca_cert.clone(),
        engine: settings.engine,
        report_json: args.report_json.clone(),
        metrics_file: args.metrics_file.clone(),
        busy_timeout: settings.busy_timeout,
        csv: CsvOptions::default(),
        dry_run: args.dry_run,
    })
}

/// How input CSV files are read, from `--delimiter` and `--encoding`.
pub(crate) fn resolve_csv(args: &crate::cli::CsvArgs) -> Result<CsvOptions> {
    let delimiter = match args.delimiter.as_deref() {
        None => None,
        Some("," | "comma") => Some(b','),
        Some(";" | "semicolon") => Some(b';'),
        Some("\t" | "\\t" | "tab") => Some(b'\t'),
        Some(other) => {
            return Err(Error::usage(format!(
                "--delimiter {other:?} is not a separator kohort-batch reads: give ',', ';' or tab"
            )));
        }
    };
    let encoding = match args.encoding.to_ascii_lowercase().as_str() {
        "utf-8" | "utf8" => CsvEncoding::Utf8,
        "windows-1252" | "cp1252" | "latin1" | "iso-8859-1" => CsvEncoding::Windows1252,
        other => {
            return Err(Error::usage(format!(
                "--encoding {other:?} is not an encoding kohort-batch reads: give utf-8, \
                 windows-1252 or latin1"
            )));
        }
    };
    Ok(CsvOptions {
        delimiter,
        encoding,
    })
}

/// Resolves the sandbox's knobs.
pub(crate) fn resolve_sandbox(args: &SandboxArgs) -> Result<SandboxConfig> {
    if let Some(r) = args.rate_limit
        && !(r.is_finite() && r > 0.0)
    {
        return Err(Error::usage(
            "--rate-limit must be a positive number of requests per second",
        ));
    }
    Ok(SandboxConfig {
        latency: parse_latency(&args.latency)?,
        error_500: probability("error-500", args.error_500)?,
        error_502_html: probability("error-502", args.error_502)?,
        error_503: probability("error-503", args.error_503)?,
        error_429: probability("error-429", args.error_429)?,
        retry_after_secs: args.retry_after,
        rate_limit: args.rate_limit,
        reset: probability("reset", args.reset)?,
        lost_response: probability("lost-response", args.lost_response)?,
        truncated: probability("truncated", args.truncated)?,
        oversized: probability("oversized", args.oversized)?,
        late_create: probability("late-create", args.late_create)?,
        late_after: bounded_duration("late-after", &args.late_after, limits::LATE_AFTER)?,
        list_answer: args.list_answer.parse().map_err(Error::Usage)?,
        seed: args.seed,
        tls: args.tls_cert.clone().zip(args.tls_key.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let table = [
            ("30s", Some(30_000)),
            ("500ms", Some(500)),
            ("2m", Some(120_000)),
            ("1h30m", Some(5_400_000)),
            ("1.5", Some(1_500)),
            ("0", Some(0)),
            ("soon", None),
            ("-1s", None),
            ("", None),
        ];
        for (text, want) in table {
            let got = parse_duration("timeout", text)
                .ok()
                .map(|d| d.as_millis() as u64);
            assert_eq!(got, want, "{text:?}");
        }
        let err = parse_duration("timeout", "soon").unwrap_err().to_string();
        assert!(err.contains("--timeout") && err.contains("30s"), "{err}");
    }

    #[test]
    fn api_base_must_be_https_unless_loopback() {
        let table = [
            ("https://api.kohortpay.com/", true),
            ("http://127.0.0.1:8080", true),
            ("http://localhost:1", true),
            ("http://[::1]:9", true),
            ("http://api.kohortpay.com", false),
            ("http://10.0.0.1", false),
            ("ftp://x", false),
            ("api.kohortpay.com", false),
            // The host a URL parser sees, not the one a string split would.
            ("http://[::1]@192.0.2.2:18090", false),
            ("http://127.0.0.1:18080@evil.example", false),
            ("https://user:secret@api.kohortpay.com", false),
            ("https://api.kohortpay.com?x=1", false),
            ("http://127.0.0.2:9", true),
        ];
        for (base, ok) in table {
            assert_eq!(check_api_base(base).is_ok(), ok, "{base}");
        }
    }

    #[test]
    fn keys() {
        assert!(
            load_key(None, None, false)
                .unwrap_err()
                .to_string()
                .contains("KOHORTPAY_API_KEY")
        );
        let live = load_key(None, Some("sk_live_abc".into()), false)
            .unwrap_err()
            .to_string();
        assert!(live.contains("--live") && !live.contains("abc"), "{live}");
        assert!(load_key(None, Some("sk_live_abc".into()), true).is_ok());
        assert!(load_key(None, Some(" sk_test_x \n".into()), false).is_ok());
    }

    #[test]
    fn the_default_settle_outlasts_the_hosting_router() {
        let args = |timeout: &str, settle: Option<&str>| crate::cli::SendArgs {
            api_base: "https://api.kohortpay.com".into(),
            api_key_file: None,
            live: false,
            concurrency: 4,
            rate: 5.0,
            max_attempts: 8,
            timeout: timeout.into(),
            settle: settle.map(Into::into),
            precheck: PrecheckArg::Always,
            breaker: 30,
            include_unknown: false,
            report_json: None,
            metrics_file: None,
            ca_cert: None,
            grace: "30s".into(),
            max_pause: "5m".into(),
            busy_timeout: "60s".into(),
            dry_run: false,
            seed: None,
        };
        let settle = |t, s| resolve_settings(&args(t, s)).unwrap().engine.settle;
        assert_eq!(settle("5s", None), Duration::from_secs(45));
        assert_eq!(settle("30s", None), Duration::from_secs(60));
        assert_eq!(settle("2m", None), Duration::from_secs(240));
        // A shorter one is the user's call (with a warning).
        assert_eq!(settle("5s", Some("1s")), Duration::from_secs(1));
    }

    #[test]
    fn latency_ranges() {
        assert_eq!(parse_latency("10ms").unwrap().1, Duration::from_millis(10));
        assert_eq!(
            parse_latency("10ms..80ms").unwrap(),
            (Duration::from_millis(10), Duration::from_millis(80))
        );
        assert!(parse_latency("80ms..10ms").is_err());
    }
}
