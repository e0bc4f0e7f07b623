//! The PostgreSQL backend (issue 16), against a throwaway cluster of its own per
//! test (`pg.rs`): every command with the same outputs and exit codes as on SQLite;
//! producers inserting from other connections while a run drains the inbox; the
//! advisory run lock; SIGKILLs and a server restart mid-run, counted by the sandbox.
//! Without PostgreSQL binaries each test prints one line and passes, unless
//! `KB_REQUIRE_POSTGRES=1` (CI) makes that a failure.

use std::time::Duration;

use kohort_batch::sandbox::SandboxConfig;

use crate::crash::{campaign, campaign_scene, campaign_size, campaign_verdict, spawn_run_on, wait};
use crate::pg::Cluster;
use crate::util::*;

/// A cluster for `test`, or `None` (skipped: `Cluster::start` said why).
fn cluster(test: &str) -> Option<Cluster> {
    Cluster::start(test)
}

/// `pg.psql(q)` from an async test: the worker thread's other tasks (the in-process
/// sandbox's) move to another thread while psql runs.
fn sql(pg: &Cluster, q: &str) -> String {
    tokio::task::block_in_place(|| pg.psql(q))
}

/// Whether no session holds an advisory lock (a killed run's is freed once the
/// server notices its session ended).
fn no_advisory_lock(pg: &Cluster) -> bool {
    sql(
        pg,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
    ) == "0"
}

/// A number psql printed.
fn number(text: &str) -> i64 {
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {text:?}"))
}

/// `cmd` on the database `db` instead of the scene's.
fn on(cmd: Cmd, db: &str) -> Cmd {
    cmd.set("--db", db)
}

