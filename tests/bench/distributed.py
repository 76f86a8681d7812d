"""One node against one coordinator and three workers, side by side.

The same Parquet files (trips, `sluice generate trips`, split into --files
files) are served by two connectors started from the same binary: one runs
every query itself, the other sends leaf stages to three `sluice worker`s on
this machine. Both run with `limits.table_cache = "0"` (the workers read
files, so the single node must too). Each query runs once to warm the page
cache and the footers, then --runs times on each deployment, alternating;
the medians and their ratio are printed.

The machine's cores are shared by the coordinator and the workers, so the
ratio measures the overhead of distribution (planning, plan shipping, the
network hops, the coordinator's share), not a speed-up: with one machine
there is nothing to gain.

Queries (one consumer per kind, since a consumer has one grant per dataset):
  aggregate  SELECT start_zone, count(*), sum(fare_eur), avg(distance_km)
             FROM trips GROUP BY start_zone          (k-anonymous grant, k=10)
  dp         the same under DP (ε 0.5, max_groups 10, max_rows 50)
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
from adbc_driver_flightsql import DatabaseOptions

SQL = "SELECT start_zone, count(*) AS n, sum(fare_eur) AS fares, avg(distance_km) AS km FROM trips GROUP BY start_zone"

POLICY = """
version: 1
datasets:
  trips:
    privacy_unit: card_id
consumers:
  - name: plain
    match: { organization: Plain }
    grants:
      trips:
        columns: { start_zone: group_by_only, fare_eur: aggregate_only, distance_km: aggregate_only }
        aggregation: { min_group_size: 10 }
        functions: { aggregate: [count, sum, avg] }
  - name: private
    match: { organization: Private }
    grants:
      trips:
        columns: { start_zone: group_by_only, fare_eur: aggregate_only, distance_km: aggregate_only }
        functions: { aggregate: [count, sum, avg] }
        dp:
          epsilon_per_query: 1.0
          default_epsilon: 0.5
          delta_per_query: 1.0e-8
          budget: { epsilon: 1.0e9, period: total }
          cache: false
          max_groups: 10
          max_rows: 50
          columns:
            fare_eur: { bounds: [0, 10] }
            distance_km: { bounds: [0, 30] }
          public_keys:
            start_zone: [%s]
""" % ", ".join(f"Z{i:02d}" for i in range(1, 41))


def run(*cmd, **kw):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)


class Process:
    """A sluice process; waits for its banner line on stdout."""

    def __init__(self, args, marker, log):
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        deadline = time.time() + 120
        self.line = ""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"{args[1]} exited; see {log}")
            if marker in line:
                self.line = line.strip()
                break
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def connect(endpoint, pki, who):
    read = lambda p: Path(p).read_text()
    return flightsql.connect(endpoint, db_kwargs={
        DatabaseOptions.TLS_ROOT_CERTS.value: read(pki / "ca.pem"),
        DatabaseOptions.MTLS_CERT_CHAIN.value: read(pki / f"{who}.pem"),
        DatabaseOptions.MTLS_PRIVATE_KEY.value: read(pki / f"{who}.key"),
    })


def timed(conn):
    started = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute(SQL)
        table = cur.fetch_arrow_table()
    assert table.num_rows > 0
    return time.perf_counter() - started


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--dir", help="work directory (default: a temporary one)")
    a = ap.parse_args()
    work = Path(a.dir or tempfile.mkdtemp(prefix="sluice-dist-bench-"))
    pki, data = work / "pki", work / "data"
    pki.mkdir(parents=True, exist_ok=True)
    data.mkdir(exist_ok=True)
    b = a.bin
    if not (pki / "ca.pem").exists():
        run(b, "certs", "ca", "--dir", pki)
        run(b, "certs", "server", "--dir", pki, "--name", "server", "--ip", "127.0.0.1", "--dns", "localhost")
        run(b, "certs", "coordinator", "--dir", pki)
        run(b, "certs", "worker", "--dir", pki, "--ip", "127.0.0.1", "--dns", "localhost")
        run(b, "certs", "client", "--dir", pki, "--name", "plain", "--org", "Plain")
        run(b, "certs", "client", "--dir", pki, "--name", "private", "--org", "Private")
    per_file = a.rows // a.files
    for k in range(a.files):
        out = data / f"part-{k}.parquet"
        if not out.exists():
            run(b, "generate", "trips", "--seed", str(100 + k), "--rows", str(per_file), "--out", out)
    (work / "policy.yaml").write_text(POLICY)
    common = (
        f'[tls]\ncert = "{pki}/server.pem"\nkey = "{pki}/server.key"\nclient_ca = "{pki}/ca.pem"\n\n'
        '[limits]\ntable_cache = "0"\nquery_timeout = "10m"\n\n'
        '[policy]\nfile = "policy.yaml"\n\n'
        f'[[datasets]]\nname = "trips"\nformat = "parquet"\npath = "{data}"\n'
    )
    (work / "single.toml").write_text(f'[server]\nstate_dir = "state-single"\n\n{common}')
    workers = []
    procs = []
    try:
        for i in range(a.workers):
            w = Process([b, "worker", "--listen", "127.0.0.1:0", "--cert", pki / "worker.pem", "--key", pki / "worker.key",
                         "--coordinator-ca", pki / "ca.pem", "--memory", "4GiB"], "listening on", work / f"worker{i}.log")
            procs.append(w)
            workers.append(w.line.split("listening on ")[1])
        urls = ", ".join(f'"{u}"' for u in workers)
        (work / "cluster.toml").write_text(
            f'[server]\nstate_dir = "state-cluster"\n\n'
            f'[cluster]\nworkers = [{urls}]\ncert = "{pki}/coordinator.pem"\nkey = "{pki}/coordinator.key"\nworker_ca = "{pki}/ca.pem"\n\n{common}')
        endpoints = {}
        for name in ("single", "cluster"):
            p = Process([b, "serve", "--config", work / f"{name}.toml", "--listen", "127.0.0.1:0", "--metrics-listen", "off"],
                        "listening on grpc+tls://", work / f"{name}.log")
            procs.append(p)
            endpoints[name] = "grpc+tls://" + p.line.split("grpc+tls://")[1].split()[0]
        print(f"{a.rows:,} rows in {a.files} Parquet files; {a.workers} workers; {os.cpu_count()} cores shared; "
              f"median of {a.runs} runs after one warm-up")
        print(f"{'query':<10} {'one node':>10} {'1 + ' + str(a.workers):>10} {'ratio':>7}")
        for kind in ("plain", "private"):
            conns = {n: connect(e, pki, kind) for n, e in endpoints.items()}
            for c in conns.values():
                timed(c)
            times = {n: [] for n in conns}
            for _ in range(a.runs):
                for n, c in conns.items():
                    times[n].append(timed(c))
            med = {n: statistics.median(t) * 1000 for n, t in times.items()}
            label = "aggregate" if kind == "plain" else "dp"
            print(f"{label:<10} {med['single']:>8.0f}ms {med['cluster']:>8.0f}ms {med['cluster'] / med['single']:>6.2f}x")
            for c in conns.values():
                c.close()
        log = (work / "cluster.log").read_text()
        print(f"distributed queries in the coordinator's log: {log.count('leaf stages sent to workers')}")
    finally:
        for p in procs:
            p.stop()


if __name__ == "__main__":
    main()
