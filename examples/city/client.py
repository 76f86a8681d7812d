"""The City Planning Agency's client in the city data space.

Connects with ADBC (Arrow Flight SQL over mutual TLS) to the City Transport
Agency's Sluice connector, which releases its `trips` only as differentially
private aggregates (ε per query at most 0.5, a budget of 10 per 30 days), and

1. asks for the number of trips and the average fare per start zone: the
   answer is noisy, every noisy column carries its noise metadata (Arrow
   field metadata `sluice.dp.*`, e.g. the 95% confidence half-width), and the
   result says how much budget is left;
2. sums the noisy zone counts per district with the public `zones` table
   (post-processing: free);
3. asks the same question again: answered from the cache, at no cost;
4. asks for more ε than a query may spend, and for raw rows: both refused;
5. shows the remaining budget with `sluice budget`.

Every step checks what it got and the script exits non-zero if something is
not as the policy says (run.sh --check relies on it).

    python client.py --pki .run/pki --endpoint grpc+tls://127.0.0.1:50081 [--sluice PATH]
"""

import argparse
import subprocess
import sys
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pyarrow as pa

PURPOSE = "urban-planning"
EPSILON_PER_QUERY = 0.5
BUDGET = 10.0
ZONES = [f"Z{z:02}" for z in range(1, 41)]

PER_ZONE = """
SELECT start_zone, count(*) AS trips, avg(fare_eur) AS avg_fare_eur
FROM trips
GROUP BY start_zone
ORDER BY start_zone"""

RAW_ROWS = "SELECT card_id, start_zone, fare_eur FROM trips LIMIT 5"


class Failed(Exception):
    pass


def check(condition: bool, message: str):
    if not condition:
        raise Failed(message)


def connect(endpoint: str, pki: Path, epsilon: float | None = None):
    options = {
        "adbc.flight.sql.client_option.tls_root_certs": (pki / "ca.pem").read_text(),
        "adbc.flight.sql.client_option.mtls_cert_chain": (pki / "planning.pem").read_text(),
        "adbc.flight.sql.client_option.mtls_private_key": (pki / "planning.key").read_text(),
        # The transport agency's policy requires a declared purpose.
        "adbc.flight.sql.rpc.call_header.x-sluice-purpose": PURPOSE,
    }
    if epsilon is not None:
        # ε to spend on each query (default: the policy's epsilon_per_query).
        options["adbc.flight.sql.rpc.call_header.x-sluice-epsilon"] = str(epsilon)
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


def expect_refusal(conn, sql: str, *needles: str) -> str:
    try:
        table = query(conn, sql)
    except adbc_driver_manager.Error as e:
        message = str(e)
        print(f"    -> {type(e).__name__}: {message}")
        for needle in needles:
            check(needle in message, f"the refusal of {sql!r} does not say {needle!r}: {message}")
        return message
    raise Failed(f"{sql!r} was answered ({table.num_rows} rows); the policy should refuse it")


