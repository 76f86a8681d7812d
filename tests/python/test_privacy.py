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


def _card_counts(daemon) -> list[int]:
    """Trips per card in the demo data, as the research grant sees it (no
    ferries)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    trips = pq.read_table(daemon.state_dir / "data" / "trips.parquet", columns=["card_id", "mode"])
    trips = trips.filter(pc.not_equal(trips["mode"], "ferry"))
    return trips.group_by("card_id").aggregate([("card_id", "count")])["card_id_count"].to_pylist()


def test_an_answer_says_how_much_its_bounds_left_out(demo_daemon):
    """`SELECT count(*)` counts at most max_rows = 50 trips per card. The
    answer's metadata estimates, privately, the share of trips beyond that
    cap; it must be near the share the plan leaves out (each card's excess
    counted up to another 50, as documented), and its ε is part of the
    query's."""
    client = flight_client(demo_daemon, "research")
    table = _run(client, "SELECT count(*) AS n FROM trips", "0.5")
    field = table.schema.field("n").metadata
    counts = _card_counts(demo_daemon)
    cap = 50
    counted = sum(min(c, cap) for c in counts)
    over = sum(min(max(c - cap, 0), cap) for c in counts)
    expected = over / (counted + over)
    # Laplace noise of scale 50 / 0.025 = 2,000 trips on each of two totals
    # near 900,000: 0.02 is over 8 scales away (false alarm below 1e-3).
    assert float(field[b"sluice.dp.bias.rows_over_max_rows"]) == pytest.approx(expected, abs=0.02)
    assert 0.02 < expected < 0.2, expected  # the demo data is skewed: a real check
    assert float(field[b"sluice.dp.bias.epsilon"]) == pytest.approx(0.05)
    split = table.schema.metadata[b"sluice.dp.budget_split"].decode()
    share = split.split("bias estimates (rows counted, rows over max_rows) ε ")[1]
    assert float(share) == pytest.approx(0.05), split
    sentence = table.schema.metadata[b"sluice.dp.bias"].decode()
    assert "of rows were not counted" in sentence and "max_rows = 50" in sentence, sentence
    # Only a grouped query with more keys than max_groups drops groups.
    assert b"sluice.dp.bias.rows_over_max_groups" not in field


def test_a_capped_group_by_reports_groups_dropped_and_values_clamped(demo_daemon):
    client = flight_client(demo_daemon, "research")
    table = _run(client, "SELECT start_zone, count(*) AS n, avg(fare_eur) AS fare FROM trips"
                 " GROUP BY start_zone", "0.2")
    fare = table.schema.field("fare").metadata
    for key in (b"sluice.dp.bias.rows_over_max_groups", b"sluice.dp.bias.clamped"):
        assert 0.0 <= float(fare[key]) <= 1.0, key
    assert b"fare_eur values were clamped to [0, 10]" in fare[b"sluice.dp.bias"]
    # The count reads no values: no clamping on its field.
    assert b"sluice.dp.bias.clamped" not in table.schema.field("n").metadata


def test_the_query_log_times_the_whole_private_answer(demo_daemon):
    """The DP answer is computed before its stream starts: the `query
    finished` line must still count that time (it once said 1.6 ms for an
    8.5 s query)."""
    import re
    import time

    client = flight_client(demo_daemon, "research")
    options = _options("0.1")
    info = client.get_flight_info(statement_query(
        "SELECT end_zone, count(*) AS n, sum(distance_km) AS km FROM trips GROUP BY end_zone"), options)
    started = time.monotonic()
    client.do_get(info.endpoints[0].ticket, options).read_all()
    waited_ms = (time.monotonic() - started) * 1e3
    time.sleep(0.5)  # the log line is written when the stream is dropped
    finished = [line for line in demo_daemon.logs if "query finished" in line]
    assert finished, "no query finished line"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", finished[-1])
    logged_ms = float(re.search(r"duration_ms=([0-9.]+)", plain).group(1))
    assert logged_ms >= 0.5 * waited_ms, (logged_ms, waited_ms)
