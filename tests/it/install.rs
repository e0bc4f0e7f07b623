//! deploy/README.md's steps, as written, on a scratch root: the blocks marked
//! `<!-- ci: NAME -->` run with bash, every installed path moved under a temporary
//! directory and `sudo` played by root (`sudo -u` by runuser). Then the nightly job
//! runs as its user while the shop's backend, in the producers' group, inserts into
//! the queue; a user outside the group cannot read it; the "how did last night go"
//! commands find the lines that matter; the rerun commands work. It needs root (to
//! make users); elsewhere it says it was skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kohort_batch::sandbox::SandboxConfig;

use crate::util::*;

/// Installed paths and where they go under the scratch root.
const MOVED: &[&str] = &[
    "/etc/kohort-batch",
    "/etc/sysusers.d",
    "/etc/tmpfiles.d",
    "/etc/cron.d",
    "/etc/logrotate.d",
    "/var/lib/kohort-batch",
    "/var/log/kohort-batch",
    "/usr/local/",
];

struct Host {
    /// The scratch root every installed path is moved under.
    root: tempfile::TempDir,
    /// The working copy: `deploy/` (paths moved) and `target/release/kohort-batch`.
    work: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        for d in [root.path(), work.path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // What every host has before the install.
        for d in [
            "usr/local/bin",
            "usr/local/lib",
            "etc/cron.d",
            "etc/logrotate.d",
            "var/lib",
            "var/log",
        ] {
            std::fs::create_dir_all(root.path().join(d)).unwrap();
        }
        let host = Host { root, work };
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        for dir in ["systemd", "cron", "logrotate", "prometheus"] {
            let from = repo.join("deploy").join(dir);
            let to = host.work.path().join("deploy").join(dir);
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(&from).unwrap() {
                let f = f.unwrap().path();
                let text = host.moved(&std::fs::read_to_string(&f).unwrap());
                let dest = to.join(f.file_name().unwrap());
                std::fs::write(&dest, text).unwrap();
                std::fs::set_permissions(&dest, std::fs::metadata(&f).unwrap().permissions())
                    .unwrap();
            }
        }
        std::fs::copy(
            repo.join("deploy/config.example.toml"),
            host.work.path().join("deploy/config.example.toml"),
        )
        .unwrap();
        let bin = host.work.path().join("target/release");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(BIN, bin.join("kohort-batch")).unwrap();
        host
    }

    fn path(&self, installed: &str) -> PathBuf {
        self.root.path().join(installed.trim_start_matches('/'))
    }

    /// `text` with every installed path moved under the root.
    fn moved(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for p in MOVED {
            out = out.replace(p, &format!("{}{p}", self.root.path().display()));
        }
        out
    }

