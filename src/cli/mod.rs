//! The command line, as clap structs. Nothing else in the crate imports clap:
//! `config.rs` turns these raw values into resolved settings in one fallible step.
//! `file.rs` folds an optional TOML config file in, below flags and environment.

mod file;

pub use file::{DEFAULT_CONFIG, ParseError, parse};

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The version, with the commit it was built from when the build had one.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), env!("KB_BUILD_COMMIT"));

/// Creates KohortPay referral groups in bulk, safely: one group per order, exactly once.
#[derive(Debug, Parser)]
#[command(name = "kohort-batch", version = VERSION, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Print no report on stdout (the exit code, --report-json and the logs still tell).
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// More log lines on stderr: -v for debug, -vv for trace (RUST_LOG overrides).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// A TOML file of defaults for any long option (flags and environment win over it).
    /// Without it, /etc/kohort-batch/config.toml is read if it exists.
    #[arg(long, global = true, env = "KOHORT_BATCH_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Where each option got its value (`default`, `environment`, `command line`,
    /// `config file PATH`), by long name; filled by [`parse`].
    #[arg(skip)]
    pub sources: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Import the CSV rows (if any) and the inbox, then send every pending job.
    Run(RunArgs),
    /// Import CSV rows as pending jobs without sending anything.
    Enqueue(EnqueueArgs),
    /// Put failed jobs back to pending (all, or those matching the filters), then send.
    RetryFailed(RetryArgs),
    /// Parse and validate a CSV exactly as `run` would; no network, no database.
    Validate(ValidateArgs),
    /// Show the report of a run, or list recent runs.
    Report(ReportArgs),
    /// Export groups (share ids per order) or failures (re-importable after a fix).
    Export(ExportArgs),
    /// Run the local simulated KohortPay API.
    Sandbox(SandboxArgs),
    /// The sandbox plus samples/ end to end: no key, no network.
    Demo(DemoArgs),
    /// Print the settings `run` would use (flags > environment > config file >
    /// defaults), as JSON. The key itself is never shown.
    Config(RunArgs),
    /// Create the database (or bring it up to date) so producers can write the
    /// inbox before the first run; prints the INSERT a producer uses.
    Init(InitArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Print the manual page (roff), for `man -l -` or /usr/local/share/man/man1.
    Man,
}

/// How input CSV files are read.
#[derive(Debug, Args, Clone, Default, serde::Serialize)]
pub struct CsvArgs {
    /// The separator: ',' ';' or '\t' (also: comma, semicolon, tab). Default: the
    /// one that splits the header line into a customerId column.
    #[arg(long, value_name = "SEP")]
    pub delimiter: Option<String>,

    /// The character encoding: utf-8 (default), windows-1252 or latin1 (read as
    /// windows-1252), what Excel in western Europe saves as "CSV".
    #[arg(long, value_name = "NAME", default_value = "utf-8")]
    pub encoding: String,
}

/// `--db` for clap: a value it refuses is never repeated in the message (a URL may
/// hold a password; clap's own message quotes the value).
#[derive(Clone, Debug)]
pub(crate) struct DbParser;

impl clap::builder::TypedValueParser for DbParser {
    type Value = crate::store::Db;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<crate::store::Db, clap::Error> {
        use clap::error::ErrorKind;
        let text = value
            .to_str()
            .ok_or_else(|| clap::Error::raw(ErrorKind::InvalidUtf8, "--db is not valid UTF-8\n"))?;
        crate::store::Db::parse(text)
            .map_err(|e| clap::Error::raw(ErrorKind::ValueValidation, format!("--db: {e}\n")))
    }
}

