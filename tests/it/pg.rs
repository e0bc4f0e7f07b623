//! A throwaway PostgreSQL cluster for the tests that need one: its own data directory
//! and loopback port, stopped and removed when the test drops it.
//!
//! The binaries are found once per test process (`KB_PG_BINDIR`, else `pg_config
//! --bindir`, else the highest `/usr/lib/postgresql/*/bin`, else `PATH`); as root they
//! run as the `postgres` user, since initdb refuses root. Without them a test prints one
//! `skipped:` line and passes, unless `KB_REQUIRE_POSTGRES=1` makes that a failure.
//!
//! initdb runs once per test process, into a template that each cluster copies (on
//! tmpfs a copy takes 0.07 s, an initdb 0.5 s). Every directory here is `kb-pg-*` in
//! /dev/shm or the temporary directory (see `base_dir`), with a `kb.lock` its process
//! holds locked; the first cluster of a process removes those whose process is gone (a
//! test binary killed by Ctrl-C or SIGKILL), after stopping the postmaster still
//! running in them. The last process's template (40 MB) stays until the next one.

use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A PostgreSQL cluster of its own for one test: initdb + pg_ctl in a temporary
/// directory, on a free loopback port; stopped (and its files removed) when dropped.
#[derive(Debug)]
pub struct Cluster {
    pg: &'static Pg,
    test: String,
    port: u16,
    /// Holds `data/` (the cluster), `s/` (its socket), `log` (the server's log) and
    /// `kb.lock`. Declared before `_lock`: removed while the lock is still held.
    dir: tempfile::TempDir,
    _lock: File,
}

