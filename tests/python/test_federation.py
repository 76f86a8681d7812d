"""Federation through a broker, as three processes: two transport operators'
connectors (north, south) and a broker, started by examples/broker/run.sh
--up (the same topology as docker/compose.yaml), queried with ADBC and
pyarrow.flight as the City Planning Agency.

Each operator decides the broker's partial query under its own policy, for
the agency (the broker's signed on-behalf-of assertion) and for the broker
itself; noises it; charges its own budget; signs its own receipt."""

import base64
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import grpc
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import ROOT, sluice_bin, sluice_v1
from test_flight_tickets import statement_query

pb = sluice_v1()
PURPOSE = "urban-planning"
BROKER_ID = "spiffe://mobility.example/org/regional-broker"
PLANNING_ID = "spiffe://mobility.example/org/city-planning"
TIMEOUT = 60


def free_base() -> int:
    """Three consecutive free loopback ports."""
    for base in range(52091, 60000, 7):
        taken = False
        for port in range(base, base + 3):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    taken = True
                    break
        if not taken:
            return base
    raise RuntimeError("no three free ports")


class Mobility:
    def __init__(self, run_dir: Path, base: int):
        self.run = run_dir
        self.pki = run_dir / "pki"
        self.north = f"grpc+tls://127.0.0.1:{base}"
        self.south = f"grpc+tls://127.0.0.1:{base + 1}"
        self.broker = f"grpc+tls://127.0.0.1:{base + 2}"
        self.env = {
            **os.environ,
            "SLUICE_BIN": sluice_bin(),
            "SLUICE_EXAMPLE_RUN_DIR": str(run_dir),
            "SLUICE_EXAMPLE_PORT_BASE": str(base),
            "TRIPS_ROWS": "60000",
        }

    def pids(self) -> dict[str, int]:
        names = ["north", "south", "broker"]
        values = [int(p) for p in (self.run / "pids").read_text().split()]
        return dict(zip(names, values))

    def pem(self, name: str) -> bytes:
        return (self.pki / name).read_bytes()

    def adbc(self, endpoint: str, identity: str = "planning", epsilon: float | None = None,
             allow_partial: bool = False):
        options = {
            "adbc.flight.sql.client_option.tls_root_certs": self.pem("ca.pem").decode(),
            "adbc.flight.sql.client_option.mtls_cert_chain": self.pem(f"{identity}.pem").decode(),
            "adbc.flight.sql.client_option.mtls_private_key": self.pem(f"{identity}.key").decode(),
            "adbc.flight.sql.rpc.call_header.x-sluice-purpose": PURPOSE,
        }
        if epsilon is not None:
            options["adbc.flight.sql.rpc.call_header.x-sluice-epsilon"] = str(epsilon)
        if allow_partial:
            options["adbc.flight.sql.rpc.call_header.x-sluice-allow-partial"] = "true"
        return flightsql.connect(endpoint, db_kwargs=options, autocommit=True)

    def query(self, endpoint: str, sql: str, **kw) -> pa.Table:
        with self.adbc(endpoint, **kw) as conn, conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetch_arrow_table()

    def channel(self, endpoint: str, identity: str = "planning"):
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.pem("ca.pem"),
            private_key=self.pem(f"{identity}.key"),
            certificate_chain=self.pem(f"{identity}.pem"),
        )
        return grpc.secure_channel(endpoint.removeprefix("grpc+tls://"), credentials)

    def remaining(self, endpoint: str) -> float:
        with self.channel(endpoint) as ch:
            stub = pb.budget_pb2_grpc.BudgetServiceStub(ch)
            lines = stub.GetBudget(pb.budget_pb2.GetBudgetRequest(dataset="trips"), timeout=TIMEOUT).budgets
        return lines[0].epsilon_remaining if lines else 10.0


