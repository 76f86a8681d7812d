"""Datasets kept decoded in memory (`limits.table_cache`,
connector/src/catalog/decoded.rs), through pyarrow.flight over mTLS against
the real daemon.

The promises: a query answers from the decoded copy exactly what it would
answer from the files, and its release record names the same data version;
a file that changed (rewritten, replaced, deleted, even with its size and
modification time kept) is read from disk at once, never from the old copy,
and decoded again soon after; what does not fit in the budget is read from
its files.
"""

import os
import re
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import OPEN_POLICY, ROOT, Daemon, flight_client, sluice_bin
from sources_support import FlightCall, release_record
from test_flight_tickets import statement_query

DEFAULT_TOML = ROOT / "connector" / "src" / "default.toml"

QUERIES = [
    "SELECT * FROM machine_events ORDER BY event_id",
    "SELECT site, count(*) AS n, avg(energy_kwh) AS kwh, max(fault_code) AS f FROM machine_events "
    "WHERE event_type = 'fault' GROUP BY site ORDER BY site",
    "SELECT event_id, temperature_c FROM machine_events WHERE vibration_mm_s > 2 ORDER BY event_id LIMIT 7",
    "SELECT mode, count(*) AS n, sum(fare_eur) AS fares, min(start_time) AS first FROM trips "
    "WHERE start_zone IN ('Z01', 'Z02', 'Z07') GROUP BY mode ORDER BY mode",
    "SELECT a.mode, count(*) AS n FROM trips a JOIN trips b ON a.mode = b.mode AND a.start_zone = b.start_zone "
    "WHERE a.trip_id < 3000 AND b.trip_id < 3000 GROUP BY a.mode ORDER BY a.mode",
    "SELECT district, population FROM zones ORDER BY zone_id",
    "SELECT trip_id, card_id, age_band FROM trips WHERE trip_id % 50000 = 3 ORDER BY trip_id",
]


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _config(state: Path, data: Path, table_cache: str, extra_limits: str = "") -> Path:
    """The embedded default over the files in `data`, under the open test
    policy, with `limits.table_cache` set."""
    text = DEFAULT_TOML.read_text()
    text = text.replace('listen = "127.0.0.1:50051"',
                        f'listen = "127.0.0.1:0"\nstate_dir = "{state}"', 1)
    text = text.replace("[limits]\n", f'[limits]\ntable_cache = "{table_cache}"\n{extra_limits}', 1)
    text = text.replace('file = "policy.yaml"', f'file = "{OPEN_POLICY}"', 1)
    text = text.replace('path = "data/', f'path = "{data}/')
    path = state / "config.toml"
    path.write_text(text)
    return path


def _state(base: Path, name: str) -> Path:
    state = base / name
    subprocess.run([sluice_bin(), "init", "--state-dir", str(state)], check=True, capture_output=True)
    return state


def _start(state: Path, data: Path, table_cache: str) -> Daemon:
    return Daemon(state, "--config", str(_config(state, data, table_cache)))


def _decoded(daemon: Daemon, dataset: str) -> int:
    """How often the daemon has logged `dataset` decoded into memory."""
    logs = _plain("".join(daemon.logs))
    return len(re.findall(rf"dataset decoded into memory.*dataset={dataset}\b", logs))


def _wait_decoded(daemon: Daemon, dataset: str, times: int = 1, within: float = 120) -> None:
    deadline = time.monotonic() + within
    while _decoded(daemon, dataset) < times:
        assert daemon.running(), _plain("".join(daemon.logs))[-3000:]
        assert time.monotonic() < deadline, f"{dataset} not decoded {times}× in {within} s"
        time.sleep(0.1)


def _ask(daemon: Daemon, sql: str) -> pa.Table:
    client = flight_client(daemon)
    info = client.get_flight_info(statement_query(sql))
    return client.do_get(info.endpoints[0].ticket).read_all()


def _count(daemon: Daemon) -> int:
    return _ask(daemon, "SELECT count(*) AS n FROM machine_events").column("n")[0].as_py()


