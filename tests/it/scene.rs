//! What an integration test starts from: a [`Scene`] (a scratch directory with a
//! database path and an input CSV in it, and the API the worker talks to) and [`Cmd`],
//! a command line of the real binary built from a scene's paths, so that no test
//! spells out `--db … --csv … --api-base …` again.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kohort_batch::Exit;
use kohort_batch::cli::SendArgs;
use kohort_batch::commands;
use kohort_batch::config::SendConfig;
use kohort_batch::engine::Control;
use kohort_batch::sandbox::{Sandbox, SandboxConfig};
use kohort_batch::store::RetryFilter;

use crate::util::{BIN, KEY, args, config, run, sandbox, write};

/// Something the worker can be pointed at with `--api-base`.
pub trait Api {
    fn url(&self) -> String;
}

impl Api for Sandbox {
    fn url(&self) -> String {
        Sandbox::url(self)
    }
}

/// A stub server's base URL.
impl Api for String {
    fn url(&self) -> String {
        self.clone()
    }
}

/// A scratch directory with a database path (`k.db`, not created) and one input CSV
/// (`o.csv`) in it, and the API `sb`: the sandbox on loopback by default, a stub's URL
/// ([`Scene::against`]) or none at all ([`Scene::offline`]).
pub struct Scene<A = Sandbox> {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub csv: PathBuf,
    pub sb: A,
}

impl Scene {
    pub async fn new(cfg: SandboxConfig, csv: &str) -> Scene {
        Scene::with_files(csv, |_| cfg).await
    }

    /// A sandbox whose config needs files from the scratch directory (a TLS
    /// certificate): `cfg` writes them there, then the sandbox starts.
    pub async fn with_files(csv: &str, cfg: impl FnOnce(&Path) -> SandboxConfig) -> Scene {
        let Scene { dir, db, csv, .. } = Scene::offline(csv);
        let sb = sandbox(cfg(dir.path())).await;
        Scene { dir, db, csv, sb }
    }
}

impl Scene<()> {
    /// The files without an API: for commands that send nothing.
    pub fn offline(csv: &str) -> Scene<()> {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("k.db");
        let csv = write(dir.path(), "o.csv", csv);
        Scene {
            dir,
            db,
            csv,
            sb: (),
        }
    }
}

impl Scene<String> {
    /// The files, against a stub API at `url`.
    pub fn against(url: String, csv: &str) -> Scene<String> {
        let Scene { dir, db, csv, .. } = Scene::offline(csv);
        Scene {
            dir,
            db,
            csv,
            sb: url,
        }
    }
}

impl<A> Scene<A> {
    /// `name` in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes another file into the scratch directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        write(self.dir.path(), name, text)
    }

    /// `words` then `--db` with this scene's database.
    pub fn on_db(&self, words: &[&str]) -> Cmd {
        Cmd::new(words).flag("--db", &self.db)
    }

    /// `report --db …` then `extra`.
    pub fn report(&self, extra: &[&str]) -> Cmd {
        self.on_db(&["report"]).args(extra)
    }

    /// `export <what> --db …` then `extra`.
    pub fn export(&self, what: &str, extra: &[&str]) -> Cmd {
        self.on_db(&["export", what]).args(extra)
    }

    /// `enqueue --db … --csv …`.
    pub fn enqueue(&self) -> Cmd {
        self.on_db(&["enqueue"]).flag("--csv", &self.csv)
    }

    /// `validate --csv …`.
    pub fn validate(&self) -> Cmd {
        Cmd::new(&["validate"]).flag("--csv", &self.csv)
    }
}

impl<A: Api> Scene<A> {
    pub fn url(&self) -> String {
        self.sb.url()
    }

    /// The test-friendly send options against this scene's API.
    pub fn args(&self) -> SendArgs {
        args(&self.url())
    }

    pub fn config(&self, a: &SendArgs) -> SendConfig {
        config(a, &self.db)
    }

    /// `run` in-process on this scene's CSV.
    pub async fn run(&self, a: &SendArgs) -> Exit {
        run(a, &self.db, std::slice::from_ref(&self.csv)).await
    }

    /// `run` in-process with no CSV: it sends what is queued (the inbox, pending jobs).
    pub async fn run_queue(&self, a: &SendArgs) -> Exit {
        run(a, &self.db, &[]).await
    }