/// What a run leaves that does not depend on timing: exit codes, the report's job
/// and import counts, `export failures`, the orders of `export groups` with how
/// each got its group, the dry run's plan, `retry-failed`.
async fn workflow(s: &Scene, db: &str, insert_inbox: impl Fn()) -> Vec<String> {
    let mut seen = Vec::new();
    let note = |seen: &mut Vec<String>, what: &str, out: &std::process::Output| {
        seen.push(format!("{what}: exit {:?}", out.status.code()));
    };
    let init = on(s.on_db(&["init"]), db).output().await;
    note(&mut seen, "init", &init);
    insert_inbox();
    let enqueue = on(s.enqueue(), db).output().await;
    note(&mut seen, "enqueue", &enqueue);
    let dry = on(s.bin_run(), db).arg("--dry-run").output().await;
    note(&mut seen, "dry run", &dry);
    seen.push(String::from_utf8_lossy(&dry.stdout).into_owned());
    let run = on(s.bin_run(), db).args(["--rate", "0"]).output().await;
    note(&mut seen, "run", &run);
    let report = on(s.report(&["--last", "--format", "json"]), db)
        .output()
        .await;
    note(&mut seen, "report", &report);
    let json: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    for part in ["jobs", "imported", "obtained", "problems"] {
        seen.push(format!("{part}: {}", json[part]));
    }
    let failures = on(s.export("failures", &[]), db).output().await;
    note(&mut seen, "export failures", &failures);
    let text = String::from_utf8_lossy(&failures.stdout)
        .replace(&s.dir.path().display().to_string(), "DIR");
    // The window of valid expiry times moves with the clock.
    seen.extend(
        text.lines()
            .map(|line| match line.split_once("from now (") {
                Some((head, tail)) => format!(
                    "{head}from now (…{}",
                    tail.split_once(')').map_or("", |t| t.1)
                ),
                None => line.to_owned(),
            }),
    );
    let groups = on(s.export("groups", &[]), db).output().await;
    note(&mut seen, "export groups", &groups);
    let text = String::from_utf8_lossy(&groups.stdout).into_owned();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    for r in reader.records() {
        let r = r.unwrap();
        seen.push(format!("group of {} {}: {}", &r[0], &r[1], &r[8]));
    }
    let retry = on(s.bin_retry_failed(), db).output().await;
    note(&mut seen, "retry-failed", &retry);
    // The failures fixed in "a spreadsheet" and fed back: fixes replace the invalid rows.
    let fixed = String::from_utf8_lossy(&failures.stdout)
        .replace("\n,ord_2026_90001,", "\ncus_fixed_1,ord_2026_90001,")
        .replace("next tuesday", "");
    let fix = s.write("fix.csv", &fixed);
    let rerun = on(s.bin_run_queue(), db)
        .flag("--csv", &fix)
        .args(["--rate", "0"])
        .output()
        .await;
    note(&mut seen, "run of the fixed failures", &rerun);
    let report = on(s.report(&["--last", "--format", "json"]), db)
        .output()
        .await;
    let json: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    seen.push(format!(
        "after the fixes: {} {}",
        json["imported"], json["jobs"]
    ));
    let listed = on(s.report(&[]), db).output().await;
    note(&mut seen, "report (list)", &listed);
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_gives_the_same_outputs_and_exit_codes_on_postgres_as_on_sqlite() {
    let Some(pg) = cluster("every_command_gives_the_same_outputs…") else {
        return;
    };
    let csv = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/samples/orders.csv"))
        .unwrap();
    let insert = "INSERT INTO inbox (customer_id, order_id, metadata) \
                  VALUES ('cus_q1', 'ord_q_1', '{\"campaign\":\"queue\"}'), ('cus_q2', NULL, NULL)";
    let lite = Scene::new(SandboxConfig::default(), &csv).await;
    let lite_db = lite.db.display().to_string();
    let on_sqlite = workflow(&lite, &lite_db, || {
        rusqlite::Connection::open(&lite.db)
            .unwrap()
            .execute_batch(insert)
            .unwrap();
    })
    .await;
    let post = Scene::new(SandboxConfig::default(), &csv).await;
    let on_postgres = workflow(&post, &pg.url(), || {
        sql(&pg, insert);
    })
    .await;
    assert!(
        on_sqlite.iter().any(|l| l.starts_with("run: exit Some(1)")),
        "{on_sqlite:#?}"
    );
    assert!(
        on_sqlite
            .iter()
            .any(|l| l.starts_with("after the fixes: ") && l.contains("\"fixed\":3")),
        "{on_sqlite:#?}"
    );
    assert_eq!(on_postgres, on_sqlite);
    // The record is in PostgreSQL, and only there.
    assert_eq!(
        number(&sql(
            &pg,
            "SELECT count(*) FROM jobs WHERE state = 'succeeded'"
        )),
        count(
            &lite.db,
            "SELECT count(*) FROM jobs WHERE state = 'succeeded'"
        )
    );
    assert_eq!(number(&sql(&pg, "SELECT count(*) FROM inbox")), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn producers_insert_from_another_connection_during_a_run_and_no_row_is_lost_or_sent_twice() {
    let Some(pg) = cluster("producers_insert_from_another_connection…") else {
        return;
    };
    let url = pg.url();
    let s = Scene::new(slow(40), "customerId,orderId\n").await;
    assert_eq!(
        on(s.on_db(&["init"]), &url).output().await.status.code(),
        Some(0)
    );
    sql(
        &pg,
        "INSERT INTO inbox (customer_id, order_id) \
         SELECT 'cus_' || i, 'ord_before_' || i FROM generate_series(1, 150) AS i",
    );
    // A producer on its own connection: one row every 10 ms until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let url = format!("{url}?options=-csearch_path%3Dkohort_batch");
        let stop = stop.clone();
        tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            let mut made = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                made += 1;
                client
                    .execute(
                        "INSERT INTO inbox (customer_id, order_id) VALUES ($1, $2)",
                        &[&format!("cus_p{made}"), &format!("ord_during_{made}")],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("insert {made} failed during the run: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            made
        })
    };
    let first = on(s.bin_run_queue(), &url)
        .args(["--rate", "0", "--concurrency", "4"])
        .output()
        .await;
    assert_eq!(first.status.code(), Some(0), "{}", all_text(&first));
    let during_first_run = number(&sql(&pg, "SELECT count(*) FROM inbox"));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let made = producer.await.unwrap();
    assert!(
        during_first_run > 10,
        "the producer wrote {during_first_run} rows while the run went on"
    );
    // The run moved the rows there at its start, and left every later one.
    let moved = number(&sql(
        &pg,
        "SELECT count(*) FROM jobs j JOIN sources s ON s.id = j.source_id WHERE s.name = 'inbox'",
    ));
    let newest_moved = number(&sql(
        &pg,
        "SELECT max(line) FROM jobs j JOIN sources s ON s.id = j.source_id WHERE s.name = 'inbox'",
    ));
    let oldest_left = number(&sql(&pg, "SELECT min(id) FROM inbox"));
    assert!(moved >= 150, "{moved}");
    assert!(newest_moved < oldest_left, "{newest_moved} {oldest_left}");
    let second = on(s.bin_run_queue(), &url)
        .args(["--rate", "0", "--concurrency", "4"])
        .output()
        .await;
    assert_eq!(second.status.code(), Some(0), "{}", all_text(&second));
    assert_eq!(number(&sql(&pg, "SELECT count(*) FROM inbox")), 0);
    let mut all: Vec<String> = (1..=150).map(|i| format!("ord_before_{i}")).collect();
    all.extend((1..=made).map(|i| format!("ord_during_{i}")));
    assert_one_group_each(&s.sb, all.iter().cloned());
    assert_eq!(s.sb.stats(false).groups_total, all.len() as u64);
    assert_eq!(
        number(&sql(
            &pg,
            "SELECT count(*) FROM jobs WHERE state = 'succeeded'"
        )),
        all.len() as i64
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_run_exits_5_naming_the_holder_and_the_server_frees_the_lock_of_a_killed_run() {
    let Some(pg) = cluster("a_second_run_exits_5…") else {
        return;
    };
    let url = pg.url();
    // The first run cannot finish before it is killed: 60 rows, one at a time, 300 ms each.
    let s = Scene::new(slow(300), &csv_rows(60)).await;
    assert_eq!(
        on(s.on_db(&["init"]), &url).output().await.status.code(),
        Some(0)
    );
    let mut first = spawn_run_on(&s, Some(&url), &["--concurrency", "1"]);
    until("the first run to hold the lock", || {
        sql(&pg, "SELECT count(*) FROM lock").trim() == "1"
    })
    .await;
    let second = on(s.bin_run_queue(), &url).output().await;
    let text = all_text(&second);
    assert_eq!(second.status.code(), Some(5), "{text}");
    assert!(
        text.contains("in use by another kohort-batch run (run 1, pid")
            && text.contains("PostgreSQL session")
            && text.contains("advisory lock"),
        "{text}"
    );
    first.kill().unwrap(); // SIGKILL: the server ends its session, and the lock with it
    first.wait().unwrap();
    until("the server to notice the session's end", || {
        no_advisory_lock(&pg)
    })
    .await;
    let third = on(s.bin_run_queue(), &url)
        .args(["--rate", "0", "--concurrency", "16"])
        .output()
        .await;
    assert_eq!(third.status.code(), Some(0), "{}", all_text(&third));
    assert_one_group_each(&s.sb, orders(60));
    assert!(
        sql(&pg, "SELECT stopped FROM runs WHERE id = 1")
            .contains("the process ended before the run finished")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_restart_mid_run_stops_it_with_74_and_a_rerun_finishes_without_duplicates() {
    let Some(pg) = cluster("a_server_restart_mid_run…") else {
        return;
    };
    let url = pg.url();
    let s = Scene::new(slow(100), &csv_rows(200)).await;
    let child = spawn_run_on(&s, Some(&url), &["--concurrency", "4"]);
    until("some groups", || s.sb.stats(false).groups_total >= 20).await;
    tokio::task::block_in_place(|| pg.restart_fast());
    let out = wait(child).await;
    let text = all_text(&out);
    assert_eq!(out.status.code(), Some(74), "{text}");
    assert!(
        text.contains("PostgreSQL server") && text.contains("rows not sent stay pending"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    let rerun = on(s.bin_run_queue(), &url)
        .args(["--rate", "0", "--concurrency", "8"])
        .output()
        .await;
    assert_eq!(rerun.status.code(), Some(0), "{}", all_text(&rerun));
    assert_one_group_each(&s.sb, orders(200));
    assert_eq!(s.sb.stats(false).groups_total, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_campaign_on_postgres_never_duplicates_and_never_loses_a_row() {
    let Some(pg) = cluster("sigkill_campaign_on_postgres…") else {
        return;
    };
    let (rows, kills) = campaign_size(1000, 12);
    let s = campaign_scene(rows).await;
    let code = campaign(&s, Some(&pg.url()), kills, || no_advisory_lock(&pg)).await;
    let succeeded = number(&sql(
        &pg,
        "SELECT count(*) FROM jobs WHERE state = 'succeeded'",
    ));
    let recovered = number(&sql(
        &pg,
        "SELECT count(*) FROM jobs WHERE obtained = 'recovered'",
    ));
    println!("on PostgreSQL:");
    campaign_verdict(&s, rows, kills, code, succeeded, recovered);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_record_goes_in_its_own_schema_and_another_applications_tables_are_never_touched() {
    let Some(pg) = cluster("the_record_goes_in_its_own_schema…") else {
        return;
    };
    sql(
        &pg,
        "CREATE TABLE public.jobs (id int, note text); \
         INSERT INTO public.jobs VALUES (7, 'the shop''s')",
    );
    let s = Scene::offline("customerId,orderId\ncus_1,ord_1\n");
    let public_tables = || {
        sql(
            &pg,
            "SELECT string_agg(table_name::text, ',') FROM information_schema.tables \
             WHERE table_schema = 'public'",
        )
    };
    // Told to use `public`, which holds the shop's `jobs`: refused, nothing changed.
    let public = format!("{}?options=-csearch_path%3Dpublic", pg.url());
    let out = on(s.on_db(&["init"]), &public).output_blocking();
    let text = all_text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("holds tables of another application (jobs)") && text.contains("search_path"),
        "{text}"
    );
    assert_eq!(public_tables(), "jobs");
    // A URL naming no schema: the record goes in `kohort_batch`, made by init.
    assert_eq!(
        on(s.on_db(&["init"]), &pg.url())
            .output_blocking()
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        on(s.enqueue(), &pg.url()).output_blocking().status.code(),
        Some(0)
    );
    assert_eq!(
        number(&sql(&pg, "SELECT count(*) FROM kohort_batch.jobs")),
        1
    );
    assert_eq!(sql(&pg, "SELECT note FROM public.jobs"), "the shop's");
    assert_eq!(public_tables(), "jobs");
    // A schema named as PostgreSQL reads it: `Shop_A` unquoted is shop_a.
    let named = format!("{}?options=-csearch_path%3DShop_A", pg.url());
    let out = on(s.enqueue(), &named).output_blocking();
    assert_eq!(out.status.code(), Some(0), "{}", all_text(&out));
    assert_eq!(number(&sql(&pg, "SELECT count(*) FROM shop_a.jobs")), 1);
    // Reading a schema no run made is refused, and makes nothing.
    let other = format!("{}?options=-csearch_path%3Dnobody", pg.url());
    let out = on(s.report(&[]), &other).output_blocking();
    assert_eq!(out.status.code(), Some(2), "{}", all_text(&out));
    assert_eq!(
        number(&sql(
            &pg,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'nobody'"
        )),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_url_naming_no_schema_never_quietly_starts_a_second_record() {
    let Some(pg) = cluster("a_url_naming_no_schema…") else {
        return;
    };
    let s = Scene::offline("customerId,orderId\ncus_1,ord_1\n");
    let shop = format!("{}?options=-csearch_path%3Dshop", pg.url());
    assert_eq!(
        on(s.enqueue(), &shop).output_blocking().status.code(),
        Some(0)
    );
    // The same database without the schema in the URL: refused, naming where the
    // record is, and nothing made.
    let out = on(s.enqueue(), &pg.url()).output_blocking();
    let text = all_text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("holds a kohort-batch record in schema shop")
            && text.contains("csearch_path%3Dshop"),
        "{text}"
    );
    assert_eq!(
        sql(
            &pg,
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'kohort_batch'"
        ),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_password_in_the_url_never_shows_in_output_logs_or_the_record() {
    let Some(pg) = cluster("a_password_in_the_url_never_shows…") else {
        return;
    };
    // Trust authentication: the server never asks for it, but it is in the URL.
    let url = pg
        .url()
        .replacen("postgres://kb@", "postgres://kb:s3cr3t-pw@", 1);
    let s = Scene::new(slow(200), &csv_rows(5)).await;
    let run = on(s.bin_run(), &url)
        .args(["-v", "--rate", "0"])
        .output()
        .await;
    let report = on(s.report(&["--last", "--format", "json"]), &url)
        .output()
        .await;
    // A run holding the lock (40 more rows, one at a time), and a second one refused.
    let more = s.write("more.csv", &csv_rows(45));
    let mut holder = on(s.bin_run_queue(), &url)
        .flag("--csv", &more)
        .args(["--concurrency", "1"])
        .command()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    until("the holder to take the lock", || {
        sql(&pg, "SELECT count(*) FROM lock") == "1"
    })
    .await;
    let locked = on(s.bin_run_queue(), &url).output().await;
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(locked.status.code(), Some(5), "{}", all_text(&locked));
    for out in [&run, &report, &locked] {
        let text = all_text(out);
        assert!(!text.contains("s3cr3t"), "{text}");
    }
    assert_eq!(run.status.code(), Some(0), "{}", all_text(&run));
    assert!(all_text(&run).contains("kb:***@"), "{}", all_text(&run));
    let stored = sql(
        &pg,
        "SELECT string_agg(options || coalesce(report, ''), ' ') FROM runs",
    );
    assert!(!stored.contains("s3cr3t") && !stored.is_empty(), "{stored}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_as_sslmode_asks_verified_against_sslrootcert_or_ca_cert() {
    let Some(pg) = cluster("tls_as_sslmode_asks…") else {
        return;
    };
    let ca = rcgen::CertifiedIssuer::self_signed(
        {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "kohort-batch test database root");
            p
        },
        rcgen::KeyPair::generate().unwrap(),
    )
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    // The server reads its certificate as its own user (postgres, when tests run as
    // root), and refuses a key others can read.
    let certs = tempfile::tempdir().unwrap();
    let crt = write(certs.path(), "server.crt", &leaf.pem());
    let key_file = write(certs.path(), "server.key", &key.serialize_pem());
    let root = write(certs.path(), "root.pem", &ca.pem());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(certs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    if let Some((uid, gid)) = pg.server_user() {
        for f in [&crt, &key_file] {
            std::os::unix::fs::chown(f, Some(uid), Some(gid)).unwrap();
        }
    }
    sql(
        &pg,
        &format!(
            "ALTER SYSTEM SET ssl = on;\nALTER SYSTEM SET ssl_cert_file = '{}';\n\
         ALTER SYSTEM SET ssl_key_file = '{}';",
            crt.display(),
            key_file.display()
        ),
    );
    tokio::task::block_in_place(|| pg.restart_fast());
    let s = Scene::new(SandboxConfig::default(), &csv_rows(3)).await;
    let base = pg.url();
    // TLS required, the server's CA unknown: refused before anything is written.
    let refused = on(s.on_db(&["init"]), &format!("{base}?sslmode=require"))
        .output()
        .await;
    let text = all_text(&refused);
    assert_eq!(refused.status.code(), Some(74), "{text}");
    assert!(
        text.contains("certificate") && text.contains("sslrootcert"),
        "{text}"
    );
    // The CA in the URL: verified.
    let with_root = format!("{base}?sslmode=verify-full&sslrootcert={}", root.display());
    let init = on(s.on_db(&["init"]), &with_root).output().await;
    assert_eq!(init.status.code(), Some(0), "{}", all_text(&init));
    // The CA as --ca-cert, for a run.
    let run = on(s.bin_run(), &format!("{base}?sslmode=require"))
        .flag("--ca-cert", &root)
        .args(["--rate", "0"])
        .output()
        .await;
    assert_eq!(run.status.code(), Some(0), "{}", all_text(&run));
    assert_one_group_each(&s.sb, orders(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dry_run_plans_the_same_checks_on_postgres_as_on_sqlite() {
    let Some(pg) = cluster("the_dry_run_plans_the_same_checks…") else {
        return;
    };
    // Order ids a list may ask for (plain: letters, digits, `_ - .`) and ids asked
    // alone: each backend decides in its own SQL, by the client's rule.
    let ids = [
        "ord_1", "A-b.c_9", "a b", "\"a,b\"", "a%b", "a:b", "a*b", "a[b", "ordé", "a'b",
    ];
    let mut csv = String::from("customerId,orderId\n");
    for (i, id) in ids.iter().enumerate() {
        csv.push_str(&format!("cus_{i},{id}\n"));
    }
    let s = Scene::new(SandboxConfig::default(), &csv).await;
    let plan = |db: String| {
        let cmd = on(s.bin_run(), &db).arg("--dry-run");
        async move { String::from_utf8_lossy(&cmd.output().await.stdout).into_owned() }
    };
    let on_sqlite = plan(s.db.display().to_string()).await;
    let on_postgres = plan(pg.url()).await;
    assert!(
        on_sqlite.contains("Would send 10 jobs (10 checked first"),
        "{on_sqlite}"
    );
    assert_eq!(on_postgres, on_sqlite);
}

/// Needs no server: clap's help and its refusal of a value are where a password
/// given in `KOHORT_BATCH_DB` or `--db` could otherwise show.
#[test]
fn the_help_and_a_refused_url_never_show_a_password() {
    let secret = "postgres://kb:s3cr3t-pw@db.internal/shop";
    let help = Cmd::new(&["run", "--help"])
        .env("KOHORT_BATCH_DB", secret)
        .output_blocking();
    assert_eq!(help.status.code(), Some(0));
    for bad in [
        "postgres://kb:s3cr3t-pw@/shop",
        "postgres://kb:s3cr3t-pw@[::1/shop",
        "postgres://kb:s3cr3t-pw@h:99999/shop",
    ] {
        let on_line = Cmd::new(&["report", "--db", bad]).output_blocking();
        let in_env = Cmd::new(&["report"])
            .env("KOHORT_BATCH_DB", bad)
            .output_blocking();
        for out in [&on_line, &in_env] {
            let text = all_text(out);
            assert_eq!(out.status.code(), Some(2), "{text}");
            assert!(text.contains("--db") && !text.contains("s3cr3t"), "{text}");
        }
    }
    assert!(!all_text(&help).contains("s3cr3t"), "{}", all_text(&help));
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_failed_picks_the_same_jobs_on_postgres_as_on_sqlite() {
    let Some(pg) = cluster("retry_failed_picks_the_same_jobs…") else {
        return;
    };
    // Failures of three classes (a 404 customer, a 400, an unknown order), and rows
    // that succeed.
    let csv = "customerId,orderId\n\
               cus_unknown_1,ord_a_1\ncus_reject_2,ord_a_2\ncus_3,ord_unknown_3\n\
               cus_4,ord_a_4\ncus_5,ord_a_5\n";
    let filters: [&[&str]; 6] = [
        &[],
        &["--status", "404"],
        &["--status", "400", "--status", "404"],
        &["--class", "order_not_found"],
        &["--transport"],
        &["--include-unknown"],
    ];
    let mut plans = Vec::new();
    for backend in ["sqlite", "postgres"] {
        let s = Scene::new(SandboxConfig::default(), csv).await;
        let db = match backend {
            "sqlite" => s.db.display().to_string(),
            _ => pg.url(),
        };
        let run = on(s.bin_run(), &db).args(["--rate", "0"]).output().await;
        assert_eq!(run.status.code(), Some(1), "{}", all_text(&run));
        let mut seen = Vec::new();
        for filter in filters {
            let plan = on(s.bin_retry_failed(), &db)
                .args(filter)
                .arg("--dry-run")
                .output()
                .await;
            seen.push(format!(
                "{filter:?}: exit {:?}\n{}",
                plan.status.code(),
                String::from_utf8_lossy(&plan.stdout)
            ));
        }
        plans.push(seen);
    }
    assert_eq!(plans[1], plans[0]);
    // The filters pick different jobs: the comparison means something.
    let distinct: std::collections::BTreeSet<&str> = plans[0]
        .iter()
        .map(|p| p.split_once('\n').map_or("", |(_, plan)| plan))
        .collect();
    assert!(distinct.len() >= 3, "{:#?}", plans[0]);
}
