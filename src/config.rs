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

/// Everything a sending command needs.
#[derive(Debug, Clone)]
pub struct SendConfig {
    pub db: PathBuf,
    pub api_base: String,
    pub key: ApiKey,
    pub timeout: Duration,
    pub ca_cert: Option<PathBuf>,
    pub engine: EngineConfig,
    pub report_json: Option<PathBuf>,
    pub metrics_file: Option<PathBuf>,
}

/// Parses a duration written the usual way: `30s`, `500ms`, `2m`, `1h30m`, `1.5s`;
/// a bare number is seconds.
pub fn parse_duration(flag: &str, text: &str) -> Result<Duration> {
    let t = text.trim();
    let bad = || {
        Error::usage(format!(
            "--{flag} {text:?} is not a duration: write it like 30s, 500ms or 2m"
        ))
    };
    if let Ok(secs) = t.parse::<f64>() {
        return if secs.is_finite() && secs >= 0.0 {
            Ok(Duration::from_secs_f64(secs))
        } else {
            Err(bad())
        };
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

/// Checks the API base URL: https, or plain http to a loopback address only.
pub fn check_api_base(base: &str) -> Result<String> {
    let base = base.trim().trim_end_matches('/');
    let (scheme, rest) = base.split_once("://").ok_or_else(|| {
        Error::usage(format!(
            "--api-base {base:?} is not a URL like https://api.kohortpay.com"
        ))
    })?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    if host.is_empty() {
        return Err(Error::usage(format!("--api-base {base:?} has no host")));
    }
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match scheme {
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
pub fn load_key(file: Option<&Path>, env_key: Option<String>, live: bool) -> Result<ApiKey> {
    let key = match file {
        Some(path) => {
            warn_if_exposed(path);
            let text = std::fs::read_to_string(path).map_err(|source| Error::File {
                action: "read the API key file",
                path: path.to_owned(),
                source,
            })?;
            text.trim().to_owned()
        }
        None => env_key.map(|k| k.trim().to_owned()).unwrap_or_default(),
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

/// Resolves the options of a sending command.
pub fn resolve_send(args: &SendArgs, db: PathBuf, env_key: Option<String>) -> Result<SendConfig> {
    let api_base = check_api_base(&args.api_base)?;
    let timeout = parse_duration("timeout", &args.timeout)?;
    if timeout.is_zero() {
        return Err(Error::usage("--timeout must be above zero"));
    }
    let settle = match &args.settle {
        Some(s) => parse_duration("settle", s)?,
        None => timeout * 2,
    };
    if args.concurrency == 0 {
        return Err(Error::usage("--concurrency must be at least 1"));
    }
    if !args.rate.is_finite() || args.rate < 0.0 {
        return Err(Error::usage(format!(
            "--rate {} is not a request rate: give requests per second, like 5 or 0.5 (0 for no limit)",
            args.rate
        )));
    }
    if args.max_attempts == 0 {
        return Err(Error::usage("--max-attempts must be at least 1"));
    }
    let key = load_key(args.api_key_file.as_deref(), env_key, args.live)?;
    let retry = RetryPolicy {
        max_attempts: args.max_attempts,
        ..RetryPolicy::default()
    };
    Ok(SendConfig {
        db,
        api_base,
        key,
        timeout,
        ca_cert: args.ca_cert.clone(),
        engine: EngineConfig {
            concurrency: args.concurrency,
            rate: (args.rate > 0.0).then_some(args.rate),
            retry,
            max_attempts: args.max_attempts,
            precheck: match args.precheck {
                PrecheckArg::Always => Precheck::Always,
                PrecheckArg::Ambiguous => Precheck::Ambiguous,
            },
            settle,
            breaker_threshold: args.breaker.max(1),
            resend_unknown: args.include_unknown,
            grace: parse_duration("grace", &args.grace)?,
            seed: args.seed,
        },
        report_json: args.report_json.clone(),
        metrics_file: args.metrics_file.clone(),
    })
}

/// Resolves the sandbox's knobs.
pub fn resolve_sandbox(args: &SandboxArgs) -> Result<SandboxConfig> {
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
        late_create: probability("late-create", args.late_create)?,
        late_after: parse_duration("late-after", &args.late_after)?,
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
    fn latency_ranges() {
        assert_eq!(parse_latency("10ms").unwrap().1, Duration::from_millis(10));
        assert_eq!(
            parse_latency("10ms..80ms").unwrap(),
            (Duration::from_millis(10), Duration::from_millis(80))
        );
        assert!(parse_latency("80ms..10ms").is_err());
    }
}
