"""Sluice's own control-plane services (proto/sluice/v1) through grpcio, with
stubs grpcio-tools generates from the .proto files at test time, over mTLS,
against the real daemon under the demo usage policy: the catalog each
consumer sees, the agreement lifecycle gating the research institute's
queries (through pyarrow.flight), and audit receipts verified with
`cryptography`'s Ed25519 the way a consumer would verify them offline."""

import hashlib
import json
import re
import time
from datetime import datetime, timedelta, timezone

import grpc
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from conftest import (RESEARCH_OFFER, RESEARCH_PURPOSE, ensure_research_agreement, grpc_channel,
                      sluice_v1)
from test_flight_tickets import statement_query

pb = sluice_v1()
TIMEOUT = 60

PLANNING_ORG = "City Planning Agency"
RESEARCH_ORG = "City Research Institute"
RECEIPT_ID = re.compile(r"audit receipt (r\d{8,}-[0-9a-f]{8})")


class _Timed:
    """A grpcio stub whose every call has a deadline."""

    def __init__(self, stub):
        self._stub = stub

    def __getattr__(self, name):
        method = getattr(self._stub, name)
        return lambda request, **kw: method(request, **{"timeout": TIMEOUT, **kw})


class Control:
    """The five sluice.v1 services on one channel, as one identity."""

    def __init__(self, daemon, identity: str):
        self.channel = grpc_channel(daemon, identity)
        self.catalog = _Timed(pb.catalog_pb2_grpc.CatalogServiceStub(self.channel))
        self.agreements = _Timed(pb.agreement_pb2_grpc.AgreementServiceStub(self.channel))
        self.audit = _Timed(pb.audit_pb2_grpc.AuditServiceStub(self.channel))
        self.budget = _Timed(pb.budget_pb2_grpc.BudgetServiceStub(self.channel))
        self.connector = _Timed(pb.connector_pb2_grpc.ConnectorServiceStub(self.channel))

    def close(self):
        self.channel.close()

    def principal(self) -> str:
        return self.connector.WhoAmI(pb.connector_pb2.WhoAmIRequest()).principal_id

    def datasets(self, **filters) -> list:
        return list(self.catalog.ListDatasets(pb.catalog_pb2.ListDatasetsRequest(**filters)).datasets)

    def dataset(self, name: str):
        return self.catalog.GetDataset(pb.catalog_pb2.GetDatasetRequest(name=name))

    def receipt(self, receipt_id: str):
        return self.audit.GetReceipt(pb.audit_pb2.GetReceiptRequest(receipt_id=receipt_id))

    def head(self):
        return self.audit.GetChainHead(pb.audit_pb2.GetChainHeadRequest())

    def all_receipts(self, event: str = "", page_size: int = 1000) -> list:
        """Every record ListReceipts gives this identity, page after page."""
        records, token = [], ""
        for _ in range(100_000):
            page = self.audit.ListReceipts(
                pb.audit_pb2.ListReceiptsRequest(page_size=page_size, page_token=token, event=event))
            records.extend(page.records)
            if not page.next_page_token:
                return records
            assert page.next_page_token != token, "ListReceipts handed back the same page token"
            token = page.next_page_token
        raise AssertionError("ListReceipts never reached its last page")

    def request(self, offer_id: str = RESEARCH_OFFER, purpose: str = RESEARCH_PURPOSE):
        return self.agreements.RequestAgreement(
            pb.agreement_pb2.RequestAgreementRequest(offer_id=offer_id, purpose=purpose))

    def decide(self, verb: str, agreement_id: str, reason: str = ""):
        method = getattr(self.agreements, f"{verb}Agreement")
        return method(pb.agreement_pb2.DecideAgreementRequest(id=agreement_id, reason=reason))

    def list_agreements(self, **filters) -> list:
        return list(self.agreements.ListAgreements(pb.agreement_pb2.ListAgreementsRequest(**filters)).agreements)


@pytest.fixture
def control(demo_daemon):
    """control("planning") → a Control for that identity, closed after the test."""
    opened = []

    def open_as(identity: str) -> Control:
        opened.append(Control(demo_daemon, identity))
        return opened[-1]

    yield open_as
    for c in opened:
        c.close()


