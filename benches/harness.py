#!/usr/bin/env python3
"""The kohort-batch benchmark harness (see BENCHMARKS.md).

Runs the release binary against its own sandbox on loopback and measures each
target of the performance issue as a ratio within one run, so a noisy machine does
not decide it. Inputs are generated here (never committed). Results: a Markdown
table on stdout and bench-out/results.json.

    python3 benches/harness.py            # everything (a few minutes)
    python3 benches/harness.py --quick    # smaller inputs, for a smoke test
    python3 benches/harness.py --only overhead rate
    python3 benches/harness.py --only overhead --bin /tmp/kb-old   # another build, for A/B
    python3 benches/harness.py --only pg-latency pg-overhead pg-import   # PostgreSQL backend

The pg-* targets start a throwaway PostgreSQL cluster of their own (initdb as the
`postgres` user when run as root) in bench-out/, on the real disk, with fsync and
synchronous_commit on, and stop it at the end, also on error.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-out"
BIN = ROOT / "target" / "release" / "kohort-batch"
KEY = "sk_test_bench"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_measured(cmd, env=None, stdout=subprocess.DEVNULL):
    """Runs cmd; returns (seconds, peak RSS in MB, exit code)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    return elapsed, usage.ru_maxrss / 1024.0, code


class Sandbox:
    def __init__(self, *knobs):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(BIN), "sandbox", "--listen", f"127.0.0.1:{self.port}", *knobs],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1).read()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the sandbox did not start")

    def stats(self):
        with urllib.request.urlopen(self.url + "/_sandbox/stats", timeout=30) as r:
            return json.load(r)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


def make_csv(path, rows, prefix="ord"):
    if path.exists() and path.stat().st_size > 0:
        with open(path) as f:
            if sum(1 for _ in f) == rows + 1:
                return path
    with open(path, "w") as f:
        f.write("customerId,orderId,metadata.campaign\n")
        for i in range(1, rows + 1):
            f.write(f"cus_{i:07d},{prefix}_{i:07d},spring\n")
    return path


def env_with_key():
    env = dict(os.environ)
    env["KOHORTPAY_API_KEY"] = KEY
    env.pop("KOHORT_BATCH_CONFIG", None)
    return env


def kb_run(sandbox, csv, db, *flags):
    """Runs `kohort-batch run`; returns (seconds, peak MB, exit, report)."""
    report = db.with_suffix(".json")
    for p in (db, Path(str(db) + "-wal"), Path(str(db) + "-shm"), report):
        if p.exists():
            p.unlink()
    cmd = [str(BIN), "run", "--db", str(db), "--csv", str(csv), "--api-base", sandbox.url,
           "--report-json", str(report), *flags]
    secs, mb, code = run_measured(cmd, env=env_with_key())
    return secs, mb, code, json.loads(report.read_text())


