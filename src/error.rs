//! The one error type a command can end with, and the exit codes
//! (`docs/design.md#exit-codes`).
//!
//! A failed *row* is never an `Error`: it is data recorded in the store. An `Error`
//! is something that stops a whole command (bad flags, an unreadable file, a
//! database held by another run), and each variant knows its exit code.

use std::path::PathBuf;

use crate::store::DbCause;

/// Process exit codes, exactly as `docs/design.md#exit-codes` lists them. In JSON
/// (reports, metrics) an exit is its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "u8", try_from = "u8")]
#[repr(u8)]
pub enum Exit {
    /// Every job ended succeeded.
    Success = 0,
    /// The run finished but some rows are invalid, failed or unknown.
    RowsFailed = 1,
    /// Usage or configuration error.
    Usage = 2,
    /// The run was stopped by the API (auth rejected, API unavailable).
    StoppedByApi = 3,
    /// Interrupted by a signal.
    Interrupted = 4,
    /// Another run holds this database.
    Locked = 5,
    /// Internal error (a bug).
    Internal = 70,
    /// The database or the file system refused (locked past the busy timeout, full,
    /// read-only, damaged): sysexits' EX_IOERR.
    IoError = 74,
}

impl Exit {
    /// Every exit, in code order.
    pub const ALL: [Exit; 8] = [
        Exit::Success,
        Exit::RowsFailed,
        Exit::Usage,
        Exit::StoppedByApi,
        Exit::Interrupted,
        Exit::Locked,
        Exit::Internal,
        Exit::IoError,
    ];

    /// The numeric code handed to the operating system.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The exit with this code, if it is one of the table's.
    pub fn from_code(code: i64) -> Option<Exit> {
        Exit::ALL.into_iter().find(|e| i64::from(e.code()) == code)
    }
}

impl From<Exit> for u8 {
    fn from(e: Exit) -> u8 {
        e.code()
    }
}

impl TryFrom<u8> for Exit {
    type Error = String;

    fn try_from(code: u8) -> std::result::Result<Exit, String> {
        Exit::from_code(i64::from(code)).ok_or_else(|| format!("{code} is not an exit code"))
    }
}

/// Everything that can end a command early. Messages say what, where, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Flags, environment or configuration that cannot be used as given.
    #[error("{0}")]
    Usage(String),

    /// A file named by the user could not be read or written (the system's reason
    /// is the source).
    #[error("cannot {action} {path}")]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An input file that cannot be imported at all (e.g. its header lacks required columns).
    #[error("{source_name}, line {line}: {message}")]
    Input {
        source_name: String,
        line: u64,
        message: String,
    },

    /// The database (a SQLite file or a PostgreSQL server) refused or failed; `cause`
    /// says why, by its remedy.
    #[error("database {db}: {message}{}", fix(*cause))]
    Database {
        /// The database as `--db` names it (a URL without its password).
        db: String,
        cause: crate::store::DbCause,
        message: String,
        /// The driver's own error, when it said one.
        #[source]
        source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
    },

    /// Another process is running a batch on this database.
    #[error(
        "database {db} is in use by another kohort-batch run ({holder}); wait for it to \
         finish, or stop it first. {release}"
    )]
    Locked {
        /// The database as `--db` names it.
        db: String,
        holder: String,
        /// What holds the lock and when it is released.
        release: String,
    },

    /// A bug or an unexpected state. Please report it.
    #[error("internal error: {what}")]
    Internal {
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    /// The exit code this error maps to.
    pub fn exit(&self) -> Exit {
        match self {
            // A disk that is full or read-only is the file system refusing, not a
            // wrong flag.
            Error::File { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::StorageFull
                        | std::io::ErrorKind::QuotaExceeded
                        | std::io::ErrorKind::ReadOnlyFilesystem
                        | std::io::ErrorKind::FileTooLarge
                ) =>
            {
                Exit::IoError
            }
            Error::Usage(_) | Error::File { .. } | Error::Input { .. } => Exit::Usage,
            Error::Locked { .. } => Exit::Locked,
            Error::Database { cause, .. } => match cause {
                DbCause::NotOurs | DbCause::Version | DbCause::Empty => Exit::Usage,
                DbCause::Busy
                | DbCause::ReadOnly
                | DbCause::Full
                | DbCause::Io
                | DbCause::Connection
                | DbCause::Denied
                | DbCause::Tls => Exit::IoError,
                DbCause::Bug => Exit::Internal,
            },
            Error::Internal { .. } => Exit::Internal,
        }
    }

    pub(crate) fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }

    /// A bug or an unexpected state, said in words.
    pub(crate) fn internal(what: impl Into<String>) -> Self {
        Error::Internal {
            what: what.into(),
            source: None,
        }
    }

    /// A bug or an unexpected state, with the error that showed it.
    pub(crate) fn internal_from(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Internal {
            what: what.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// An error and its causes, each said once: `what: why: why…`. The one way an error
/// is shown to a person (at the top, when a command ends).
pub fn render(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let said = c.to_string();
        // A cause that repeats what is said already (SQLite's "Error code 13:
        // database or disk is full" under rusqlite's "database or disk is full") adds
        // nothing.
        let gist = said.rsplit(": ").next().unwrap_or(&said);
        if !gist.is_empty() && !text.contains(gist) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = c.source();
    }
    text
}

/// The fix that follows a database message (its cause's, if it has one).
fn fix(cause: DbCause) -> String {
    match cause.fix() {
        "" => String::new(),
        fix => format!(" ({fix})"),
    }
}

/// Convenience alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_match_design() {
        let table = [
            (Exit::Success, 0),
            (Exit::RowsFailed, 1),
            (Exit::Usage, 2),
            (Exit::StoppedByApi, 3),
            (Exit::Interrupted, 4),
            (Exit::Locked, 5),
            (Exit::Internal, 70),
            (Exit::IoError, 74),
        ];
        for (exit, code) in table {
            assert_eq!(exit.code(), code, "{exit:?}");
        }
    }

    #[test]
    fn errors_map_to_exit_codes() {
        assert_eq!(Error::usage("x").exit(), Exit::Usage);
        let locked = Error::Locked {
            db: "a.db".into(),
            holder: "run 3, pid 1 on h, started now".into(),
            release: "The lock is released when that run ends.".into(),
        };
        assert_eq!(locked.exit(), Exit::Locked);
        assert!(locked.to_string().contains("pid 1"));
        assert_eq!(Error::internal("x").exit(), Exit::Internal);
    }

    #[test]
    fn errors_keep_their_cause_and_say_each_once() {
        let missing = Error::File {
            action: "open CSV file",
            path: "o.csv".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "No such file"),
        };
        assert_eq!(render(&missing), "cannot open CSV file o.csv: No such file");
        let sqlite = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("database or disk is full".into()),
        );
        let full = crate::store::Failure::from(sqlite)
            .context("cannot record outcomes")
            .into_error("k.db");
        let text = render(&full);
        assert!(std::error::Error::source(&full).is_some());
        assert_eq!(
            text.matches("database or disk is full").count(),
            1,
            "{text}"
        );
        assert!(
            text.starts_with("database k.db: cannot record outcomes: "),
            "{text}"
        );
        let bug = Error::internal_from(
            "cannot make a temporary directory",
            std::io::Error::other("quota"),
        );
        assert_eq!(
            render(&bug),
            "internal error: cannot make a temporary directory: quota"
        );
    }
}
