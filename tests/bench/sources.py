#!/usr/bin/env python3
"""Benchmark of Sluice's new data sources, side by side, in one run.

A. PostgreSQL. The demo `trips` (`sluice generate trips --rows N --seed 7`)
   loaded into a throwaway cluster (tests/services/postgres.sh). Two
   aggregates (a selective filter; a full GROUP BY) and a raw stream, timed
     (a) through Sluice, database `pushdown = true`,
     (b) through Sluice, `pushdown = false` (every filter runs in Sluice),
     (c) directly with psql: `postgres.sh psql DIR PORT -c SQL` end to end
         (process start, connect, run, print), the same statements in one
         warm psql session (`\\timing`, client-measured round trip), and
         PostgreSQL's own execution time (EXPLAIN (ANALYZE, TIMING OFF)),
     (d) through Sluice over the same rows as one local Parquet file,
   plus, for reference, (a) and (d) under the demo usage policy as the City
   Planning Agency (row filter, masks, k = 10 distinct cards per group).
B. Object store. The same trips as hive-partitioned Parquet (`mode=<m>/`),
   uploaded to moto's S3 server (tests/services/moto.sh) and kept in a local
   directory: a full-scan aggregate, a partition-pruned aggregate and the raw
   stream `SELECT * FROM trips` (every batch read; MB/s of Arrow data), through
   Sluice over S3 and over the local directory (and the single Parquet file).

Sluice is called with pyarrow.flight over mutual TLS (Flight SQL
CommandStatementQuery; GetFlightInfo, then DoGet of every endpoint, the whole
stream read), one client per daemon, as a consumer that a permissive policy
written by the harness lets read every column raw, so the policy rewrite is
the same trivial one for every source. Each daemon is started once; each
query is run once per variant as a warm-up, then `--runs` times, the variants
of a query taking turns (round robin), so that background noise falls on all
of them alike. Times are wall-clock milliseconds on the client: median and
p90 (linear interpolation).

    tests/bench/sources.sh [--bin PATH] [--rows N] [--runs K] [--keep]

Needs the virtualenv of tests/run.sh (pyarrow, boto3, moto) and PostgreSQL
(postgres.sh installs it with apt if missing); run as root.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))

import pyarrow as pa  # noqa: E402
import pyarrow.flight as flight  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from conftest import _die_with_parent  # noqa: E402
from sources_support import (  # noqa: E402
    DEMO_POLICY, SERVICES, Moto, Postgres, free_port, make_state, object_store, partitioned_trips,
    postgres_database, postgres_dataset, statement_command, toml_str, world_readable_tmpdir, write_hive,
)

# --- queries ---------------------------------------------------------------------

ZONES = ("Z01", "Z02", "Z03")
Q_FILTERED = ("SELECT start_zone, count(*) AS n, avg(fare_eur) AS f FROM trips "
              f"WHERE mode = 'tram' AND start_zone IN ({', '.join(repr(z) for z in ZONES)}) GROUP BY start_zone")
Q_GROUP = "SELECT start_zone, count(*) AS n, avg(fare_eur) AS f FROM trips GROUP BY start_zone"
Q_RAW = "SELECT * FROM trips"
Q_FULL = "SELECT count(*) AS n, sum(fare_eur) AS fares FROM trips"
Q_PRUNED = "SELECT count(*) AS n, sum(fare_eur) AS fares FROM trips WHERE mode = 'tram'"

# The harness's permissive policy: every trips column raw for both demo
# organizations, so the rewrite is the identity for every source.
OPEN_POLICY_YAML = """# tests/bench/sources.py: every trips column raw (benchmark only).
version: 1
datasets:
  trips: {}
consumers:
  - name: bench-open
    match: { san_uri: "spiffe://sluice.demo/org/*" }
    grants:
      trips:
        columns:
          trip_id: raw
          card_id: raw
          start_time: raw
          end_time: raw
          start_zone: raw
          end_zone: raw
          mode: raw
          distance_km: raw
          fare_eur: raw
          age_band: raw
        functions:
          aggregate: [count, sum, avg, min, max]
          scalar: [round]
        comparisons: ["=", "<>", "<", "<=", ">", ">=", in, not_in, between, is_null, and, or, not]
