"""The demo usage policy through real clients: ADBC (Go Flight SQL driver) and
pyarrow.flight, over mTLS, against the embedded default as a newcomer runs it."""

import adbc_driver_manager
import datafusion
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import adbc_connect, flight_client

# The planning agency's view of trips, written out by hand: no ferries (row
# filter), groups of at least 10 distinct cards (k).
ORACLE = ("SELECT start_zone, count(*) AS trips, round(avg(distance_km), 4) AS km FROM trips "
          "WHERE mode <> 'ferry' AND mode = 'tram' GROUP BY start_zone "
          "HAVING count(DISTINCT card_id) >= 10 ORDER BY start_zone")
QUERY = ("SELECT start_zone, count(*) AS trips, round(avg(distance_km), 4) AS km FROM trips "
         "WHERE mode = 'tram' GROUP BY start_zone ORDER BY start_zone")


def test_an_allowed_aggregate_matches_the_policy_applied_by_hand(demo_daemon):
    ctx = datafusion.SessionContext()
    ctx.register_parquet("trips", str(demo_daemon.state_dir / "data" / "trips.parquet"))
    want = ctx.sql(ORACLE).to_arrow_table()
    with adbc_connect(demo_daemon, purpose="urban-planning") as conn, conn.cursor() as cur:
        cur.execute(QUERY)
        got = cur.fetch_arrow_table()
    assert got.num_rows > 0
    assert got.column_names == want.column_names
    for name in ("start_zone", "trips"):
        assert got.column(name).to_pylist() == want.column(name).to_pylist(), name
    # A sum of doubles depends on the order rows meet in (file scans and
    # decoded copies, partitions merged in parallel), so the rounded mean
    # may differ in its last digit.
    assert got.column("km").to_pylist() == pytest.approx(want.column("km").to_pylist(), abs=1.01e-4)
    assert got.schema.metadata[b"sluice.tags"] == b"personal"


@pytest.mark.parametrize("sql, rule", [
    ("SELECT mode, start_zone FROM trips", "grants.trips.aggregation"),
    ("SELECT fare_eur FROM trips ORDER BY fare_eur DESC LIMIT 1", "fare_eur"),
    ("SELECT max(fare_eur) FROM trips", "`max`"),
    # Issue 14: a negation by another spelling, an upper bound on a count,
    # and rows beside a condition on a column that may not be returned.
    ("SELECT count(*) FROM trips WHERE (start_zone = 'Z01') IS NOT TRUE", "grants.trips.comparisons"),
    ("SELECT start_zone, count(*) FROM trips GROUP BY start_zone HAVING count(*) BETWEEN 1 AND 20", "HAVING"),
    ("SELECT z.zone_id FROM zones z JOIN (SELECT start_zone FROM trips WHERE end_zone = 'Z01' "
     "GROUP BY start_zone) t ON z.zone_id = t.start_zone", "grants.trips.columns.end_zone"),
])
def test_forbidden_queries_are_refused_naming_the_rule(demo_daemon, sql, rule):
    with adbc_connect(demo_daemon, purpose="research") as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as info:
            cur.execute(sql)
            cur.fetch_arrow_table()
    message = str(info.value)
    assert "PermissionDenied" in message, message
    assert rule in message, message


def test_a_missing_purpose_is_a_failed_precondition(demo_daemon):
    client = flight_client(demo_daemon)
    descriptor = flight.FlightDescriptor.for_command(_statement("SELECT count(*) FROM trips"))
    # pyarrow maps FAILED_PRECONDITION to ArrowInvalid and names the code.
    with pytest.raises(pa.ArrowException) as info:
        client.get_flight_info(descriptor)
    assert "precondition failed" in str(info.value), str(info.value)
    assert "x-sluice-purpose" in str(info.value), str(info.value)
    options = flight.FlightCallOptions(headers=[(b"x-sluice-purpose", b"research")])
    info = client.get_flight_info(descriptor, options)
    table = client.do_get(info.endpoints[0].ticket, options).read_all()
    assert table.num_rows == 1


def test_catalog_shows_each_consumer_only_its_columns(demo_daemon):
    with adbc_connect(demo_daemon, "supplier") as conn:
        objects = conn.adbc_get_objects(depth="columns").read_all().to_pylist()
    tables = {
        table["table_name"]: [c["column_name"] for c in table["table_columns"]]
        for catalog in objects
        for schema in catalog["catalog_db_schemas"]
        for table in schema["db_schema_tables"]
    }
    assert set(tables) == {"machine_events", "zones"}
    assert sorted(tables["zones"]) == ["district", "zone_id"]


def _statement(sql: str) -> bytes:
    """A CommandStatementQuery wrapped in google.protobuf.Any, by hand."""
    from test_flight_tickets import statement_query
    return statement_query(sql).command
