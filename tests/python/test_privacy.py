"""Differentially private answers through real clients: ADBC (Go Flight SQL
driver) and pyarrow.flight, over mTLS, for the demo's research institute,
which may read `trips` only under differential privacy."""

import math
import re
import subprocess

import adbc_driver_manager
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import (DEMO_POLICY, Daemon, adbc_connect, ensure_research_agreement, flight_client,
                      grpc_channel, sluice_bin, sluice_v1)
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


# zCDP accounting ------------------------------------------------------------

ZCDP_BUDGET = "budget: { epsilon: 3.0, delta: 1.0e-6, period: month, accounting: zcdp }"


def _rho_for(epsilon: float, delta: float) -> float:
    """The ρ whose zCDP → (ε, δ) conversion ρ + 2·√(ρ·ln(1/δ)) is ε."""
    log_term = math.log(1 / delta)
    return (epsilon / (math.sqrt(log_term + epsilon) + math.sqrt(log_term))) ** 2


def _epsilon_of(rho: float, delta: float) -> float:
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


@pytest.fixture(scope="module")
def zcdp_daemon(tmp_path_factory):
    """The demo, with the research grant's budget composing in zCDP (3 ε and
    1e-6 δ a month, Gaussian noise), in a state directory of its own."""
    yield from _demo_daemon_with(tmp_path_factory, "zcdp", {
        "budget: { epsilon: 10.0, delta: 1.0e-6, period: month }": ZCDP_BUDGET,
        "noise: laplace": "noise: gaussian",
    })


def _demo_daemon_with(tmp_path_factory, name: str, changes: dict):
    """A daemon over the demo, in a state directory of its own, with its
    policy changed as `changes` says (each text found exactly once), and the
    research institute's agreement in place."""
    state = tmp_path_factory.mktemp(f"{name}-state")
    subprocess.run([sluice_bin(), "init", "--state-dir", str(state)], check=True, capture_output=True)
    text = DEMO_POLICY.read_text()
    for old, new in changes.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    policy = state / f"{name}-policy.yaml"
    policy.write_text(text)
    daemon = Daemon(state, "--policy", str(policy))
    try:
        ensure_research_agreement(daemon)
    except BaseException:
        daemon.stop()
        raise
    yield daemon
    daemon.stop()


def test_zcdp_budget_admits_the_queries_its_rho_allows(zcdp_daemon):
    """Queries of ε 1 at δ 1e-8 against 3 ε: three fit when their ε add up;
    in zCDP their ρ add up, and the ledger converts the sum at half the
    budget's δ. The daemon must admit exactly as many as that sum allows,
    report the same remaining ε, and refuse the next one."""
    rho = _rho_for(1.0, 1e-8)
    conversion_delta = 0.5e-6
    expected = math.floor(_rho_for(3.0, conversion_delta) / rho)
    assert expected > 3
    client = flight_client(zcdp_daemon, "research")
    admitted = 0
    for zone in range(1, 41):
        sql = f"SELECT count(*) AS n FROM trips WHERE start_zone = 'Z{zone:02d}'"
        try:
            table = _run(client, sql, "1.0")
        except pa.ArrowException as refused:
            # RESOURCE_EXHAUSTED, naming what remains and what was asked.
            assert "resource exhausted" in str(refused), str(refused)
            assert "privacy budget exhausted" in str(refused), str(refused)
            break
        admitted += 1
        metadata = table.schema.metadata
        assert float(metadata[b"sluice.dp.query_epsilon"]) == 1.0
        assert float(metadata[b"sluice.dp.query_rho"]) == pytest.approx(rho, rel=1e-9)
        assert float(metadata[b"sluice.dp.query_charged_delta"]) == 0.0
        spent = _epsilon_of(admitted * rho, conversion_delta)
        assert float(metadata[b"sluice.dp.remaining_epsilon"]) == pytest.approx(3.0 - spent, abs=1e-8)
        field = table.schema.field("n").metadata
        assert field[b"sluice.dp.mechanism"] == b"discrete_gaussian"
        assert float(field[b"sluice.dp.rho"]) > 0
    else:
        pytest.fail("the zCDP budget never ran out")
    assert admitted == expected

    pb = sluice_v1()
    with grpc_channel(zcdp_daemon, "research") as channel:
        lines = pb.budget_pb2_grpc.BudgetServiceStub(channel).GetBudget(
            pb.budget_pb2.GetBudgetRequest(dataset="trips"), timeout=30).budgets
    assert len(lines) == 1
    assert lines[0].rho_spent == pytest.approx(admitted * rho, rel=1e-9)
    assert lines[0].epsilon_spent == pytest.approx(_epsilon_of(admitted * rho, conversion_delta), abs=1e-8)
    assert lines[0].delta_spent == pytest.approx(conversion_delta)


