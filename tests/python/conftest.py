"""Starts the real `sluice` binary for the Python interop tests.

The binary comes from $SLUICE_BIN (tests/run.sh sets it); the state directory
(development PKI and demo data) from $SLUICE_TEST_STATE_DIR, prepared with
`sluice init` if needed.

The control-plane services (proto/sluice/v1) are called with grpcio, through
stubs that grpcio-tools generates from the .proto files of this tree when the
tests start: `sluice_v1()`, `grpc_channel()`.
"""

import atexit
import ctypes
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def sluice_bin() -> str:
    default = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug" / "sluice"
    return os.environ.get("SLUICE_BIN", str(default))


def _die_with_parent():
    """If pytest is killed without cleaning up, the daemon dies with it."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Daemon:
    def __init__(self, state_dir: Path, *extra: str):
        self.state_dir = state_dir
        self.proc = subprocess.Popen(
            [sluice_bin(), "serve", "--state-dir", str(state_dir), "--listen", "127.0.0.1:0",
             "--metrics-listen", "off", "--dsp-listen", "127.0.0.1:0",
             "--console-listen", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=_die_with_parent,
        )
        self.logs: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.dsp_url = None
        self.console_url = None  # e.g. https://127.0.0.1:PORT, no trailing slash
        for line in self.proc.stdout:
            match = re.search(r"listening on grpc\+tls://(\S+)", line)
            if match:
                self.address = match.group(1)
            dsp = re.search(r"DSP 2025-1 on (https://\S+)/dsp/2025-1", line)
            if dsp:
                self.dsp_url = dsp.group(1)
            console = re.search(r"web console on (https://\S+?)/?(\s|$)", line)
            if console:
                self.console_url = console.group(1)
            if "config:" in line:  # the banner's lines before it are read
                break
        else:
            raise RuntimeError("sluice serve exited: " + "".join(self.logs))
        threading.Thread(target=self._drain_stdout, daemon=True).start()

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.logs.append(line)

    def _drain_stdout(self):
        for _ in self.proc.stdout:
            pass

    @property
    def uri(self) -> str:
        return f"grpc+tls://{self.address}"

    def pem(self, name: str) -> bytes:
        return (self.state_dir / "pki" / name).read_bytes()

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item (`item.rep_call`), so a
    fixture can tell in its teardown whether the test failed (test_console.py
    then saves a screenshot)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def state_dir() -> Path:
    configured = os.environ.get("SLUICE_TEST_STATE_DIR")
    path = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="sluice-py-"))
    subprocess.run([sluice_bin(), "init", "--state-dir", str(path)], check=True, capture_output=True)
    return path


OPEN_POLICY = ROOT / "connector" / "tests" / "policies" / "open.yaml"
# The source tree's demo policy: a reused state directory keeps the copy it
# was created with, which may be older.
DEMO_POLICY = ROOT / "connector" / "src" / "dev" / "demo_policy.yaml"


@pytest.fixture(scope="session")
def daemon(state_dir):
    """For transport tests: the open test policy (every demo column raw)."""
    d = Daemon(state_dir, "--policy", str(OPEN_POLICY))
    yield d
    d.stop()


@pytest.fixture(scope="session")
def demo_daemon(state_dir):
    """The embedded default as a newcomer runs it: the demo usage policy,
    with the research institute's agreement for `trips` approved (as the
    demo's README walks a newcomer through), so every test may query as
    `research`. A test that revokes it must restore it."""
    d = Daemon(state_dir, "--policy", str(DEMO_POLICY))
    try:
        ensure_research_agreement(d)
    except BaseException:
        d.stop()
        raise
    yield d
    d.stop()


def adbc_connect(daemon: Daemon, identity: str = "planning", purpose: str | None = None):
    import adbc_driver_flightsql.dbapi as flightsql

    options = {
        "adbc.flight.sql.client_option.tls_root_certs": daemon.pem("ca.pem").decode(),
        "adbc.flight.sql.client_option.mtls_cert_chain": daemon.pem(f"{identity}.pem").decode(),
        "adbc.flight.sql.client_option.mtls_private_key": daemon.pem(f"{identity}.key").decode(),
    }
    if purpose:
        options["adbc.flight.sql.rpc.call_header.x-sluice-purpose"] = purpose
    return flightsql.connect(daemon.uri, db_kwargs=options, autocommit=True)


def flight_client(daemon: Daemon, identity: str = "planning"):
    import pyarrow.flight as flight

    return flight.FlightClient(
        daemon.uri,
        tls_root_certs=daemon.pem("ca.pem"),
        cert_chain=daemon.pem(f"{identity}.pem"),
        private_key=daemon.pem(f"{identity}.key"),
    )


# --- the control plane (sluice.v1) through grpcio --------------------------

PROTO_DIR = ROOT / "proto"
_STUBS: types.SimpleNamespace | None = None


def sluice_v1() -> types.SimpleNamespace:
    """The sluice.v1 messages and stubs, generated by grpcio-tools from
    proto/sluice/v1/*.proto once per test process: `.catalog_pb2`,
    `.catalog_pb2_grpc`, … for catalog, agreement, audit, budget, connector."""
    global _STUBS
    if _STUBS is not None:
        return _STUBS
    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="sluice-py-stubs-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "sluice" / "v1").glob("*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"
    generated = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}",
         f"--python_out={out}", f"--grpc_python_out={out}", *protos],
        capture_output=True, text=True,
    )
    if generated.returncode != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {protos}:\n{generated.stderr}")
    sys.path.insert(0, str(out))
    modules = {}
    for proto in protos:
        stem = Path(proto).stem
        for suffix in ["_pb2", "_pb2_grpc"]:
            modules[stem + suffix] = importlib.import_module(f"sluice.v1.{stem}{suffix}")
    _STUBS = types.SimpleNamespace(**modules)
    return _STUBS


def grpc_channel(daemon: Daemon, identity: str = "planning"):
    """A grpcio channel to the daemon over mTLS as `identity` (a client
    certificate of the development PKI). Close it (or use it in `with`)."""
    import grpc

    credentials = grpc.ssl_channel_credentials(
        root_certificates=daemon.pem("ca.pem"),
        private_key=daemon.pem(f"{identity}.key"),
        certificate_chain=daemon.pem(f"{identity}.pem"),
    )
    return grpc.secure_channel(daemon.address, credentials)


RESEARCH_OFFER = "trips/city-research"
RESEARCH_PURPOSE = "research"


def ensure_research_agreement(daemon: Daemon):
    """Makes sure the research institute has an active agreement for offer
    `trips/city-research` (purpose research): requested as `research`, and
    approved as `admin` if it is pending. Returns the active agreement."""
    pb = sluice_v1()
    with grpc_channel(daemon, "research") as research, grpc_channel(daemon, "admin") as admin:
        agreement = pb.agreement_pb2_grpc.AgreementServiceStub(research).RequestAgreement(
            pb.agreement_pb2.RequestAgreementRequest(offer_id=RESEARCH_OFFER, purpose=RESEARCH_PURPOSE),
            timeout=30,
        )
        if agreement.state == pb.agreement_pb2.PENDING:
            agreement = pb.agreement_pb2_grpc.AgreementServiceStub(admin).ApproveAgreement(
                pb.agreement_pb2.DecideAgreementRequest(id=agreement.id, reason="approved for the test suite"),
                timeout=30,
            )
    if agreement.state != pb.agreement_pb2.ACTIVE:
        raise RuntimeError(f"the research agreement is not active: {agreement}")
    return agreement