def rpc_error(code: grpc.StatusCode, call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    assert info.value.code() == code, f"{info.value.code()}: {info.value.details()}"
    return info.value


# --- Flight queries with the receipts their responses carry ------------------

class ReceiptHeaders(flight.ClientMiddlewareFactory):
    """Collects the `x-sluice-receipt` response headers of every DoGet."""

    def __init__(self):
        self.do_get: list[str] = []

    def start_call(self, info):
        return _ReceiptRecorder(self, info.method)


class _ReceiptRecorder(flight.ClientMiddleware):
    def __init__(self, factory: ReceiptHeaders, method):
        self.factory = factory
        self.method = method

    def received_headers(self, headers):
        if self.method == flight.FlightMethod.DO_GET:
            self.factory.do_get.extend(headers.get("x-sluice-receipt", []))


def flight_with_receipts(daemon, identity: str):
    headers = ReceiptHeaders()
    client = flight.FlightClient(
        daemon.uri,
        tls_root_certs=daemon.pem("ca.pem"),
        cert_chain=daemon.pem(f"{identity}.pem"),
        private_key=daemon.pem(f"{identity}.key"),
        middleware=[headers],
    )
    return client, headers


def call_options(purpose: str, epsilon: str | None = None) -> flight.FlightCallOptions:
    headers = [(b"x-sluice-purpose", purpose.encode())]
    if epsilon is not None:
        headers.append((b"x-sluice-epsilon", epsilon.encode()))
    return flight.FlightCallOptions(headers=headers, timeout=TIMEOUT)


def query(client, sql: str, purpose: str, epsilon: str | None = None) -> pa.Table:
    options = call_options(purpose, epsilon)
    info = client.get_flight_info(statement_query(sql), options)
    return client.do_get(info.endpoints[0].ticket, options).read_all()


def receipt_in(message: str) -> str:
    found = RECEIPT_ID.search(message)
    assert found, f"no audit receipt id in: {message}"
    return found.group(1)


def verify_signature(public_key_pem: str, record) -> None:
    """Raises InvalidSignature unless `record.signature` is the connector's
    Ed25519 signature of "sluice-audit-v1\\n" || the record's hash bytes."""
    key = serialization.load_pem_public_key(public_key_pem.encode())
    assert isinstance(key, Ed25519PublicKey)
    key.verify(bytes.fromhex(record.signature), b"sluice-audit-v1\n" + bytes.fromhex(record.hash))


# --- health and reflection ---------------------------------------------------

SERVICES = ["sluice.v1.CatalogService", "sluice.v1.AgreementService", "sluice.v1.AuditService",
            "sluice.v1.BudgetService", "sluice.v1.ConnectorService"]


def test_health_reports_every_control_plane_service_serving(demo_daemon):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc_channel(demo_daemon, "supplier") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", *SERVICES]:
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="sluice.v1.NoSuchService"), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_serves_the_descriptors_of_this_tree(demo_daemon):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
        ProtoReflectionDescriptorDatabase

    with grpc_channel(demo_daemon, "planning") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(SERVICES) <= set(database.get_services())
        served = DescriptorPool(database)
        for name in ["sluice.v1.AuditRecord", "sluice.v1.Offer", "sluice.v1.Agreement", "sluice.v1.Column"]:
            ours = pb.audit_pb2.DESCRIPTOR.pool.FindMessageTypeByName(name)
            theirs = served.FindMessageTypeByName(name)
            assert [(f.name, f.number, f.type) for f in theirs.fields] == \
                [(f.name, f.number, f.type) for f in ours.fields], name
        methods = [m.name for m in served.FindServiceByName("sluice.v1.AgreementService").methods]
        assert methods == ["RequestAgreement", "GetAgreement", "ListAgreements",
                           "ApproveAgreement", "RejectAgreement", "RevokeAgreement"]


