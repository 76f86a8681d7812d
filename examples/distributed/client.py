"""The consumers' client in the distributed example.

The City Transport Agency's connector coordinates three `sluice worker`s:
the scans, filters and partial aggregations of each query run on them, the
policy, the noise and the budget ledger stay on the connector. For the
consumers nothing changes: they connect with ADBC (Arrow Flight SQL over
mutual TLS) to the connector, as in examples/city. This client

1. as the transport agency's operations department (k-anonymous aggregates:
   every group over at least 10 cards) asks for the trips and the average
   distance per mode, and checks the answer against pyarrow reading the
   same Parquet files itself: splitting the scan between the workers changes
   nothing;
2. as the City Planning Agency (differentially private aggregates only)
   asks the same question: the answer is noisy, every noisy column carries
   its noise metadata (Arrow field metadata `sluice.dp.*`), and ε 0.5 of the
   budget of 10 is spent, on the connector's ledger;
3. presents the planning agency's certificate to a worker directly (gRPC):
   refused with PERMISSION_DENIED, a worker serves its coordinators only;
   and the coordinator's certificate to the connector: refused too.

Every step checks what it got and the script exits non-zero if something is
not as the policy says (run.sh --check relies on it).

    python client.py --pki .run/pki --endpoint grpc+tls://127.0.0.1:50291 \\
        --data .run/data/trips --worker 127.0.0.1:50293
"""

import argparse
import sys
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import grpc
import pyarrow as pa
import pyarrow.dataset as ds
from grpc_health.v1 import health_pb2, health_pb2_grpc

PURPOSE = "urban-planning"
EPSILON_PER_QUERY = 0.5
BUDGET = 10.0
MODES = ["bike", "bus", "ferry", "metro", "tram"]

PER_MODE = """
SELECT mode, count(*) AS trips, avg(distance_km) AS avg_km
FROM trips
GROUP BY mode
ORDER BY mode"""


class Failed(Exception):
    pass


def check(condition: bool, message: str):
    if not condition:
        raise Failed(message)


def connect(endpoint: str, pki: Path, who: str):
    """An ADBC connection to the connector with the certificate pki/WHO.pem."""
    options = {
        "adbc.flight.sql.client_option.tls_root_certs": (pki / "ca.pem").read_text(),
        "adbc.flight.sql.client_option.mtls_cert_chain": (pki / f"{who}.pem").read_text(),
        "adbc.flight.sql.client_option.mtls_private_key": (pki / f"{who}.key").read_text(),
        # The transport agency's policy requires a declared purpose.
        "adbc.flight.sql.rpc.call_header.x-sluice-purpose": PURPOSE,
    }
    return flightsql.connect(endpoint, db_kwargs=options, autocommit=True)


def query(conn, sql: str) -> pa.Table:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table()


def meta(field: pa.Field, key: str) -> str | None:
    value = (field.metadata or {}).get(f"sluice.dp.{key}".encode())
    return value.decode() if value is not None else None


def schema_meta(table: pa.Table, key: str) -> str | None:
    value = (table.schema.metadata or {}).get(f"sluice.dp.{key}".encode())
    return value.decode() if value is not None else None


def show_noise(table: pa.Table):
    """The noise metadata of every noisy column, and of the query."""
    for field in table.schema:
        if not field.metadata or not any(k.startswith(b"sluice.dp.") for k in field.metadata):
            continue
        ci95 = meta(field, "ci95_half_width")
        print(f"    {field.name}: mechanism {meta(field, 'mechanism')}, ε {float(meta(field, 'epsilon')):.4f}, "
              f"scale {float(meta(field, 'scale')):.1f}, "
              + (f"95% of answers within ± {float(ci95):.1f}" if ci95 else "no 95% half-width announced"))
    note = next((meta(f, "note") for f in table.schema if meta(f, "note")), None)
    if note:
        print(f"    note: {note}")
    print(f"    query: ε {schema_meta(table, 'query_epsilon')}, δ {schema_meta(table, 'query_delta')}, "
          f"split {schema_meta(table, 'budget_split')}, cached {schema_meta(table, 'cached')}; "
          f"remaining ε {schema_meta(table, 'remaining_epsilon')}")


def exact_per_mode(data: Path) -> dict[str, tuple[int, float]]:
    """What the files hold, read by pyarrow itself: (trips, avg km) per mode.
    Only the provider could compute this; the example shows it to compare."""
    files = ds.dataset(data, format="parquet")
    table = files.to_table(columns=["mode", "distance_km"])
    grouped = table.group_by("mode").aggregate([("distance_km", "count"), ("distance_km", "mean")])
    return {
        mode: (count, mean)
        for mode, count, mean in zip(
            grouped.column("mode").to_pylist(),
            grouped.column("distance_km_count").to_pylist(),
            grouped.column("distance_km_mean").to_pylist(),
        )
    }


