//! The optional TOML config file. Its keys are the long options of the commands
//! (`concurrency = 8`, `api-base = "…"`, `api_key_file = "…"`: dashes or
//! underscores). A value from the file is used only where neither a flag nor an
//! environment variable gave one, so the precedence is flags > environment > file
//! > defaults. Unknown keys and bad values are errors that name the file and key.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches};

use super::Cli;
use crate::error::Error;

/// Read when no `--config` or `KOHORT_BATCH_CONFIG` is given, if it exists.
pub const DEFAULT_CONFIG: &str = "/etc/kohort-batch/config.toml";

/// Keys whose values are durations, checked here so the error names the file.
const DURATION_KEYS: &[&str] = &[
    "timeout",
    "settle",
    "grace",
    "late-after",
    "max-pause",
    "busy-timeout",
];

/// Why the command line could not be turned into a [`Cli`].
#[derive(Debug)]
pub enum ParseError {
    /// clap's own error (usage, `--help`, `--version`): print it as clap formats it.
    Clap(clap::Error),
    /// A config file problem.
    Config(Error),
}

/// Parses `argv`, folding in the config file.
pub fn parse(argv: Vec<OsString>) -> Result<Cli, ParseError> {
    let cmd = Cli::command();
    let matches = cmd
        .clone()
        .try_get_matches_from(&argv)
        .map_err(ParseError::Clap)?;
    let explicit = matches.get_one::<PathBuf>("config").cloned();
    let path = match explicit {
        Some(p) => p,
        None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
        None => return with_sources(&matches, &[], None),
    };
    let extra = file_args(&cmd, &matches, &path).map_err(ParseError::Config)?;
    if extra.is_empty() {
        return with_sources(&matches, &[], Some(&path));
    }
    let mut all = argv;
    for (flag, value) in &extra {
        all.push(flag.into());
        if !value.is_empty() {
            all.push(value.into());
        }
    }
    let parsed = cmd.try_get_matches_from(all).and_then(|m| {
        with_sources(&m, &extra, Some(&path)).map_err(|e| match e {
            ParseError::Clap(e) => e,
            ParseError::Config(_) => clap::Error::new(clap::error::ErrorKind::InvalidValue),
        })
    });
    parsed.map_err(|e| {
        // Only the file's values are new here: a bad one is the file's fault.
        let culprit = match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(arg)) => extra
                .iter()
                .find(|(flag, _)| arg.split(' ').next() == Some(flag.as_str())),
            _ => None,
        };
        match culprit {
            Some((flag, _)) => {
                ParseError::Config(bad(&path, flag.trim_start_matches("--"), clap_message(&e)))
            }
            None => ParseError::Clap(e),
        }
    })
}

/// The [`Cli`] of `matches`, with where each option of its subcommand got its value
/// (`extra` are the config file's, at `file`).
fn with_sources(
    matches: &clap::ArgMatches,
    extra: &[(String, String)],
    file: Option<&Path>,
) -> Result<Cli, ParseError> {
    let mut cli = Cli::from_arg_matches(matches).map_err(ParseError::Clap)?;
    let mut sources = std::collections::BTreeMap::new();
    let mut note = |m: &clap::ArgMatches| {
        // Argument groups (a flattened struct's name) are not options.
        for id in m
            .ids()
            .filter(|id| !id.as_str().starts_with(char::is_uppercase))
        {
            let name = id.as_str().replace('_', "-");
            let from = match m.value_source(id.as_str()) {
                Some(ValueSource::DefaultValue) => "default".to_owned(),
                Some(ValueSource::EnvVariable) => "environment".to_owned(),
                Some(ValueSource::CommandLine)
                    if extra
                        .iter()
                        .any(|(flag, _)| flag.trim_start_matches("--") == name) =>
                {
                    format!(
                        "config file {}",
                        file.map(|f| f.display().to_string()).unwrap_or_default()
                    )
                }
                Some(ValueSource::CommandLine) => "command line".to_owned(),
                _ => continue,
            };
            sources.insert(name, from);
        }
    };
    note(matches);
    if let Some((_, sub)) = matches.subcommand() {
        note(sub);
    }
    cli.sources = sources;
    Ok(cli)
}

fn bad(path: &Path, key: &str, why: impl std::fmt::Display) -> Error {
    Error::Usage(format!("config file {}: key {key}: {why}", path.display()))
}