def test_who_am_i_names_the_certificate_identity(control):
    research = control("research").connector.WhoAmI(pb.connector_pb2.WhoAmIRequest())
    assert research.principal_id == "spiffe://sluice.demo/org/city-research"
    assert research.organization == RESEARCH_ORG
    assert research.principal_id in research.san_uris
    assert re.fullmatch(r"[0-9a-f]{64}", research.certificate_sha256)


# --- catalog -----------------------------------------------------------------

def test_each_consumer_lists_only_the_datasets_it_is_offered(control):
    planning, supplier, research = control("planning"), control("supplier"), control("research")
    assert [d.name for d in planning.datasets()] == ["trips", "zones"]
    assert [d.name for d in supplier.datasets()] == ["machine_events", "zones"]
    assert [d.name for d in research.datasets()] == ["trips", "zones"]
    listing = planning.catalog.ListDatasets(pb.catalog_pb2.ListDatasetsRequest())
    assert listing.total == 2 and not listing.next_page_token
    # The same public dataset, tailored: the supplier's grant shows two columns.
    assert sorted(c.name for c in supplier.dataset("zones").columns) == ["district", "zone_id"]
    assert sorted(c.name for c in planning.dataset("zones").columns) == \
        ["area_km2", "district", "population", "zone_id"]
    assert planning.dataset("zones").public


def test_a_hidden_dataset_is_not_found_exactly_like_a_missing_one(control):
    planning, supplier = control("planning"), control("supplier")
    hidden = rpc_error(grpc.StatusCode.NOT_FOUND, planning.dataset, "machine_events")
    missing = rpc_error(grpc.StatusCode.NOT_FOUND, planning.dataset, "no_such_table")
    assert hidden.details().replace("machine_events", "X") == missing.details().replace("no_such_table", "X")
    rpc_error(grpc.StatusCode.NOT_FOUND, supplier.dataset, "trips")


def test_trips_for_the_planning_agency_is_an_aggregate_offer_without_identifiers(control):
    trips = control("planning").dataset("trips")
    assert trips.title == "City public-transport trips"
    assert trips.publisher == "City Transport Agency"
    assert "mobility" in trips.keywords
    assert trips.modified.endswith("Z")
    columns = {c.name: c for c in trips.columns}
    assert "card_id" not in columns and "trip_id" not in columns
    assert set(columns) == {"start_time", "end_time", "start_zone", "end_zone", "mode",
                            "distance_km", "fare_eur", "age_band"}
    assert columns["start_time"].visibility == "masked"
    assert "hour" in columns["start_time"].mask
    assert columns["end_time"].visibility == "masked"
    assert columns["mode"].visibility == "raw"
    assert columns["start_zone"].visibility == "group_by_only"
    assert columns["fare_eur"].visibility == "aggregate_only"
    assert columns["age_band"].classification == "important"
    assert "sensitive_personal" in columns["age_band"].tags
    assert trips.classification == "important"
    [offer] = trips.offers
    assert offer.id == "trips/city-planning"
    assert offer.dataset == "trips"
    assert offer.mode == "aggregate"
    assert offer.min_group_size == 10
    assert sorted(offer.purposes) == ["research", "urban-planning"]
    assert offer.agreement == "none"
    assert offer.max_rows == 10000
    assert offer.valid_from == "2026-01-01T00:00:00Z"
    assert offer.valid_until == "2030-12-31T23:59:59Z"
    assert not offer.HasField("dp")
    # The offer says what k gives and what it does not.
    assert "at least 10 distinct privacy units" in offer.guarantee
    assert "does not stop differencing" in offer.guarantee


