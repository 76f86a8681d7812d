"""ADBC (adbc-driver-flightsql, the Go Flight SQL driver) over mTLS."""

import json
import re
import subprocess

import adbc_driver_manager
import datafusion
import pyarrow as pa
import pytest

from conftest import adbc_connect, sluice_bin


def datafusion_answer(state_dir, sql: str) -> pa.Table:
    """DataFusion's own answer (the Python bindings) on the same demo files."""
    ctx = datafusion.SessionContext()
    ctx.register_parquet("trips", str(state_dir / "data" / "trips.parquet"))
    return ctx.sql(sql).to_arrow_table()


def rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def test_query_matches_datafusion_on_the_same_file(daemon):
    sql = ("SELECT mode, start_zone, count(*) AS trips, round(sum(distance_km), 3) AS km, max(fare_eur) AS top_fare "
           "FROM trips WHERE age_band IS NOT NULL GROUP BY mode, start_zone ORDER BY mode, start_zone")
    with adbc_connect(daemon) as conn, conn.cursor() as cur:
        cur.execute(sql)
        got = cur.fetch_arrow_table()
    want = datafusion_answer(daemon.state_dir, sql)
    assert got.num_rows > 10
    assert got.column_names == want.column_names
    assert rows(got) == rows(want)


def test_whole_table_arrives_with_exact_types(daemon):
    with adbc_connect(daemon, "supplier") as conn, conn.cursor() as cur:
        cur.execute("SELECT * FROM trips")
        table = cur.fetch_arrow_table()
    assert table.num_rows == 1_000_000
    assert table.schema.field("trip_id").type == pa.int64()
    assert table.schema.field("start_time").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("card_id").nullable is False


def test_get_objects_lists_catalog_schema_tables_and_columns(daemon):
    with adbc_connect(daemon) as conn:
        objects = conn.adbc_get_objects(depth="all").read_all().to_pylist()
    catalogs = {c["catalog_name"]: c for c in objects}
    assert list(catalogs) == ["sluice"]
    schemas = {s["db_schema_name"]: s for s in catalogs["sluice"]["catalog_db_schemas"]}
    assert list(schemas) == ["public"]
    tables = {t["table_name"]: t for t in schemas["public"]["db_schema_tables"]}
    assert set(tables) == {"trips", "machine_events", "zones"}
    assert tables["trips"]["table_type"] == "TABLE"
    columns = [c["column_name"] for c in tables["trips"]["table_columns"]]
    assert columns[:3] == ["trip_id", "card_id", "start_time"]
    assert len(columns) == 10

    with adbc_connect(daemon) as conn:
        schema = conn.adbc_get_table_schema("machine_events")
    assert schema.field("event_time").type == pa.timestamp("us")


def test_prepared_statement_with_bound_parameter(daemon):
    sql = "SELECT count(*) AS n, round(sum(fare_eur), 2) AS fares FROM trips WHERE mode = ?"
    with adbc_connect(daemon) as conn, conn.cursor() as cur:
        for mode in ["bus", "tram", "metro", "no-such-mode"]:
            cur.execute(sql, parameters=(mode,))
            got = cur.fetch_arrow_table()
            want = datafusion_answer(daemon.state_dir, sql.replace("?", f"'{mode}'"))
            assert rows(got) == rows(want), mode
        # Explicitly prepared once, executed with two different bindings.
        cur.adbc_prepare("SELECT count(*) AS n FROM trips WHERE distance_km > ?")
        counts = []
        for km in [1.0, 20.0]:
            cur.execute("SELECT count(*) AS n FROM trips WHERE distance_km > ?", parameters=(km,))
            counts.append(cur.fetchone()[0])
        assert counts[0] > counts[1] > 0


def test_bad_sql_raises_and_the_connection_still_works(daemon):
    with adbc_connect(daemon) as conn, conn.cursor() as cur:
        # The driver reports the gRPC code by name, next to Sluice's message.
        for sql, code, says in [("SELEC 1", "InvalidArgument", "syntax"),
                                ("SELECT * FROM missing_table", "NotFound", "missing_table"),
                                ("DROP TABLE trips", "PermissionDenied", "read-only")]:
            with pytest.raises(adbc_driver_manager.Error) as info:
                cur.execute(sql)
                cur.fetch_arrow_table()
            assert code in str(info.value), str(info.value)
            assert says in str(info.value), str(info.value)
        cur.execute("SELECT 1 AS one")
        assert cur.fetchone() == (1,)
    assert daemon.running()