def per_zone(conn) -> pa.Table:
    table = query(conn, PER_ZONE)
    check(table.column("start_zone").to_pylist() == ZONES,
          f"expected every published zone Z01..Z40 once, got {table.column('start_zone').to_pylist()}")
    check(all(t is not None for t in table.column("trips").to_pylist()), "a zone has no (noisy) count")
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pki", type=Path, required=True, help="directory with ca.pem, planning.pem, planning.key")
    parser.add_argument("--endpoint", required=True, help="the transport agency's connector, grpc+tls://HOST:PORT")
    parser.add_argument("--sluice", help="the sluice binary, to show the budget with `sluice budget`")
    parser.add_argument("--live", action="store_true",
                        help="trips is read live from a database: a repeat is computed afresh and charged "
                             "(DP answers over a database are never cached, docs/sources.md)")
    args = parser.parse_args()
    try:
        with connect(args.endpoint, args.pki) as conn:
            print(f"\n1. differentially private trips and average fare per start zone (ε {EPSILON_PER_QUERY})")
            first = per_zone(conn)
            trips = first.schema.field("trips")
            fare = first.schema.field("avg_fare_eur")
            check(float(meta(trips, "ci95_half_width") or 0) > 0,
                  "trips: no positive sluice.dp.ci95_half_width metadata")
            half_width = float(meta(trips, "ci95_half_width"))
            print(f"    {'zone':>5}  {'trips (95% CI)':>16}  {'avg fare (EUR)':>14}")
            for row in first.to_pylist():
                print(f"    {row['start_zone']:>5}  {row['trips']:>8} ± {half_width:<5.0f}  "
                      f"{row['avg_fare_eur']:>14.2f}")
            show_noise(first)
            for field in (trips, fare):
                check(meta(field, "mechanism") is not None, f"{field.name}: no sluice.dp.mechanism metadata")
                check(float(meta(field, "epsilon") or 0) > 0, f"{field.name}: no sluice.dp.epsilon metadata")
            check(all(0 <= f <= 10 for f in first.column("avg_fare_eur").to_pylist()),
                  "an average fare lies outside the policy's bounds [0, 10]")
            check(float(schema_meta(first, "query_epsilon")) == EPSILON_PER_QUERY,
                  f"the query spent ε {schema_meta(first, 'query_epsilon')}, expected {EPSILON_PER_QUERY}")
            remaining = float(schema_meta(first, "remaining_epsilon"))
            check(abs(remaining - (BUDGET - EPSILON_PER_QUERY)) < 1e-9,
                  f"remaining ε is {remaining}, expected {BUDGET - EPSILON_PER_QUERY} (a fresh budget of {BUDGET})")
            check(sum(first.column("trips").to_pylist()) > 10 * half_width,
                  "the noisy counts are implausibly small")

            print("\n2. per district: the noisy zone counts summed with the public zones table (no ε spent)")
            zones = query(conn, "SELECT zone_id, district, population FROM zones ORDER BY zone_id")
            check(zones.num_rows == len(ZONES), f"expected {len(ZONES)} zones, got {zones.num_rows}")
            district_of = dict(zip(zones.column("zone_id").to_pylist(), zones.column("district").to_pylist()))
            by_district: dict[str, int] = {}
            for row in first.to_pylist():
                district = district_of[row["start_zone"]]
                by_district[district] = by_district.get(district, 0) + row["trips"]
            for district, count in sorted(by_district.items(), key=lambda kv: -kv[1]):
                print(f"    {district:<12} {count:>8}")

            if args.live:
                print("\n3. the same question again: live data, so a fresh answer, charged again")
                again = per_zone(conn)
                show_noise(again)
                check(schema_meta(again, "cached") == "false", "a DP answer over live data came from the cache")
                check(abs(float(schema_meta(again, "remaining_epsilon")) - (remaining - EPSILON_PER_QUERY)) < 1e-9,
                      "the fresh answer was not charged")
                remaining -= EPSILON_PER_QUERY
            else:
                print("\n3. the same question again: the cached answer, free")
                again = per_zone(conn)
                show_noise(again)
                check(schema_meta(again, "cached") == "true", "the repeated query was not answered from the cache")
                check(again.column("trips").to_pylist() == first.column("trips").to_pylist(),
                      "the cached answer differs from the first one")
                check(float(schema_meta(again, "remaining_epsilon")) == remaining,
                      "the cached answer was charged")

        print(f"\n4. refused: more ε than a query may spend (1.0 > {EPSILON_PER_QUERY})")
        with connect(args.endpoint, args.pki, epsilon=1.0) as greedy:
            expect_refusal(greedy, "SELECT mode, count(*) AS trips FROM trips GROUP BY mode",
                           f"above the {EPSILON_PER_QUERY:g} allowed per query")
        print(f"\n   refused: raw rows ({RAW_ROWS})")
        with connect(args.endpoint, args.pki) as conn:
            expect_refusal(conn, RAW_ROWS, "PermissionDenied")

        if args.sluice:
            print("\n5. the remaining budget: sluice budget")
            pki = args.pki
            budget = subprocess.run(
                [args.sluice, "budget", "--endpoint", args.endpoint, "--ca", str(pki / "ca.pem"),
                 "--cert", str(pki / "planning.pem"), "--key", str(pki / "planning.key")],
                capture_output=True, text=True, timeout=60,
            )
            print("    " + budget.stdout.strip().replace("\n", "\n    "))
            check(budget.returncode == 0, f"sluice budget failed: {budget.stderr}")
            check(f"remaining {remaining:g} ε" in budget.stdout,
                  f"sluice budget does not show {remaining:g} ε remaining: {budget.stdout}")
    except Failed as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        return 1
    repeat = "a charged repeat over live data" if args.live else "a free repeat"
    print(f"\nOK: noisy answers with their metadata, {repeat}, refusals; {remaining:g} ε of {BUDGET:g} left.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