# Bounds chosen from the data ---------------------------------------------------

@pytest.fixture(scope="module")
def auto_daemon(tmp_path_factory):
    """The demo, with the research grant's `max_groups`, `max_rows` and
    fare bounds written `auto`, in a state directory of its own."""
    yield from _demo_daemon_with(tmp_path_factory, "auto", {
        "max_groups: 10\n": "max_groups: auto\n",
        "max_rows: 50\n": "max_rows: auto\n",
        "fare_eur: { bounds: [0, 10] }": "fare_eur: { bounds: auto }",
    })


def _exact_by_mode(daemon) -> dict:
    import pyarrow.parquet as pq

    trips = pq.read_table(daemon.state_dir / "data" / "trips.parquet", columns=["mode"])
    counts = trips.group_by("mode").aggregate([("mode", "count")]).to_pylist()
    return {row["mode"]: row["mode_count"] for row in counts if row["mode"] != "ferry"}


def test_auto_bounds_are_chosen_privately_and_reported(auto_daemon):
    """The README's query over `auto` bounds: 10% of its ε chooses them (DP
    quantiles of per-card contributions and fares), the answer says which
    were chosen and at what cost, and the counts stay close to the exact ones.

    False alarms: the upper fare bound is 6 (every card's largest fare is
    below 5.4) unless the mechanism climbs five grid steps (e^-10); max_rows
    outside [16, 128] needs at least 26 noise scales of rank or three steps
    beyond the data (below e^-6); a count more than 15% off needs noise of
    over 7 scales (e^-7) on top of the caps' at most 12% bias. Together
    below 2e-3."""
    client = flight_client(auto_daemon, "research")
    table = _run(client, BY_MODE, "0.5")
    metadata = table.schema.metadata
    sentence = metadata[b"sluice.dp.auto_bounds"].decode()
    max_rows = int(re.search(r"max_rows = (\d+)", sentence).group(1))
    lower, upper = map(float, re.search(r"fare_eur in \[([-0-9.e]+), ([-0-9.e]+)\]", sentence).groups())
    assert 16 <= max_rows <= 128, sentence
    assert lower == 0.0 and upper in (6.0, 8.0, 12.0, 16.0, 24.0), sentence
    assert "max_groups = " in sentence and "differential privacy" in sentence, sentence
    split = metadata[b"sluice.dp.budget_split"].decode()
    share = split.split("choosing bounds (max_groups, max_rows, upper bound of fare_eur, "
                        "lower bound of fare_eur) ε ")[1]
    assert float(share) == pytest.approx(0.05), split
    assert float(metadata[b"sluice.dp.query_epsilon"]) == 0.5
    # The bias estimate names the cap that was chosen.
    assert f"max_rows = {max_rows}" in metadata[b"sluice.dp.bias"].decode()
    exact = _exact_by_mode(auto_daemon)
    for row in table.to_pylist():
        assert row["trips"] == pytest.approx(exact[row["mode"]], rel=0.15), (row, exact, sentence)
        assert 0 <= row["fare"] <= upper


def test_explain_policy_says_which_bounds_are_auto(auto_daemon):
    client = flight_client(auto_daemon, "research")
    table = _run(client, "EXPLAIN POLICY SELECT start_zone, count(*) FROM trips GROUP BY start_zone")
    rules = table.column("rule")[0].as_py()
    assert "max_rows = auto (the 0.99-quantile" in rules, rules
    assert "max_groups = auto (the 0.9-quantile" in rules, rules
    assert "choosing bounds (max_groups, max_rows) ε" in rules, rules


def test_the_catalog_says_which_bounds_are_auto(auto_daemon):
    """An `auto` column's compiled worst case (±1.6e9) is no bound any answer
    uses: the catalog says `auto` instead, and keeps the fixed ones."""
    pb = sluice_v1()
    with grpc_channel(auto_daemon, "research") as channel:
        trips = pb.catalog_pb2_grpc.CatalogServiceStub(channel).GetDataset(
            pb.catalog_pb2.GetDatasetRequest(name="trips"), timeout=30)
    columns = {c.name: c for c in trips.columns}
    assert columns["fare_eur"].dp_bounds_auto
    assert list(columns["fare_eur"].dp_bounds) == []
    assert not columns["distance_km"].dp_bounds_auto
    assert list(columns["distance_km"].dp_bounds) == [0.0, 30.0]
    [offer] = trips.offers
    assert offer.dp.max_rows == 0 and offer.dp.max_groups == 0
    assert "row(s) (a number each query chooses from the data, privately)" in offer.guarantee