def test_the_readme_example_runs(demo_daemon):
    daemon = demo_daemon
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, str(ROOT / "examples" / "python" / "adbc_query.py"),
                          str(daemon.state_dir), daemon.uri], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "sluice.public.trips" in out.stdout
    assert "start_zone" in out.stdout


# ADBC executes every query by preparing it (CreatePreparedStatement, then
# GetFlightInfo for the prepared statement). A query refused at prepare time
# never reaches GetFlightInfo, so the prepare decision is the only record of
# it: three such refusals once left audit.jsonl empty.
REFUSED_AT_PREPARE = [
    ("SELECT * FROM trips", "PermissionDenied", "denied"),
    ("SELECT fare_eur FROM trips LIMIT 3", "PermissionDenied", "denied"),
    ("SELECT card_id FROM trips", "InvalidArgument", "invalid"),  # hidden: not in the caller's view
    ("SELECT * FROM no_such_table", "NotFound", "invalid"),
]
CODE_NAMES = {"PermissionDenied": "PERMISSION_DENIED", "InvalidArgument": "INVALID_ARGUMENT",
              "NotFound": "NOT_FOUND"}
RECEIPT_ID = re.compile(r"audit receipt (r\d{8,}-[0-9a-f]{8})")


def audit_records(daemon) -> list[dict]:
    log = daemon.state_dir / "audit" / "audit.jsonl"
    return [json.loads(line)["record"] for line in log.read_text().splitlines() if line.strip()]


def test_queries_refused_at_prepare_time_are_on_the_audit_log(demo_daemon):
    before = len(audit_records(demo_daemon))
    receipts = []
    with adbc_connect(demo_daemon, "planning", purpose="research") as conn, conn.cursor() as cur:
        for sql, code, _ in REFUSED_AT_PREPARE:
            with pytest.raises(adbc_driver_manager.Error) as info:
                cur.execute(sql)
                cur.fetch_arrow_table()
            message = str(info.value)
            assert code in message, message
            found = RECEIPT_ID.search(message)
            assert found, f"no audit receipt in: {message}"
            receipts.append((found.group(1), message))
    new = audit_records(demo_daemon)[before:]
    by_receipt = {r["receipt_id"]: r for r in new}
    for (receipt, message), (sql, code, outcome) in zip(receipts, REFUSED_AT_PREPARE):
        record = by_receipt[receipt]
        entry = record["entry"]
        assert entry["event"] == "prepare", entry
        assert entry["outcome"] == outcome, entry
        assert entry["organization"] == "City Planning Agency", entry
        assert entry["code"] == CODE_NAMES[code], entry
        if outcome == "denied":
            # The rule that refused, as the client was told.
            assert entry["rule"] and f"`{entry['rule']}`" in message, (entry, message)
    # Refused at prepare, so never issued: no decision or release follows.
    assert [r["entry"]["event"] for r in new] == ["prepare"] * len(REFUSED_AT_PREPARE), new
    verify = subprocess.run([sluice_bin(), "audit", "verify", "--state-dir", str(demo_daemon.state_dir)],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_an_allowed_adbc_query_is_recorded_once_per_step(demo_daemon):
    sql = "SELECT mode, count(*) AS trips FROM trips GROUP BY mode ORDER BY mode"
    before = len(audit_records(demo_daemon))
    with adbc_connect(demo_daemon, "planning", purpose="research") as conn, conn.cursor() as cur:
        cur.execute(sql)
        assert cur.fetch_arrow_table().num_rows > 0
    new = [r["entry"] for r in audit_records(demo_daemon)[before:]]
    # The prepare decision, then the execution's decision, release and
    # completion: each once.
    assert [(e["event"], e["outcome"]) for e in new] == [
        ("prepare", "allowed"), ("decision", "allowed"), ("release", "released"),
        ("completion", "completed")], new
    assert new[0]["plan_hash"] and new[1]["query_id"] == new[2]["query_id"] == new[3]["query_id"]
