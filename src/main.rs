//! The `kohort-batch` binary: everything lives in the library (see `src/lib.rs`).

fn main() -> std::process::ExitCode {
    kohort_batch::main_entry()
}