/// The database option of the commands that use one.
#[derive(Debug, Args, Clone, serde::Serialize)]
pub struct DbArg {
    /// Where jobs, attempts, groups and runs are kept: a SQLite file, or a
    /// postgres://USER@HOST/DATABASE URL (put a URL with a password in
    /// KOHORT_BATCH_DB or a config file, not on the command line).
    #[arg(
        long,
        env = "KOHORT_BATCH_DB",
        hide_env_values = true,
        default_value = "kohort-batch.db",
        value_name = "PATH|URL",
        value_parser = DbParser
    )]
    pub db: crate::store::Db,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub db: DbArg,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo's database here (default: a temporary directory, removed after).
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// The clap command, for completions and the manual page.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[derive(Debug, Args, serde::Serialize)]
pub struct RunArgs {
    #[command(flatten)]
    pub db: DbArg,

    /// CSV files to import before sending ('-' for stdin). May be repeated.
    #[arg(long = "csv", value_name = "FILE")]
    pub csv: Vec<PathBuf>,

    #[command(flatten)]
    pub csv_format: CsvArgs,

    #[command(flatten)]
    pub send: SendArgs,
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub db: DbArg,

    /// CSV files to import ('-' for stdin). May be repeated.
    #[arg(long = "csv", value_name = "FILE", required = true)]
    pub csv: Vec<PathBuf>,

    #[command(flatten)]
    pub csv_format: CsvArgs,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    #[command(flatten)]
    pub db: DbArg,

    /// Only jobs whose last HTTP status is this (repeatable), e.g. --status 503.
    #[arg(long = "status", value_name = "CODE")]
    pub statuses: Vec<u16>,

    /// Only jobs whose last attempt got no HTTP response (connection errors, timeouts).
    #[arg(long)]
    pub transport: bool,

    /// Only jobs of this failure class (repeatable): retries_exhausted, order_not_found,
    /// http_400, http_404, …
    #[arg(long = "class", value_name = "CLASS")]
    pub classes: Vec<String>,

    #[command(flatten)]
    pub send: SendArgs,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The CSV file to check ('-' for stdin).
    #[arg(long = "csv", value_name = "FILE")]
    pub csv: PathBuf,

    /// Print each request body that would be sent, as NDJSON on stdout.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub csv_format: CsvArgs,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub db: DbArg,

    /// The run to show.
    #[arg(long, conflicts_with = "last")]
    pub run: Option<i64>,

    /// Show the newest run.
    #[arg(long)]
    pub last: bool,

    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub db: DbArg,

    /// What to export.
    #[arg(value_enum)]
    pub what: ExportWhat,

    #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
    pub format: ExportFormat,

