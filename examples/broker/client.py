"""The City Planning Agency's client in the regional mobility data space.

Connects with ADBC (Arrow Flight SQL over mutual TLS) to the regional broker,
which federates `trips` across the north and south transport operators'
Sluice connectors, and

1. asks for trips and the average distance per mode across both operators:
   each operator answered its own partial query under its own policy and
   noise; the result names both, with each one's receipt and ε, and every
   noisy column carries the combined 95% confidence half-width;
2. checks each operator's budget directly: each charged its own;
3. asks for trips per age band: the south operator does not release age
   bands, so the broker names it and refuses, unless the agency accepts a
   partial answer (x-sluice-allow-partial), which is then flagged.

Every step checks what it got; the script exits non-zero if something is
not as the policies say (run.sh --check relies on it).

    python client.py --pki .run/pki --broker grpc+tls://127.0.0.1:50093 \
        --north grpc+tls://127.0.0.1:50091 --south grpc+tls://127.0.0.1:50092
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pyarrow as pa

PURPOSE = "urban-planning"

PER_MODE = """
SELECT mode, count(*) AS trips, avg(distance_km) AS avg_km
FROM trips
GROUP BY mode
ORDER BY trips DESC"""

PER_AGE_BAND = "SELECT age_band, count(*) AS trips FROM trips GROUP BY age_band ORDER BY age_band"


class Failed(Exception):
    pass


def check(condition: bool, message: str):
    if not condition:
        raise Failed(message)


def connect(endpoint: str, pki: Path, allow_partial: bool = False):
    options = {
        "adbc.flight.sql.client_option.tls_root_certs": (pki / "ca.pem").read_text(),
        "adbc.flight.sql.client_option.mtls_cert_chain": (pki / "planning.pem").read_text(),
        "adbc.flight.sql.client_option.mtls_private_key": (pki / "planning.key").read_text(),
        # The operators' policies require a declared purpose; the broker
        # passes it on, with the agency's identity.
        "adbc.flight.sql.rpc.call_header.x-sluice-purpose": PURPOSE,
    }
    if allow_partial:
        options["adbc.flight.sql.rpc.call_header.x-sluice-allow-partial"] = "true"
    return flightsql.connect(endpoint, db_kwargs=options, autocommit=True)


def query(endpoint: str, pki: Path, sql: str, allow_partial: bool = False) -> pa.Table:
    with connect(endpoint, pki, allow_partial) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table()


def show(table: pa.Table):
    names = table.column_names
    rows = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()] for r in table.to_pylist()]
    widths = [max(len(n), *(len(r[i]) for r in rows)) for i, n in enumerate(names)]
    for line in [names, *rows]:
        print("   " + "  ".join(c.rjust(w) for c, w in zip(line, widths)))


def federation(table: pa.Table, key: str):
    value = (table.schema.metadata or {}).get(f"sluice.federation.{key}".encode())
    return json.loads(value) if value is not None else None


def remaining_budget(sluice: str, endpoint: str, pki: Path) -> str:
    out = subprocess.run(
        [sluice, "budget", "--endpoint", endpoint, "--ca", str(pki / "ca.pem"),
         "--cert", str(pki / "planning.pem"), "--key", str(pki / "planning.key"), "--dataset", "trips"],
        capture_output=True, text=True, check=True,
    ).stdout
    line = next((l for l in out.splitlines() if "remaining" in l), "")
    return line.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pki", type=Path, required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--north", required=True)
    parser.add_argument("--south", required=True)
    parser.add_argument("--sluice", default="sluice")
    args = parser.parse_args()

    print("1. trips and average distance per mode, across both operators")
    table = query(args.broker, args.pki, PER_MODE)
    show(table)
    providers = federation(table, "providers")
    check([p["provider"] for p in providers] == ["north", "south"], f"expected both operators: {providers}")
    check(federation(table, "partial") is False, "a complete answer must not be flagged partial")
    for p in providers:
        receipt = json.loads(p["receipt"])
        print(f"   {p['provider']}: ε {p['epsilon']} charged there, receipt {receipt['receipt_id']}")
        check(p["epsilon"] == 0.5, f"{p['provider']} should charge its ε per query (0.5): {p}")
    width = (table.schema.field("trips").metadata or {}).get(b"sluice.dp.ci95_half_width")
    check(width is not None, "the merged count must carry its confidence half-width")
    print(f"   trips ± {float(width):.1f} (95%, noise of both operators combined)")
    check(table.num_rows == 5 and all(t > 0 for t in table.column("trips").to_pylist()),
          "five modes with trips expected")

    print("\n2. each operator keeps its own budget for the agency")
    for name, endpoint in [("north", args.north), ("south", args.south)]:
        line = remaining_budget(args.sluice, endpoint, args.pki)
        print(f"   {name}: {line}")
        check("remaining 9.5 ε" in line, f"{name} should have charged 0.5 of 10: {line}")

    print("\n3. trips per age band: the south operator does not release age bands")
    try:
        query(args.broker, args.pki, PER_AGE_BAND)
        raise Failed("the broker answered although the south operator forbids age_band")
    except adbc_driver_manager.Error as e:
        message = str(e)
        check("provider `south`" in message and "age_band" in message, f"unexpected refusal: {message}")
        print(f"   refused: {message.splitlines()[0][:200]}…")
    partial = query(args.broker, args.pki, PER_AGE_BAND, allow_partial=True)
    missing = federation(partial, "missing")
    check(federation(partial, "partial") is True, "a partial answer must be flagged")
    check([m["provider"] for m in missing] == ["south"], f"south should be named missing: {missing}")
    print("   with x-sluice-allow-partial: true (north only, south named missing):")
    show(partial)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
