"""Starts the real `sluice` binary for the Python interop tests.

The binary comes from $SLUICE_BIN (tests/run.sh sets it); the state directory
(development PKI and demo data) from $SLUICE_TEST_STATE_DIR, prepared with
`sluice init` if needed.
"""

import ctypes
import os
import re
import signal
import subprocess
import tempfile
import threading
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
             "--metrics-listen", "off", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=_die_with_parent,
        )
        self.logs: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        for line in self.proc.stdout:
            match = re.search(r"listening on grpc\+tls://(\S+)", line)
            if match:
                self.address = match.group(1)
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


@pytest.fixture(scope="session")
def state_dir() -> Path:
    configured = os.environ.get("SLUICE_TEST_STATE_DIR")
    path = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="sluice-py-"))
    subprocess.run([sluice_bin(), "init", "--state-dir", str(path)], check=True, capture_output=True)
    return path


OPEN_POLICY = ROOT / "connector" / "tests" / "policies" / "open.yaml"
# The source tree's demo policy: a reused state directory keeps the copy it
# was created with, which may be older.
DEMO_POLICY = ROOT / "connector" / "src" / "demo_policy.yaml"


@pytest.fixture(scope="session")
def daemon(state_dir):
    """For transport tests: the open test policy (every demo column raw)."""
    d = Daemon(state_dir, "--policy", str(OPEN_POLICY))
    yield d
    d.stop()


@pytest.fixture(scope="session")
def demo_daemon(state_dir):
    """The embedded default as a newcomer runs it: the demo usage policy."""
    d = Daemon(state_dir, "--policy", str(DEMO_POLICY))
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