def test_trips_for_the_research_institute_is_a_dp_offer_under_manual_agreement(control):
    trips = control("research").dataset("trips")
    columns = {c.name: c for c in trips.columns}
    assert set(columns) == {"start_time", "start_zone", "end_zone", "mode", "distance_km", "fare_eur"}
    assert list(columns["fare_eur"].dp_bounds) == [0.0, 10.0]
    assert list(columns["distance_km"].dp_bounds) == [0.0, 30.0]
    assert columns["start_time"].visibility == "masked"
    assert trips.classification == "general"
    [offer] = trips.offers
    assert offer.id == RESEARCH_OFFER
    assert offer.mode == "dp"
    assert list(offer.purposes) == ["research"]
    assert offer.agreement == "manual"
    assert offer.agreement_duration_seconds == 30 * 86400
    assert offer.HasField("dp")
    assert offer.dp.epsilon_per_query == 1.0
    assert offer.dp.default_epsilon == 0.5
    assert offer.dp.budget_epsilon == 10.0
    assert offer.dp.budget_period == "month"
    assert offer.dp.noise == "laplace"
    assert offer.guarantee.startswith("ε-differential privacy per query (ε ≤ 1")
    assert "budget of ε = 10" in offer.guarantee and "per month" in offer.guarantee


def test_supplier_sees_machine_events_with_the_serial_hashed(control):
    events = control("supplier").dataset("machine_events")
    columns = {c.name: c for c in events.columns}
    assert columns["machine_serial"].visibility == "masked"
    assert columns["machine_serial"].data_type == "Utf8"
    # Rows leave under this grant, so fault codes cannot be filter_only.
    assert columns["fault_code"].visibility == "raw"
    assert columns["energy_kwh"].visibility == "aggregate_only"
    [offer] = events.offers
    assert offer.id == "machine_events/axle-suppliers"
    assert offer.mode == "raw"
    assert offer.min_group_size == 2
    assert offer.guarantee.startswith("Rows leave")
    assert "does not stop differencing" in offer.guarantee


def test_pages_of_one_walk_every_visible_dataset(control):
    for identity in ["planning", "supplier"]:
        client = control(identity)
        everything = [d.name for d in client.datasets()]
        walked, token, totals = [], "", set()
        for _ in range(10):
            page = client.catalog.ListDatasets(pb.catalog_pb2.ListDatasetsRequest(page_size=1, page_token=token))
            assert len(page.datasets) == 1
            walked.append(page.datasets[0].name)
            totals.add(page.total)
            token = page.next_page_token
            if not token:
                break
        assert walked == everything, identity
        assert totals == {len(everything)}, identity


def test_filters_narrow_the_listing(control):
    planning, supplier = control("planning"), control("supplier")
    assert [d.name for d in planning.datasets(keyword="mobility")] == ["trips"]
    assert [d.name for d in planning.datasets(keyword="MOBILITY")] == ["trips"]
    assert [d.name for d in planning.datasets(keyword="geography")] == ["zones"]
    assert planning.catalog.ListDatasets(pb.catalog_pb2.ListDatasetsRequest(keyword="telemetry")).total == 0
    assert [d.name for d in supplier.datasets(publisher="axle")] == ["machine_events"]
    assert [d.name for d in planning.datasets(classification="important")] == ["trips"]
    assert [d.name for d in planning.datasets(classification="general")] == ["zones"]
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: planning.datasets(classification="secret"))
    assert "secret" in error.details()


# --- agreements ----------------------------------------------------------------

RESEARCH_SQL = "SELECT mode, count(*) FROM trips GROUP BY mode"
MODES = ["bike", "bus", "metro", "tram"]


def research_query(client) -> pa.Table:
    return query(client, RESEARCH_SQL, RESEARCH_PURPOSE, epsilon="0.1")