/// The flags the file contributes: `(--key, value)` per key not already set (a switch
/// has an empty value).
fn file_args(
    cmd: &clap::Command,
    matches: &clap::ArgMatches,
    path: &Path,
) -> Result<Vec<(String, String)>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::File {
        action: "read the config file",
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        Error::Usage(format!("config file {}: {}", path.display(), e.message()))
    })?;
    let Some((sub_name, sub_matches)) = matches.subcommand() else {
        return Ok(Vec::new());
    };
    let sub_cmd = cmd.find_subcommand(sub_name).unwrap_or(cmd);
    let mut out = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        if long == "api-key" {
            return Err(bad(
                path,
                key,
                "the key itself never goes in a config file (it would be one more copy); use api-key-file",
            ));
        }
        let arg = sub_cmd
            .get_arguments()
            .filter(|a| a.get_long().is_some())
            .chain(cmd.get_arguments())
            .find(|a| a.get_long() == Some(long.as_str()) && a.get_id() != "config");
        let Some(arg) = arg else {
            let known_elsewhere = cmd
                .get_subcommands()
                .flat_map(|c| c.get_arguments())
                .any(|a| a.get_long() == Some(long.as_str()));
            if known_elsewhere {
                continue; // an option of another command
            }
            return Err(bad(
                path,
                key,
                "unknown key; the keys are the long options of the commands, such as concurrency, rate, api-base, api-key-file, db",
            ));
        };
        if matches!(
            sub_matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let values = toml_values(path, key, value)?;
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match values.as_slice() {
                [v] if v == "true" => out.push((format!("--{long}"), String::new())),
                [v] if v == "false" => {}
                _ => return Err(bad(path, key, "must be true or false")),
            }
            continue;
        }
        for v in values {
            if DURATION_KEYS.contains(&long.as_str()) {
                crate::config::parse_duration(&long, &v).map_err(|e| bad(path, key, e))?;
            }
            out.push((format!("--{long}"), v));
        }
    }
    Ok(out)
}

/// A TOML value as the command-line values it stands for (an array gives several).
fn toml_values(path: &Path, key: &str, value: &toml::Value) -> Result<Vec<String>, Error> {
    let values = match value {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Integer(i) => vec![i.to_string()],
        toml::Value::Float(f) => vec![f.to_string()],
        toml::Value::Boolean(b) => vec![b.to_string()],
        toml::Value::Array(items) => items
            .iter()
            .map(|i| match i {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(n) => Ok(n.to_string()),
                other => Err(bad(
                    path,
                    key,
                    format!("{other} is not a string or a number"),
                )),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(bad(
                path,
                key,
                format!("{other} is not a value this option takes"),
            ));
        }
    };
    Ok(values)
}

/// clap's message on one line, without its "error:" prefix and help hint.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.trim_start_matches("error: ").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_file(text: &str, argv: &[&str]) -> Result<Cli, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let mut all: Vec<OsString> = vec!["kohort-batch".into()];
        all.extend(argv.iter().map(OsString::from));
        all.push("--config".into());
        all.push(path.clone().into());
        parse(all).map_err(|e| match e {
            ParseError::Clap(e) => e.to_string(),
            ParseError::Config(e) => e.to_string().replace(&path.display().to_string(), "FILE"),
        })
    }

    fn send(cli: Cli) -> crate::cli::SendArgs {
        match cli.command {
            crate::cli::Command::Run(r) => r.send,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn file_fills_what_flags_leave_at_default() {
        let cfg = "concurrency = 9\nrate = 2.5\nprecheck = \"ambiguous\"\nlive = true\ndb = \"/tmp/x.db\"\ntimeout = \"10s\"\n";
        let cli = with_file(cfg, &["run", "--rate", "7"]).unwrap();
        assert!(
            matches!(&cli.command, crate::cli::Command::Run(r) if r.db.db.file() == Some(Path::new("/tmp/x.db")))
        );
        assert_eq!(cli.sources["rate"], "command line");
        assert!(cli.sources["concurrency"].starts_with("config file "));
        assert_eq!(cli.sources["grace"], "default");
        let s = send(cli);
        assert_eq!((s.concurrency, s.rate, s.live), (9, 7.0, true));
        assert_eq!(s.precheck, crate::cli::PrecheckArg::Ambiguous);
        assert_eq!(s.timeout, "10s");
    }

    #[test]
    fn keys_for_other_commands_are_ignored() {
        let cli = with_file("listen = \"127.0.0.1:9\"\nconcurrency = 3\n", &["run"]).unwrap();
        assert_eq!(send(cli).concurrency, 3);
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let table = [
            (
                "concurency = 3",
                "config file FILE: key concurency: unknown key",
            ),
            (
                "concurrency = \"many\"",
                "config file FILE: key concurrency: invalid value 'many'",
            ),
            (
                "timeout = \"soon\"",
                "config file FILE: key timeout: --timeout \"soon\" is not a duration",
            ),
            (
                "live = \"yes\"",
                "config file FILE: key live: must be true or false",
            ),
            (
                "api_key = \"sk_test_x\"",
                "config file FILE: key api_key: the key itself never goes in a config file",
            ),
            ("rate = ", "config file FILE: "),
        ];
        for (text, want) in table {
            let err = with_file(text, &["run"]).unwrap_err();
            assert!(err.starts_with(want), "{text:?}: {err}");
        }
    }
}