    /// `retry-failed` in-process with `filter`.
    pub async fn retry_failed(&self, a: &SendArgs, filter: RetryFilter) -> Exit {
        commands::retry_failed(&self.config(a), filter, Arc::new(Control::default()))
            .await
            .unwrap()
    }

    /// The real binary's `run` with no CSV: `run --db … --api-base …`, with the test key.
    pub fn bin_run_queue(&self) -> Cmd {
        self.on_db(&["run"]).flag("--api-base", self.url()).key(KEY)
    }

    /// The real binary's `run` on this scene: `run --db … --api-base … --csv …`, with
    /// the test key.
    pub fn bin_run(&self) -> Cmd {
        self.bin_run_queue().flag("--csv", &self.csv)
    }

    /// [`Scene::bin_run`] with `extra` arguments, run to completion.
    pub async fn run_bin(&self, extra: &[&str]) -> std::process::Output {
        self.bin_run().args(extra).output().await
    }

    /// `retry-failed --db … --api-base …`, with the test key.
    pub fn bin_retry_failed(&self) -> Cmd {
        self.on_db(&["retry-failed"])
            .flag("--api-base", self.url())
            .key(KEY)
    }
}

/// A command line of the binary under test and the variables set for it. Whatever
/// the calling environment holds for the key, the API base, the database and the
/// config file is cleared first.
#[derive(Debug, Clone)]
pub struct Cmd {
    argv: Vec<String>,
    env: Vec<(String, String)>,
}

const CLEARED: [&str; 4] = [
    "KOHORTPAY_API_KEY",
    "KOHORTPAY_API_BASE",
    "KOHORT_BATCH_DB",
    "KOHORT_BATCH_CONFIG",
];

impl Cmd {
    pub fn new(words: &[&str]) -> Cmd {
        Cmd {
            argv: Vec::new(),
            env: Vec::new(),
        }
        .args(words)
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Cmd {
        self.argv.push(a.as_ref().to_string_lossy().into_owned());
        self
    }

    pub fn args<S: AsRef<OsStr>>(self, words: impl IntoIterator<Item = S>) -> Cmd {
        words.into_iter().fold(self, Cmd::arg)
    }

    /// `name value`.
    pub fn flag(self, name: &str, value: impl AsRef<OsStr>) -> Cmd {
        self.arg(name).arg(value)
    }

    /// `name value`, in place of the value an earlier `name` had (another `--db`, say),
    /// or added.
    pub fn set(mut self, name: &str, value: impl AsRef<OsStr>) -> Cmd {
        let value = value.as_ref().to_string_lossy().into_owned();
        match self.argv.iter().position(|a| a == name) {
            Some(i) if i + 1 < self.argv.len() => {
                self.argv[i + 1] = value;
                self
            }
            _ => self.flag(name, value),
        }
    }

    /// Sets the variable `name` (replacing an earlier value).
    pub fn env(mut self, name: &str, value: impl Into<String>) -> Cmd {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_owned(), value.into()));
        self
    }

    /// Runs with this key in `KOHORTPAY_API_KEY`.
    pub fn key(self, key: &str) -> Cmd {
        self.env("KOHORTPAY_API_KEY", key)
    }

    /// Runs with no key in the environment.
    pub fn no_key(mut self) -> Cmd {
        self.env.retain(|(k, _)| k != "KOHORTPAY_API_KEY");
        self
    }

    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// The binary, run by `program` with `before` in front: `program before… BIN argv…`,
    /// with the environment set as for the binary itself.
    pub fn wrapped(&self, program: &str, before: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(program);
        cmd.args(before).arg(BIN).args(&self.argv);
        self.set_env(&mut cmd);
        cmd
    }

    /// The binary as a [`std::process::Command`], to spawn with other stdio.
    pub fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(&self.argv);
        self.set_env(&mut cmd);
        cmd
    }

    fn set_env(&self, cmd: &mut std::process::Command) {
        for var in CLEARED {
            cmd.env_remove(var);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
    }

    /// Runs to completion, on this thread (in a test without the sandbox).
    pub fn output_blocking(&self) -> std::process::Output {
        self.command().output().unwrap()
    }

    /// Runs to completion, off the async worker threads (the in-process sandbox runs
    /// on them).
    pub async fn output(self) -> std::process::Output {
        tokio::task::spawn_blocking(move || self.output_blocking())
            .await
            .unwrap()
    }
}