def assert_needs_an_agreement(client) -> str:
    """The research query is refused with FAILED_PRECONDITION naming the
    offer to request; returns the refusal's receipt id."""
    # pyarrow maps FAILED_PRECONDITION to ArrowInvalid and names the code.
    with pytest.raises(pa.ArrowInvalid) as info:
        research_query(client)
    message = str(info.value)
    assert "precondition failed" in message, message
    assert RESEARCH_OFFER in message, message
    return receipt_in(message)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_agreement_lifecycle_gates_the_research_institutes_queries(demo_daemon, control):
    admin, research = control("admin"), control("research")
    admin_id, research_id = admin.principal(), research.principal()
    client, receipts = flight_with_receipts(demo_daemon, "research")
    try:
        active = ensure_research_agreement(demo_daemon)
        assert sorted(research_query(client).column("mode").to_pylist()) == MODES

        revoked = admin.decide("Revoke", active.id, "test: revoked")
        assert (revoked.id, revoked.state) == (active.id, pb.agreement_pb2.REVOKED)
        assert revoked.decided_by == admin_id
        assert revoked.reason == "test: revoked"
        assert research.agreements.GetAgreement(pb.agreement_pb2.GetAgreementRequest(id=active.id)) == revoked
        # Only an active agreement can be revoked.
        rpc_error(grpc.StatusCode.FAILED_PRECONDITION, admin.decide, "Revoke", active.id)

        refusal = research.receipt(assert_needs_an_agreement(client))
        assert (refusal.event, refusal.outcome) == ("decision", "denied")
        assert "agreement" in refusal.rule
        assert refusal.code == "FAILED_PRECONDITION"
        assert refusal.organization == RESEARCH_ORG

        pending = research.request()
        assert pending.state == pb.agreement_pb2.PENDING
        assert pending.id != active.id
        assert (pending.offer_id, pending.dataset, pending.purpose) == (RESEARCH_OFFER, "trips", RESEARCH_PURPOSE)
        assert (pending.organization, pending.requested_by) == (RESEARCH_ORG, research_id)
        assert not pending.decided_by and not pending.decided_at
        # Asking again while it is pending returns the same request.
        assert research.request().id == pending.id
        # A pending request is not an agreement.
        assert_needs_an_agreement(client)
        denied = rpc_error(grpc.StatusCode.PERMISSION_DENIED, research.decide, "Approve", pending.id)
        assert "admins" in denied.details(), denied.details()
        assert research.agreements.GetAgreement(
            pb.agreement_pb2.GetAgreementRequest(id=pending.id)).state == pb.agreement_pb2.PENDING

        approved = admin.decide("Approve", pending.id, "test: approved")
        assert (approved.id, approved.state) == (pending.id, pb.agreement_pb2.ACTIVE)
        assert approved.decided_by == admin_id
        # Manual approval for 30 days (the offer's valid_for_days).
        assert utc(approved.expires_at) - utc(approved.decided_at) == timedelta(days=30)
        rpc_error(grpc.StatusCode.FAILED_PRECONDITION, admin.decide, "Approve", pending.id)

        receipts.do_get.clear()
        assert sorted(research_query(client).column("mode").to_pylist()) == MODES
        [header] = receipts.do_get
        release = research.receipt(json.loads(header)["receipt_id"])
        assert (release.event, release.outcome) == ("release", "released")
        assert list(release.agreements) == [approved.id]
        assert release.purpose == RESEARCH_PURPOSE
        # The same query earlier in the session may be answered from the DP
        # cache, which charges (and records) nothing.
        charged = 0.0 if "cached" in release.message else 0.1
        assert release.HasField("epsilon") and release.epsilon == pytest.approx(charged)

        # A ticket issued under the agreement dies with it.
        options = call_options(RESEARCH_PURPOSE, "0.1")
        ticket = client.get_flight_info(statement_query(RESEARCH_SQL), options).endpoints[0].ticket
        admin.decide("Revoke", approved.id, "test: revoked with a ticket outstanding")
        with pytest.raises(pa.ArrowInvalid) as info:
            client.do_get(ticket, options).read_all()
        message = str(info.value)
        assert "precondition failed" in message, message
        assert "no longer active" in message, message
        assert approved.id in message, message
        assert_needs_an_agreement(client)

        # A rejected request does not help either.
        again = research.request()
        assert again.state == pb.agreement_pb2.PENDING and again.id not in (active.id, approved.id)
        rejected = admin.decide("Reject", again.id, "test: rejected")
        assert (rejected.state, rejected.reason) == (pb.agreement_pb2.REJECTED, "test: rejected")
        assert_needs_an_agreement(client)
        rpc_error(grpc.StatusCode.FAILED_PRECONDITION, admin.decide, "Approve", again.id)
    finally:
        restored = ensure_research_agreement(demo_daemon)
    assert restored.state == pb.agreement_pb2.ACTIVE
    assert sorted(research_query(client).column("mode").to_pylist()) == MODES


