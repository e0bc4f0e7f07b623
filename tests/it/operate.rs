//! Operating the tool (issue 5): configuration precedence through the real binary,
//! the key never leaking, metrics, and logs.

use std::path::Path;

use kohort_batch::sandbox::SandboxConfig;

use crate::util::*;

#[test]
fn flags_beat_environment_beat_file_beat_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
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
    let bad = write(dir.path(), "bad.toml", "rate = \"fast\"\n");
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
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("k.db");
    let sb = sandbox(SandboxConfig {
        error_503: 0.2,
        retry_after_secs: 0,
        seed: 4,
        ..SandboxConfig::default()
    })
    .await;
    let csv = write(
        dir.path(),
        "o.csv",
        "customerId,orderId\ncus_1,ord_1\ncus_unknown_2,ord_2\n,ord_3\ncus_4,ord_4\n",
    );
    let key_file = write(dir.path(), "key", SENTINEL);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (dbs, csvs, url, kf) = (
        db.display().to_string(),
        csv.display().to_string(),
        sb.url(),
        key_file.display().to_string(),
    );
    let report = dir.path().join("r.json").display().to_string();
    let metrics = dir.path().join("m.prom").display().to_string();
    let env_key = vec![
        ("KOHORTPAY_API_KEY".to_owned(), SENTINEL.to_owned()),
        ("RUST_LOG".to_owned(), "trace".to_owned()),
    ];
    let file_key = vec![("RUST_LOG".to_owned(), "trace".to_owned())];
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    type Env = Vec<(String, String)>;
    let runs: Vec<(Vec<String>, Env)> = vec![
        (
            s(&[
                "run",
                "--db",
                &dbs,
                "--csv",
                &csvs,
                "--api-base",
                &url,
                "--rate",
                "0",
                "--settle",
                "100ms",
                "--report-json",
                &report,
                "--metrics-file",
                &metrics,
            ]),
            env_key.clone(),
        ),
        (
            s(&[
                "--log-format",
                "json",
                "retry-failed",
                "--db",
                &dbs,
                "--api-base",
                &url,
                "--rate",
                "0",
                "--settle",
                "100ms",
                "--api-key-file",
                &kf,
            ]),
            file_key.clone(),
        ),
        (
            s(&["enqueue", "--db", &dbs, "--csv", &csvs]),
            env_key.clone(),
        ),
        (s(&["validate", "--csv", &csvs, "--json"]), env_key.clone()),
        (s(&["report", "--last", "--db", &dbs]), env_key.clone()),
        (
            s(&["report", "--last", "--format", "json", "--db", &dbs]),
            env_key.clone(),
        ),
        (s(&["export", "groups", "--db", &dbs]), env_key.clone()),
        (
            s(&["export", "failures", "--format", "json", "--db", &dbs]),
            env_key.clone(),
        ),
        (s(&["config", "--api-key-file", &kf]), env_key.clone()),
        (
            s(&["run", "--db", &dbs, "--api-base", "http://example.com"]),
            env_key.clone(),
        ),
        (
            s(&["run", "--db", &dbs]),
            vec![(
                "KOHORTPAY_API_KEY".to_owned(),
                "sk_live_SENTINEL_7f3a9c2e".to_owned(),
            )],
        ),
    ];
    for (args, env) in runs {
        let out = bin_async(args.clone(), env).await;
        assert_no_sentinel(&format!("stdout of {args:?}"), &out.stdout);
        assert_no_sentinel(&format!("stderr of {args:?}"), &out.stderr);
        assert!(
            !out.stderr.is_empty() || !out.stdout.is_empty(),
            "{args:?} printed nothing"
        );
    }
    for file in ["k.db", "k.db-wal", "r.json", "m.prom"] {
        if let Ok(bytes) = std::fs::read(dir.path().join(file)) {
            assert_no_sentinel(file, &bytes);
        }
    }
    assert!(Path::new(&metrics).exists() && Path::new(&report).exists());
    // The key went out as a bearer header all the same.
    assert!(sb.stats(false).groups_total >= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_file_others_can_read_draws_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = write(dir.path(), "key", "sk_test_x");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let sb = sandbox(SandboxConfig::default()).await;
    let args = vec![
        "run".into(),
        "--db".into(),
        dir.path().join("k.db").display().to_string(),
        "--api-key-file".into(),
        key_file.display().to_string(),
        "--api-base".into(),
        sb.url(),
    ];
    let out = bin_async(args, vec![]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_one_line_per_failed_row_and_none_per_success() {
    let Scene { dir, db, csv, sb } = Scene::new(
        SandboxConfig::default(),
        &format!("{}cus_unknown_9,ord_00009,x\n", csv_rows(8)),
    )
    .await;
    let metrics = dir.path().join("m.prom");
    let args = vec![
        "--log-format".into(),
        "json".into(),
        "run".into(),
        "--db".into(),
        db.display().to_string(),
        "--csv".into(),
        csv.display().to_string(),
        "--api-base".into(),
        sb.url(),
        "--rate".into(),
        "0".into(),
        "--metrics-file".into(),
        metrics.display().to_string(),
    ];
    let out = bin_async(args, vec![("KOHORTPAY_API_KEY".into(), KEY.into())]).await;
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
    let dir = tempfile::tempdir().unwrap();
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
    let cert = write(dir.path(), "leaf.pem", &leaf.pem());
    let key = write(dir.path(), "leaf.key", &leaf_key.serialize_pem());
    let root = write(dir.path(), "root.pem", &ca.pem());
    let sb = sandbox(SandboxConfig {
        tls: Some((cert, key)),
        ..SandboxConfig::default()
    })
    .await;
    assert!(sb.url().starts_with("https://127.0.0.1:"));
    let csv = write(dir.path(), "o.csv", &csv_rows(3))
        .display()
        .to_string();

    let db = dir.path().join("a.db").display().to_string();
    let untrusted = bin_async(
        [
            "run",
            "--db",
            &db,
            "--csv",
            &csv,
            "--api-base",
            &sb.url(),
            "--max-attempts",
            "1",
        ]
        .map(String::from)
        .to_vec(),
        vec![("KOHORTPAY_API_KEY".into(), KEY.into())],
    )
    .await;
    assert_eq!(untrusted.status.code(), Some(1));
    let errors = column(Path::new(&db), "SELECT DISTINCT error FROM jobs");
    assert!(
        errors[0].contains("could not connect") && errors[0].to_lowercase().contains("certificate"),
        "{errors:?}"
    );
    assert_eq!(sb.stats(false).groups_total, 0);

    let db = dir.path().join("b.db").display().to_string();
    let root = root.display().to_string();
    let trusted = bin_async(
        [
            "run",
            "--db",
            &db,
            "--csv",
            &csv,
            "--api-base",
            &sb.url(),
            "--ca-cert",
            &root,
            "--rate",
            "0",
        ]
        .map(String::from)
        .to_vec(),
        vec![("KOHORTPAY_API_KEY".into(), KEY.into())],
    )
    .await;
    assert_eq!(
        trusted.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    assert_one_group_each(&sb, orders(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_standard_proxy_variables_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    // The sandbox plays the proxy: nothing listens at the API address itself, so a
    // group can only be created if the request went through HTTP_PROXY.
    let sb = sandbox(SandboxConfig::default()).await;
    let csv = write(dir.path(), "o.csv", &csv_rows(2))
        .display()
        .to_string();
    let db = dir.path().join("p.db").display().to_string();
    let out = bin_async(
        [
            "run",
            "--db",
            &db,
            "--csv",
            &csv,
            "--api-base",
            "http://127.0.0.2:9",
            "--rate",
            "0",
            "--max-attempts",
            "1",
        ]
        .map(String::from)
        .to_vec(),
        vec![
            ("KOHORTPAY_API_KEY".into(), KEY.into()),
            ("HTTP_PROXY".into(), sb.url()),
            ("NO_PROXY".into(), String::new()),
        ],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_one_group_each(&sb, orders(2));
}