impl Cluster {
    /// Starts one, or returns None after printing ONE line `skipped: <test name>: no
    /// PostgreSQL binaries (looked for initdb/pg_ctl/psql in …); install postgresql, or
    /// set KB_REQUIRE_POSTGRES=1 to make this a failure` when there are no binaries (or,
    /// as root, no `postgres` user to run them as). With env KB_REQUIRE_POSTGRES=1 that
    /// is a panic (failure) instead of a skip.
    pub fn start(test: &str) -> Option<Cluster> {
        let pg = match PG.get_or_init(Pg::find) {
            Ok(pg) => pg,
            Err(missing) => {
                if std::env::var("KB_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                    panic!(
                        "{test}: {}, and KB_REQUIRE_POSTGRES=1 makes that a failure: {}, \
                         or unset KB_REQUIRE_POSTGRES to skip",
                        missing.what, missing.fix
                    );
                }
                println!(
                    "skipped: {test}: {}; {}, or set KB_REQUIRE_POSTGRES=1 to make this a failure",
                    missing.what, missing.fix
                );
                return None;
            }
        };
        let template = TEMPLATE.get_or_init(|| Template::make(pg));
        let (dir, lock) = pg.own_dir("kb-pg-");
        let data = dir.path().join("data");
        let copy = Command::new("cp")
            .arg("-a")
            .arg(template.dir.join("data"))
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            copy.status.success(),
            "{test}: could not copy the template cluster {} to {}: {}",
            template.dir.display(),
            data.display(),
            text(&copy)
        );
        std::fs::create_dir(dir.path().join("s")).unwrap();
        pg.give(&dir.path().join("s"));
        let mut cluster = Cluster {
            pg,
            test: test.to_owned(),
            port: 0,
            dir,
            _lock: lock,
        };
        // Another test may take the port between our probe and the postmaster's bind.
        for attempt in 1..=5 {
            cluster.port = free_port();
            match cluster.pg_ctl_start("start") {
                Ok(()) => break,
                Err(log) if attempt < 5 && port_taken(&log) => continue,
                Err(log) => panic!(
                    "{test}: the test cluster in {} did not start (attempt {attempt}, port {}); \
                     the server's log ends:\n{log}",
                    cluster.dir.path().display(),
                    cluster.port
                ),
            }
        }
        cluster.run_psql("postgres", "CREATE DATABASE kohort");
        Some(cluster)
    }

    /// postgres://kb@127.0.0.1:PORT/kohort (a database `kohort` made at start; role
    /// `kb` is the superuser, trust auth on loopback).
    pub fn url(&self) -> String {
        format!("postgres://kb@127.0.0.1:{}/kohort", self.port)
    }

    /// Runs SQL with psql as the superuser against db `kohort` (`-v ON_ERROR_STOP=1 -X
    /// -q -A -t`, the SQL on standard input), returns stdout trimmed; panics with psql's
    /// stderr on failure.
    pub fn psql(&self, sql: &str) -> String {
        // kohort-batch's tables are in its own schema unless a URL names another.
        self.run_psql(
            "kohort",
            &format!("SET search_path TO kohort_batch, public;\n{sql}"),
        )
    }

    /// `pg_ctl restart -m fast` (waits until it accepts connections again).
    pub fn restart_fast(&self) {
        if let Err(log) = self.pg_ctl_start("restart") {
            if !port_taken(&log) {
                panic!(
                    "{}: the test cluster in {} did not restart on port {}; the server's \
                     log ends:\n{log}",
                    self.test,
                    self.dir.path().display(),
                    self.port
                );
            }
            // It stopped, but something took its port in between: start it there again.
            self.start_again();
        }
    }

    /// `pg_ctl stop -m fast`; [`Cluster::start_again`] starts it later on the same port
    /// and data directory.
    pub fn stop(&self) {
        let out = self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "30"]);
        assert!(
            out.status.success(),
            "{}: the test cluster in {} did not stop: {}; the server's log ends:\n{}",
            self.test,
            self.dir.path().display(),
            text(&out),
            self.log_tail(0)
        );
    }

    /// Starts it again after [`Cluster::stop`], on the same port and data directory.
    pub fn start_again(&self) {
        let mut attempt = 1;
        while let Err(log) = self.pg_ctl_start("start") {
            // The port is this cluster's URL: wait for whoever holds it, a while.
            if attempt == 5 || !port_taken(&log) {
                panic!(
                    "{}: the test cluster in {} did not start again on port {} (attempt \
                     {attempt}); the server's log ends:\n{log}",
                    self.test,
                    self.dir.path().display(),
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(200 * attempt));
            attempt += 1;
        }
    }

    /// The uid and gid the server runs as, when that is not ours (tests run as root):
    /// files it must read, and only it, are given to that user.
    pub fn server_user(&self) -> Option<(u32, u32)> {
        self.pg.user
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `pg_ctl start` or `restart` with this cluster's settings, waiting until it
    /// accepts connections; on failure, the server log written meanwhile.
    fn pg_ctl_start(&self, verb: &str) -> Result<(), String> {
        let log = self.dir.path().join("log");
        let from = std::fs::metadata(&log).map_or(0, |m| m.len());
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} \
             -c fsync=off -c full_page_writes=off -c max_connections=200",
            self.port,
            self.dir.path().join("s").display()
        );
        let mut args = vec![verb, "-l"];
        let log_arg = log.display().to_string();
        args.push(&log_arg);
        if verb == "restart" {
            args.extend(["-m", "fast"]);
        }
        args.extend(["-w", "-t", "60", "-o", &options]);
        let out = self.pg_ctl(&args);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}\n(pg_ctl: {})", self.log_tail(from), text(&out)))
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        self.pg
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn run_psql(&self, db: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let mut child = self
            .pg
            .command("psql")
            .args(["-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t"])
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "kb", "-d", db])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // Written from a thread: psql may answer more than a pipe holds before it has
        // read all of the SQL.
        let out = std::thread::scope(|s| {
            s.spawn(move || {
                let _ = stdin.write_all(sql.as_bytes());
            });
            child.wait_with_output().unwrap()
        });
        assert!(
            out.status.success(),
            "{}: psql failed on the test cluster (port {}, database {db}) with {}: {}\nthe SQL: {sql}",
            self.test,
            self.port,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The server's log from byte `from` on, its last 40 lines.
    fn log_tail(&self, from: u64) -> String {
        let log = std::fs::read(self.dir.path().join("log")).unwrap_or_default();
        let log = String::from_utf8_lossy(log.get(from as usize..).unwrap_or_default());
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Errors ignored: it may be stopped already. `-t 30` bounds the wait.
        let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
    }
}

/// Where the binaries are and whom they run as, found once per test process.
#[derive(Debug)]
struct Pg {
    bin: PathBuf,
    /// The `postgres` user's uid and gid when we are root: the binaries then run
    /// through `runuser -u postgres`, in directories that user owns.
    user: Option<(u32, u32)>,
    /// Where the `kb-pg-*` directories go.
    base: PathBuf,
}

/// Why there is no PostgreSQL to test against, and what to do about it.
#[derive(Debug)]
struct Missing {
    what: String,
    fix: &'static str,
}

static PG: OnceLock<Result<Pg, Missing>> = OnceLock::new();