def test_agreements_are_visible_to_their_organization_and_to_admins(demo_daemon, control):
    current = ensure_research_agreement(demo_daemon)
    research, admin, planning, supplier = (control(who) for who in ["research", "admin", "planning", "supplier"])

    mine = research.list_agreements()
    assert current.id in [a.id for a in mine]
    assert {a.organization for a in mine} == {RESEARCH_ORG}
    assert [a.requested_at for a in mine] == sorted((a.requested_at for a in mine), reverse=True)
    everything = admin.list_agreements()
    assert {a.id for a in mine} <= {a.id for a in everything}
    active = research.list_agreements(state=pb.agreement_pb2.ACTIVE)
    assert current.id in [a.id for a in active]
    assert {a.state for a in active} == {pb.agreement_pb2.ACTIVE}
    assert [a.id for a in research.list_agreements(offer_id=RESEARCH_OFFER)] == [a.id for a in mine]
    assert research.list_agreements(offer_id="zones/city-research") == []
    assert all(a.organization == PLANNING_ORG for a in planning.list_agreements())

    get = pb.agreement_pb2.GetAgreementRequest(id=current.id)
    assert research.agreements.GetAgreement(get) == current
    assert admin.agreements.GetAgreement(get) == current
    for outsider in [planning, supplier]:
        error = rpc_error(grpc.StatusCode.NOT_FOUND, outsider.agreements.GetAgreement, get)
        missing = rpc_error(grpc.StatusCode.NOT_FOUND, outsider.agreements.GetAgreement,
                            pb.agreement_pb2.GetAgreementRequest(id="agr-0000000000000000"))
        assert error.details().replace(current.id, "X") == missing.details().replace("agr-0000000000000000", "X")


def test_agreement_requests_outside_the_offers_are_refused(demo_daemon, control):
    current = ensure_research_agreement(demo_daemon)
    research, planning, admin = control("research"), control("planning"), control("admin")
    # Not an offer made to the planning agency.
    rpc_error(grpc.StatusCode.NOT_FOUND, planning.request)
    # The planning agency's own offer needs no agreement.
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: planning.request("trips/city-planning", "research"))
    assert "needs no agreement" in error.details(), error.details()
    # A purpose the offer does not list, or none.
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: research.request(RESEARCH_OFFER, "marketing"))
    assert "marketing" in error.details(), error.details()
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: research.request(RESEARCH_OFFER, ""))
    # Consumers decide nothing; admins decide only what exists.
    for verb in ["Approve", "Reject", "Revoke"]:
        rpc_error(grpc.StatusCode.PERMISSION_DENIED, research.decide, verb, current.id)
        rpc_error(grpc.StatusCode.PERMISSION_DENIED, planning.decide, verb, current.id)
    rpc_error(grpc.StatusCode.NOT_FOUND, admin.decide, "Approve", "agr-0000000000000000")
    assert research.agreements.GetAgreement(
        pb.agreement_pb2.GetAgreementRequest(id=current.id)).state == pb.agreement_pb2.ACTIVE


def test_budget_matches_what_the_data_plane_reports(demo_daemon, control):
    ensure_research_agreement(demo_daemon)
    research, planning = control("research"), control("planning")
    client, _ = flight_with_receipts(demo_daemon, "research")
    table = query(client, "SELECT start_zone, count(*) AS n FROM trips GROUP BY start_zone",
                  RESEARCH_PURPOSE, epsilon="0.1")
    remaining = float(table.schema.metadata[b"sluice.dp.remaining_epsilon"])
    budget = research.budget.GetBudget(pb.budget_pb2.GetBudgetRequest(dataset="trips"))
    assert budget.organization == RESEARCH_ORG
    [line] = budget.budgets
    assert line.dataset == "trips"
    assert line.period == datetime.now(timezone.utc).strftime("%Y-%m")
    assert not line.unlimited
    assert line.epsilon_limit == 10.0
    assert line.epsilon_remaining == pytest.approx(remaining, abs=1e-9)
    assert line.epsilon_spent + line.epsilon_remaining == pytest.approx(10.0, abs=1e-9)
    assert line.epsilon_spent >= 0.1 - 1e-9
    assert line.queries >= 1
    planning_budget = planning.budget.GetBudget(pb.budget_pb2.GetBudgetRequest())
    assert planning_budget.organization == PLANNING_ORG
    assert "trips" not in [b.dataset for b in planning_budget.budgets]


