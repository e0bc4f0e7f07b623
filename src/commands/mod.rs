//! One function per subcommand: they wire config, store, source, engine, API and
//! report together. Errors end here: each is printed once, with its exit code.
//!
//! `send.rs`: run, retry-failed, enqueue. `inspect.rs`: validate, report, export.
//! `demo.rs`: sandbox, demo.

mod demo;
mod inspect;
pub mod out;
mod progress;
mod send;

use std::path::Path;
use std::sync::Arc;

use crate::cli::{Cli, Command, LogFormat};
use crate::config;
use crate::engine::Control;
use crate::error::{Error, Exit, Result};
use crate::store::RetryFilter;

pub use send::{enqueue, import_csv, retry_failed, run};

/// Logs go to stderr, as text or JSON lines; `RUST_LOG` overrides the level.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::field::MakeExt;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
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

/// Runs a parsed command line to its exit code.
pub async fn dispatch(cli: Cli) -> Exit {
    let env_key = std::env::var("KOHORTPAY_API_KEY").ok();
    let result = match cli.command {
        Command::Run(args) => match config::resolve_send(&args.send, cli.db, env_key) {
            Ok(cfg) => run(&cfg, &args.csv, signals()).await,
            Err(e) => Err(e),
        },
        Command::RetryFailed(args) => match config::resolve_send(&args.send, cli.db, env_key) {
            Ok(cfg) => {
                let filter = RetryFilter {
                    statuses: args.statuses,
                    transport_only: args.transport,
                    classes: args.classes,
                    include_unknown: false,
                };
                retry_failed(&cfg, filter, signals()).await
            }
            Err(e) => Err(e),
        },
        Command::Enqueue(args) => enqueue(&cli.db, &args.csv).await,
        Command::Validate(args) => inspect::validate(&args.csv, args.json),
        Command::Report(args) => inspect::report(&cli.db, args.run, args.last, args.format).await,
        Command::Export(args) => {
            inspect::export(&cli.db, args.what, args.format, args.output.as_deref()).await
        }
        Command::Sandbox(args) => match config::resolve_sandbox(&args) {
            Ok(cfg) => demo::sandbox(cfg, args.listen).await,
            Err(e) => Err(e),
        },
        Command::Demo => demo::demo().await,
        Command::Config(args) => show_config(
            &cli.db,
            cli.config.as_deref(),
            &args,
            env_key.as_deref(),
            &cli.sources,
        ),
    };
    match result {
        Ok(exit) => exit,
        // The reader of the output went away (`| head`): it has what it wanted.
        Err(e) if out::is_broken_pipe(&e) => Exit::Success,
        Err(e) => {
            out::tell(&format!("error: {e}"));
            e.exit()
        }
    }
}

/// `config`: the settings a `run` would use, checked exactly as `run` checks them
/// (a bad value is the same error, exit 2), as JSON: each resolved value, where it
/// came from, and the key only as where it comes from.
fn show_config(
    db: &Path,
    file: Option<&Path>,
    args: &crate::cli::RunArgs,
    env_key: Option<&str>,
    sources: &std::collections::BTreeMap<String, String>,
) -> Result<Exit> {
    let settings = config::resolve_settings(&args.send)?;
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
        "computed: 2 × timeout".to_owned()
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

/// A fresh stop switch wired to SIGINT/SIGTERM.
fn signals() -> Arc<Control> {
    let control = Arc::new(Control::default());
    listen_for_signals(control.clone());
    control
}

/// First SIGINT/SIGTERM: stop starting requests; second: abandon those in flight.
fn listen_for_signals(control: Arc<Control>) {
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
                _ = int.recv() => control.signal(),
                _ = term.recv() => control.signal(),
            }
        }
    });
}

/// Writes a file so readers never see half of it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let io = |source| Error::File {
        action: "write",
        path: path.to_owned(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
