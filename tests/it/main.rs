//! Integration tests: the real `run` and the real binary against the sandbox on
//! loopback. One test binary; helpers in `util.rs`.

#![expect(
    clippy::unwrap_used,
    reason = "in tests a panic is a failed test with its message"
)]
#![expect(
    clippy::print_stdout,
    reason = "a test prints what it skipped and the crash campaign's figures"
)]

mod api_client;
mod beyond_one_process;
mod core_run;
mod crash;
mod deploy;
mod economy;
mod edges;
mod exactly_once;
mod install;
mod nightly;
mod operate;
mod pg;
mod postgres;
mod robustness;
mod scene;
mod spreadsheets;
mod util;
mod workflows;