"""

DEMO_PURPOSE = "urban-planning"


# --- statistics ------------------------------------------------------------------

def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Result:
    label: str
    times_ms: list[float] = field(default_factory=list)
    rows: int = 0
    nbytes: int = 0
    table: pa.Table | None = None
    note: str = ""
    output: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p90(self) -> float:
        return quantile(self.times_ms, 0.9)


# --- Sluice through pyarrow.flight ------------------------------------------------

def statement_query(sql: str) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(statement_command(sql))


class Sluice:
    """A `sluice serve --config` started once, and a pyarrow.flight client
    to it over mTLS as `identity`."""

    def __init__(self, binary: Path, base: Path, shared: Path, name: str, services: str, trips: str,
                 policy: Path, identity: str = "planning", purpose: str | None = None):
        self.name = name
        dir = base / "daemons" / name
        state = make_state(shared, dir / "state")
        config = dir / "sluice.toml"
        config.write_text(f"""# tests/bench/sources.py: {name}
[server]
listen = "127.0.0.1:0"
state_dir = {toml_str(state)}
shutdown_grace = "2s"

[limits]
query_timeout = "5m"

[policy]
file = {toml_str(policy)}

[log]
format = "text"
level = "warn"

{services}
{trips}
""")
        self.log = open(dir / "sluice.log", "w")
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--config", str(config), "--state-dir", str(state), "--listen", "127.0.0.1:0",
             "--metrics-listen", "off"],
            stdout=subprocess.PIPE, stderr=self.log, text=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 120
        self.address = None
        for line in self.proc.stdout:
            m = re.search(r"listening on grpc\+tls://(\S+)", line)
            if m:
                self.address = m.group(1)
                break
            if time.monotonic() > deadline:
                break
        if self.address is None:
            self.stop()
            raise RuntimeError(f"sluice serve ({name}) did not start; log: {(dir / 'sluice.log').read_text()[-3000:]}")
        # Drain stdout so the daemon never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        pki = state / "pki"
        self.client = flight.FlightClient(
            f"grpc+tls://{self.address}", tls_root_certs=(pki / "ca.pem").read_bytes(),
            cert_chain=(pki / f"{identity}.pem").read_bytes(), private_key=(pki / f"{identity}.key").read_bytes())
        headers = [(b"x-sluice-purpose", purpose.encode())] if purpose else []
        self.options = flight.FlightCallOptions(headers=headers, timeout=600)

    def query(self, sql: str) -> pa.Table:
        info = self.client.get_flight_info(statement_query(sql), self.options)
        tables = [self.client.do_get(endpoint.ticket, self.options).read_all() for endpoint in info.endpoints]
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --- psql ------------------------------------------------------------------------------

def psql_script(pg: Postgres, *args: str, input: str | None = None) -> str:
    done = subprocess.run([str(SERVICES / "postgres.sh"), "psql", str(pg.dir), str(pg.port), *args], input=input,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"postgres.sh psql failed: {done.stderr}")
    return done.stdout


def psql_session(pg: Postgres, statements: list[str]) -> str:
    """The statements in one psql session, with \\timing on."""
    script = "\\timing on\n" + "".join(s.rstrip(";") + ";\n" for s in statements)
    return psql_script(pg, "-tA", input=script)


def timing_lines(output: str) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(r"^Time: ([\d.]+) ms", output, re.M)]


# --- the benchmark ----------------------------------------------------------------------

class Bench:
    def __init__(self, runs: int):
        self.runs = runs
        self.results: dict[tuple[str, str], Result] = {}

    def measure(self, query_name: str, sql: str, variants: dict[str, Sluice], keep_table: bool = True):
        """Warm-up once per variant, then `runs` rounds, variants in turn."""
        results = {}
        for label, daemon in variants.items():
            t0 = time.perf_counter()
            table = daemon.query(sql)
            warm = (time.perf_counter() - t0) * 1000
            results[label] = Result(label, rows=table.num_rows, nbytes=table.nbytes,
                                    table=table if keep_table else None, note=f"warm-up {warm:.0f} ms")
            del table
        for _ in range(self.runs):
            for label, daemon in variants.items():
                t0 = time.perf_counter()
                table = daemon.query(sql)
                results[label].times_ms.append((time.perf_counter() - t0) * 1000)
                if table.num_rows != results[label].rows:
                    raise RuntimeError(f"{label}: {table.num_rows} rows, the warm-up had {results[label].rows}")
                del table
        for label, r in results.items():
            self.results[(query_name, label)] = r
        return results

    def measure_psql(self, pg: Postgres, query_name: str, sql: str):
        # Warm-up (also the row count).
        out = psql_script(pg, "-tA", "-c", sql)
        rows = len([line for line in out.splitlines() if line.strip()])
        e2e = Result("psql end to end", rows=rows, note="postgres.sh psql -c: process + connect + run + print")
        e2e.output = out
        for _ in range(self.runs):
            t0 = time.perf_counter()
            psql_script(pg, "-tA", "-c", sql)
            e2e.times_ms.append((time.perf_counter() - t0) * 1000)
        session = Result("psql \\timing", rows=rows, note="one warm session, client round trip")
        session.times_ms = timing_lines(psql_session(pg, [sql] * (self.runs + 1)))[1:]
        explain = Result("PG execution", rows=rows, note="EXPLAIN (ANALYZE, TIMING OFF): Execution Time")
        planning = []
        out = psql_session(pg, [f"EXPLAIN (ANALYZE, TIMING OFF) {sql}"] * (self.runs + 1))
        exec_times = [float(x) for x in re.findall(r"Execution Time: ([\d.]+) ms", out)][1:]
        planning = [float(x) for x in re.findall(r"Planning Time: ([\d.]+) ms", out)][1:]
        explain.times_ms = exec_times
        explain.note += f" (+ planning, median {statistics.median(planning):.2f} ms)"
        plan = psql_script(pg, "-tA", "-c", f"EXPLAIN {sql}")
        explain.note += "; plan: " + " / ".join(line.strip() for line in plan.splitlines()[:3])
        for r in (e2e, session, explain):
            self.results[(query_name, r.label)] = r
        return {r.label: r for r in (e2e, session, explain)}


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    return a == b


def same_rows(a: list[tuple], b: list[tuple]) -> bool:
    """Rows equal, floats within a relative 1e-9 (summation order differs)."""
    key = lambda r: tuple(str(v) for v in r if not isinstance(v, float))  # noqa: E731
    a, b = sorted(a, key=key), sorted(b, key=key)
    return len(a) == len(b) and all(len(x) == len(y) and all(map(_close, x, y)) for x, y in zip(a, b))


def table_rows(table: pa.Table) -> list[tuple]:
    return [tuple(r.values()) for r in table.to_pylist()]


def psql_rows(output: str, like: list[tuple]) -> list[tuple]:
    """`psql -tA` lines as tuples, typed like the rows of `like`."""
    types = [type(v) for v in like[0]] if like else []
    rows = []
    for line in output.splitlines():
        if line.strip():
            rows.append(tuple(t(v) if t in (int, float) else v for t, v in zip(types, line.split("|"))))
    return rows


def print_table(title: str, results: dict[str, Result], raw: bool = False):
    print(f"\n{title}")
    if raw:
        header = f"  {'variant':<34} {'median ms':>10} {'p90 ms':>10} {'rows':>9} {'MB':>8} {'MB/s':>8} {'Mrows/s':>8}"
    else:
        header = f"  {'variant':<34} {'median ms':>10} {'p90 ms':>10} {'rows':>9}"
    print(header)
    for label, r in results.items():
        line = f"  {label:<34} {r.median:>10.2f} {r.p90:>10.2f} {r.rows:>9}"
        if raw:
            mb = r.nbytes / 1e6
            line += f" {mb:>8.1f} {mb / (r.median / 1000):>8.1f} {r.rows / 1e6 / (r.median / 1000):>8.2f}"
        print(line)


def ratio(a: Result, b: Result) -> str:
    return f"{a.median / b.median:7.2f}x"


def sql_sent(pg: Postgres, daemon: Sluice, sql: str) -> str:
    offset = pg.log_offset()
    daemon.query(sql)
    time.sleep(0.2)
    statements = [s for s in pg.statements_since(offset) if "trips" in s]
    return statements[-1] if statements else "(no statement logged)"


def main() -> int:
    target = Path(os.environ.get("CARGO_TARGET_DIR", "/root/.cache/sluice-release"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, default=target / "release" / "sluice",
                    help="the sluice binary (default $CARGO_TARGET_DIR/release/sluice, "
                         "CARGO_TARGET_DIR default /root/.cache/sluice-release)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="trips to generate (default 1,000,000)")
    ap.add_argument("--runs", type=int, default=7, help="timed runs per query and variant (default 7)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (data, configs, daemon logs)")
    ap.add_argument("--no-demo-policy", action="store_true", help="skip the demo-policy reference rows")
    args = ap.parse_args()
    binary = args.bin.resolve()
    if not os.access(binary, os.X_OK):
        print(f"no sluice binary at {binary} (build it: cargo build --release, or give --bin)", file=sys.stderr)
        return 2
    if args.runs < 1:
        print("--runs must be at least 1", file=sys.stderr)
        return 2

    def interrupted(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    base = world_readable_tmpdir("sluice-bench-")
    pg = Postgres(base / "pg", free_port())
    moto = Moto(base / "moto", free_port())
    daemons: list[Sluice] = []
    pg_started = moto_started = False
    bench = Bench(args.runs)

    def step(text: str):
        print(f"[{time.monotonic() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    try:
        # --- data and services
        step(f"sluice init (PKI) and generate trips --rows {args.rows} --seed 7")
        shared = base / "shared"
        subprocess.run([str(binary), "init", "--state-dir", str(shared)], check=True, capture_output=True)
        trips_parquet = base / "trips.parquet"
        subprocess.run([str(binary), "generate", "trips", "--rows", str(args.rows), "--seed", "7",
                        "--out", str(trips_parquet)], check=True, capture_output=True)
        trips = pq.read_table(trips_parquet)
        step("PostgreSQL: start, load trips")
        pg.start()
        pg_started = True
        pg.load_trips(trips_parquet)
        pg_version = pg.sql("SHOW server_version")
        pg_size = pg.sql("SELECT pg_size_pretty(pg_total_relation_size('public.trips'))")
        step("hive partitions (mode=…) locally and in moto's S3")
        hive = base / "hive-mode"
        files = write_hive(trips, hive, "mode")
        hive_bytes = sum(p.stat().st_size for p in files)
        del trips
        moto.start()
        moto_started = True
        moto.client().create_bucket(Bucket="lake")
        moto.upload_tree(hive, "lake", "trips")
        credentials = moto.credentials_file()

        # --- daemons, each started once
        step("starting the daemons")
        policy = base / "open-policy.yaml"
        policy.write_text(OPEN_POLICY_YAML)
        db = postgres_database(pg.port, pg.dir / "password")
        db_off = db + "pushdown = false\n"
        pg_trips = postgres_dataset("trips", "public.trips")
        file_trips = f'[[datasets]]\nname = "trips"\nformat = "parquet"\npath = {toml_str(trips_parquet)}\n'

        def start(name, services, trips_toml, policy_path=policy, **kw):
            d = Sluice(binary, base, shared, name, services, trips_toml, policy_path, **kw)
            daemons.append(d)
            return d

        pg_push = start("pg-pushdown", db, pg_trips)
        pg_nopush = start("pg-no-pushdown", db_off, pg_trips)
        parquet = start("parquet", "", file_trips)
        s3 = start("s3-hive", object_store("lake", moto.endpoint, credentials),
                   partitioned_trips("s3://lake/trips/", "mode"))
        local_hive = start("local-hive", "", partitioned_trips(str(hive) + "/", "mode"))
        demo = {}
        if not args.no_demo_policy:
            demo = {
                "Sluice-PG pushdown, demo policy": start("demo-pg-pushdown", db, pg_trips, DEMO_POLICY,
                                                         purpose=DEMO_PURPOSE),
                "Sluice-parquet, demo policy": start("demo-parquet", "", file_trips, DEMO_POLICY,
                                                     purpose=DEMO_PURPOSE),
            }

        # --- what Sluice sends to PostgreSQL
        sent = {label: sql_sent(pg, d, Q_FILTERED) for label, d in
                [("pushdown", pg_push), ("no pushdown", pg_nopush)]
                + ([("demo policy, pushdown", demo["Sluice-PG pushdown, demo policy"])] if demo else [])}
        pg_settings = pg.sql("SELECT string_agg(name || ' = ' || setting || coalesce(unit, ''), ', ' ORDER BY name) "
                             "FROM pg_settings WHERE name IN ('max_parallel_workers_per_gather', 'shared_buffers', "
                             "'work_mem', 'jit')")

        # --- A. PostgreSQL
        a_variants = {"Sluice-PG pushdown": pg_push, "Sluice-PG no pushdown": pg_nopush, "Sluice-parquet": parquet}
        a_results = {}
        for qname, sql in [("A1 filtered", Q_FILTERED), ("A2 group by", Q_GROUP)]:
            step(f"{qname}: Sluice variants")
            res = bench.measure(qname, sql, a_variants)
            step(f"{qname}: psql")
            res.update(bench.measure_psql(pg, qname, sql))
            if demo:
                step(f"{qname}: demo policy")
                res.update(bench.measure(qname, sql, demo))
            a_results[qname] = (sql, res)
        step("A3 raw stream")
        a_raw = bench.measure("A3 raw", Q_RAW, {"Sluice-PG": pg_push, "Sluice-parquet": parquet}, keep_table=False)

        # --- B. object store
        b_variants = {"Sluice-S3 hive": s3, "Sluice-local hive": local_hive, "Sluice-parquet (1 file)": parquet}
        b_results = {}
        for qname, sql in [("B1 full scan", Q_FULL), ("B2 pruned", Q_PRUNED)]:
            step(f"{qname}")
            b_results[qname] = (sql, bench.measure(qname, sql, b_variants))
        step("B3 raw stream")
        b_raw = bench.measure("B3 raw", Q_RAW, b_variants, keep_table=False)

        # --- agreement of the answers
        checks = []
        for qname, (sql, res) in list(a_results.items()) + list(b_results.items()):
            sluice = {k: v for k, v in res.items() if v.table is not None}
            reference = table_rows(next(iter(sluice.values())).table)
            differ = [k for k, v in sluice.items() if not same_rows(table_rows(v.table), reference)]
            # The demo policy drops ferries (row filter): its answers differ on
            # purpose where ferries count; they must agree with each other.
            differ = [k for k in differ if "demo" not in k]
            demo_pair = [v for k, v in sluice.items() if "demo" in k]
            if len(demo_pair) == 2 and not same_rows(table_rows(demo_pair[0].table), table_rows(demo_pair[1].table)):
                differ.append("demo policy PG vs parquet")
            names = [k for k in sluice if "demo" not in k]
            if "psql end to end" in res:
                names.append("psql")
                if not same_rows(psql_rows(res["psql end to end"].output, reference), reference):
                    differ.append("psql")
            checks.append(f"{qname}: " + (f"ANSWERS DIFFER: {', '.join(differ)}" if differ else
                                          f"same answer from {', '.join(names)}"
                                          + (" (demo policy: PG = parquet)" if demo_pair else "")))

        # --- report
        total = time.monotonic() - started
        cpus = len(os.sched_getaffinity(0))
        print("=" * 100)
        print("Sluice source benchmark (tests/bench/sources.py)")
        print(f"  machine   : nproc {cpus} ({os.cpu_count()} online), {os.uname().machine}, "
              f"{os.uname().sysname} {os.uname().release}")
        print(f"  load avg  : {' '.join(f'{x:.2f}' for x in os.getloadavg())} (at the end of the run)")
        print(f"  binary    : {binary}")
        print(f"  rows      : {args.rows:,} trips (sluice generate trips --seed 7), "
              f"Parquet {trips_parquet.stat().st_size / 1e6:.1f} MB; hive mode=… {len(files)} files "
              f"{hive_bytes / 1e6:.1f} MB; PostgreSQL table {pg_size}")
        print(f"  services  : PostgreSQL {pg_version} (fsync off, log_statement = all); moto S3 on "
              f"{moto.endpoint}")
        print(f"  runs      : {args.runs} timed per query and variant after 1 warm-up, round robin; "
              f"times in ms, wall clock on the client")
        print("  client    : pyarrow.flight over mTLS, identity planning, permissive harness policy "
              "(demo rows: demo policy, purpose urban-planning)")
        print(f"  PG config : {pg_settings}")
        for label, statement in sent.items():
            print(f"  Sluice → PostgreSQL for A1, {label:<21}: {statement}")
        print("  variants  : Sluice-PG pushdown / no pushdown = Sluice over the PostgreSQL table, [[databases]] "
              "pushdown = true / false;")
        print("              Sluice-parquet = Sluice over the same rows as one local Parquet file;")
        print("              psql end to end = `postgres.sh psql DIR PORT -tA -c SQL` as a process (bash, psql "
              "start, unix-socket connect, run, print);")
        print("              psql \\timing = the same SQL repeated in one warm psql session (round trip measured "
              "by psql);")
        print("              PG execution = EXPLAIN (ANALYZE, TIMING OFF) Execution Time (server only, no transfer);")
        print("              Sluice-S3 hive / local hive = hive-partitioned (mode=…) Parquet in moto's S3 / in a "
              "local directory")

        print("\nA. PostgreSQL")
        for qname, (sql, res) in a_results.items():
            print_table(f"{qname}: {sql}", res)
            for r in res.values():
                if r.label == "PG execution":
                    print(f"      PG execution: {r.note}")
        print_table(f"A3 raw stream: {Q_RAW}", a_raw, raw=True)

        print("\n  ratios (median ÷ median)")
        for qname, (sql, res) in a_results.items():
            push, nopush, pq_ = res["Sluice-PG pushdown"], res["Sluice-PG no pushdown"], res["Sluice-parquet"]
            e2e, sess, exe = res["psql end to end"], res["psql \\timing"], res["PG execution"]
            print(f"  {qname}:")
            print(f"    Sluice-PG pushdown    ÷ psql end to end : {ratio(push, e2e)}   "
                  f"÷ psql \\timing : {ratio(push, sess)}   ÷ PG execution : {ratio(push, exe)}")
            print(f"    Sluice-PG no pushdown ÷ psql end to end : {ratio(nopush, e2e)}   "
                  f"÷ psql \\timing : {ratio(nopush, sess)}   ÷ PG execution : {ratio(nopush, exe)}")
            same_statement = " (no filter: both send the same statement, so this is the noise floor)" \
                if "WHERE" not in sql else ""
            print(f"    pushdown speed-up (no pushdown ÷ pushdown)  : {ratio(nopush, push)}{same_statement}")
            print(f"    Sluice-PG pushdown ÷ Sluice-parquet        : {ratio(push, pq_)}")
            print(f"    Sluice-PG no pushdown ÷ Sluice-parquet     : {ratio(nopush, pq_)}")
            if demo:
                dpg, dpq = res["Sluice-PG pushdown, demo policy"], res["Sluice-parquet, demo policy"]
                print(f"    demo policy ÷ open policy: PG pushdown {ratio(dpg, push)}, parquet {ratio(dpq, pq_)}"
                      f"   (demo rows returned: PG {dpg.rows}, parquet {dpq.rows})")
        print(f"  A3 raw: Sluice-PG ÷ Sluice-parquet : {ratio(a_raw['Sluice-PG'], a_raw['Sluice-parquet'])}")

        print("\nB. Object store (moto S3) vs local, hive partitions mode=…")
        for qname, (sql, res) in b_results.items():
            print_table(f"{qname}: {sql}", res)
        print_table(f"B3 raw stream: {Q_RAW}", b_raw, raw=True)
        print("\n  ratios (median ÷ median)")
        for qname, res in [(q, r) for q, (_, r) in b_results.items()] + [("B3 raw", b_raw)]:
            print(f"  {qname:<13} Sluice-S3 ÷ Sluice-local hive : "
                  f"{ratio(res['Sluice-S3 hive'], res['Sluice-local hive'])}   "
                  f"Sluice-local hive ÷ Sluice-parquet (1 file) : "
                  f"{ratio(res['Sluice-local hive'], res['Sluice-parquet (1 file)'])}")
        full, pruned = b_results["B1 full scan"][1], b_results["B2 pruned"][1]
        print(f"  pruning speed-up (full ÷ pruned): S3 {ratio(full['Sluice-S3 hive'], pruned['Sluice-S3 hive'])}, "
              f"local hive {ratio(full['Sluice-local hive'], pruned['Sluice-local hive'])}")

        print("\nChecks")
        for c in checks:
            print(f"  {c}")
        print(f"\ntotal run time {total:.0f} s")
        print("=" * 100)
        return 0 if all("DIFFER" not in c for c in checks) else 1
    finally:
        for d in daemons:
            try:
                d.stop()
            except Exception as e:  # noqa: BLE001
                print(f"stopping {d.name}: {e}", file=sys.stderr)
        if moto_started:
            moto.stop()
        if pg_started:
            pg.stop()
        if args.keep:
            print(f"work directory kept: {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
