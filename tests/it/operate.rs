//! Operating the tool (issue 5): configuration precedence through the real binary,
//! the key never leaking, metrics, and logs.

use kohort_batch::sandbox::SandboxConfig;

use crate::util::*;

#[test]
fn flags_beat_environment_beat_file_beat_defaults() {
    let s = Scene::offline("");
    let file = s.write(
        "c.toml",
        "api-base = \"https://file.example\"\ndb = \"/file.db\"\nrate = 3\nconcurrency = 7\n",
    );
    let f = file.display().to_string();
    let env = [
        ("KOHORTPAY_API_BASE", "https://env.example"),
        ("KOHORT_BATCH_DB", "/env.db"),
    ];
    type Case<'a> = (
        &'a str,
        Vec<&'a str>,
        Vec<(&'a str, &'a str)>,
        (&'a str, &'a str, f64, u64),
    );
    let cases: Vec<Case> = vec![
        (
            "defaults",
            vec!["config"],
            vec![],
            ("https://api.kohortpay.com", "kohort-batch.db", 5.0, 4),
        ),
        (
            "file",
            vec!["config", "--config", &f],
            vec![],
            ("https://file.example", "/file.db", 3.0, 7),
        ),
        (
            "file via env",
            vec!["config"],
            vec![("KOHORT_BATCH_CONFIG", f.as_str())],
            ("https://file.example", "/file.db", 3.0, 7),
        ),
        (
            "env over file",
            vec!["config", "--config", &f],
            env.to_vec(),
            ("https://env.example", "/env.db", 3.0, 7),
        ),
        (
            "flags over env",
            vec![
                "config",
                "--config",
                &f,
                "--api-base",
                "https://flag.example",
                "--db",
                "/flag.db",
                "--rate",
                "9",
            ],
            env.to_vec(),
            ("https://flag.example", "/flag.db", 9.0, 7),
        ),
    ];
    for (name, args, env, (base, db, rate, conc)) in cases {
        let out = bin(&args, &env);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["settings"]["api_base"], base, "{name}");
        assert_eq!(v["db"], db, "{name}");
        assert_eq!(v["settings"]["engine"]["rate"], rate, "{name}");
        assert_eq!(v["settings"]["engine"]["concurrency"], conc, "{name}");
    }
    let bad = s.write("bad.toml", "rate = \"fast\"\n");
    let out = bin(&["run", "--config", &bad.display().to_string()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml: key rate: invalid value 'fast'"),
        "{err}"
    );
}

const SENTINEL: &str = "sk_test_SENTINEL_7f3a9c2e";

