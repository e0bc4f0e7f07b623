//! The run lock: one sending run per database, held by the kernel.
//!
//! An exclusive `flock` on `<db>.lock` (the database path with its symlinks
//! resolved, plus `.lock`) is taken before a run touches any job and held until it
//! finishes. The kernel releases it when the process ends, however it ends, so
//! nothing is ever inferred from a pid: a holder in another PID namespace, a
//! container sharing the volume or a process hidden by `hidepid` still holds it,
//! and a pid reused after a crash blocks nothing. Producers never touch this file.
//!
//! The file's text names the holder (pid, host, run, start time) for the message a
//! second run prints; it is information only. The file is never deleted: a process
//! that deleted it while it is held would let the next run lock a new file beside
//! the held one.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub(super) struct RunLock {
    file: File,
}

/// The lock file of a database at `db` (which must exist: its real path is used, so
/// that two names of one database through symlinks share one lock).
pub fn lock_path(db: &Path) -> PathBuf {
    let real = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_owned());
    let mut name = real.file_name().unwrap_or_default().to_owned();
    name.push(".lock");
    real.with_file_name(name)
}

impl RunLock {
    /// Takes the lock of the database at `db` without waiting; `Error::Locked`
    /// naming the holder if another process has it.
    pub(super) fn acquire(db: &Path) -> Result<RunLock> {
        let path = lock_path(db);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| Error::File {
                action: "open the run lock file",
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(RunLock { file }),
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = text.trim();
                Err(Error::Locked {
                    db: db.display().to_string(),
                    holder: if holder.is_empty() {
                        "a run that is just starting".to_owned()
                    } else {
                        holder.to_owned()
                    },
                    release: format!(
                        "The lock ({}) is held by the kernel and released when that process \
                         ends, however it ends: never delete it by hand",
                        path.display()
                    ),
                })
            }
            Err(TryLockError::Error(source)) => Err(Error::File {
                action: "lock",
                path,
                source,
            }),
        }
    }

    /// Writes who holds the lock into the file (information for a second run).
    pub(super) fn describe(&mut self, run_id: i64, started_at: &str) {
        let host = host_name();
        let text = format!(
            "run {run_id}, pid {} on {host}, started {started_at}\n",
            std::process::id()
        );
        let written = self
            .file
            .set_len(0)
            .and_then(|()| self.file.rewind())
            .and_then(|()| self.file.write_all(text.as_bytes()));
        if let Err(e) = written {
            tracing::debug!(error = %e, "cannot describe the run lock's holder");
        }
    }
}

/// This machine's name, for the messages that name a lock's holder.
pub(super) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "an unknown host".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("k.db");
        std::fs::write(&db, b"").unwrap();
        let mut first = RunLock::acquire(&db).unwrap();
        first.describe(7, "2026-12-01T00:00:00Z");
        // A second open file description of the same file, as another process has.
        let err = RunLock::acquire(&db).unwrap_err().to_string();
        assert!(
            err.contains("run 7, pid") && err.contains("started 2026-12-01"),
            "{err}"
        );
        // Through a symlink: the same lock.
        let link = dir.path().join("other-name.db");
        std::os::unix::fs::symlink(&db, &link).unwrap();
        assert!(RunLock::acquire(&link).is_err());
        drop(first);
        let _again = RunLock::acquire(&link).unwrap();
    }
}
