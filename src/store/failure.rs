//! Why the database refused, sorted by what a person can do about it: each cause
//! has its exit code (README, "Exit codes") and a one-line fix.

use std::fmt;

use rusqlite::ErrorCode;

/// What went wrong with the database, by its remedy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbCause {
    /// Another process held it locked for longer than the busy timeout.
    Busy,
    /// This user may not write the file, its `-wal`/`-shm` files or its directory.
    ReadOnly,
    /// The disk (or the file size limit) is full.
    Full,
    /// The file system failed, or the file is damaged.
    Io,
    /// Not a kohort-batch database (another application's, or not SQLite at all).
    NotOurs,
    /// Written by a newer kohort-batch, or by an older one a read-only command may not upgrade.
    Version,
    /// No run has used it yet: there is nothing to read.
    Empty,
    /// The PostgreSQL server could not be reached, refused the login, or closed the
    /// connection (restarted, say).
    Connection,
    /// The PostgreSQL role lacks a privilege the command needs.
    Denied,
    /// The PostgreSQL server's TLS certificate could not be verified.
    Tls,
    /// Anything else: a bug.
    Bug,
}

impl DbCause {
    /// What to do about it, to follow the message.
    pub fn fix(self) -> &'static str {
        match self {
            DbCause::Busy => {
                "another process kept the database locked for longer than --busy-timeout (a \
                 producer's transaction left open?): find it with `fuser` on the file, or \
                 raise --busy-timeout; rows not sent stay pending"
            }
            DbCause::ReadOnly => {
                "this user cannot write the database, its -wal/-shm files or its directory: \
                 check their owner and mode"
            }
            DbCause::Full => "the disk is full: free some space and run again",
            DbCause::Io => {
                "the file system refused a read or write (a full disk, a file size limit, \
                 a failing disk, or a damaged file): check free space and the disk"
            }
            DbCause::Connection => {
                "the PostgreSQL server could not be reached, refused the login, or closed the \
                 connection (a restart?): check that it runs and the URL in --db; rows not \
                 sent stay pending, and the next run checks any in flight first"
            }
            DbCause::Tls => {
                "the PostgreSQL server's TLS certificate is not trusted: give the CA that \
                 signed it with sslrootcert=/path/ca.pem in the URL (or --ca-cert). A \
                 self-signed server certificate cannot be verified: sign it with a CA of \
                 your own, or use sslmode=disable on a network you trust"
            }
            DbCause::Denied => {
                "the PostgreSQL role lacks a privilege this command needs: grant it as \
                 deploy/README.md (PostgreSQL) shows"
            }
            DbCause::NotOurs | DbCause::Version | DbCause::Empty => "",
            DbCause::Bug => "this is a bug in kohort-batch: please report it",
        }
    }
}

/// A database failure as the store's thread reports it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub cause: DbCause,
    pub message: String,
    /// The driver's own error, when it said one (shared: one failed transaction is
    /// told to every caller in it).
    pub source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
}

impl Failure {
    pub fn new(cause: DbCause, message: impl Into<String>) -> Failure {
        Failure {
            cause,
            message: message.into(),
            source: None,
        }
    }

    /// The top-level error for this failure of the database `db` (as `--db` names it).
    pub fn into_error(self, db: &str) -> crate::error::Error {
        crate::error::Error::Database {
            db: db.to_owned(),
            cause: self.cause,
            message: self.message,
            source: self.source,
        }
    }

    /// The same failure, its message prefixed with what was being done.
    pub fn context(&self, what: &str) -> Failure {
        Failure {
            message: format!("{what}: {}", self.message),
            ..self.clone()
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Failure {
        let cause = match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => DbCause::Busy,
            Some(ErrorCode::ReadOnly | ErrorCode::PermissionDenied | ErrorCode::CannotOpen) => {
                DbCause::ReadOnly
            }
            Some(ErrorCode::DiskFull | ErrorCode::TooBig) => DbCause::Full,
            Some(ErrorCode::SystemIoFailure | ErrorCode::DatabaseCorrupt) => DbCause::Io,
            Some(ErrorCode::NotADatabase) => DbCause::NotOurs,
            _ => DbCause::Bug,
        };
        let message = match cause {
            DbCause::NotOurs => "not a SQLite database (is --db the right file?)".to_owned(),
            _ => e.to_string(),
        };
        Failure {
            source: Some(std::sync::Arc::new(e)),
            ..Failure::new(cause, message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite(code: std::ffi::c_int) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    #[test]
    fn sqlite_errors_sort_into_causes() {
        use rusqlite::ffi;
        for (code, cause) in [
            (ffi::SQLITE_BUSY, DbCause::Busy),
            (ffi::SQLITE_LOCKED, DbCause::Busy),
            (ffi::SQLITE_READONLY, DbCause::ReadOnly),
            (ffi::SQLITE_CANTOPEN, DbCause::ReadOnly),
            (ffi::SQLITE_PERM, DbCause::ReadOnly),
            (ffi::SQLITE_FULL, DbCause::Full),
            (ffi::SQLITE_IOERR, DbCause::Io),
            (ffi::SQLITE_CORRUPT, DbCause::Io),
            (ffi::SQLITE_NOTADB, DbCause::NotOurs),
            (ffi::SQLITE_ERROR, DbCause::Bug),
        ] {
            assert_eq!(Failure::from(sqlite(code)).cause, cause, "code {code}");
        }
        assert_eq!(
            Failure::from(rusqlite::Error::InvalidQuery).cause,
            DbCause::Bug
        );
    }
}