# --- audit receipts --------------------------------------------------------------

PLANNING_SQL = ("SELECT start_zone, count(*) AS trips FROM trips WHERE mode = 'tram' "
                "GROUP BY start_zone ORDER BY start_zone")


class Release:
    """A planning query through pyarrow.flight and what the log said about it."""

    def __init__(self, daemon):
        auditor = Control(daemon, "planning")
        try:
            self.before = auditor.head()
            client, headers = flight_with_receipts(daemon, "planning")
            self.table = query(client, PLANNING_SQL, "urban-planning")
            self.after = auditor.head()
        finally:
            auditor.close()
        assert len(headers.do_get) == 1, headers.do_get
        self.header = headers.do_get[0]
        self.receipt = json.loads(self.header)


@pytest.fixture(scope="module")
def release(demo_daemon) -> Release:
    return Release(demo_daemon)


def test_doget_carries_a_receipt_of_the_signed_release_record(release, control):
    planning = control("planning")
    assert release.table.num_rows > 0
    receipt = release.receipt
    assert set(receipt) == {"receipt_id", "seq", "hash", "key_id", "signature"}
    record = planning.receipt(receipt["receipt_id"])
    assert (record.receipt_id, record.seq, record.hash, record.key_id, record.signature) == \
        (receipt["receipt_id"], receipt["seq"], receipt["hash"], receipt["key_id"], receipt["signature"])
    assert (record.event, record.outcome) == ("release", "released")
    assert list(record.datasets) == ["trips"]
    assert record.organization == PLANNING_ORG
    assert record.principal == planning.principal()
    assert record.purpose == "urban-planning"
    assert record.policy_version == planning.connector.GetServerInfo(
        pb.connector_pb2.GetServerInfoRequest()).policy_version
    assert release.before.records <= record.seq < release.after.records

    # The hash covers exactly record_json; the fields are copied out of it.
    assert hashlib.sha256(record.record_json.encode()).hexdigest() == record.hash
    body = json.loads(record.record_json)
    assert (body["receipt_id"], body["seq"], body["prev_hash"]) == (record.receipt_id, record.seq, record.prev_hash)

    head = planning.head()
    verify_signature(head.public_key_pem, record)
    tampered = type(record)()
    tampered.CopyFrom(record)
    tampered.hash = hashlib.sha256(record.record_json.replace("release", "relaase").encode()).hexdigest()
    with pytest.raises(InvalidSignature):
        verify_signature(head.public_key_pem, tampered)

    # key_id: "ed25519:" and the first 8 bytes of SHA-256 of the raw key.
    key = serialization.load_pem_public_key(head.public_key_pem.encode())
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert head.key_id == "ed25519:" + hashlib.sha256(raw).hexdigest()[:16] == record.key_id


def test_a_receipt_is_readable_only_by_its_organization_and_admins(release, control):
    receipt_id = release.receipt["receipt_id"]
    for outsider in ["supplier", "research"]:
        error = rpc_error(grpc.StatusCode.NOT_FOUND, control(outsider).receipt, receipt_id)
        missing = rpc_error(grpc.StatusCode.NOT_FOUND, control(outsider).receipt, "r99999999-00000000")
        assert error.details().replace(receipt_id, "X") == missing.details().replace("r99999999-00000000", "X")
    assert control("admin").receipt(receipt_id).hash == release.receipt["hash"]