def _events_version(entry: dict) -> str:
    lines = [v for v in entry.get("data_versions", []) if v.startswith("machine_events: ")]
    assert len(lines) == 1, entry
    return lines[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A daemon keeping the demo data decoded and one reading the same
    files with the cache off."""
    base = tmp_path_factory.mktemp("table-cache")
    cached_state, files_state = _state(base, "cached"), _state(base, "files")
    data = cached_state / "data"
    cached = _start(cached_state, data, "512MiB")
    files = _start(files_state, data, "0")
    try:
        for dataset in ("trips", "machine_events", "zones"):
            _wait_decoded(cached, dataset)
        yield cached, files
    finally:
        cached.stop()
        files.stop()


@pytest.mark.parametrize("sql", QUERIES)
def test_the_decoded_copy_answers_what_the_files_answer(pair, sql):
    cached, files = pair
    got, want = _ask(cached, sql), _ask(files, sql)
    assert got.num_rows > 0, sql
    assert got.schema == want.schema, (got.schema, want.schema)
    assert got.column_names == want.column_names
    for name in got.column_names:
        a, b = got.column(name).to_pylist(), want.column(name).to_pylist()
        if pa.types.is_floating(got.schema.field(name).type):
            # Sums of doubles depend on the order rows meet in, which
            # parallel aggregation leaves open even between two runs.
            assert a == pytest.approx(b, rel=1e-12, abs=1e-12), (sql, name)
        else:
            assert a == b, (sql, name)
    assert _decoded(files, "trips") == 0, "the cache is off in the other daemon"


def test_a_release_record_from_the_copy_names_the_version_of_the_files(pair):
    cached, files = pair
    records = []
    for daemon in (cached, files):
        call = FlightCall(daemon, "planning")
        call.do_get(call.get_flight_info(QUERIES[1]))
        records.append(_events_version(release_record(daemon, call)))
    assert records[0] == records[1], records
    assert re.match(r"machine_events: 1 file\(s\), newest modified \S+, digest [0-9a-f]{24}$", records[0]), records


@pytest.fixture
def alone(tmp_path):
    """A daemon keeping its own copy of the demo data decoded."""
    state = _state(tmp_path, "state")
    daemon = _start(state, state / "data", "512MiB")
    try:
        _wait_decoded(daemon, "machine_events")
        yield daemon, state / "data" / "machine_events.csv"
    finally:
        daemon.stop()


def _rows(csv: Path) -> int:
    return pacsv.read_csv(csv).num_rows


def test_a_changed_file_is_read_from_disk_at_once_and_decoded_again(alone):
    daemon, csv = alone
    original = csv.read_bytes()
    assert _count(daemon) == _rows(csv)

    # Replaced by a rename: a new inode.
    lines = original.splitlines(keepends=True)
    shorter = b"".join(lines[:1001])
    csv.with_suffix(".new").write_bytes(shorter)
    csv.with_suffix(".new").replace(csv)
    assert _count(daemon) == 1000, "the old copy answered after the file was replaced"
    _wait_decoded(daemon, "machine_events", times=2)
    assert _count(daemon) == 1000

    # Rewritten in place with the same size and the old modification time:
    # only the change time tells. Every `fault` row becomes `idle`.
    stat = csv.stat()
    rewritten = shorter.replace(b",fault,", b",idle_,")
    assert len(rewritten) == len(shorter) and rewritten != shorter
    faults = "SELECT count(*) AS n FROM machine_events WHERE event_type = 'fault'"
    assert _ask(daemon, faults).column("n")[0].as_py() > 0
    with open(csv, "r+b") as f:
        f.write(rewritten)
    os.utime(csv, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert csv.stat().st_size == stat.st_size and csv.stat().st_mtime_ns == stat.st_mtime_ns
    assert _ask(daemon, faults).column("n")[0].as_py() == 0, "the old copy answered after an in-place rewrite"
    _wait_decoded(daemon, "machine_events", times=3)
    assert _ask(daemon, faults).column("n")[0].as_py() == 0


def test_a_deleted_file_is_unavailable_not_answered_from_the_copy(alone):
    daemon, csv = alone
    assert _count(daemon) == _rows(csv)
    away = csv.with_suffix(".away")
    csv.rename(away)
    try:
        with pytest.raises(flight.FlightError) as refused:
            _count(daemon)
        message = str(refused.value)
        assert "dataset `machine_events`" in message and ".csv" not in message, message
        # Other datasets are served meanwhile.
        assert _ask(daemon, "SELECT count(*) AS n FROM zones").column("n")[0].as_py() > 0
    finally:
        away.rename(csv)
    assert _count(daemon) == _rows(csv)


def test_a_query_begun_from_the_copy_reads_a_consistent_snapshot(alone):
    # From the copy, a file cut short mid-stream does not cut the result:
    # the query reads the version it began with, to the end (with the cache
    # off, it fails naming the dataset: connector/tests/faults.rs).
    daemon, csv = alone
    rows = _rows(csv)
    client = flight_client(daemon)
    info = client.get_flight_info(statement_query("SELECT * FROM machine_events"))
    reader = client.do_get(info.endpoints[0].ticket)
    first = reader.read_chunk().data.num_rows
    content = csv.read_bytes()
    # A few bytes into a line: what is left ends in a line cut short.
    cut = content.index(b"\n", len(content) // 3) + 5
    with open(csv, "r+b") as f:
        f.truncate(cut)
    rest = reader.read_all().num_rows
    assert first + rest == rows
    with pytest.raises(flight.FlightError):
        _count(daemon)  # the cut file, read from disk: a line cut short


def test_what_does_not_fit_the_budget_is_read_from_its_files(tmp_path):
    state = _state(tmp_path, "state")
    # 2 MiB: the zones fit, the 50,000 events (about 5 MB decoded) and the
    # million trips do not.
    daemon = _start(state, state / "data", "2MiB")
    try:
        _wait_decoded(daemon, "zones")
        deadline = time.monotonic() + 60
        logs = ""
        while time.monotonic() < deadline:
            logs = _plain("".join(daemon.logs))
            if all(re.search(rf"not kept decoded.*dataset={d}\b", logs) for d in ("trips", "machine_events")):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"trips and machine_events were not passed over:\n{logs[-3000:]}")
        assert _decoded(daemon, "trips") == 0 and _decoded(daemon, "machine_events") == 0
        assert _count(daemon) == _rows(state / "data" / "machine_events.csv")
        # Passed over once per version of the files, not at every round.
        time.sleep(6)
        logs = _plain("".join(daemon.logs))
        assert len(re.findall(r"not kept decoded.*dataset=trips\b", logs)) == 1, logs[-3000:]
    finally:
        daemon.stop()


def _write_trips(table: pa.Table, path: Path) -> None:
    # Small row groups, so that scans skip row groups by their min/max;
    # fixed-width pages (no compression, no dictionary), so that trips
    # with other ids make a file of the same size.
    pq.write_table(table, path, row_group_size=2_000, compression="NONE", use_dictionary=False)


@pytest.mark.parametrize("table_cache", ["0", "512MiB"])
def test_a_parquet_file_rewritten_keeping_size_and_time_is_read_with_its_new_footer(tmp_path, table_cache):
    # A Parquet footer holds each row group's min/max, by which a scan
    # skips row groups (and by which min, max and count can be answered
    # without reading any). DataFusion keeps footers while a file's size
    # and modification time are unchanged; a file rewritten in place
    # keeping both must still be answered from its new footer, with the
    # decoded copies on or off (connector/src/catalog/footers.rs).
    state = _state(tmp_path, "state")
    trips = state / "data" / "trips.parquet"
    table = pq.read_table(trips).slice(0, 20_000)
    _write_trips(table, trips)
    moved = table.set_column(table.schema.get_field_index("trip_id"), table.schema.field("trip_id"),
                             pc.add(table.column("trip_id"), 10_000_000))
    replacement = tmp_path / "moved.parquet"
    _write_trips(moved, replacement)
    assert replacement.stat().st_size == trips.stat().st_size, "the test needs two files of one size"
    # Footers are kept only of files that have not changed for 2 s.
    time.sleep(2.5)
    daemon = _start(state, state / "data", table_cache)
    try:
        if table_cache != "0":
            _wait_decoded(daemon, "trips")
        high = "SELECT count(*) AS n FROM trips WHERE trip_id >= 10000000"
        bounds = "SELECT min(trip_id) AS lo, max(trip_id) AS hi, count(*) AS n FROM trips"
        old_bounds = (pc.min(table.column("trip_id")).as_py(), pc.max(table.column("trip_id")).as_py(), 20_000)
        new_bounds = (old_bounds[0] + 10_000_000, old_bounds[1] + 10_000_000, 20_000)
        for _ in range(2):  # the second time from the kept footer
            assert _ask(daemon, high).column("n")[0].as_py() == 0
            assert tuple(_ask(daemon, bounds).to_pylist()[0].values()) == old_bounds

        stat = trips.stat()
        with open(trips, "r+b") as f:
            f.write(replacement.read_bytes())
        os.utime(trips, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert (trips.stat().st_size, trips.stat().st_mtime_ns, trips.stat().st_ino) == \
            (stat.st_size, stat.st_mtime_ns, stat.st_ino)

        assert _ask(daemon, high).column("n")[0].as_py() == 20_000, "row groups skipped by the old footer"
        assert tuple(_ask(daemon, bounds).to_pylist()[0].values()) == new_bounds, "answered from the old footer"
        if table_cache != "0":
            _wait_decoded(daemon, "trips", times=2)
        time.sleep(2.5)  # settled: its footer may be kept again, the new one
        for _ in range(2):
            assert _ask(daemon, high).column("n")[0].as_py() == 20_000
            assert tuple(_ask(daemon, bounds).to_pylist()[0].values()) == new_bounds
    finally:
        daemon.stop()
