//! The deploy files can never drift from the flags: their command lines are parsed
//! and resolved by the real CLI, and the cron line is checked field by field.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use kohort_batch::cli::{self, Command, LogFormat};
use kohort_batch::config;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The `--db` of a parsed `run` command line.
fn db_of(parsed: &cli::Cli) -> PathBuf {
    match &parsed.command {
        Command::Run(r) => r.db.db.file().unwrap().to_owned(),
        other => panic!("not a run: {other:?}"),
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap()
}

/// Parses an installed command line with the real CLI, with the installed paths
/// swapped for ones that exist here, and resolves it like `run` would.
fn parse_installed(words: &[String], dir: &Path) -> cli::Cli {
    let key = dir.join("api-key");
    std::fs::write(&key, "sk_live_deploy_test").unwrap();
    let example = repo("deploy/config.example.toml");
    let argv: Vec<OsString> = words
        .iter()
        .map(|w| {
            let w = w
                .replace("/var/log/kohort-batch", &dir.display().to_string())
                .replace("/var/lib/kohort-batch-metrics", &dir.display().to_string())
                .replace("/var/lib/kohort-batch", &dir.display().to_string())
                .replace(
                    "${CREDENTIALS_DIRECTORY}/kohortpay-api-key",
                    &key.display().to_string(),
                )
                .replace(
                    "/etc/kohort-batch/config.toml",
                    &example.display().to_string(),
                );
            OsString::from(w)
        })
        .collect();
    let parsed = cli::parse(argv.clone()).unwrap_or_else(|e| panic!("{argv:?}: {e:?}"));
    let Command::Run(run) = &parsed.command else {
        panic!("not a run: {argv:?}")
    };
    assert_eq!(parsed.log_format, LogFormat::Json);
    assert!(run.send.live && run.send.report_json.is_some() && run.send.metrics_file.is_some());
    let resolved = config::resolve_send(&run.send, run.db.db.clone(), None).unwrap();
    assert_eq!(resolved.api_base, "https://api.kohortpay.com");
    assert_eq!(resolved.engine.concurrency, 4);
    parsed
}

#[test]
fn the_service_exec_start_parses_with_the_real_cli() {
    let unit = read("deploy/systemd/kohort-batch.service");
    let exec: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .collect();
    assert_eq!(exec.len(), 1);
    let words: Vec<String> = exec[0].split_whitespace().map(str::to_owned).collect();
    assert_eq!(words[0], "/usr/local/bin/kohort-batch");
    let dir = tempfile::tempdir().unwrap();
    let parsed = parse_installed(&words, dir.path());
    assert_eq!(db_of(&parsed), dir.path().join("kohort-batch.db"));
    for needed in [
        "Type=oneshot",
        "User=kohort-batch\n",
        "Group=kohort-batch-producers\n",
        "UMask=0007\n",
        "ReadWritePaths=/var/lib/kohort-batch /var/lib/kohort-batch-metrics /var/log/kohort-batch\n",
        "Restart=on-failure\n",
        "RestartPreventExitStatus=2 4 5 70\n",
        "SuccessExitStatus=1\n",
        "LoadCredential=kohortpay-api-key:",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=",
        "SystemCallFilter=@system-service",
        "TimeoutStartSec=",
    ] {
        assert!(unit.contains(needed), "the service lacks {needed:?}");
    }
}

#[test]
fn the_timer_runs_nightly_and_catches_up() {
    let timer = read("deploy/systemd/kohort-batch.timer");
    for needed in [
        "OnCalendar=*-*-* 02:30:00",
        "Persistent=true",
        "RandomizedDelaySec=",
        "WantedBy=timers.target",
    ] {
        assert!(timer.contains(needed), "the timer lacks {needed:?}");
    }
}

#[test]
fn the_cron_lines_and_their_command_are_right() {
    let cron = read("deploy/cron/kohort-batch");
    let jobs: Vec<&str> = cron
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.contains('='))
        .collect();
    assert_eq!(jobs.len(), 2, "the night and its retry: {jobs:?}");
    let mut hours = Vec::new();
    for job in &jobs {
        let fields: Vec<&str> = job.split_whitespace().collect();
        let (minute, hour) = (
            fields[0].parse::<u32>().unwrap(),
            fields[1].parse::<u32>().unwrap(),
        );
        assert!(minute < 60 && hour < 24);
        hours.push(hour);
        assert_eq!(&fields[2..5], ["*", "*", "*"], "every day");
        assert_eq!(fields[5], "kohort-batch", "runs as its own user");
        assert_eq!(fields[6..], ["/usr/local/lib/kohort-batch/nightly"]);
    }
    assert!(hours[1] > hours[0], "the retry comes after the night's run");
    assert!(cron.contains("PATH=") && cron.contains("SHELL=/bin/sh"));

    // The script's exec line, continuation lines joined, its shell words resolved.
    let script = read("deploy/cron/nightly");
    let exec = script[script.find("exec ").unwrap() + 5..].replace("\\\n", " ");
    let words: Vec<String> = exec
        .split_whitespace()
        .filter(|w| !w.starts_with('>') && !w.starts_with("2>"))
        .map(|w| {
            w.replace(
                "\"$key_file\"",
                "${CREDENTIALS_DIRECTORY}/kohortpay-api-key",
            )
            .replace(
                "\"$log_dir/last-run.json\"",
                "/var/log/kohort-batch/last-run.json",
            )
        })
        .collect();
    assert_eq!(words[0], "/usr/local/bin/kohort-batch");
    let dir = tempfile::tempdir().unwrap();
    let parsed = parse_installed(&words, dir.path());
    assert_eq!(db_of(&parsed), dir.path().join("kohort-batch.db"));
    assert!(script.contains("key_file=/etc/kohort-batch/api-key"));
    assert!(script.contains(">\"$log_dir/last-report.txt\" 2>>\"$log_dir/run.log\""));
    assert!(script.contains("umask 0007"));
}

#[test]
fn the_example_config_holds_only_known_keys_with_good_values() {
    let dir = tempfile::tempdir().unwrap();
    let argv: Vec<OsString> = ["kohort-batch", "config", "--config"]
        .iter()
        .map(OsString::from)
        .chain([repo("deploy/config.example.toml").into_os_string()])
        .collect();
    let parsed = cli::parse(argv).unwrap_or_else(|e| panic!("{e:?}"));
    let Command::Config(run) = parsed.command else {
        panic!()
    };
    assert_eq!(run.send.rate, 5.0);
    assert_eq!(run.send.precheck, cli::PrecheckArg::Always);
    drop(dir);
}
