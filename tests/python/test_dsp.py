"""Sluice as a DSP 2025-1 provider, driven the way a foreign consumer (an
EDC connector, say) would: plain `requests` over HTTPS with a client
certificate, and a callback server of its own (Python's http.server behind
ssl) that receives the provider's messages.

Every message the provider sends is checked against the structure the
2025-1 JSON Schemas define (written here from the specification, not taken
from Sluice), then used: the agreement, the FINALIZED event, the data
address whose token a pyarrow.flight and an ADBC query present.
"""

import json
import queue
import ssl
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.flight as flight
import pytest
import requests

from conftest import DEMO_POLICY, Daemon
from test_flight_tickets import statement_query

CONTEXT = "https://w3id.org/dspace/2025/1/context.jsonld"

# Required fields per message type (DSP 2025-1, artifacts/src/main/resources).
REQUIRED = {
    "ContractNegotiation": ["providerPid", "consumerPid", "state"],
    "ContractNegotiationError": ["providerPid", "consumerPid"],
    "ContractAgreementMessage": ["providerPid", "consumerPid", "agreement"],
    "ContractNegotiationEventMessage": ["providerPid", "consumerPid", "eventType"],
    "ContractNegotiationTerminationMessage": ["providerPid", "consumerPid"],
    "TransferProcess": ["providerPid", "consumerPid", "state"],
    "TransferStartMessage": ["providerPid", "consumerPid"],
    "TransferError": ["providerPid", "consumerPid"],
    "Catalog": ["@id", "participantId"],
    "CatalogError": [],
}
NEGOTIATION_STATES = {"REQUESTED", "OFFERED", "ACCEPTED", "AGREED", "VERIFIED", "FINALIZED", "TERMINATED"}
TRANSFER_STATES = {"REQUESTED", "STARTED", "TERMINATED", "COMPLETED", "SUSPENDED"}


def check(message: dict, kind: str):
    """The structure the schema of `kind` defines (fields, types, enums)."""
    context = message.get("@context")
    assert isinstance(context, list) and all(isinstance(c, str) for c in context), context
    assert CONTEXT in context
    assert message.get("@type") == kind, message
    for field in REQUIRED[kind]:
        assert field in message, f"{kind} lacks {field}: {message}"
        if field not in ("agreement",):
            assert isinstance(message[field], str), (field, message)
    if "reason" in message:
        assert isinstance(message["reason"], list) and message["reason"], message
    if kind == "ContractNegotiation":
        assert message["state"] in NEGOTIATION_STATES, message
    if kind == "TransferProcess":
        assert message["state"] in TRANSFER_STATES, message
    if kind == "ContractNegotiationEventMessage":
        assert message["eventType"] in {"ACCEPTED", "FINALIZED"}, message
    if kind == "ContractAgreementMessage":
        agreement = message["agreement"]
        assert agreement["@type"] == "Agreement"
        for field in ["@id", "target", "assigner", "assignee"]:
            assert isinstance(agreement[field], str), (field, agreement)
        assert "permission" in agreement or "prohibition" in agreement
        check_rules(agreement)
    if kind == "TransferStartMessage" and "dataAddress" in message:
        address = message["dataAddress"]
        assert address["@type"] == "DataAddress" and isinstance(address["endpointType"], str)
        for prop in address.get("endpointProperties", []):
            assert prop["@type"] == "EndpointProperty"
            assert isinstance(prop["name"], str) and isinstance(prop["value"], str), prop
    if kind == "Catalog":
        assert "hasPolicy" not in message
        for dataset in message.get("dataset", []):
            assert isinstance(dataset["@id"], str) and dataset["hasPolicy"] and dataset["distribution"]
            for offer in dataset["hasPolicy"]:
                assert "target" not in offer, "an offer in a catalog has no target"
                check_rules(offer)
            for distribution in dataset["distribution"]:
                assert isinstance(distribution["format"], str)
                service = distribution["accessService"]
                assert isinstance(service, str) or (service["@type"] == "DataService" and service["endpointURL"])


def check_rules(policy: dict):
    operators = {"eq", "gt", "gteq", "hasPart", "isA", "isAllOf", "isAnyOf", "isNoneOf", "isPartOf", "lt",
                 "term-lteq", "lteq", "neq"}
    for rule in policy.get("permission", []) + policy.get("prohibition", []):
        assert isinstance(rule["action"], str)
        for constraint in rule.get("constraint", []):
            assert isinstance(constraint["leftOperand"], str)
            assert constraint["operator"] in operators, constraint
            # A JSON number is not a valid right operand in 2025-1.
            assert isinstance(constraint["rightOperand"], (str, list, dict)), constraint


