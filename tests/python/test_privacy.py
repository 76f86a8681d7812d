"""Differentially private answers through real clients: ADBC (Go Flight SQL
driver) and pyarrow.flight, over mTLS, for the demo's research institute,
which may read `trips` only under differential privacy."""

import adbc_driver_manager
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import adbc_connect, flight_client
from test_flight_tickets import statement_query

BY_MODE = ("SELECT mode, count(*) AS trips, avg(fare_eur) AS fare FROM trips "
           "GROUP BY mode ORDER BY mode")


def _options(epsilon: str | None = None) -> flight.FlightCallOptions:
    headers = [(b"x-sluice-purpose", b"research")]
    if epsilon is not None:
        headers.append((b"x-sluice-epsilon", epsilon.encode()))
    return flight.FlightCallOptions(headers=headers)


def _run(client, sql: str, epsilon: str | None = None) -> pa.Table:
    options = _options(epsilon)
    descriptor = statement_query(sql)
    info = client.get_flight_info(descriptor, options)
    return client.do_get(info.endpoints[0].ticket, options).read_all()


def test_adbc_gets_noisy_groups_with_their_metadata(demo_daemon):
    with adbc_connect(demo_daemon, "research", purpose="research") as conn, conn.cursor() as cur:
        cur.execute(BY_MODE)
        table = cur.fetch_arrow_table()
    # The policy publishes the modes: every one is reported (ferries are
    # filtered out by the row filter), and no other.
    assert table.column("mode").to_pylist() == ["bike", "bus", "metro", "tram"]
    trips = table.schema.field("trips").metadata
    assert trips[b"sluice.dp.mechanism"] == b"discrete_laplace"
    assert float(trips[b"sluice.dp.ci95_half_width"]) > 0
    fare = table.schema.field("fare").metadata
    assert b"excludes bias from clamping" in fare[b"sluice.dp.note"]
    assert all(0 <= f <= 10 for f in table.column("fare").to_pylist())
    assert float(table.schema.metadata[b"sluice.dp.query_epsilon"]) == 0.5


def test_each_new_query_is_charged_and_a_repeat_is_free(demo_daemon):
    client = flight_client(demo_daemon, "research")
    first = _run(client, "SELECT count(*) AS n FROM trips WHERE start_zone = 'Z01'", "0.25")
    before = float(first.schema.metadata[b"sluice.dp.remaining_epsilon"])
    second = _run(client, "SELECT count(*) AS n FROM trips WHERE start_zone = 'Z02'", "0.25")
    after = float(second.schema.metadata[b"sluice.dp.remaining_epsilon"])
    assert after == pytest.approx(before - 0.25, abs=1e-9)
    again = _run(client, "SELECT count(*) AS n FROM trips WHERE start_zone = 'Z02'", "0.25")
    assert again.schema.metadata[b"sluice.dp.cached"] == b"true"
    assert again.column("n").to_pylist() == second.column("n").to_pylist()


def test_epsilon_above_the_cap_is_refused(demo_daemon):
    client = flight_client(demo_daemon, "research")
    with pytest.raises(flight.FlightUnauthorizedError) as info:
        _run(client, "SELECT count(*) FROM trips", "5")
    assert "above the 1 allowed per query" in str(info.value)


def test_rows_and_unsupported_aggregates_are_refused(demo_daemon):
    with adbc_connect(demo_daemon, "research", purpose="research") as conn, conn.cursor() as cur:
        for sql in ["SELECT fare_eur FROM trips", "SELECT count(DISTINCT start_zone) FROM trips"]:
            with pytest.raises(adbc_driver_manager.Error) as info:
                cur.execute(sql)
                cur.fetch_arrow_table()
            assert "PermissionDenied" in str(info.value), str(info.value)