    /// Write here instead of stdout.
    #[arg(long, short, value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// With `groups`: only the groups that have no share id yet.
    #[arg(long)]
    pub missing_share_id: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportWhat {
    /// One line per order with its group and share id.
    Groups,
    /// Failed, invalid and unknown rows in the input CSV format, plus error and line.
    Failures,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Csv,
    Json,
}

/// Options of every command that talks to the API.
#[derive(Debug, Args, Clone, serde::Serialize)]
pub struct SendArgs {
    /// API base URL (plain http only for loopback).
    #[arg(
        long,
        env = "KOHORTPAY_API_BASE",
        default_value = "https://api.kohortpay.com"
    )]
    pub api_base: String,

    /// Read the API key from this file (else from the KOHORTPAY_API_KEY environment variable).
    #[arg(long, value_name = "PATH")]
    pub api_key_file: Option<PathBuf>,

    /// Allow a live key (sk_live_…): live groups email real customers.
    #[arg(long)]
    pub live: bool,

    /// Most requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,

    /// Most requests started per second (fractions allowed; 0 for no limit).
    #[arg(long, default_value_t = 5.0)]
    pub rate: f64,

    /// Attempts per job and run, the first included.
    #[arg(long, default_value_t = 8)]
    pub max_attempts: u32,

    /// Per-request timeout (e.g. 30s, 500ms, 2m).
    #[arg(long, default_value = "30s")]
    pub timeout: String,

    /// Wait after an ambiguous outcome before checking whether the group exists
    /// (default: twice --timeout).
    #[arg(long)]
    pub settle: Option<String>,

    /// When to check for an existing group before creating one.
    #[arg(long, value_enum, default_value_t = PrecheckArg::Always)]
    pub precheck: PrecheckArg,

    /// Consecutive 5xx or transport failures after which the run stops (exit 3).
    #[arg(long, default_value_t = 30)]
    pub breaker: u32,

    /// Also re-send rows whose earlier outcome is unknown and cannot be checked (a
    /// person's decision: they may duplicate).
    #[arg(long)]
    pub include_unknown: bool,

    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub report_json: Option<PathBuf>,

    /// Write run metrics in Prometheus text format to this file (atomically), for
    /// node_exporter's textfile collector.
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,

    /// A private root certificate (PEM) to trust for --api-base.
    #[arg(long, value_name = "PATH")]
    pub ca_cert: Option<PathBuf>,

    /// How long requests in flight may finish after SIGINT/SIGTERM.
    #[arg(long, default_value = "30s")]
    pub grace: String,

    /// Say what the command would do (jobs to send and check, requests, time) on a
    /// copy of the database: nothing is changed, nothing is sent, no lock is taken.
    #[arg(long)]
    pub dry_run: bool,

    /// The longest `Retry-After` the run waits out; a longer one stops the run (exit
    /// 3) with its rows pending, to be sent by a later run.
    #[arg(long, default_value = "5m")]
    pub max_pause: String,

    /// How long a write waits for another process's transaction on the database
    /// (a producer's insert) before the run stops with exit 74.
    #[arg(long, default_value = "60s")]
    pub busy_timeout: String,

    /// Seed for retry jitter (reproducible tests).
    #[arg(long, hide = true)]
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecheckArg {
    Always,
    Ambiguous,
}

/// Knobs of the simulated API.
#[derive(Debug, Args, Clone)]
pub struct SandboxArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Latency added to each request: fixed (20ms) or a range (10ms..80ms).
    #[arg(long, default_value = "0ms")]
    pub latency: String,

    /// Probability of a 500 (not processed).
    #[arg(long, default_value_t = 0.0)]
    pub error_500: f64,

    /// Probability of a 502 with an HTML body (not processed).
    #[arg(long, default_value_t = 0.0)]
    pub error_502: f64,

    /// Probability of a 503 with Retry-After (not processed).
    #[arg(long, default_value_t = 0.0)]
    pub error_503: f64,

    /// Probability of a 429 with Retry-After.
    #[arg(long, default_value_t = 0.0)]
    pub error_429: f64,

    /// Retry-After seconds sent with 429 and 503.
    #[arg(long, default_value_t = 1)]
    pub retry_after: u64,

    /// Requests per second above which the sandbox answers 429.
    #[arg(long)]
    pub rate_limit: Option<f64>,

    /// Probability the connection drops before processing.
    #[arg(long, default_value_t = 0.0)]
    pub reset: f64,

    /// Probability a create is stored but its response is lost.
    #[arg(long, default_value_t = 0.0)]
    pub lost_response: f64,

    /// Probability a create is stored but answered with a truncated body.
    #[arg(long, default_value_t = 0.0)]
    pub truncated: f64,

    /// Probability a create is stored but answered with a 50 MB body.
    #[arg(long, default_value_t = 0.0)]
    pub oversized: f64,

    /// Probability of a late create: 503 after --late-after, group created later.
    #[arg(long, default_value_t = 0.0)]
    pub late_create: f64,

    /// When a late create answers 503 (the group appears twice as late).
    #[arg(long, default_value = "1s")]
    pub late_after: String,

    /// How order lists answer: honest, unfiltered (ignore the search), refused (400),
    /// first-only (only the first order asked for), summaries (no payment_group_id):
    /// servers not to be trusted.
    #[arg(long, default_value = "honest", value_name = "HOW")]
    pub list_answer: String,

    /// Seed for every random choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}
