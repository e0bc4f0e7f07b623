//! PostgreSQL's errors sorted by what a person can do about them (the causes and
//! their exit codes are SQLite's: `store/failure.rs`).

use tokio_postgres::error::SqlState;

use crate::store::failure::{DbCause, Failure};

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        let (cause, message) = match e.as_db_error() {
            None => {
                let cause = match crate::api::untrusted_certificate(&e) {
                    true => DbCause::Tls,
                    false => DbCause::Connection,
                };
                (cause, connection_failed(&e))
            }
            // The server's own words, whole: the driver's error adds only "db error".
            Some(db) => {
                let mut text = db.message().to_owned();
                if let Some(detail) = db.detail() {
                    text.push_str(&format!(" ({detail})"));
                }
                text.push_str(&format!(" [SQLSTATE {}]", db.code().code()));
                return Failure::new(cause_of(db.code()), text);
            }
        };
        Failure {
            source: Some(std::sync::Arc::new(e)),
            ..Failure::new(cause, message)
        }
    }
}

/// What a failed connection says, with where its causes lead (TLS's are told
/// only deep in the chain).
fn connection_failed(e: &tokio_postgres::Error) -> String {
    let mut text = format!("the connection to the PostgreSQL server failed: {e}");
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let said = c.to_string();
        if !text.contains(&said) {
            text.push_str(&format!(": {said}"));
        }
        cause = c.source();
    }
    text
}

/// The cause of an error the server sent, by its SQLSTATE.
fn cause_of(code: &SqlState) -> DbCause {
    let class = &code.code()[..2];
    match class {
        // Connection exceptions, a server shutting down or starting, a login refused.
        "08" | "57" | "28" => DbCause::Connection,
        "53" if *code == SqlState::DISK_FULL => DbCause::Full,
        "53" | "58" | "XX" => DbCause::Io,
        "42" if *code == SqlState::INSUFFICIENT_PRIVILEGE => DbCause::Denied,
        "25" if *code == SqlState::READ_ONLY_SQL_TRANSACTION => DbCause::ReadOnly,
        "55" if *code == SqlState::LOCK_NOT_AVAILABLE => DbCause::Busy,
        "40" => DbCause::Busy,
        "3D" => DbCause::Connection,
        _ => DbCause::Bug,
    }
}

/// A failure to get a connection from the pool.
pub(super) fn from_pool(e: deadpool_postgres::PoolError) -> Failure {
    match e {
        deadpool_postgres::PoolError::Backend(e) => e.into(),
        other => Failure::new(
            DbCause::Connection,
            format!("no connection to the PostgreSQL server: {other}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_sort_into_causes() {
        for (code, cause) in [
            (SqlState::ADMIN_SHUTDOWN, DbCause::Connection),
            (SqlState::CANNOT_CONNECT_NOW, DbCause::Connection),
            (SqlState::INVALID_PASSWORD, DbCause::Connection),
            (SqlState::INSUFFICIENT_PRIVILEGE, DbCause::Denied),
            (SqlState::DISK_FULL, DbCause::Full),
            (SqlState::LOCK_NOT_AVAILABLE, DbCause::Busy),
            (SqlState::T_R_DEADLOCK_DETECTED, DbCause::Busy),
            (SqlState::READ_ONLY_SQL_TRANSACTION, DbCause::ReadOnly),
            (SqlState::UNDEFINED_TABLE, DbCause::Bug),
        ] {
            assert_eq!(cause_of(&code), cause, "{}", code.code());
        }
    }
}