fn assert_no_sentinel(what: &str, bytes: &[u8]) {
    let hay = String::from_utf8_lossy(bytes);
    assert!(
        !hay.contains("SENTINEL_7f3a9c2e"),
        "the key leaked into {what}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_key_appears_nowhere() {
    let s = Scene::new(
        some_503s(0.2, 0, 4),
        "customerId,orderId\ncus_1,ord_1\ncus_unknown_2,ord_2\n,ord_3\ncus_4,ord_4\n",
    )
    .await;
    let key_file = s.write("key", SENTINEL);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (report, metrics) = (s.path("r.json"), s.path("m.prom"));
    // The key in the environment, with every log line on.
    let leaky = |cmd: Cmd| cmd.key(SENTINEL).env("RUST_LOG", "trace");
    let runs = [
        leaky(s.bin_run())
            .args(["--rate", "0", "--settle", "100ms"])
            .flag("--report-json", &report)
            .flag("--metrics-file", &metrics),
        s.bin_retry_failed()
            .args(["--log-format", "json", "--rate", "0", "--settle", "100ms"])
            .flag("--api-key-file", &key_file)
            .no_key()
            .env("RUST_LOG", "trace"),
        leaky(s.enqueue()),
        leaky(s.validate().arg("--json")),
        leaky(s.report(&["--last"])),
        leaky(s.report(&["--last", "--format", "json"])),
        leaky(s.export("groups", &[])),
        leaky(s.export("failures", &["--format", "json"])),
        leaky(Cmd::new(&["config"]).flag("--api-key-file", &key_file)),
        leaky(s.on_db(&["run"]).args(["--api-base", "http://example.com"])),
        s.on_db(&["run"]).key("sk_live_SENTINEL_7f3a9c2e"),
    ];
    for cmd in runs {
        let args = cmd.argv().to_vec();
        let out = cmd.output().await;
        assert_no_sentinel(&format!("stdout of {args:?}"), &out.stdout);
        assert_no_sentinel(&format!("stderr of {args:?}"), &out.stderr);
        assert!(
            !out.stderr.is_empty() || !out.stdout.is_empty(),
            "{args:?} printed nothing"
        );
    }
    for file in ["k.db", "k.db-wal", "r.json", "m.prom"] {
        if let Ok(bytes) = std::fs::read(s.path(file)) {
            assert_no_sentinel(file, &bytes);
        }
    }
    assert!(metrics.exists() && report.exists());
    // The key went out as a bearer header all the same.
    assert!(s.sb.stats(false).groups_total >= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_file_others_can_read_draws_a_warning() {
    let s = Scene::new(SandboxConfig::default(), "").await;
    let key_file = s.write("key", "sk_test_x");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = s
        .bin_run_queue()
        .flag("--api-key-file", &key_file)
        .no_key()
        .output()
        .await;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_one_line_per_failed_row_and_none_per_success() {
    let s = Scene::new(
        SandboxConfig::default(),
        &format!("{}cus_unknown_9,ord_00009,x\n", csv_rows(8)),
    )
    .await;
    let metrics = s.path("m.prom");
    let out = s
        .bin_run()
        .args(["--log-format", "json", "--rate", "0"])
        .flag("--metrics-file", &metrics)
        .output()
        .await;
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let failed: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["message"] == "row failed")
        .collect();
    assert_eq!(failed.len(), 1, "{lines:#?}");
    let f = failed[0];
    assert_eq!(f["key"], "ord_00009");
    assert_eq!(f["level"], "WARN");
    assert!(f["reason"].as_str().unwrap().contains("HTTP 404"));
    assert!(f["requests"].as_u64().unwrap() >= 1 && f["latency_ms"].as_f64().is_some());
    assert_eq!(f["span"]["run"], 1, "{f}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["level"] == "WARN" || l["level"] == "ERROR")
            .count(),
        1
    );
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        prom.contains("kohort_batch_last_run_jobs{state=\"succeeded\"} 8\n"),
        "{prom}"
    );
    assert!(prom.contains("kohort_batch_last_run_jobs{state=\"failed\"} 1\n"));
    assert!(prom.contains("kohort_batch_last_run_exit_code 1\n"));
    assert!(
        !prom.contains("last_success_timestamp"),
        "no run has succeeded yet"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_with_a_private_root_and_a_refusal_without_it() {
    let ca = rcgen::CertifiedIssuer::self_signed(
        {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "kohort-batch test root");
            p
        },
        rcgen::KeyPair::generate().unwrap(),
    )
    .unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let s = Scene::with_files(&csv_rows(3), |dir| {
        let cert = write(dir, "leaf.pem", &leaf.pem());
        let key = write(dir, "leaf.key", &leaf_key.serialize_pem());
        SandboxConfig {
            tls: Some((cert, key)),
            ..SandboxConfig::default()
        }
    })
    .await;
    let root = s.write("root.pem", &ca.pem());
    assert!(s.url().starts_with("https://127.0.0.1:"));

    // An untrusted certificate stops the run (exit 3) and fails no row: every request
    // would fail alike, and the message says to give --ca-cert.
    let untrusted = s.run_bin(&[]).await;
    assert_eq!(untrusted.status.code(), Some(3));
    let said = all_text(&untrusted);
    assert!(
        said.contains("TLS certificate is not trusted") && said.contains("--ca-cert"),
        "{said}"
    );
    assert_eq!(
        column(&s.db, "SELECT DISTINCT state FROM jobs"),
        ["pending"]
    );
    assert_eq!(s.sb.stats(false).groups_total, 0);

    let trusted = s
        .bin_run()
        .set("--db", s.path("b.db"))
        .flag("--ca-cert", &root)
        .args(["--rate", "0"])
        .output()
        .await;
    assert_eq!(
        trusted.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    assert_one_group_each(&s.sb, orders(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_standard_proxy_variables_are_honoured() {
    // The sandbox plays the proxy: nothing listens at the API address itself, so a
    // group can only be created if the request went through HTTP_PROXY.
    let s = Scene::new(SandboxConfig::default(), &csv_rows(2)).await;
    let out = s
        .bin_run()
        .set("--api-base", "http://127.0.0.2:9")
        .args(["--rate", "0", "--max-attempts", "1"])
        .env("HTTP_PROXY", s.url())
        .env("NO_PROXY", "")
        .output()
        .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_one_group_each(&s.sb, orders(2));
}