impl Pg {
    fn find() -> Result<Pg, Missing> {
        let bin = bindir()?;
        let user = if euid() == 0 {
            let id = |flag: &str| -> Option<u32> {
                let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
                String::from_utf8_lossy(&out.stdout).trim().parse().ok()
            };
            let (Some(uid), Some(gid)) = (id("-u"), id("-g")) else {
                return Err(Missing {
                    what: "running as root and there is no `postgres` user to run initdb as \
                           (it refuses root)"
                        .into(),
                    fix: "create one (useradd --system postgres)",
                });
            };
            let runuser = Command::new("runuser").arg("--version").output();
            if !runuser.is_ok_and(|o| o.status.success()) {
                return Err(Missing {
                    what: "running as root and there is no runuser to run initdb as `postgres` \
                           (it refuses root)"
                        .into(),
                    fix: "install util-linux",
                });
            }
            Some((uid, gid))
        } else {
            None
        };
        Ok(Pg {
            bin,
            base: base_dir(user.is_some()),
            user,
        })
    }

    /// A command running `tool` from the bin directory, as `postgres` when we are
    /// root, with no PG* variable of the calling environment and C messages.
    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        let mut cmd = if self.user.is_some() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("LC_ALL", "C")
            .env("PGCONNECT_TIMEOUT", "30")
            .current_dir("/");
        cmd
    }

    /// Gives `path` to the `postgres` user when we are root.
    fn give(&self, path: &Path) {
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
        }
    }

    /// A `kb-pg-*` directory in the base directory, for the binaries' user, and its
    /// `kb.lock`, locked for as long as the file is open.
    fn own_dir(&self, prefix: &str) -> (tempfile::TempDir, File) {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.base)
            .unwrap_or_else(|e| {
                panic!(
                    "could not make a directory for a test cluster in {}: {e}; check that \
                     it exists and is writable, or set TMPDIR",
                    self.base.display()
                )
            });
        // Locked under another name first: a `kb.lock` that can be locked is one whose
        // process is gone (see `sweep`).
        let lock = File::create(dir.path().join("kb.lock.new")).unwrap();
        lock.lock().unwrap();
        std::fs::rename(dir.path().join("kb.lock.new"), dir.path().join("kb.lock")).unwrap();
        self.give(dir.path());
        (dir, lock)
    }
}

/// `$KB_PG_BINDIR` only, when set; else `pg_config --bindir`, the highest
/// `/usr/lib/postgresql/*/bin`, then the real directory of `initdb` on PATH (past
/// symlinks: pg_ctl finds postgres next to itself).
fn bindir() -> Result<PathBuf, Missing> {
    let complete = |dir: &Path| {
        ["initdb", "pg_ctl", "psql"]
            .iter()
            .all(|t| runs(&dir.join(t)))
    };
    let missing = |places: &str| Missing {
        what: format!("no PostgreSQL binaries (looked for initdb/pg_ctl/psql in {places})"),
        fix: "install postgresql",
    };
    if let Some(dir) = std::env::var_os("KB_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if complete(&dir) {
            Ok(dir)
        } else {
            Err(missing(&format!("KB_PG_BINDIR={}", dir.display())))
        };
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = name
                .split('.')
                .map(|n| n.parse().ok())
                .collect::<Option<_>>()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("initdb"))
            .find(|initdb| runs(initdb))
            .and_then(|initdb| Some(initdb.canonicalize().ok()?.parent()?.to_path_buf()))
    });
    from_pg_config
        .into_iter()
        .chain(versions.into_iter().rev().map(|(_, bin)| bin))
        .chain(on_path)
        .find(|dir| complete(dir))
        .ok_or_else(|| missing("pg_config --bindir, /usr/lib/postgresql/*/bin and PATH"))
}

fn runs(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(file).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The effective uid, from /proc/self/status (`id -u` where there is no /proc).
fn euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let from_proc = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1)?.parse().ok());
    from_proc.unwrap_or_else(|| {
        let out = Command::new("id").arg("-u").output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    })
}

/// /dev/shm when it is a tmpfs with 2 GiB free and TMPDIR is not set (a copy of the
/// template takes 0.07 s there against 0.8 s on an ext4 /tmp of a small VM); else the
/// temporary directory, unless the `postgres` user could not reach into it (as root)
/// or a socket path in it would be too long (108 bytes with the socket's name): then
/// /tmp.
fn base_dir(for_other_user: bool) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    if std::env::var_os("TMPDIR").is_none() && roomy_tmpfs("/dev/shm") {
        return PathBuf::from("/dev/shm");
    }
    let tmp = std::env::temp_dir();
    let socket = tmp.join("kb-pg-XXXXXX/s/.s.PGSQL.65535");
    let reachable = tmp
        .ancestors()
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    if socket.as_os_str().len() < 100 && (reachable || !for_other_user) {
        tmp
    } else {
        PathBuf::from("/tmp")
    }
}

