"""Streaming and small-query latency through pyarrow.flight, side by side in
one run: the real `sluice serve` (open test policy, mTLS) against an anchor,
a pyarrow Flight server in this process that holds the same table in memory
and serves it over the same kind of mTLS (the dev PKI of the same state
directory). Both are read by the same pyarrow.flight client.

Sluice keeps the demo datasets decoded in memory (`limits.table_cache`);
the benchmark starts measuring once they are.

(1) `SELECT * FROM trips` (1,000,000 rows): MB/s of Arrow data received
    (the table's in-memory size over the wall time of GetFlightInfo + DoGet
    + read_all), batches received; alternating runs, medians.
(2) The small aggregate of bench (b) (machine_events, a few dozen rows):
    p50/p99 of GetFlightInfo + DoGet + read_all on an open channel, against
    the anchor answering the two calls from a precomputed table.

Usage: tests/bench/stream.sh [--bin PATH] [--runs K] [--latency-runs N]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from test_flight_tickets import statement_query  # noqa: E402

SCAN = "SELECT * FROM trips"
SMALL = ("SELECT site, count(*) AS events, avg(energy_kwh) AS kwh FROM machine_events "
         "WHERE event_type = 'fault' GROUP BY site")


class Anchor(flight.FlightServerBase):
    """Answers any descriptor with `tables[descriptor.command]`, from memory."""

    def __init__(self, location, tables, **kwargs):
        super().__init__(location, **kwargs)
        self.tables = tables

    def get_flight_info(self, context, descriptor):
        table = self.tables[descriptor.command]
        endpoint = flight.FlightEndpoint(descriptor.command, [])
        return flight.FlightInfo(table.schema, descriptor, [endpoint], table.num_rows, table.nbytes)

    def do_get(self, context, ticket):
        return flight.RecordBatchStream(self.tables[ticket.ticket])


def start_sluice(binary: str, state: Path) -> tuple[subprocess.Popen, str]:
    policy = ROOT / "connector" / "tests" / "policies" / "open.yaml"
    proc = subprocess.Popen(
        [binary, "serve", "--state-dir", str(state), "--listen", "127.0.0.1:0",
         "--metrics-listen", "off", "--dsp-listen", "off", "--console-listen", "off",
         "--policy", str(policy),
         "--log-level", "warn,sluice::catalog::decoded=info"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        match = re.search(r"listening on grpc\+tls://(\S+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            break
    else:
        raise RuntimeError("sluice serve exited before listening")
    # The demo's three datasets are decoded at start (limits.table_cache):
    # measure once they are, as a long-running daemon serves.
    decoded = 0
    for line in proc.stderr:
        decoded += "dataset decoded into memory" in line
        if decoded == 3:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, match.group(1)
    raise RuntimeError("sluice serve exited before decoding the demo datasets")


def client(address: str, pki: Path) -> flight.FlightClient:
    return flight.FlightClient(
        f"grpc+tls://{address}",
        tls_root_certs=(pki / "ca.pem").read_bytes(),
        cert_chain=(pki / "planning.pem").read_bytes(),
        private_key=(pki / "planning.key").read_bytes(),
        override_hostname="localhost",
    )


def fetch(c: flight.FlightClient, descriptor) -> tuple[pa.Table, int]:
    info = c.get_flight_info(descriptor)
    reader = c.do_get(info.endpoints[0].ticket)
    batches = 0
    chunks = []
    for chunk in reader:
        batches += 1
        chunks.append(chunk.data)
    return pa.Table.from_batches(chunks, schema=reader.schema), batches


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--latency-runs", type=int, default=300)
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="sluice-stream-bench-"))
    subprocess.run([args.bin, "init", "--state-dir", str(state)], check=True, capture_output=True)
    pki = state / "pki"
    sluice, address = start_sluice(args.bin, state)
    try:
        sluice_client = client(address, pki)
        # The anchor's tables: what Sluice answers, computed once by Sluice
        # itself (so both send the same data) and held in memory.
        trips, _ = fetch(sluice_client, statement_query(SCAN))
        # As a Parquet file's row groups would give it: 8 batches of 131,072.
        trips = pa.Table.from_batches(trips.combine_chunks().to_batches(max_chunksize=131_072))
        small, _ = fetch(sluice_client, statement_query(SMALL))
        scan_key, small_key = b"scan", b"small"
        anchor = Anchor(
            "grpc+tls://127.0.0.1:0", {scan_key: trips, small_key: small},
            tls_certificates=[flight.CertKeyPair((pki / "server.pem").read_bytes(),
                                                 (pki / "server.key").read_bytes())],
            verify_client=True, root_certificates=(pki / "ca.pem").read_bytes())
        anchor_client = client(f"127.0.0.1:{anchor.port}", pki)
        nbytes = trips.nbytes

        sides = {
            "sluice": (sluice_client, statement_query(SCAN)),
            "anchor": (anchor_client, flight.FlightDescriptor.for_command(scan_key)),
        }
        times = {name: [] for name in sides}
        batches = {}
        for run in range(args.runs + 1):
            for name, (c, descriptor) in sides.items():
                started = time.perf_counter()
                table, count = fetch(c, descriptor)
                elapsed = time.perf_counter() - started
                assert table.num_rows == trips.num_rows, (name, table.num_rows)
                if run > 0:  # the first run warms up
                    times[name].append(elapsed)
                batches[name] = count
        rate = {name: nbytes / statistics.median(t) / 1e6 for name, t in times.items()}
        print(f"(1) SELECT * FROM trips, {trips.num_rows:,} rows, {nbytes / 1e6:.1f} MB of Arrow data, "
              f"{args.runs} runs each (pyarrow.flight client, mTLS)")
        for name in sides:
            print(f"    {name:7} {rate[name]:7.1f} MB/s  (median {statistics.median(times[name]) * 1e3:.0f} ms, "
                  f"{batches[name]} batches)")
        print(f"    sluice / anchor: {rate['sluice'] / rate['anchor']:.2f}")

        small_sides = {
            "sluice": (sluice_client, statement_query(SMALL)),
            "anchor": (anchor_client, flight.FlightDescriptor.for_command(small_key)),
        }
        latencies = {name: [] for name in small_sides}
        for run in range(args.latency_runs + 10):
            for name, (c, descriptor) in small_sides.items():
                started = time.perf_counter()
                table, _ = fetch(c, descriptor)
                elapsed = time.perf_counter() - started
                assert table.num_rows == small.num_rows
                if run >= 10:
                    latencies[name].append(elapsed * 1e3)
        print(f"(2) small aggregate ({small.num_rows} rows), {args.latency_runs} runs each: "
              "GetFlightInfo + DoGet + read_all")
        for name, values in latencies.items():
            values.sort()
            p50 = values[len(values) // 2]
            p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
            print(f"    {name:7} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms")
        p50 = {name: sorted(v)[len(v) // 2] for name, v in latencies.items()}
        print(f"    sluice - anchor at p50: {p50['sluice'] - p50['anchor']:.2f} ms")
        anchor.shutdown()
    finally:
        sluice.terminate()
        sluice.wait(timeout=30)


if __name__ == "__main__":
    main()
