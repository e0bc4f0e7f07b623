//! Standard output and error for commands. A reader that went away (`| head`) is
//! not an error: what it wanted it has, so output stops quietly and the command
//! ends with its own exit code (a `run` still records everything), as ripgrep does.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// Standard output was closed by its reader: write nothing more to it.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);

/// `-q`: a run's report is not printed.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Sets `-q` for this process.
pub(crate) fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Prints a run's report, unless `-q` was given.
pub(crate) fn report(text: &str) -> Result<()> {
    if QUIET.load(Ordering::Relaxed) {
        return Ok(());
    }
    say(text)
}

/// Writes `text` to standard output. A closed pipe is not an error; another write
/// error is (a full disk under a redirection, say).
pub(crate) fn say(text: &str) -> Result<()> {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_GONE.store(true, Ordering::Relaxed);
            Ok(())
        }
        other => other.map_err(|source| Error::File {
            action: "write to",
            path: "standard output".into(),
            source,
        }),
    }
}

/// Writes a line to standard error, whatever becomes of it (a closed stderr must
/// not turn a message into a crash).
pub(crate) fn tell(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Whether an error is only that a reader closed its end of a pipe.
pub(crate) fn is_broken_pipe(e: &Error) -> bool {
    match e {
        Error::File { source, .. } => source.kind() == std::io::ErrorKind::BrokenPipe,
        _ => false,
    }
}