    /// Runs one marked block of deploy/README.md; `stdin` is what a person would type.
    fn step(&self, name: &str, stdin: &str) -> std::process::Output {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/README.md"))
                .unwrap();
        let marker = format!("<!-- ci: {name} -->\n```sh\n");
        let start = readme
            .find(&marker)
            .unwrap_or_else(|| panic!("no block {name}"))
            + marker.len();
        let block = &readme[start..start + readme[start..].find("```").unwrap()];
        let script = self
            .moved(block)
            .replace("cargo build --release --locked", "true")
            .replace("sudo -u kohort-batch ", "runuser -u kohort-batch -- ")
            .replace("sudo ", "");
        let mut child = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(self.work.path())
            .env(
                "PATH",
                format!(
                    "{}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                    self.path("/usr/local/bin").display()
                ),
            )
            .env_remove("KOHORTPAY_API_KEY")
            .env_remove("KOHORT_BATCH_CONFIG")
            .env_remove("KOHORT_BATCH_DB")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "step {name} failed:\n{script}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The nightly cron job, as cron runs it (its user, its command).
    fn nightly(&self) -> Option<i32> {
        Command::new("runuser")
            .args(["-u", "kohort-batch", "--"])
            .arg(self.path("/usr/local/lib/kohort-batch/nightly"))
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .status()
            .unwrap()
            .code()
    }

    fn db(&self) -> PathBuf {
        self.path("/var/lib/kohort-batch/kohort-batch.db")
    }
}

/// Runs `sh` as `user`; its status.
fn as_user(user: &str, script: &str) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", user, "--", "sh", "-c", script])
        .output()
        .unwrap()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// A producer's inserts, in Python's sqlite3 as a shop's backend might write them.
fn producer(db: &Path, from: u32, to: u32, pause: f64) -> String {
    format!(
        "python3 -c \"
import sqlite3, time
con = sqlite3.connect('{}', timeout=60, isolation_level=None)
for i in range({from}, {to}):
    con.execute('INSERT INTO inbox (customer_id, order_id) VALUES (?, ?)', ('cus_p%d' % i, 'ord_p%05d' % i))
    time.sleep({pause})
\"",
        db.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_deploy_readme_installs_a_nightly_setup_producers_can_feed() {
    let missing: Vec<&str> = [
        "systemd-sysusers",
        "systemd-tmpfiles",
        "runuser",
        "useradd",
        "usermod",
        "python3",
        "jq",
    ]
    .into_iter()
    .filter(|t| !have(t))
    .collect();
    if !is_root() || !missing.is_empty() {
        println!(
            "skipped the install test: it needs root and {missing:?} (root: {})",
            is_root()
        );
        return;
    }
    let sb = sandbox(slow(20)).await;
    let host = Host::new();

    // Install: the user, the directories with their modes, the database.
    host.step("install", "");
    let meta = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).unwrap();
        (m.mode() & 0o7777, m.gid())
    };
    let producers_gid = {
        let out = Command::new("getent")
            .args(["group", "kohort-batch-producers"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split(':')
            .nth(2)
            .unwrap()
            .parse::<u32>()
            .unwrap()
    };
    assert_eq!(
        meta(&host.path("/var/lib/kohort-batch")),
        (0o2770, producers_gid)
    );
    assert_eq!(meta(&host.db()), (0o660, producers_gid));
    assert_eq!(meta(&host.path("/var/lib/kohort-batch-metrics")).0, 0o755);

    // The key, from standard input; never on a command line.
    host.step("key", "sk_test_nightly_install\n");
    let key = host.path("/etc/kohort-batch/api-key");
    assert_eq!(
        std::fs::read_to_string(&key).unwrap(),
        "sk_test_nightly_install\n"
    );
    assert_eq!(meta(&key).0, 0o600);

    // The shop's backend joins the producers; another user does not.
    for user in ["shop-backend", "kb-outsider"] {
        let _ = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                user,
            ])
            .output();
    }
    host.step("producer", "");
    // "then edit": the config points at the sandbox, without a rate limit.
    std::fs::write(
        host.path("/etc/kohort-batch/config.toml"),
        format!(
            "api-base = \"{}\"\nrate = 0\nconcurrency = 4\nbreaker = 3\nmax-attempts = 2\ntimeout = \"5s\"\nsettle = \"100ms\"\n",
            sb.url()
        ),
    )
    .unwrap();
    host.step("cron", "");

    // The backend inserts before the first night and while it runs.
    let db = host.db();
    let before = as_user("shop-backend", &producer(&db, 1, 51, 0.0));
    assert!(
        before.status.success(),
        "{}",
        String::from_utf8_lossy(&before.stderr)
    );
    let during = Command::new("runuser")
        .args([
            "-u",
            "shop-backend",
            "--",
            "sh",
            "-c",
            &producer(&db, 51, 151, 0.01),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let nightly = tokio::task::spawn_blocking({
        let root = host.root.path().to_owned();
        move || {
            Command::new("runuser")
                .args(["-u", "kohort-batch", "--"])
                .arg(root.join("usr/local/lib/kohort-batch/nightly"))
                .status()
                .unwrap()
                .code()
        }
    })
    .await
    .unwrap();
    assert_eq!(nightly, Some(0));
    let during = during.wait_with_output().unwrap();
    assert!(
        during.status.success(),
        "an insert failed: {}",
        String::from_utf8_lossy(&during.stderr)
    );
    // The retry line (or the next night) sends what came in meanwhile.
    assert_eq!(host.nightly(), Some(0));
    assert_one_group_each(&sb, (1..151).map(|i| format!("ord_p{i:05}")));
    assert_eq!(count(&db, "SELECT count(*) FROM inbox"), 0);
    // Outside the group, nothing: not even a read.
    let peek = as_user(
        "kb-outsider",
        &format!(
            "python3 -c \"import sqlite3; sqlite3.connect('{}').execute('SELECT count(*) FROM inbox')\"",
            db.display()
        ),
    );
    assert!(!peek.status.success(), "an outsider read the queue");
    // The files the runs made are the group's too.
    for f in ["kohort-batch.db", "kohort-batch.db.lock"] {
        assert_eq!(
            meta(&host.path(&format!("/var/lib/kohort-batch/{f}"))),
            (0o660, producers_gid),
            "{f}"
        );
    }
    assert_eq!(
        meta(&host.path("/var/lib/kohort-batch-metrics/kohort_batch.prom")).0,
        0o644
    );
    let report =
        std::fs::read_to_string(host.path("/var/log/kohort-batch/last-report.txt")).unwrap();
    assert!(report.starts_with("kohort-batch run #"), "{report}");

    // A key file anyone else can read is refused before anything runs.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(host.nightly(), Some(2));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    // A key the API rejects, then the API down: "how did last night go" finds both.
    host.step("key", "sk_test_revoked_install\n");
    assert!(
        as_user("shop-backend", &producer(&db, 151, 153, 0.0))
            .status
            .success()
    );
    assert_eq!(host.nightly(), Some(3));
    let seen = host.step("last-night", "");
    let text = String::from_utf8_lossy(&seen.stdout);
    assert!(text.contains("the API rejected the key"), "{text}");
    host.step("key", "sk_test_nightly_install\n");
    let config = host.path("/etc/kohort-batch/config.toml");
    let live = std::fs::read_to_string(&config).unwrap();
    // The API down: the breaker stops the run before the rows spend their attempts,
    // so they stay pending (with two attempts each they could fail first).
    let down = live
        .replace(&sb.url(), "http://127.0.0.1:9")
        .replace("max-attempts = 2\n", "max-attempts = 8\n");
    std::fs::write(&config, down).unwrap();
    assert_eq!(host.nightly(), Some(3));
    let seen = host.step("last-night", "");
    let text = String::from_utf8_lossy(&seen.stdout);
    assert!(text.contains("the API looks unavailable"), "{text}");
    assert!(text.contains("\"exit_code\":3"), "{text}");

    // A row that failed in an outage, put right by the rerun commands. (The breaker
    // is set out of reach: this step is about rows that fail, not a run that stops.)
    assert!(live.contains("breaker = 3\n"), "{live}");
    std::fs::write(
        &config,
        live.replace("breaker = 3\n", "breaker = 1000000\n"),
    )
    .unwrap();
    sb.set_faults(SandboxConfig {
        error_503: 1.0,
        retry_after_secs: 0,
        ..SandboxConfig::default()
    });
    assert_eq!(host.nightly(), Some(1));
    assert!(count(&db, "SELECT count(*) FROM jobs WHERE state = 'failed'") > 0);
    sb.set_faults(SandboxConfig::default());
    std::fs::write(&config, live.clone()).unwrap();
    host.step("rerun", "");
    assert_eq!(
        count(&db, "SELECT count(*) FROM jobs WHERE state = 'failed'"),
        0
    );
    assert_one_group_each(&sb, (1..153).map(|i| format!("ord_p{i:05}")));
    let _ = std::fs::remove_file("/tmp/fix-me.csv");
}