/// Whether `dir` is a tmpfs with at least 2 GiB available (GNU `stat -f`).
fn roomy_tmpfs(dir: &str) -> bool {
    let Ok(out) = Command::new("stat")
        .args(["-f", "-c", "%T %a %S", dir])
        .output()
    else {
        return false;
    };
    let out = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = out.split_whitespace().collect();
    let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (fields.first(), number(1), number(2)) {
        (Some(&"tmpfs"), Some(blocks), Some(size)) => blocks.saturating_mul(size) >= 2 << 30,
        _ => false,
    }
}

/// A port nothing listens on right now (the kernel's pick for port 0).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn port_taken(log: &str) -> bool {
    log.contains("Address already in use")
}

fn text(out: &Output) -> String {
    format!(
        "{} {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// The cluster initdb made once for this process, which each [`Cluster`] copies.
/// Kept to the end of the process (there is no hook at exit): a later process's
/// first cluster removes it.
#[derive(Debug)]
struct Template {
    dir: PathBuf,
    _lock: File,
}

static TEMPLATE: OnceLock<Template> = OnceLock::new();

impl Template {
    fn make(pg: &Pg) -> Template {
        sweep(pg);
        let (dir, lock) = pg.own_dir("kb-pg-template-");
        let dir = dir.keep();
        let data = dir.join("data");
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "kb",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            panic!(
                "initdb ({}) failed to make the template cluster in {}: {}",
                pg.bin.display(),
                data.display(),
                text(&out)
            );
        }
        Template { dir, _lock: lock }
    }
}

/// Removes the `kb-pg-*` directories our user made whose process is gone (their
/// `kb.lock` can be locked), stopping the postmaster left running in them first.
fn sweep(pg: &Pg) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(&pg.base) else {
        return;
    };
    let us = euid();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !entry.file_name().to_string_lossy().starts_with("kb-pg-") {
            continue;
        }
        let lock_path = dir.join("kb.lock");
        let ours =
            std::fs::symlink_metadata(&lock_path).is_ok_and(|m| m.is_file() && m.uid() == us);
        if !ours {
            continue;
        }
        let Ok(lock) = File::open(&lock_path) else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue; // its process is alive
        }
        // Stop its postmaster, but only if that pid still is one working in this
        // directory (a pid is reused; a stale postmaster.pid could name anything).
        let data = dir.join("data");
        let pid = std::fs::read_to_string(data.join("postmaster.pid")).unwrap_or_default();
        let pid = pid.lines().next().unwrap_or_default().trim();
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"));
        if !pid.is_empty() && cwd.is_ok_and(|cwd| cwd == data) {
            let _ = pg
                .command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .args(["stop", "-m", "immediate", "-w", "-t", "30"])
                .stdin(Stdio::null())
                .output();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Whether `pid` has exited. Here a zombie counts: an orphaned postmaster is the
/// child of PID 1, which on some machines (containers, microVMs) never reaps.
fn gone(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z'))
    })
}

#[test]
fn a_throwaway_cluster_starts_answers_and_goes_away() {
    let Some(c) = Cluster::start("a_throwaway_cluster_starts_answers_and_goes_away") else {
        return;
    };
    assert_eq!(
        c.url(),
        format!("postgres://kb@127.0.0.1:{}/kohort", c.port())
    );
    assert_eq!(c.psql("select 1"), "1");
    assert_eq!(
        c.psql("select current_user, current_database()"),
        "kb|kohort"
    );

    c.restart_fast();
    assert_eq!(
        c.psql("create table t (n int); insert into t values (7); select n from t"),
        "7"
    );
    c.stop();
    c.start_again();
    assert_eq!(c.psql("select n from t"), "7");

    let dir = c.dir.path().to_path_buf();
    let pid = std::fs::read_to_string(dir.join("data/postmaster.pid")).unwrap();
    let pid = pid.lines().next().unwrap().to_owned();
    assert!(
        !gone(&pid),
        "postmaster {pid} of {} is not running",
        dir.display()
    );
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone(&pid) {
        assert!(
            Instant::now() < deadline,
            "postmaster {pid} still runs 10 s after drop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!dir.exists(), "{} is still there after drop", dir.display());
}