def worker_refuses(worker: str, pki: Path, who: str) -> str:
    """Calls a worker over mTLS with the certificate pki/WHO.pem (a health
    check: any call would do) and returns the refusal's message."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / f"{who}.key").read_bytes(),
        certificate_chain=(pki / f"{who}.pem").read_bytes(),
    )
    with grpc.secure_channel(worker, credentials) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
        except grpc.RpcError as e:
            print(f"    -> {e.code().name}: {e.details()}")
            check(e.code() == grpc.StatusCode.PERMISSION_DENIED,
                  f"the worker answered {who}'s certificate with {e.code().name}, expected PERMISSION_DENIED")
            return e.details()
    raise Failed(f"the worker at {worker} answered a call made with {who}'s certificate")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pki", type=Path, required=True,
                        help="directory with ca.pem and the operations, planning and coordinator pairs")
    parser.add_argument("--endpoint", required=True, help="the transport agency's connector, grpc+tls://HOST:PORT")
    parser.add_argument("--data", type=Path, required=True,
                        help="the directory of trips Parquet files (to compare with the exact answer)")
    parser.add_argument("--worker", required=True, help="one of the workers, HOST:PORT")
    args = parser.parse_args()
    try:
        exact = exact_per_mode(args.data)
        files = len(list(args.data.glob("*.parquet")))
        total = sum(count for count, _ in exact.values())

        print("\n1. the operations department (k-anonymous aggregates): trips and average distance per mode")
        with connect(args.endpoint, args.pki, "operations") as conn:
            plain = query(conn, PER_MODE)
        print(f"    {'mode':>6}  {'trips':>7}  {'avg km':>7}")
        for row in plain.to_pylist():
            print(f"    {row['mode']:>6}  {row['trips']:>7}  {row['avg_km']:>7.3f}")
        check(plain.column("mode").to_pylist() == MODES, f"expected the modes {MODES}, got {plain.column('mode').to_pylist()}")
        for row in plain.to_pylist():
            count, mean = exact[row["mode"]]
            check(row["trips"] == count, f"{row['mode']}: {row['trips']} trips, the files hold {count}")
            check(abs(row["avg_km"] - mean) < 1e-9 * max(1.0, mean),
                  f"{row['mode']}: average {row['avg_km']} km, the files give {mean}")
        print(f"    = pyarrow over the {files} files itself ({total} journeys): every count and average agrees")

        print(f"\n2. the planning agency (differential privacy only): the same question, ε {EPSILON_PER_QUERY}")
        with connect(args.endpoint, args.pki, "planning") as conn:
            noisy = query(conn, PER_MODE)
        trips = noisy.schema.field("trips")
        check(meta(trips, "mechanism") is not None, "trips: no sluice.dp.mechanism metadata")
        check(float(meta(trips, "ci95_half_width") or 0) > 0, "trips: no positive sluice.dp.ci95_half_width metadata")
        half_width = float(meta(trips, "ci95_half_width"))
        print(f"    {'mode':>6}  {'trips (95% CI)':>16}  {'avg km':>7}   exact, never released: trips, avg km")
        for row in noisy.to_pylist():
            count, mean = exact[row["mode"]]
            print(f"    {row['mode']:>6}  {row['trips']:>8} ± {half_width:<5.0f}  {row['avg_km']:>7.3f}   "
                  f"{count:>7}  {mean:.3f}")
        show_noise(noisy)
        check(noisy.column("mode").to_pylist() == MODES, f"expected every published mode once, got {noisy.column('mode').to_pylist()}")
        check(all(0 <= km <= 30 for km in noisy.column("avg_km").to_pylist()),
              "an average distance lies outside the policy's bounds [0, 30]")
        # Capping heavy travellers only removes trips; the noise is within
        # 3 half-widths but once in about 8,000 groups.
        for row in noisy.to_pylist():
            check(row["trips"] <= exact[row["mode"]][0] + 3 * half_width,
                  f"{row['mode']}: a noisy count of {row['trips']} is far above the {exact[row['mode']][0]} trips there are")
        check(sum(noisy.column("trips").to_pylist()) > 10 * half_width, "the noisy counts are implausibly small")
        check(float(schema_meta(noisy, "query_epsilon")) == EPSILON_PER_QUERY,
              f"the query spent ε {schema_meta(noisy, 'query_epsilon')}, expected {EPSILON_PER_QUERY}")
        remaining = float(schema_meta(noisy, "remaining_epsilon"))
        check(abs(remaining - (BUDGET - EPSILON_PER_QUERY)) < 1e-9,
              f"remaining ε is {remaining}, expected {BUDGET - EPSILON_PER_QUERY} (a fresh budget of {BUDGET})")

        print(f"\n3. the planning agency's certificate presented to a worker ({args.worker}) directly")
        message = worker_refuses(args.worker, args.pki, "planning")
        check("serves only its coordinators" in message, f"the worker's refusal does not say why: {message}")
        print("\n   the coordinator's certificate presented to the connector")
        with connect(args.endpoint, args.pki, "coordinator") as conn:
            try:
                table = query(conn, PER_MODE)
            except adbc_driver_manager.Error as e:
                print(f"    -> {type(e).__name__}: {e}")
                check("PermissionDenied" in str(e) or "PERMISSION_DENIED" in str(e),
                      f"the connector refused the coordinator's certificate with something else: {e}")
            else:
                raise Failed(f"the connector answered the coordinator's certificate ({table.num_rows} rows)")
    except Failed as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        return 1
    print(f"\nOK: exact k-anonymous aggregates, a noisy answer with its metadata ({remaining:g} ε of {BUDGET:g} left), "
          "and a worker that serves its coordinator only.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
