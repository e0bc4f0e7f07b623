//! One function per subcommand: they wire config, store, source, engine, API and
//! report together. Errors end here: each is printed once, with its exit code.
//!
//! `send.rs`: run, retry-failed, enqueue; `dry_run.rs`: their `--dry-run`.
//! `inspect.rs`: validate, report; `export.rs`: export.
//! `demo.rs`: sandbox, demo.

mod demo;
mod dry_run;
mod export;
mod inspect;
pub(crate) mod out;
mod progress;
mod send;

use std::path::Path;
use std::sync::Arc;

use crate::cli::{Cli, Command, LogFormat, RetryArgs, RunArgs};
use crate::config;
use crate::engine::Control;
use crate::error::{Error, Exit, Result};
use crate::store::RetryFilter;

pub use send::{enqueue, enqueue_with, import_csv, retry_failed, run};

/// Logs go to stderr, as text or JSON lines: info, or debug with `-v`, trace with
/// `-vv`; `RUST_LOG` overrides the level. Colours only on a terminal, and never when
/// `NO_COLOR` is set.
pub(crate) fn init_logging(format: LogFormat, verbose: u8) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::field::MakeExt;
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours())
        .with_writer(|| progress::LogWriter)
        // Its report of a failed write is an `eprintln!`, which would panic on the
        // very stderr that failed (closed by `| head`): a log line that cannot be
        // written is dropped.
        .log_internal_errors(false);
    let _ = match format {
        // Field values (and messages) are escaped: text from a CSV or from the API
        // cannot move the cursor, recolour the terminal or forge a log line. JSON
        // lines escape by themselves.
        LogFormat::Text => builder
            .fmt_fields(
                tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
                    let text = format!("{value:?}");
                    let text = crate::text::escape(&text);
                    match field.name() {
                        "message" => write!(w, "{text}"),
                        name => write!(w, "{name}={text}"),
                    }
                })
                .delimited(" "),
            )
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Whether stderr gets colours: a terminal, and no `NO_COLOR` (https://no-color.org).
pub(crate) fn colours() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// Runs a parsed command line to its exit code.
pub(crate) async fn dispatch(cli: Cli) -> Exit {
    out::set_quiet(cli.quiet);
    let env_key = std::env::var("KOHORTPAY_API_KEY").ok();
    let result = match cli.command {
        Command::Run(args) => run_command(args, env_key).await,
        Command::RetryFailed(args) => retry_command(args, env_key).await,
        Command::Enqueue(args) => match config::resolve_csv(&args.csv_format) {
            Ok(opts) => enqueue_with(&args.db.db, &args.csv, &opts).await,
            Err(e) => Err(e),
        },
        Command::Validate(args) => match config::resolve_csv(&args.csv_format) {
            Ok(opts) => inspect::validate(&args.csv, args.json, &opts),
            Err(e) => Err(e),
        },
        Command::Report(args) => {
            inspect::report(&args.db.db, args.run, args.last, args.format).await
        }
        Command::Export(args) => {
            export::export(
                &args.db.db,
                args.what,
                args.format,
                args.output.as_deref(),
                args.missing_share_id,
            )
            .await
        }
        Command::Sandbox(args) => match config::resolve_sandbox(&args) {
            Ok(cfg) => demo::sandbox(cfg, args.listen).await,
            Err(e) => Err(e),
        },
        Command::Demo(args) => demo::demo(args.db.as_deref()).await,
        Command::Config(args) => show_config(
            &args.db.db,
            cli.config.as_deref(),
            &args,
            env_key.as_deref(),
            &cli.sources,
        ),
        Command::Init(args) => init(&args.db.db).await,
        Command::Completions(args) => completions(args.shell),
        Command::Man => man(),
    };
    match result {
        Ok(exit) => exit,
        // The reader of the output went away (`| head`): it has what it wanted.
        Err(e) if out::is_broken_pipe(&e) => Exit::Success,
        Err(e) => {
            out::tell(&format!("error: {}", crate::error::render(&e)));
            e.exit()
        }
    }
}

/// `run`: the settings resolved from the flags, then [`run`].
async fn run_command(args: RunArgs, env_key: Option<String>) -> Result<Exit> {
    let mut cfg = config::resolve_send(&args.send, args.db.db.clone(), env_key)?;
    cfg.csv = config::resolve_csv(&args.csv_format)?;
    run(&cfg, &args.csv, signals()).await
}

/// `retry-failed`: the settings and the filter resolved from the flags, then
/// [`retry_failed`].
async fn retry_command(args: RetryArgs, env_key: Option<String>) -> Result<Exit> {
    let cfg = config::resolve_send(&args.send, args.db.db.clone(), env_key)?;
    let filter = RetryFilter {
        statuses: args.statuses,
        transport_only: args.transport,
        classes: send::failure_classes(&args.classes)?,
        include_unknown: false,
    };
    retry_failed(&cfg, filter, signals()).await
}

/// `completions`: the completion script for `shell`.
fn completions(shell: clap_complete::Shell) -> Result<Exit> {
    let mut text = Vec::new();
    clap_complete::generate(shell, &mut crate::cli::command(), "kohort-batch", &mut text);
    out::say(&String::from_utf8_lossy(&text)).map(|()| Exit::Success)
}

/// `man`: the manual page, as roff.
fn man() -> Result<Exit> {
    let mut text = Vec::new();
    match clap_mangen::Man::new(crate::cli::command()).render(&mut text) {
        Ok(()) => out::say(&String::from_utf8_lossy(&text)).map(|()| Exit::Success),
        Err(e) => Err(Error::internal(format!(
            "cannot render the manual page: {e}"
        ))),
    }
}

/// `config`: the settings a `run` would use, checked exactly as `run` checks them
/// (a bad value is the same error, exit 2), as JSON: each resolved value, where it
/// came from, and the key only as where it comes from.
fn show_config(
    db: &crate::store::Db,
    file: Option<&Path>,
    args: &crate::cli::RunArgs,
    env_key: Option<&str>,
    sources: &std::collections::BTreeMap<String, String>,
) -> Result<Exit> {
    let settings = config::resolve_settings(&args.send)?;
    // The CSV files too, exactly as `run` checks them before opening the database.
    send::check_inputs(&args.csv, &config::resolve_csv(&args.csv_format)?)?;
    let key = match (&args.send.api_key_file, env_key) {
        (Some(p), _) => {
            config::load_key(Some(p), None, args.send.live)?;
            format!("from file {}", p.display())
        }
        (None, Some(k)) => {
            config::load_key(None, Some(k.to_owned()), args.send.live)?;
            "from KOHORTPAY_API_KEY".to_owned()
        }
        (None, None) => "missing: set KOHORTPAY_API_KEY or pass --api-key-file".to_owned(),
    };
    let file = file.map(Path::to_path_buf).or_else(|| {
        Some(Path::new(crate::cli::DEFAULT_CONFIG))
            .filter(|p| p.exists())
            .map(Path::to_path_buf)
    });
    let e = &settings.engine;
    let settle_from = if args.send.settle.is_some() {
        sources.get("settle").cloned().unwrap_or_default()
    } else {
        "computed: the larger of 2 × timeout and 45s".to_owned()
    };
    let mut sources = sources.clone();
    sources.insert("settle".into(), settle_from);
    let json = serde_json::json!({
        "db": db,
        "config_file": file,
        "api_key": key,
        "settings": {
            "api_base": settings.api_base,
            "timeout_secs": settings.timeout.as_secs_f64(),
            "busy_timeout_secs": settings.busy_timeout.as_secs_f64(),
            "csv": args.csv,
            "report_json": args.send.report_json,
            "metrics_file": args.send.metrics_file,
            "ca_cert": args.send.ca_cert,
            "live": args.send.live,
            "engine": e,
        },
        "sources": sources,
    });
    out::say(&format!(
        "{}\n",
        serde_json::to_string_pretty(&json).unwrap_or_default()
    ))?;
    Ok(Exit::Success)
}

/// `init`: creates the database (or brings its schema up to date) with its tables,
/// so producers can write the inbox before the first run; prints how they do.
async fn init(db: &crate::store::Db) -> Result<Exit> {
    use crate::store::{Access, Db, Store};
    let existed = db.file().is_none_or(Path::exists);
    let store = Store::connect_plain(db, Access::Write).await?;
    store.close().await;
    let what = if existed { "is ready" } else { "was created" };
    let insert = "INSERT INTO inbox (customer_id, order_id, metadata) \
                  VALUES ('cus_123', 'ord_2026_0042', '{\\\"campaign\\\":\\\"spring\\\"}')";
    let how = match db {
        Db::File(path) => {
            // Quoted for a shell, so the printed command can be pasted as it is.
            let quoted = format!("'{}'", path.display().to_string().replace('\'', "'\\''"));
            format!(
                "  sqlite3 {quoted} \"PRAGMA busy_timeout = 60000; {insert}\"\n\n\
                 The next `kohort-batch run --db {quoted}` sends them.\n"
            )
        }
        Db::Postgres(_) => format!(
            "  psql \"$PRODUCER_URL\" -c \"{insert}\"\n\n\
             (as a role with INSERT on inbox only: deploy/README.md, PostgreSQL). The next \
             `kohort-batch run` with this --db sends them.\n"
        ),
    };
    out::say(&format!(
        "{} {what}. Producers insert into its inbox with plain SQL, for example:\n\n{how}",
        crate::text::escape(&db.to_string()),
    ))?;
    Ok(Exit::Success)
}

/// A fresh stop switch wired to SIGINT/SIGTERM.
fn signals() -> Arc<Control> {
    let control = Arc::new(Control::default());
    listen_for_signals(control.clone());
    control
}

/// First SIGINT/SIGTERM: stop starting requests; second: abandon those in flight.
fn listen_for_signals(control: Arc<Control>) {
    on_signals(move || control.signal());
}

/// Calls `then` on every SIGINT or SIGTERM (for a run: stop, then abandon; for the
/// sandbox: shut down).
pub(super) fn on_signals(then: impl Fn() + Send + 'static) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            tracing::warn!("cannot listen for signals; ctrl-c will end the process at once");
            return;
        };
        loop {
            tokio::select! {
                _ = int.recv() => then(),
                _ = term.recv() => then(),
            }
        }
    });
}

/// [`write_atomic`], then readable by everyone (0644, whatever the umask): the
/// metrics file is read by node_exporter, which runs as another user.
pub(crate) fn write_readable(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with_mode(path, bytes, Some(0o644))
}

/// Writes a file so readers never see half of it.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with_mode(path, bytes, None)
}

/// Writes `path` through a temporary file renamed into place, with `mode` set
/// before the rename when given.
fn write_with_mode(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| Error::File {
        action: "write",
        path: path.to_owned(),
        source,
    };
    // A symlink is written through (to what it points at); a FIFO or a device is
    // written to as it is, never replaced by a file.
    let target = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            let to = std::fs::read_link(path).map_err(io)?;
            match path.parent() {
                Some(dir) if to.is_relative() => dir.join(to),
                _ => to,
            }
        }
        _ => path.to_owned(),
    };
    if std::fs::metadata(&target).is_ok_and(|m| !m.is_file()) {
        return std::fs::write(&target, bytes).map_err(io);
    }
    let path = target.as_path();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io)?;
    if let Some(mode) = mode {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}
