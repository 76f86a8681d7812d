"""The supplier consortium's client in the industry data space.

Connects with ADBC (Arrow Flight SQL over mutual TLS) to each manufacturer's
own Sluice connector, with the consortium's certificate, and

1. asks each for an aggregate over its machine telemetry (allowed: every
   group covers at least 10 distinct machines), and combines the answers;
2. asks for telemetry by site, where one site has fewer than 10 machines:
   that group is left out of the answer;
3. asks for raw rows, which each connector refuses, naming the rule.

Every step checks what it got and the script exits non-zero if something is
not as the policies say (run.sh --check relies on it).

    python client.py --pki .run/pki \\
        --connector "Kessler Werke=grpc+tls://127.0.0.1:50071" \\
        --connector "Nordhavn Motion=grpc+tls://127.0.0.1:50072"
"""

import argparse
import sys
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pyarrow as pa

PURPOSE = "quality-benchmarking"
K = 10
EVENT_TYPES = ["fault", "idle", "maintenance", "run"]

BY_EVENT_TYPE = """
SELECT manufacturer, event_type,
       count(*) AS events,
       count(DISTINCT machine_serial) AS machines,
       round(avg(temperature_c), 1) AS avg_temp_c,
       round(avg(vibration_mm_s), 2) AS avg_vibration_mm_s,
       round(sum(energy_kwh), 0) AS energy_kwh
FROM machine_events
GROUP BY manufacturer, event_type
ORDER BY event_type"""

BY_SITE = """
SELECT site, count(DISTINCT machine_serial) AS machines, count(*) AS events
FROM machine_events
GROUP BY site
ORDER BY site"""

RAW_ROWS = "SELECT machine_serial, event_time, temperature_c FROM machine_events LIMIT 5"


class Failed(Exception):
    pass


def check(condition: bool, message: str):
    if not condition:
        raise Failed(message)


def show(table: pa.Table, indent: str = "    "):
    """A small aligned text table (no pandas needed)."""
    names = table.column_names
    rows = [[("NULL" if v is None else str(v)) for v in row.values()] for row in table.to_pylist()]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    line = lambda cells: indent + "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    print(line(names))
    print(indent + "  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    print(f"{indent}({table.num_rows} rows)")


def connect(endpoint: str, pki: Path):
    return flightsql.connect(endpoint, db_kwargs={
        "adbc.flight.sql.client_option.tls_root_certs": (pki / "ca.pem").read_text(),
        "adbc.flight.sql.client_option.mtls_cert_chain": (pki / "consortium.pem").read_text(),
        "adbc.flight.sql.client_option.mtls_private_key": (pki / "consortium.key").read_text(),
        # The manufacturers' policies require a declared purpose.
        "adbc.flight.sql.rpc.call_header.x-sluice-purpose": PURPOSE,
    }, autocommit=True)


def query(conn, sql: str) -> pa.Table:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table()


def at_manufacturer(name: str, endpoint: str, pki: Path) -> pa.Table:
    print(f"\n=== {name} ({endpoint})")
    with connect(endpoint, pki) as conn:
        print(f"\n  allowed: telemetry by event type, each group over >= {K} machines")
        by_type = query(conn, BY_EVENT_TYPE)
        show(by_type)
        check(by_type.num_rows > 0, f"{name}: the aggregate returned no rows")
        check(by_type.column("event_type").to_pylist() == EVENT_TYPES,
              f"{name}: expected one group per event type {EVENT_TYPES}, got "
              f"{by_type.column('event_type').to_pylist()}")
        check(set(by_type.column("manufacturer").to_pylist()) == {name},
              f"{name}: the connector serves another manufacturer's data: "
              f"{set(by_type.column('manufacturer').to_pylist())}")
        check(all(m >= K for m in by_type.column("machines").to_pylist()),
              f"{name}: a group with fewer than {K} machines was released")

        print(f"\n  allowed, but small groups are dropped: machines per site")
        by_site = query(conn, BY_SITE)
        show(by_site)
        sites = by_site.column("site").to_pylist()
        check(all(m >= K for m in by_site.column("machines").to_pylist()),
              f"{name}: a site with fewer than {K} machines was released")
        # The generator puts 14, 6, 10 and 10 machines at plants A to D.
        check(sites == ["Plant A", "Plant C", "Plant D"],
              f"{name}: expected Plant B (6 machines < k = {K}) to be suppressed, got sites {sites}")
        print(f"    Plant B is missing: it has fewer than {K} machines, so its group is suppressed.")

        print(f"\n  refused: raw rows")
        print(f"    {RAW_ROWS}")
        try:
            rows = query(conn, RAW_ROWS)
        except adbc_driver_manager.Error as e:
            message = str(e)
            print(f"    -> {type(e).__name__}: {message}")
            check("PERMISSION_DENIED" in message or "PermissionDenied" in message,
                  f"{name}: the refusal is not PERMISSION_DENIED: {message}")
            check("releases only aggregates" in message and f"at least {K} distinct" in message,
                  f"{name}: the refusal does not name the aggregation rule: {message}")
        else:
            raise Failed(f"{name}: raw rows were released ({rows.num_rows} rows), the policy should refuse them")
    return by_type


def combine(answers: dict[str, pa.Table]):
    """The consortium's own view: the manufacturers' aggregates side by side
    and combined (weighted by event counts). Computed from the released
    aggregates only."""
    print("\n=== combined across manufacturers (computed by the consortium from the aggregates)")
    combined = {}
    for table in answers.values():
        for row in table.to_pylist():
            c = combined.setdefault(row["event_type"], {"events": 0, "machines": 0, "temp_sum": 0.0, "energy": 0.0})
            c["events"] += row["events"]
            c["machines"] += row["machines"]
            c["temp_sum"] += (row["avg_temp_c"] or 0.0) * row["events"]
            c["energy"] += row["energy_kwh"] or 0.0
    table = pa.table({
        "event_type": list(combined),
        "events": [c["events"] for c in combined.values()],
        "machines": [c["machines"] for c in combined.values()],
        "avg_temp_c": [round(c["temp_sum"] / c["events"], 1) for c in combined.values()],
        "energy_kwh": [round(c["energy"]) for c in combined.values()],
    })
    show(table)
    check(all(m >= K * len(answers) for m in table.column("machines").to_pylist()),
          "the combined view should count the machines of every manufacturer")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pki", type=Path, required=True, help="directory with ca.pem, consortium.pem, consortium.key")
    parser.add_argument("--connector", action="append", required=True, metavar="NAME=ENDPOINT",
                        help="a manufacturer and its connector (repeatable)")
    args = parser.parse_args()
    answers = {}
    try:
        for spec in args.connector:
            name, sep, endpoint = spec.partition("=")
            check(bool(sep and name and endpoint), f"--connector {spec!r}: write NAME=ENDPOINT")
            answers[name] = at_manufacturer(name, endpoint, args.pki)
        combine(answers)
    except Failed as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        return 1
    print(f"\nOK: aggregates from {len(answers)} manufacturers, small groups suppressed, raw rows refused.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