class Callbacks:
    """A foreign consumer's callback endpoint: HTTPS with its own
    certificate, requiring the provider's client certificate."""

    def __init__(self, pki: Path, identity: str):
        self.received: "queue.Queue[tuple[str, dict]]" = queue.Queue()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.put((self.path, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki / f"{identity}.pem", pki / f"{identity}.key")
        context.load_verify_locations(pki / "ca.pem")
        context.verify_mode = ssl.CERT_REQUIRED
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/callback"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, path_end: str, timeout: float = 30) -> dict:
        while True:
            path, body = self.received.get(timeout=timeout)
            if path.endswith(path_end):
                return body

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def provider():
    """A provider on a state directory of its own (a fresh development PKI),
    whose research institute may use `zones` under an automatic agreement."""
    state = Path(tempfile.mkdtemp(prefix="sluice-dsp-"))
    demo = DEMO_POLICY.read_text()
    zones = "      zones:\n        columns: { zone_id: raw, district: raw, population: raw, area_km2: raw }\n"
    assert zones in demo
    policy = state.parent / f"{state.name}-policy.yaml"
    policy.write_text(demo.replace(zones, zones + "        agreement: { approval: automatic }\n"))
    daemon = Daemon(state, "--policy", str(policy))
    assert daemon.dsp_url, "the banner names the DSP endpoint"
    yield daemon
    daemon.stop()


def session(daemon: Daemon, identity: str) -> requests.Session:
    pki = daemon.state_dir / "pki"
    s = requests.Session()
    s.cert = (str(pki / f"{identity}.pem"), str(pki / f"{identity}.key"))
    s.verify = str(pki / "ca.pem")
    # REQUESTS_CA_BUNDLE in the environment would replace `verify`.
    s.trust_env = False
    return s


def test_the_version_endpoint_is_unauthenticated_and_everything_else_is_not(provider):
    ca = str(provider.state_dir / "pki" / "ca.pem")
    versions = requests.get(f"{provider.dsp_url}/.well-known/dspace-version", verify=ca)
    assert versions.status_code == 200
    [version] = versions.json()["protocolVersions"]
    assert version["version"] == "2025-1" and version["binding"] == "HTTPS"
    base = provider.dsp_url + version["path"]
    anonymous = requests.post(f"{base}/catalog/request", verify=ca,
                              json={"@context": [CONTEXT], "@type": "CatalogRequestMessage"})
    assert anonymous.status_code == 401
    check(anonymous.json(), "CatalogError")
    assert "client certificate" in anonymous.json()["reason"][0]


def test_a_foreign_consumer_negotiates_transfers_queries_and_terminates(provider):
    client = session(provider, "research")
    base = provider.dsp_url + "/dsp/2025-1"
    callbacks = Callbacks(provider.state_dir / "pki", "research")
    try:
        catalog = client.post(f"{base}/catalog/request",
                              json={"@context": [CONTEXT], "@type": "CatalogRequestMessage"})
        assert catalog.status_code == 200
        check(catalog.json(), "Catalog")
        zones = next(d for d in catalog.json()["dataset"] if d["@id"] == "zones")
        offer = zones["hasPolicy"][0]
        assert offer["@id"] == "zones/city-research"

        consumer_pid = f"urn:uuid:{uuid.uuid4()}"
        requested = client.post(f"{base}/negotiations/request", json={
            "@context": [CONTEXT], "@type": "ContractRequestMessage",
            "consumerPid": consumer_pid, "callbackAddress": callbacks.url,
            "offer": {"@type": "Offer", "@id": offer["@id"], "target": "zones",
                      "permission": [{"action": "use", "constraint": [
                          {"leftOperand": "purpose", "operator": "eq", "rightOperand": "research"}]}]},
        })
        assert requested.status_code == 201, requested.text
        check(requested.json(), "ContractNegotiation")
        provider_pid = requested.json()["providerPid"]

        agreement = callbacks.wait(f"/negotiations/{consumer_pid}/agreement")
        check(agreement, "ContractAgreementMessage")
        assert agreement["providerPid"] == provider_pid and agreement["consumerPid"] == consumer_pid
        assert agreement["agreement"]["target"] == "zones"
        assert agreement["agreement"]["assignee"] == "spiffe://sluice.demo/org/city-research"
        verified = client.post(f"{base}/negotiations/{provider_pid}/agreement/verification", json={
            "@context": [CONTEXT], "@type": "ContractAgreementVerificationMessage",
            "providerPid": provider_pid, "consumerPid": consumer_pid})
        assert verified.status_code == 200, verified.text
        finalized = callbacks.wait(f"/negotiations/{consumer_pid}/events")
        check(finalized, "ContractNegotiationEventMessage")
        assert finalized["eventType"] == "FINALIZED"
        state = client.get(f"{base}/negotiations/{provider_pid}").json()
        assert state["state"] == "FINALIZED"

        transfer_pid = f"urn:uuid:{uuid.uuid4()}"
        transfer = client.post(f"{base}/transfers/request", json={
            "@context": [CONTEXT], "@type": "TransferRequestMessage",
            "consumerPid": transfer_pid, "agreementId": agreement["agreement"]["@id"],
            "format": zones["distribution"][0]["format"], "callbackAddress": callbacks.url})
        assert transfer.status_code == 201, transfer.text
        check(transfer.json(), "TransferProcess")
        start = callbacks.wait(f"/transfers/{transfer_pid}/start")
        check(start, "TransferStartMessage")
        properties = {p["name"]: p["value"] for p in start["dataAddress"]["endpointProperties"]}
        assert properties["authType"] == "bearer"
        token, endpoint = properties["authorization"], start["dataAddress"]["endpoint"]
        assert endpoint == provider.uri

        pki = provider.state_dir / "pki"
        flight_client = flight.FlightClient(endpoint, tls_root_certs=(pki / "ca.pem").read_bytes(),
                                            cert_chain=(pki / "research.pem").read_bytes(),
                                            private_key=(pki / "research.key").read_bytes())
        options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])

        def count():
            descriptor = statement_query("SELECT count(*) AS n FROM zones")
            info = flight_client.get_flight_info(descriptor, options)
            return flight_client.do_get(info.endpoints[0].ticket, options).read_all()

        assert count().column("n").to_pylist() == [40]

        import adbc_driver_flightsql.dbapi as flightsql
        with flightsql.connect(endpoint, db_kwargs={
            "adbc.flight.sql.client_option.tls_root_certs": (pki / "ca.pem").read_text(),
            "adbc.flight.sql.client_option.mtls_cert_chain": (pki / "research.pem").read_text(),
            "adbc.flight.sql.client_option.mtls_private_key": (pki / "research.key").read_text(),
            "adbc.flight.sql.authorization_header": f"Bearer {token}",
        }, autocommit=True) as conn:
            cur = conn.cursor()
            cur.execute("SELECT district, count(*) AS n FROM zones GROUP BY district")
            assert sum(cur.fetch_arrow_table().column("n").to_pylist()) == 40

        ended = client.post(f"{base}/transfers/{transfer.json()['providerPid']}/termination", json={
            "@context": [CONTEXT], "@type": "TransferTerminationMessage",
            "providerPid": transfer.json()["providerPid"], "consumerPid": transfer_pid,
            "reason": ["done"]})
        assert ended.status_code == 200, ended.text
        with pytest.raises(flight.FlightError) as refused:
            count()
        assert "access token" in str(refused.value)
        assert token not in str(refused.value)

        # A second termination: the process is TERMINATED, a state error.
        again = client.post(f"{base}/transfers/{transfer.json()['providerPid']}/termination", json={
            "@context": [CONTEXT], "@type": "TransferTerminationMessage",
            "providerPid": transfer.json()["providerPid"], "consumerPid": transfer_pid})
        assert again.status_code == 400
        check(again.json(), "TransferError")
    finally:
        callbacks.close()


def test_a_callback_presenting_another_certificate_gets_nothing(provider):
    """The provider pins the callback to the consumer that negotiated: a
    callback address served with another principal's certificate (here the
    planning agency's) receives no agreement, and the negotiation ends."""
    client = session(provider, "research")
    base = provider.dsp_url + "/dsp/2025-1"
    impostor = Callbacks(provider.state_dir / "pki", "planning")
    try:
        consumer_pid = f"urn:uuid:{uuid.uuid4()}"
        requested = client.post(f"{base}/negotiations/request", json={
            "@context": [CONTEXT], "@type": "ContractRequestMessage",
            "consumerPid": consumer_pid, "callbackAddress": impostor.url,
            "offer": {"@type": "Offer", "@id": "zones/city-research", "target": "zones",
                      "permission": [{"action": "use", "constraint": [
                          {"leftOperand": "purpose", "operator": "eq", "rightOperand": "research"}]}]},
        })
        assert requested.status_code == 201, requested.text
        provider_pid = requested.json()["providerPid"]
        with pytest.raises(queue.Empty):
            impostor.wait("/agreement", timeout=8)
        assert client.get(f"{base}/negotiations/{provider_pid}").json()["state"] == "TERMINATED"
    finally:
        impostor.close()