@pytest.fixture(scope="module")
def mobility(tmp_path_factory):
    m = Mobility(tmp_path_factory.mktemp("mobility"), free_base())
    script = ROOT / "examples" / "broker" / "run.sh"
    up = subprocess.run([str(script), "--up"], env=m.env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, f"run.sh --up failed:\n{up.stdout}\n{up.stderr}"
    yield m
    subprocess.run([str(script), "--down"], env=m.env, capture_output=True, timeout=60)
    for pid in m.pids().values() if (m.run / "pids").exists() else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def metadata(table_or_field, key: str) -> str | None:
    value = (table_or_field.metadata or {}).get(key.encode())
    return value.decode() if value is not None else None


def provenance(table: pa.Table) -> dict[str, dict]:
    return {p["provider"]: p for p in json.loads(metadata(table.schema, "sluice.federation.providers"))}


def refused(call) -> str:
    with pytest.raises(adbc_driver_manager.Error) as info:
        call()
    return str(info.value)


FEDERATED = ("SELECT mode, count(*) AS trips, sum(distance_km) AS km, avg(distance_km) AS avg_km "
             "FROM trips GROUP BY mode ORDER BY mode")
# What the broker asks each operator for (docs/federation.md).
PARTIAL = ('SELECT mode, count(*) AS "p0", sum(distance_km) AS "p1", count(distance_km) AS "p2" '
           "FROM trips GROUP BY mode")


def test_federated_count_sum_avg_equal_the_merge_of_each_operators_answer(mobility):
    eps = 0.3
    merged = mobility.query(mobility.broker, FEDERATED, epsilon=eps)
    got = provenance(merged)
    assert set(got) == {"north", "south"}
    assert metadata(merged.schema, "sluice.federation.partial") == "false"
    for p in got.values():
        assert p["epsilon"] == pytest.approx(eps) and p["receipt"] and p["rows"] == 5
    # The same partial query directly, as the same organization with the
    # same ε: each operator serves its cached noisy answer (free) — exactly
    # what it gave the broker.
    parts = {}
    for name, endpoint in [("north", mobility.north), ("south", mobility.south)]:
        part = mobility.query(endpoint, PARTIAL, epsilon=eps)
        assert metadata(part.schema, "sluice.dp.cached") == "true", f"{name} did not repeat its answer"
        assert metadata(part.schema, "sluice.dp.query_epsilon") == "0"
        parts[name] = part
    rows = {}
    for part in parts.values():
        for r in part.to_pylist():
            acc = rows.setdefault(r["mode"], [0, 0.0, 0])
            acc[0] += r["p0"]
            acc[1] += r["p1"]
            acc[2] += r["p2"]
    assert merged.column("mode").to_pylist() == sorted(rows)
    for r in merged.to_pylist():
        count, km, n = rows[r["mode"]]
        assert r["trips"] == count
        assert r["km"] == pytest.approx(km, rel=1e-12)
        assert r["avg_km"] == pytest.approx(km / n, rel=1e-12)
    # Noise variances add: the merged half-width is the root-sum-square.
    widths = [float(metadata(p.schema.field("p0"), "sluice.dp.ci95_half_width")) for p in parts.values()]
    assert float(metadata(merged.schema.field("trips"), "sluice.dp.ci95_half_width")) == pytest.approx(
        math.sqrt(sum(w * w for w in widths)), rel=1e-9)
    assert metadata(merged.schema.field("avg_km"), "sluice.dp.ci95_half_width") is not None


def test_each_operator_charges_its_own_budget(mobility):
    before = {n: mobility.remaining(e) for n, e in [("north", mobility.north), ("south", mobility.south)]}
    table = mobility.query(mobility.broker,
                           "SELECT start_zone, count(*) AS trips FROM trips GROUP BY start_zone", epsilon=0.2)
    assert table.num_rows == 40
    after = {n: mobility.remaining(e) for n, e in [("north", mobility.north), ("south", mobility.south)]}
    for name in before:
        assert before[name] - after[name] == pytest.approx(0.2), name


def test_receipts_verify_against_each_operators_key(mobility):
    table = mobility.query(mobility.broker,
                           "SELECT mode, avg(distance_km) AS km FROM trips GROUP BY mode", epsilon=0.1)
    keys = {}
    for name, endpoint in [("north", mobility.north), ("south", mobility.south)]:
        with mobility.channel(endpoint) as ch:
            audit = pb.audit_pb2_grpc.AuditServiceStub(ch)
            keys[name] = serialization.load_pem_public_key(
                audit.GetChainHead(pb.audit_pb2.GetChainHeadRequest(), timeout=TIMEOUT).public_key_pem.encode())
            receipt = json.loads(provenance(table)[name]["receipt"])
            record = audit.GetReceipt(pb.audit_pb2.GetReceiptRequest(receipt_id=receipt["receipt_id"]),
                                      timeout=TIMEOUT)
        assert hashlib.sha256(record.record_json.encode()).hexdigest() == record.hash == receipt["hash"]
        keys[name].verify(bytes.fromhex(record.signature), b"sluice-audit-v1\n" + bytes.fromhex(record.hash))
        entry = json.loads(record.record_json)["entry"]
        assert entry["event"] == "release"
        assert entry["principal"] == PLANNING_ID and entry["via"] == BROKER_ID
        assert entry["organization"] == "City Planning Agency"
    # North's receipt is not south's.
    north = json.loads(provenance(table)["north"]["receipt"])
    with pytest.raises(InvalidSignature):
        keys["south"].verify(bytes.fromhex(north["signature"]), b"sluice-audit-v1\n" + bytes.fromhex(north["hash"]))


def test_a_column_one_operator_forbids_is_forbidden_through_the_broker(mobility):
    sql = "SELECT age_band, count(*) AS trips FROM trips GROUP BY age_band"
    # North releases age bands to the agency; south does not.
    assert mobility.query(mobility.north, sql, epsilon=0.1).num_rows == 6
    message = refused(lambda: mobility.query(mobility.broker, sql, epsilon=0.1))
    # A column south does not release does not exist for the agency there.
    assert "INVALID_ARGUMENT" in message, message
    assert "provider `south`" in message and "No field named age_band" in message
    # Asked for, a partial answer: north only, and south named as missing.
    partial = mobility.query(mobility.broker, sql, epsilon=0.1, allow_partial=True)
    assert metadata(partial.schema, "sluice.federation.partial") == "true"
    assert set(provenance(partial)) == {"north"}
    missing = json.loads(metadata(partial.schema, "sluice.federation.missing"))
    assert [m["provider"] for m in missing] == ["south"]
    assert missing[0]["code"] == "INVALID_ARGUMENT" and "age_band" in missing[0]["message"]


def test_the_brokers_own_grant_caps_what_a_relayed_query_may_be(mobility):
    # The agency may ask about fares directly; the operators' grant for the
    # broker has no fares, and the stricter grant wins for relayed queries.
    sql = "SELECT mode, avg(fare_eur) AS fare FROM trips GROUP BY mode"
    assert mobility.query(mobility.north, sql, epsilon=0.1).num_rows == 5
    message = refused(lambda: mobility.query(mobility.broker, sql, epsilon=0.1))
    assert "provider `north`" in message and "provider `south`" in message
    # Relayed, the agency's view is the stricter one: no fares in it.
    assert "No field named fare_eur" in message, message


def test_the_broker_serves_only_its_consumers_and_refuses_what_does_not_split(mobility):
    message = refused(lambda: mobility.query(mobility.broker, FEDERATED, identity="stranger"))
    assert "access.consumers" in message
    message = refused(lambda: mobility.query(mobility.broker, "SELECT count(DISTINCT card_id) FROM trips"))
    assert "DISTINCT aggregates cannot be merged" in message
    message = refused(lambda: mobility.query(mobility.broker, "SELECT fare_eur FROM trips"))
    assert "query a provider directly" in message


def assertion(key, subject: str, organization: str) -> str:
    """An on-behalf-of assertion as a broker makes it (docs/federation.md),
    written here independently with `cryptography`."""
    now = int(time.time())
    claims = {"sub": subject, "organization": organization, "common_name": None, "san_uris": [subject],
              "iat": now, "exp": now + 120, "nonce": "00" * 12}
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    signature = key.sign(b"sluice-on-behalf-of-v1\n" + payload.encode(), ec.ECDSA(hashes.SHA256()))
    return f"v1.{payload}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def relayed_query(mobility, identity: str, token: str, sql: str):
    client = flight.FlightClient(mobility.north, tls_root_certs=mobility.pem("ca.pem"),
                                 cert_chain=mobility.pem(f"{identity}.pem"),
                                 private_key=mobility.pem(f"{identity}.key"))
    options = flight.FlightCallOptions(timeout=TIMEOUT, headers=[
        (b"x-sluice-purpose", PURPOSE.encode()), (b"x-sluice-on-behalf-of", token.encode())])
    info = client.get_flight_info(statement_query(sql), options)
    return client.do_get(info.endpoints[0].ticket, options).read_all()


def test_only_trusted_brokers_relay_and_only_with_their_own_key(mobility):
    sql = "SELECT mode, count(*) AS trips FROM trips GROUP BY mode"
    broker_key = serialization.load_pem_private_key(mobility.pem("broker.key"), password=None)
    planning_key = serialization.load_pem_private_key(mobility.pem("planning.key"), password=None)
    # The broker's own certificate and key: accepted, decided for the agency.
    table = relayed_query(mobility, "broker", assertion(broker_key, PLANNING_ID, "City Planning Agency"), sql)
    assert table.num_rows == 5
    # Signed with another key than the connection's certificate: refused.
    with pytest.raises(flight.FlightUnauthenticatedError, match="does not verify"):
        relayed_query(mobility, "broker", assertion(planning_key, PLANNING_ID, "City Planning Agency"), sql)
    # A consumer that is no broker relaying for someone else: refused by policy.
    with pytest.raises(flight.FlightError, match="not a trusted broker"):
        relayed_query(mobility, "planning", assertion(planning_key, "spiffe://x/org/someone", "Someone"), sql)
    # The trusted broker speaking for someone outside its relays_for: refused.
    with pytest.raises(flight.FlightError, match="may not speak for"):
        relayed_query(mobility, "broker", assertion(broker_key, "spiffe://elsewhere.example/org/unknown",
                                                    "Unknown Analytics"), sql)
    # The control plane answers direct callers only.
    token = assertion(broker_key, PLANNING_ID, "City Planning Agency")
    with mobility.channel(mobility.north, "broker") as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb.budget_pb2_grpc.BudgetServiceStub(ch).GetBudget(
                pb.budget_pb2.GetBudgetRequest(), timeout=TIMEOUT,
                metadata=[("x-sluice-on-behalf-of", token)])
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "direct callers only" in info.value.details()


def test_an_operator_that_is_down_is_named_or_the_result_is_flagged(mobility):
    """Runs last: it stops the south operator."""
    os.kill(mobility.pids()["south"], signal.SIGKILL)
    time.sleep(0.5)
    message = refused(lambda: mobility.query(mobility.broker, FEDERATED, epsilon=0.4))
    assert "provider `south` failed (UNAVAILABLE)" in message
    partial = mobility.query(mobility.broker, FEDERATED, epsilon=0.4, allow_partial=True)
    assert set(provenance(partial)) == {"north"}
    missing = json.loads(metadata(partial.schema, "sluice.federation.missing"))
    assert missing[0]["provider"] == "south" and missing[0]["code"] == "UNAVAILABLE"
    assert partial.num_rows == 5