def pg_bindir():
    """KB_PG_BINDIR, else the highest /usr/lib/postgresql/*/bin, else PATH (as tests/it/pg.rs)."""
    if os.environ.get("KB_PG_BINDIR"):
        return Path(os.environ["KB_PG_BINDIR"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if not initdb:
        sys.exit("PostgreSQL is missing (no initdb): apt-get install postgresql, or set KB_PG_BINDIR")
    return Path(initdb).parent


class PgCluster:
    """A throwaway PostgreSQL cluster for one target: initdb into a temporary directory
    under bench-out/ (the real disk, not /dev/shm), default fsync=on and
    synchronous_commit=on (durability is part of what is measured), its own loopback
    port and socket directory; stopped and removed on exit, also on error. As root, the
    server programs run as the `postgres` user (initdb refuses root); psql runs as us.
    `--pg-option NAME=VALUE` adds server settings (for profiling, e.g.
    log_min_duration_statement=0), `--pg-keep` keeps the directory and its server log."""

    OPTIONS = []
    KEEP = False

    def __init__(self):
        self.bindir = pg_bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="pg-", dir=OUT))
        self.data, self.sock, self.log = self.dir / "data", self.dir / "s", self.dir / "log"
        self.port = free_port()
        self.started = False
        try:
            self.sock.mkdir()
            if os.geteuid() == 0:
                for p in (self.dir, self.sock):
                    shutil.chown(p, "postgres", "postgres")
            self._server("initdb", "-D", str(self.data), "-A", "trust", "-U", "kb", "-E", "UTF8",
                         "--locale=C")
            options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                       f"-c unix_socket_directories={self.sock} -c max_connections=100")
            options += "".join(f" -c {o}" for o in self.OPTIONS)
            self._server("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                         "-o", options, "start")
            self.started = True
            self.psql("postgres", "CREATE DATABASE kohort")
            self.settings = {k: self.psql("postgres", f"SHOW {k}") for k in
                             ("server_version", "fsync", "synchronous_commit", "full_page_writes",
                              "wal_level", "shared_buffers", "max_wal_size")}
            assert self.settings["fsync"] == "on" and self.settings["synchronous_commit"] == "on", \
                self.settings
        except BaseException:
            self.close()
            raise

    def _server(self, prog, *args):
        cmd = [str(self.bindir / prog), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            tail = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{prog} failed ({out.returncode}): {out.stderr.strip()}\n{tail}")

    def url(self, db="kohort"):
        return f"postgres://kb@127.0.0.1:{self.port}/{db}?sslmode=disable"

    def psql_cmd(self, db, *args):
        return [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", "127.0.0.1", "-p", str(self.port), "-U", "kb", "-d", db, *args]

    def psql(self, db, sql):
        out = subprocess.run(self.psql_cmd(db, "-c", sql), capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"psql failed on {sql!r}: {out.stderr.strip()}")
        return out.stdout.strip()

    def fresh_db(self, db="kohort"):
        """Drops and re-creates a database (a fresh schema for kohort-batch), then
        checkpoints, so no measurement pays for the one before it."""
        self.psql("postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        self.psql("postgres", f"CREATE DATABASE {db}")
        self.psql("postgres", "CHECKPOINT")
        return self.url(db)

    def describe(self):
        s = self.settings
        return (f"PostgreSQL {s['server_version'].split()[0]}, fsync {s['fsync']}, synchronous_commit "
                f"{s['synchronous_commit']}, shared_buffers {s['shared_buffers']}")

    def close(self):
        if self.started:
            self.started = False
            try:
                self._server("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
            except RuntimeError as e:
                print(f"warning: {e}", file=sys.stderr)
        if self.KEEP:
            print(f"PostgreSQL cluster kept in {self.dir} (server log: {self.log})", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def kb_run_pg(sandbox, csv, cluster, name, *flags):
    """`kohort-batch run` on a fresh PostgreSQL database; returns (seconds, peak MB, exit, report)."""
    url = cluster.fresh_db()
    report = OUT / f"{name}.json"
    if report.exists():
        report.unlink()
    cmd = [str(BIN), "run", "--db", url, "--csv", str(csv), "--api-base", sandbox.url,
           "--report-json", str(report), *flags]
    secs, mb, code = run_measured(cmd, env=env_with_key())
    return secs, mb, code, json.loads(report.read_text()) if report.exists() else None


def wrk_rate(url, connections, seconds):
    script = OUT / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.body = \'{"customerId":"cus_1","orderId":"ord_wrk"}\'\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {KEY}"\n'
    )
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url + "/groups"],
        capture_output=True, text=True, check=True,
    ).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def bench_overhead(args):
    """Alternates wrk and `run` (fresh sandbox each), three pairs, and reports the median
    of the per-pair ratios: the machine's speed drifts within minutes."""
    rows = 10_000 if args.quick else 50_000
    conc = 64
    pairs = 1 if args.quick else 3
    csv = make_csv(OUT / f"rows-{rows}.csv", rows)
    ratios, raws, rates = [], [], []
    for _ in range(pairs):
        with Sandbox() as sb:
            raw = wrk_rate(sb.url, conc, 5)
        with Sandbox() as sb:
            secs, mb, code, rep = kb_run(sb, csv, OUT / "overhead.db", "--rate", "0",
                                         "--concurrency", str(conc), "--precheck", "ambiguous")
            dup = sb.stats()["duplicate_keys"]
        assert code == 0 and dup == 0, (code, dup)
        raws.append(raw)
        rates.append(rows / secs)
        ratios.append(rows / secs / raw)
    mid = sorted(range(pairs), key=lambda i: ratios[i])[pairs // 2]
    ratio = ratios[mid]
    return {
        "name": "overhead",
        "what": f"`run` rows/s vs raw `wrk` POST /groups req/s, {rows:,} rows, concurrency {conc}, "
                f"no latency (median of {pairs} alternating pairs)",
        "measured": f"{rates[mid]:,.0f} rows/s vs {raws[mid]:,.0f} req/s "
                    f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})",
        "ratio": ratio, "target": ">= 0.5", "ok": ratio >= 0.5,
        "extra": {"ratios": ratios, "run_rows_per_sec": rates, "wrk_req_per_sec": raws},
    }


def bench_rate(args):
    rows = 1_000 if args.quick else 4_000
    csv = make_csv(OUT / f"rows-{rows}.csv", rows)
    with Sandbox() as sb:
        secs, mb, code, rep = kb_run(sb, csv, OUT / "rate.db", "--rate", "200", "--concurrency", "16")
        stats = sb.stats()
    assert code == 0 and stats["duplicate_keys"] == 0
    achieved = rep["requests"]["rate_per_sec"]
    peak = stats["max_starts_in_one_second"]
    ok = achieved >= 0.97 * 200 and peak <= 201
    return {
        "name": "rate",
        "what": f"`--rate 200`, {rows:,} rows (checks and creates: {rep['requests']['total']:,} requests)",
        "measured": f"{achieved:.1f} req/s achieved; at most {peak} starts in any 1 s",
        "ratio": achieved / 200, "target": ">= 0.97, and <= 201 starts/s", "ok": ok,
        "extra": {"max_starts_in_one_second": peak},
    }


def bench_latency(args):
    rows = 3_000 if args.quick else 10_000
    csv = make_csv(OUT / f"rows-{rows}.csv", rows)
    with Sandbox("--latency", "100ms") as sb:
        secs, mb, code, rep = kb_run(sb, csv, OUT / "latency.db", "--rate", "0", "--concurrency", "64",
                                     "--precheck", "ambiguous")
    assert code == 0
    per_sec = rows / secs
    return {
        "name": "latency",
        "what": f"sandbox latency 100 ms, concurrency 64, {rows:,} rows (bound: 640 rows/s)",
        "measured": f"{per_sec:,.0f} rows/s",
        "ratio": per_sec / 640, "target": ">= 0.9", "ok": per_sec / 640 >= 0.9,
        "extra": {"wall_secs": secs},
    }


def bench_import(args):
    rows = 200_000 if args.quick else 1_000_000
    csv = make_csv(OUT / f"rows-{rows}.csv", rows)
    ref_db = OUT / "sqlite-import.db"
    if ref_db.exists():
        ref_db.unlink()
    ref_secs, _, code = run_measured(["sqlite3", str(ref_db), ".mode csv", f".import {csv} t"])
    assert code == 0
    db = OUT / "enqueue.db"
    for p in (db, Path(str(db) + "-wal"), Path(str(db) + "-shm")):
        if p.exists():
            p.unlink()
    secs, mb, code = run_measured([str(BIN), "enqueue", "--db", str(db), "--csv", str(csv)], env=env_with_key())
    assert code == 0, code
    vsecs, vmb, vcode = run_measured([str(BIN), "validate", "--csv", str(csv)])
    assert vcode == 0, vcode
    return [
        {
            "name": "import",
            "what": f"`enqueue` of {rows:,} rows vs `sqlite3 .import` into a plain table",
            "measured": f"{secs:.1f} s vs {ref_secs:.1f} s",
            "ratio": secs / ref_secs, "target": "<= 2.0", "ok": secs / ref_secs <= 2.0,
            "extra": {"enqueue_peak_mb": mb},
        },
        {
            "name": "memory-enqueue",
            "what": f"peak RSS of `enqueue`, {rows:,} rows",
            "measured": f"{mb:.0f} MB", "ratio": mb / 100, "target": "<= 100 MB", "ok": mb <= 100,
        },
        {
            "name": "memory-validate",
            "what": f"peak RSS of `validate`, {rows:,} rows ({vsecs:.1f} s)",
            "measured": f"{vmb:.0f} MB", "ratio": vmb / 100, "target": "<= 100 MB", "ok": vmb <= 100,
        },
    ]


def bench_run_memory(args):
    rows = 10_000 if args.quick else 50_000
    csv = make_csv(OUT / f"rows-{rows}.csv", rows)
    with Sandbox() as sb:
        secs, mb, code, rep = kb_run(sb, csv, OUT / "memory.db", "--rate", "0", "--concurrency", "16")
    assert code == 0
    return {
        "name": "memory-run",
        "what": f"peak RSS of `run`, {rows:,} rows (precheck always)",
        "measured": f"{mb:.0f} MB", "ratio": mb / 100, "target": "<= 100 MB", "ok": mb <= 100,
    }


def bench_precheck(args):
    rows = 2_000 if args.quick else 5_000
    csv = make_csv(OUT / f"rows-{rows}.csv", rows)
    out = {}
    for mode in ("always", "ambiguous"):
        with Sandbox("--latency", "20ms") as sb:
            secs, mb, code, rep = kb_run(sb, csv, OUT / f"precheck-{mode}.db", "--rate", "0",
                                         "--concurrency", "16", "--precheck", mode)
        assert code == 0
        out[mode] = (rows / secs, rep["requests"]["total"])
    ratio = out["always"][0] / out["ambiguous"][0]
    return {
        "name": "precheck",
        "what": f"`--precheck always` vs `ambiguous`, {rows:,} rows, latency 20 ms, concurrency 16",
        "measured": f"{out['always'][0]:,.0f} vs {out['ambiguous'][0]:,.0f} rows/s "
                    f"({out['always'][1]:,} vs {out['ambiguous'][1]:,} requests)",
        "ratio": ratio, "target": "(informative)", "ok": True,
    }


def bench_economy(args):
    """Requests per created group and the check-to-create gap with batched checks."""
    results = []
    rows = 500 if args.quick else 2_000
    csv = make_csv(OUT / f"rows-{rows}.csv", rows)
    for mode in ("always", "ambiguous"):
        with Sandbox("--latency", "50ms") as sb:
            secs, mb, code, rep = kb_run(sb, csv, OUT / f"economy-{mode}.db", "--rate", "20",
                                         "--precheck", mode)
            stats = sb.stats()
        assert code == 0, code
        sent = sum(stats["requests"].values())
        per_group = sent / stats["groups_total"]
        gaps = rep.get("check_to_create") or {}
        limit = 1.1 if mode == "always" else 1.0
        measured = (f"{sent:,} requests for {stats['groups_total']:,} groups "
                    f"({stats['list_ids_asked']:,} ids asked in lists), {rows / secs:.1f} rows/s")
        if gaps:
            measured += (f"; check to create p50 {gaps['p50_ms']} ms, p99 {gaps['p99_ms']} ms, "
                         f"max {gaps['max_ms']} ms")
        ok = per_group <= limit and stats["duplicate_keys"] == 0
        if mode == "always":
            ok = ok and gaps.get("p99_ms", 10**9) <= 5_000
        results.append({
            "name": f"economy {mode}",
            "what": f"`--precheck {mode}`, `--rate 20`, {rows:,} fresh orders, latency 50 ms: "
                    "requests per group (sandbox count)" + (", check-to-create p99" if mode == "always" else ""),
            "measured": measured, "ratio": per_group,
            "target": f"≤ {limit}" + (" and p99 ≤ 5 s" if mode == "always" else ""), "ok": ok,
        })
    for rate, n in ((5, 100 if args.quick else 300), (50, 500 if args.quick else 2_000)):
        csv = make_csv(OUT / f"rows-{n}.csv", n)
        with Sandbox("--latency", "50ms") as sb:
            secs, mb, code, rep = kb_run(sb, csv, OUT / f"pace-{rate}.db", "--rate", str(rate))
            stats = sb.stats()
        assert code == 0, code
        bound = rate * 25 / 26
        results.append({
            "name": f"pace {rate}/s",
            "what": f"`--rate {rate}`, {n:,} fresh orders, latency 50 ms, precheck always "
                    f"(bound {bound:.2f} rows/s: 26 requests per 25 groups)",
            "measured": f"{n / secs:.2f} rows/s, {sum(stats['requests'].values()):,} requests",
            "ratio": n / secs / bound, "target": "(informative)", "ok": True,
        })
    return results


def bench_interrupted(args):
    """A run stopped early has spent its requests on creates, not on checks."""
    results = []
    rows = 500 if args.quick else 2_000
    # Interrupted: SIGINT after 15 s at the default rate; what the requests bought.
    csv = make_csv(OUT / f"rows-{rows}.csv", rows)
    with Sandbox("--latency", "50ms") as sb:
        db = OUT / "economy-interrupted.db"
        for p in (db, Path(str(db) + "-wal"), Path(str(db) + "-shm")):
            if p.exists():
                p.unlink()
        proc = subprocess.Popen([str(BIN), "run", "--db", str(db), "--csv", str(csv), "--api-base",
                                 sb.url, "-q"], env=env_with_key(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(15)
        proc.send_signal(signal.SIGINT)
        proc.wait()
        stats = sb.stats()
    sent = sum(stats["requests"].values())
    results.append({
        "name": "economy interrupted",
        "what": "default `--rate 5`, interrupted (SIGINT) after 15 s: groups created per request sent "
                "(sandbox count; 25/26 = 0.96 is the bound)",
        "measured": f"{stats['groups_total']} groups for {sent} requests",
        "ratio": stats["groups_total"] / max(sent, 1), "target": "≈ 25/26", "ok": stats["duplicate_keys"] == 0,
    })
    return results


def bench_pg_latency(args):
    rows = 3_000 if args.quick else 10_000
    conc, latency_ms = 32, 50
    bound = conc * 1000 / latency_ms
    csv = make_csv(OUT / f"rows-{rows}.csv", rows)
    with PgCluster() as pg:
        with Sandbox("--latency", f"{latency_ms}ms") as sb:
            secs, mb, code, rep = kb_run_pg(sb, csv, pg, "pg-latency", "--rate", "0",
                                            "--concurrency", str(conc), "--precheck", "ambiguous")
            dup = sb.stats()["duplicate_keys"]
        assert code == 0 and dup == 0, (code, dup)
        cluster = pg.describe()
    per_sec = rows / secs
    return {
        "name": "pg-latency",
        "what": f"PostgreSQL `run`, sandbox latency {latency_ms} ms, concurrency {conc}, no rate limit, "
                f"`--precheck ambiguous`, {rows:,} rows (bound C/L: {bound:,.0f} rows/s)",
        "measured": f"{per_sec:,.0f} rows/s",
        "ratio": per_sec / bound, "target": ">= 0.9", "ok": per_sec / bound >= 0.9,
        "extra": {"wall_secs": secs, "peak_mb": mb, "cluster": cluster},
    }


def bench_pg_overhead(args):
    """The `overhead` target's kb side, SQLite and PostgreSQL alternating (fresh sandbox
    and database each), median of each."""
    rows = 10_000 if args.quick else 50_000
    conc = 64
    rounds = 1 if args.quick else 3
    csv = make_csv(OUT / f"rows-{rows}.csv", rows)
    flags = ("--rate", "0", "--concurrency", str(conc), "--precheck", "ambiguous")
    lite, pgr = [], []
    with PgCluster() as pg:
        for _ in range(rounds):
            with Sandbox() as sb:
                secs, mb, code, rep = kb_run(sb, csv, OUT / "pg-overhead-sqlite.db", *flags)
                dup = sb.stats()["duplicate_keys"]
            assert code == 0 and dup == 0, (code, dup)
            lite.append(rows / secs)
            with Sandbox() as sb:
                secs, mb, code, rep = kb_run_pg(sb, csv, pg, "pg-overhead", *flags)
                dup = sb.stats()["duplicate_keys"]
            assert code == 0 and dup == 0, (code, dup)
            pgr.append(rows / secs)
        cluster = pg.describe()
    lmid, pmid = sorted(lite)[rounds // 2], sorted(pgr)[rounds // 2]
    return {
        "name": "pg-overhead",
        "what": f"`run` rows/s on PostgreSQL vs on SQLite, {rows:,} rows, concurrency {conc}, no latency, "
                f"`--precheck ambiguous` (medians of {rounds} alternating)",
        "measured": f"{pmid:,.0f} vs {lmid:,.0f} rows/s (PostgreSQL {', '.join(f'{r:,.0f}' for r in pgr)}; "
                    f"SQLite {', '.join(f'{r:,.0f}' for r in lite)})",
        "ratio": pmid / lmid, "target": "(informative)", "ok": True,
        "extra": {"pg_rows_per_sec": pgr, "sqlite_rows_per_sec": lite, "cluster": cluster},
    }


def bench_pg_import(args):
    """`enqueue` into a fresh PostgreSQL database vs psql `\\copy` of the same file into
    a plain table of three text columns (made fresh each time), alternating; the median
    of the per-pair ratios. Beside it, the floor: psql `\\copy` of the same rows, already
    shaped as jobs, into kohort-batch's own `jobs` table (its unique key and primary key
    maintained row by row), i.e. what PostgreSQL alone needs to hold them."""
    rows = 200_000 if args.quick else 1_000_000
    pairs = 1 if args.quick else 3
    csv = make_csv(OUT / f"rows-{rows}.csv", rows)
    shaped = OUT / f"rows-{rows}-as-jobs.csv"
    with open(csv) as src, open(shaped, "w") as dst:
        next(src)
        for line_no, line in enumerate(src, start=2):
            cus, order, campaign = line.rstrip("\n").split(",")
            meta = '"{""campaign"":""' + campaign + '""}"'
            dst.write(f'{cus},{order},,,,{meta},"",1,{line_no},pending,1,1,0\n')
    ratios, kb, ref, floor = [], [], [], []
    with PgCluster() as pg:
        pg.psql("postgres", "CREATE DATABASE plain")
        for _ in range(pairs):
            url = pg.fresh_db()
            secs, mb, code = run_measured([str(BIN), "enqueue", "--db", url, "--csv", str(csv)],
                                          env=env_with_key())
            assert code == 0, code
            n = int(pg.psql("kohort", "SELECT count(*) FROM kohort_batch.jobs WHERE state = 'pending'"))
            assert n == rows, n
            pg.psql("plain", "DROP TABLE IF EXISTS plain_table")
            pg.psql("plain", "CREATE TABLE plain_table (c1 text, c2 text, c3 text)")
            pg.psql("postgres", "CHECKPOINT")
            ref_secs, _, code = run_measured(pg.psql_cmd(
                "plain", "-c", f"\\copy plain_table FROM '{csv}' CSV HEADER"))
            assert code == 0, code
            n = int(pg.psql("plain", "SELECT count(*) FROM plain_table"))
            assert n == rows, n
            # The floor: the same rows straight into an empty `jobs` of the same schema.
            url = pg.fresh_db()
            code = subprocess.run([str(BIN), "init", "--db", url], stdout=subprocess.DEVNULL).returncode
            assert code == 0, code
            pg.psql("kohort", "INSERT INTO kohort_batch.sources (name) VALUES ('x')")
            pg.psql("postgres", "CHECKPOINT")
            floor_secs, _, code = run_measured(pg.psql_cmd(
                "kohort", "-c", "\\copy kohort_batch.jobs (customer_id, order_id, payment_intent_id, "
                "expires_at, mid_expire_at, metadata, raw, source_id, line, state, first_run_id, "
                f"last_run_id, updated_ms) FROM '{shaped}' CSV"))
            assert code == 0, code
            kb.append(secs)
            ref.append(ref_secs)
            floor.append(floor_secs)
            ratios.append(secs / ref_secs)
        cluster = pg.describe()
    mid = sorted(range(pairs), key=lambda i: ratios[i])[pairs // 2]
    ratio = ratios[mid]
    return {
        "name": "pg-import",
        "what": f"`enqueue` of {rows:,} rows into a fresh PostgreSQL database vs psql `\\copy` of the "
                f"same file into a plain table (median of {pairs} alternating pairs); floor: psql "
                f"`\\copy` of the same rows shaped as jobs into kohort-batch's `jobs`",
        "measured": f"{kb[mid]:.1f} s vs {ref[mid]:.1f} s (pairs: {', '.join(f'{r:.2f}' for r in ratios)}); "
                    f"floor {floor[mid]:.1f} s, enqueue/floor {kb[mid] / floor[mid]:.2f}",
        "ratio": ratio, "target": "<= 2.0", "ok": ratio <= 2.0,
        "extra": {"ratios": ratios, "enqueue_secs": kb, "copy_secs": ref, "floor_secs": floor,
                  "cluster": cluster},
    }


BENCHES = {
    "overhead": bench_overhead,
    "rate": bench_rate,
    "latency": bench_latency,
    "import": bench_import,
    "run-memory": bench_run_memory,
    "precheck": bench_precheck,
    "economy": bench_economy,
    "interrupted": bench_interrupted,
    "pg-latency": bench_pg_latency,
    "pg-overhead": bench_pg_overhead,
    "pg-import": bench_pg_import,
}


def machine():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} {platform.release()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller inputs (a smoke test, not the targets)")
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run only these")
    ap.add_argument("--no-build", action="store_true", help="use the existing release binary")
    ap.add_argument("--bin", type=Path, help="measure this binary (it serves the sandbox too); implies --no-build")
    ap.add_argument("--pg-option", action="append", default=[], metavar="NAME=VALUE",
                    help="an extra server setting for the pg-* clusters (profiling only)")
    ap.add_argument("--pg-keep", action="store_true", help="keep the pg-* clusters' directories and logs")
    args = ap.parse_args()
    PgCluster.OPTIONS, PgCluster.KEEP = args.pg_option, args.pg_keep
    # SIGTERM unwinds like Ctrl-C does: the PostgreSQL clusters are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    global BIN
    if args.bin:
        BIN = args.bin.resolve()
        args.no_build = True
    for tool in ("wrk", "sqlite3"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install {tool}")
    OUT.mkdir(exist_ok=True)
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "--quiet"], cwd=ROOT, check=True)
    results = []
    for name in args.only or list(BENCHES):
        print(f"... {name}", file=sys.stderr, flush=True)
        r = BENCHES[name](args)
        results.extend(r if isinstance(r, list) else [r])
    print(f"\nMachine: {machine()}\n")
    print("| target | what | measured | ratio | target | ok |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['what']} | {r['measured']} | {r['ratio']:.2f} | {r['target']} | "
              f"{'yes' if r['ok'] else '**no**'} |")
    (OUT / "results.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
