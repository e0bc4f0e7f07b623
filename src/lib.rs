//! kohort-batch creates KohortPay referral groups in bulk, safely: every row ends
//! with exactly one group or a recorded reason why not.
//!
//! # Layout
//!
//! | module | owns | may touch |
//! |---|---|---|
//! | [`cli`] | the clap structs (nothing else imports clap) | — |
//! | [`config`] | flags → resolved, typed settings; the key; URL rules | `cli`, `engine` types |
//! | [`job`] | the request body, its key, the validation rules (pure) | — |
//! | [`source`] | streaming CSV reader: columns by header, line numbers, encodings, quotes | `job` |
//! | [`store`] | the record behind one seam ([`store::Backend`]): SQLite (schema, migrations, the single writer thread) or PostgreSQL (`store/pg/`); **all SQL** (rooms listed in its docs) | `job`, `source` |
//! | [`api`] | the HTTP client (**only reqwest user**), wire parsing, classification | `job` |
//! | [`engine`] | pacing, retries, the check desk, and the exactly-once protocol as a pure state machine (`engine/protocol.rs`) driven per job by `engine/worker.rs` | `store`, `api` handles |
//! | [`report`] | the run summary, text and JSON, built from the store | `store` facts |
//! | [`metrics`] | the Prometheus textfile of a run | `report` |
//! | [`sandbox`] | the simulated API (axum) with fault knobs and stats | `text` |
//! | [`commands`] | one function per subcommand, wiring the above | everything |
//! | [`error`] | the top-level error and the exit codes | — |
//! | [`text`] | text for people: durations, plurals, escaping of input text | — |
//!
//! The design notes behind them (job states, the protocol, exit codes, the queue) are
//! in `docs/design.md`; what the KohortPay API does and does not promise is in
//! `docs/api-notes.md`.
//!
//! Data flows CSV → `source` → `store` (jobs) → `engine` → `api` → `store`
//! (attempts, groups, states) → `report`. The engine only ever drains `jobs`, so a
//! crash, a rerun or a retry is the same operation: send what is not finished.

pub mod api;
pub mod cli;
pub mod commands;
pub mod config;
pub mod engine;
pub mod error;
pub mod job;
pub mod metrics;
pub mod report;
pub mod sandbox;
pub mod source;
pub mod store;
pub mod text;

use std::process::ExitCode;

pub use error::{Error, Exit};

/// The whole program: parse, set up logging and the runtime, run, map to an exit code.
pub fn main_entry() -> ExitCode {
    let cli = match cli::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(cli::ParseError::Clap(e)) => {
            // `print` reports a closed pipe as an error, never a panic.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                Exit::Usage.code()
            } else {
                0
            });
        }
        Err(cli::ParseError::Config(e)) => {
            commands::out::tell(&format!("error: {}", error::render(&e)));
            return ExitCode::from(e.exit().code());
        }
    };
    commands::init_logging(cli.log_format, cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            commands::out::tell(&format!("error: cannot start the async runtime: {e}"));
            return ExitCode::from(Exit::Internal.code());
        }
    };
    let exit = runtime.block_on(commands::dispatch(cli));
    // Do not wait for stray tasks (e.g. abandoned requests) at exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    ExitCode::from(exit.code())
}