def test_list_receipts_shows_only_the_callers_organization(release, control):
    planning, supplier, admin = control("planning"), control("supplier"), control("admin")
    records = planning.all_receipts()
    assert {r.organization for r in records} == {PLANNING_ORG}
    seqs = [r.seq for r in records]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    [released] = [r for r in records if r.receipt_id == release.receipt["receipt_id"]]
    # The decision that allowed the query, with the plan it released.
    [decided] = [r for r in records if r.event == "decision" and r.query_id == released.query_id]
    assert decided.outcome == "allowed"
    assert decided.seq < released.seq
    assert decided.plan_hash == released.plan_hash != ""
    # Filtered by event; pages of 2 give the same records.
    releases = planning.all_receipts(event="release")
    assert {r.event for r in releases} == {"release"}
    assert [r.receipt_id for r in releases] == [r.receipt_id for r in records if r.event == "release"]
    assert [r.receipt_id for r in planning.all_receipts(event="release", page_size=2)] == \
        [r.receipt_id for r in releases]
    assert release.receipt["receipt_id"] not in {r.receipt_id for r in supplier.all_receipts()}
    assert PLANNING_ORG not in {r.organization for r in supplier.all_receipts()}
    assert release.receipt["receipt_id"] in {r.receipt_id for r in admin.all_receipts(event="release")}
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, planning.audit.ListReceipts,
              pb.audit_pb2.ListReceiptsRequest(page_token="not a token"))


def test_the_completion_record_counts_what_left(release, control):
    planning = control("planning")
    deadline = time.monotonic() + 20
    while True:
        follow_ups = [r for r in planning.all_receipts(event="completion")
                      if r.refers_to == release.receipt["receipt_id"]]
        if follow_ups or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(follow_ups) == 1, "no completion record refers to the release"
    [completion] = follow_ups
    assert completion.outcome == "completed"
    assert completion.HasField("rows") and completion.rows == release.table.num_rows
    assert completion.HasField("bytes") and completion.bytes > 0
    assert completion.seq > release.receipt["seq"]


def test_a_refusal_has_a_receipt_naming_its_rule(demo_daemon, control):
    planning, supplier = control("planning"), control("supplier")
    client, headers = flight_with_receipts(demo_daemon, "planning")
    with pytest.raises(flight.FlightUnauthorizedError) as info:
        query(client, "SELECT fare_eur FROM trips", "urban-planning")
    message = str(info.value)
    receipt_id = receipt_in(message)
    record = planning.receipt(receipt_id)
    assert (record.event, record.outcome) == ("decision", "denied")
    assert record.rule, record
    assert record.code == "PERMISSION_DENIED"
    assert record.organization == PLANNING_ORG
    assert record.message and record.message in message
    assert hashlib.sha256(record.record_json.encode()).hexdigest() == record.hash
    verify_signature(planning.head().public_key_pem, record)
    assert headers.do_get == []
    rpc_error(grpc.StatusCode.NOT_FOUND, supplier.receipt, receipt_id)


def test_the_chain_head_grows_and_links_every_new_record(demo_daemon, control):
    admin, planning = control("admin"), control("planning")
    before = planning.head()
    Release(demo_daemon)
    head = planning.head()
    # At least the decision and the release record.
    assert head.records >= before.records + 2
    assert head.hash != before.hash and re.fullmatch(r"[0-9a-f]{64}", head.hash)
    assert utc(head.time) >= utc(before.time)
    assert head.public_key_pem == before.public_key_pem
    new = [r for r in admin.all_receipts() if r.seq >= before.records]
    assert [r.seq for r in new] == list(range(before.records, before.records + len(new)))
    assert new[0].prev_hash == before.hash
    for previous, record in zip(new, new[1:]):
        assert record.prev_hash == previous.hash, record.receipt_id
    for record in new:
        assert hashlib.sha256(record.record_json.encode()).hexdigest() == record.hash, record.receipt_id
        verify_signature(head.public_key_pem, record)
    assert new[head.records - 1 - before.records].hash == head.hash
    # The public key in the state directory is the one the service hands out.
    on_disk = demo_daemon.state_dir / "audit" / "public-key.pem"
    assert serialization.load_pem_public_key(on_disk.read_bytes()).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw) == serialization.load_pem_public_key(
        head.public_key_pem.encode()).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
