"""Helpers for test_sources.py: the throwaway PostgreSQL cluster and S3 store
(tests/services/postgres.sh, tests/services/moto.sh), per-daemon state
directories and configs, and Flight SQL calls through grpcio that report the
exact gRPC status code and message.

Flight SQL over grpcio is written out here from the wire format (protobuf
fields of FlightDescriptor, FlightInfo, Ticket and FlightData; the Arrow IPC
encapsulation of FlightData's header and body), as test_adversarial.py does
for single calls, so that a refusal's code is the server's, not a client
library's mapping of it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from conftest import ROOT, Daemon, grpc_channel

SERVICES = ROOT / "tests" / "services"
DEMO_POLICY = ROOT / "connector" / "src" / "dev" / "demo_policy.yaml"
OPEN_POLICY = ROOT / "connector" / "tests" / "policies" / "open.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_readable_tmpdir(prefix: str) -> Path:
    """A temporary directory the `postgres` OS user can reach (pytest's own
    tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def _service_env() -> dict:
    env = dict(os.environ)
    env["PYTHON"] = sys.executable
    env.setdefault("VENV", str(Path(sys.executable).parent.parent))
    return env


# --- PostgreSQL ---------------------------------------------------------------

class Postgres:
    """A cluster made by tests/services/postgres.sh in `dir` on `port`."""

    def __init__(self, dir: Path, port: int):
        self.dir = Path(dir)
        self.port = port

    def _script(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([str(SERVICES / "postgres.sh"), *args], input=input, capture_output=True,
                              text=True, env=_service_env(), timeout=600)
        if check and done.returncode != 0:
            raise RuntimeError(f"postgres.sh {' '.join(args)} failed ({done.returncode}):\n"
                               f"{done.stdout}\n{done.stderr}")
        return done

    def start(self):
        self._script("start", str(self.dir), str(self.port))

    def stop(self):
        self._script("stop", str(self.dir))

    def kill(self):
        self._script("kill", str(self.dir))

    def load_trips(self, parquet: Path):
        self._script("load-trips", str(self.dir), str(self.port), str(parquet))

    def load_table(self, table: str, parquet: Path):
        self._script("load-table", str(self.dir), str(self.port), table, str(parquet))

    def tls(self, cert: Path, key: Path):
        """Serves TLS with `cert` and `key` from now on, and only TLS over TCP
        (pg_hba.conf: hostssl lines only); the server has reloaded when this
        returns."""
        self._script("tls", str(self.dir), str(cert), str(key))

    def sql(self, statement: str) -> str:
        """Runs SQL as the superuser in database transit; unaligned output."""
        return self._script("psql", str(self.dir), str(self.port), "-tA", "-c", statement).stdout.strip()

    @property
    def password(self) -> str:
        return (self.dir / "password").read_text().strip()

    @property
    def log_path(self) -> Path:
        return self.dir / "postgres.log"

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    def statements_since(self, offset: int, user: str = "sluice_reader") -> list[str]:
        """The statements `user` sent since the log had `offset` bytes, as
        logged by log_statement = 'all' (simple and extended protocol)."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        statements = []
        for entry in log_entries(text):
            m = re.match(rf"\S+ \S+ \S+ \[\d+\] {re.escape(user)}@\S+ LOG:\s+(?:statement|execute [^:]*):\s(.*)",
                         entry, re.S)
            if m:
                statements.append(m.group(1).strip())
        return statements

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def hold_lock(self, table: str) -> "LockHolder":
        return LockHolder(self, table)

    def waiting_sessions(self, user: str = "sluice_reader") -> int:
        return int(self.sql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}' "
                            "AND wait_event_type = 'Lock'"))


_LOG_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \S+ \[\d+\] ", re.M)


def log_entries(text: str) -> list[str]:
    """A PostgreSQL stderr log split into entries (an entry's continuation
    lines do not start with the log_line_prefix)."""
    starts = [m.start() for m in _LOG_START.finditer(text)]
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


class LockHolder:
    """An open psql session holding ACCESS EXCLUSIVE on a table until
    release() (or the end of a `with`)."""

    def __init__(self, pg: Postgres, table: str):
        self.pg = pg
        self.proc = subprocess.Popen(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(pg.dir), "-p", str(pg.port), "-U", "postgres",
             "-d", "transit"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.proc.stdin.write(f"BEGIN;\nLOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + 30
        while pg.sql(f"SELECT count(*) FROM pg_locks WHERE relation = '{table}'::regclass "
                     "AND mode = 'AccessExclusiveLock' AND granted") != "1":
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"could not lock {table}: {self.proc.stderr.read() if self.proc.poll() is not None else 'timeout'}")
            time.sleep(0.1)

    def release(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("ROLLBACK;\n\\q\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# --- moto (S3) ----------------------------------------------------------------

ACCESS_KEY = "AKIASLUICETEST000001"
SECRET_KEY = "sluice-test-secret-key-not-a-real-one"


class Moto:
    def __init__(self, dir: Path, port: int):
        self.dir = Path(dir)
        self.port = port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _script(self, *args: str):
        done = subprocess.run([str(SERVICES / "moto.sh"), *args], capture_output=True, text=True,
                              env=_service_env(), timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"moto.sh {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")

    def start(self):
        self._script("start", str(self.dir), str(self.port))

    def stop(self):
        self._script("stop", str(self.dir))

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def credentials_file(self) -> Path:
        path = self.dir / "credentials"
        path.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
        path.chmod(0o600)
        return path

    def upload_tree(self, local: Path, bucket: str, prefix: str) -> list[str]:
        """Puts every file under `local` at s3://bucket/prefix/<relative path>;
        returns the keys."""
        s3 = self.client()
        keys = []
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            key = f"{prefix.rstrip('/')}/{path.relative_to(local).as_posix()}"
            s3.upload_file(str(path), bucket, key)
            keys.append(key)
        return keys


# --- data ---------------------------------------------------------------------

MACHINE_EVENTS_SCHEMA = pa.schema([
    pa.field("event_id", pa.int64(), False),
    pa.field("machine_serial", pa.string(), False),
    pa.field("manufacturer", pa.string(), False),
    pa.field("site", pa.string(), False),
    pa.field("event_time", pa.timestamp("us"), False),
    pa.field("event_type", pa.string(), False),
    pa.field("temperature_c", pa.float64()),
    pa.field("vibration_mm_s", pa.float64()),
    pa.field("energy_kwh", pa.float64()),
    pa.field("fault_code", pa.string()),
])

# As in connector/src/default.toml (the embedded default).
MACHINE_EVENTS_CSV_SCHEMA_TOML = """schema = [
  { name = "event_id", type = "Int64", nullable = false },
  { name = "machine_serial", type = "Utf8", nullable = false },
  { name = "manufacturer", type = "Utf8", nullable = false },
  { name = "site", type = "Utf8", nullable = false },
  { name = "event_time", type = "Timestamp(Microsecond, None)", nullable = false },
  { name = "event_type", type = "Utf8", nullable = false },
  { name = "temperature_c", type = "Float64" },
  { name = "vibration_mm_s", type = "Float64" },
  { name = "energy_kwh", type = "Float64" },
  { name = "fault_code", type = "Utf8" },
]"""


def machine_events_parquet(csv_path: Path, out: Path) -> Path:
    """The demo machine_events CSV with its declared schema, as Parquet (for
    loading into PostgreSQL)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    table = pacsv.read_csv(csv_path, convert_options=pacsv.ConvertOptions(
        column_types={f.name: f.type for f in MACHINE_EVENTS_SCHEMA},
        # Empty fields are NULL, as Sluice (arrow-csv) reads them.
        strings_can_be_null=True))
    table = table.select(MACHINE_EVENTS_SCHEMA.names).cast(MACHINE_EVENTS_SCHEMA)
    pq.write_table(table, out)
    return out


def write_hive(table: pa.Table, out: Path, column: str) -> list[Path]:
    """`table` as hive-style directories `column=value/part-0.parquet`, the
    partition column left out of the files."""
    import pyarrow.dataset as ds
    ds.write_dataset(table, out, format="parquet", partitioning=[column], partitioning_flavor="hive",
                     basename_template="part-{i}.parquet", existing_data_behavior="error")
    return sorted(p for p in out.rglob("*.parquet"))


# --- daemons ------------------------------------------------------------------

def toml_str(value) -> str:
    return json.dumps(str(value))


def make_state(shared: Path, dir: Path) -> Path:
    """A state directory of its own for one daemon (its own audit log,
    ledger and agreements), with the shared development PKI and masking key,
    so that every daemon's certificates and hashed values are the same."""
    dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(shared / "pki", dir / "pki", dirs_exist_ok=True)
    shutil.copytree(shared / "secrets", dir / "secrets", dirs_exist_ok=True)
    return dir


@dataclass
class Source:
    """How one daemon's datasets are configured: TOML for `[[databases]]` /
    `[[object_stores]]` and the `trips` and `machine_events` datasets."""
    name: str
    trips: str
    machine_events: str
    services: str = ""


def file_trips(parquet: Path) -> str:
    return f"""[[datasets]]
name = "trips"
format = "parquet"
path = {toml_str(parquet)}
"""


def file_machine_events(shared: Path) -> str:
    return f"""[[datasets]]
name = "machine_events"
format = "csv"
path = {toml_str(shared / "data" / "machine_events.csv")}
csv = {{ has_header = true, delimiter = "," }}
{MACHINE_EVENTS_CSV_SCHEMA_TOML}
"""


def postgres_database(pg_port: int, password_file: Path, *, name: str = "transit",
                      statement_timeout: str | None = None, host: str = "127.0.0.1",
                      connect_timeout: str = "5s", tls: str = "disable", ca_file: Path | None = None,
                      max_connections: int = 4) -> str:
    extra = f'statement_timeout = "{statement_timeout}"\n' if statement_timeout else ""
    if ca_file is not None:
        extra += f"ca_file = {toml_str(ca_file)}\n"
    return f"""[[databases]]
name = "{name}"
kind = "postgres"
host = "{host}"
port = {pg_port}
dbname = "transit"
user = "sluice_reader"
password_file = {toml_str(password_file)}
tls = "{tls}"
max_connections = {max_connections}
connect_timeout = "{connect_timeout}"
{extra}"""


def postgres_dataset(name: str, relation: str, database: str = "transit") -> str:
    return f"""[[datasets]]
name = "{name}"
format = "postgres"
database = "{database}"
relation = "{relation}"
"""


def object_store(bucket: str, endpoint: str, credentials: Path) -> str:
    return f"""[[object_stores]]
url = "s3://{bucket}"
endpoint = "{endpoint}"
allow_http = true
region = "us-east-1"
credentials_file = {toml_str(credentials)}
"""


def partitioned_trips(path: str, column: str) -> str:
    return f"""[[datasets]]
name = "trips"
format = "parquet"
path = {toml_str(path)}
[[datasets.partitions]]
name = "{column}"
type = "Utf8"
"""


def write_config(path: Path, state: Path, source: Source, policy: Path = DEMO_POLICY,
                 log_level: str = "info", query_timeout: str = "2m") -> Path:
    text = f"""# test_sources.py: the `{source.name}` source.
[server]
listen = "127.0.0.1:0"
state_dir = {toml_str(state)}
shutdown_grace = "5s"

[limits]
query_timeout = "{query_timeout}"

[policy]
file = {toml_str(policy)}

[log]
format = "text"
level = "{log_level}"

{source.services}
{source.trips}
{source.machine_events}
"""
    path.write_text(text)
    return path


def daemon_config(base: Path, shared: Path, source: Source, zones: Path, **config) -> tuple[Path, Path]:
    """The state directory (under `base/source.name`) and the config file of
    a daemon over `source`, with `zones` from the demo JSON file."""
    dir = base / source.name
    state = make_state(shared, dir / "state")
    source = Source(source.name, source.trips, source.machine_events + f"""
[[datasets]]
name = "zones"
format = "json"
path = {toml_str(zones)}
""", source.services)
    return state, write_config(dir / "sluice.toml", state, source, **config)


def start_daemon(base: Path, shared: Path, source: Source, zones: Path, **config) -> Daemon:
    """A `sluice serve --config` over `source`, with `zones` from the demo
    JSON file, in a state directory of its own under `base/source.name`."""
    state, cfg = daemon_config(base, shared, source, zones, **config)
    return Daemon(state, "--config", str(cfg))


def serve_until_exit(base: Path, shared: Path, source: Source, zones: Path, timeout: float = 90,
                     **config) -> subprocess.CompletedProcess:
    """Runs `sluice serve --config` over `source` as start_daemon would and
    waits for it to exit (for configurations it must refuse at startup). A
    daemon still running after `timeout` seconds is killed and its output
    returned with returncode None."""
    from conftest import sluice_bin
    state, cfg = daemon_config(base, shared, source, zones, **config)
    args = [sluice_bin(), "serve", "--state-dir", str(state), "--listen", "127.0.0.1:0", "--metrics-listen", "off",
            "--config", str(cfg)]
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return subprocess.CompletedProcess(args, None, out, err)


# --- Flight SQL through grpcio ----------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 2:
            size, i = _read_varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield number, wire, value


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def statement_command(sql: str) -> bytes:
    """A CommandStatementQuery in an Any: a FlightDescriptor's command."""
    query = _len_field(1, sql.encode())
    return _len_field(1, b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery") + _len_field(2, query)


def statement_descriptor(sql: str) -> bytes:
    return b"\x08\x02" + _len_field(2, statement_command(sql))


def _headers(purpose: str | None, epsilon: str | None) -> list[tuple[str, str]]:
    headers = []
    if purpose:
        headers.append(("x-sluice-purpose", purpose))
    if epsilon is not None:
        headers.append(("x-sluice-epsilon", epsilon))
    return headers


@dataclass
class Outcome:
    """An answer (code OK, table) or a refusal (gRPC code name, message)."""
    code: str
    message: str = ""
    table: pa.Table | None = None
    stage: str = ""

    def comparable(self):
        if self.code == "OK":
            return ("OK", sorted_table(self.table))
        return (self.code, strip_receipt(self.message))

    def __repr__(self):
        if self.code == "OK":
            return f"Outcome(OK, {self.table.num_rows} rows, schema={self.table.schema.names})"
        return f"Outcome({self.code} at {self.stage}: {self.message!r})"


def strip_receipt(message: str) -> str:
    return re.sub(r" \(audit receipt [^)]*\)", "", message)


def sorted_table(table: pa.Table) -> tuple:
    """Schema (names, types) and the rows, sorted, for comparing answers
    whose row order the query does not fix."""
    schema = [(f.name, str(f.type)) for f in table.schema]
    rows = [tuple(r.values()) for r in table.to_pylist()]
    return schema, sorted(rows, key=lambda r: tuple((v is None, str(type(v)), v if v is not None else 0) for v in r))


class FlightCall:
    """GetFlightInfo, then DoGet of its endpoints, over grpcio."""

    def __init__(self, daemon: Daemon, identity: str = "planning", purpose: str | None = None,
                 epsilon: str | None = None, timeout: float = 180):
        self.daemon = daemon
        self.identity = identity
        self.metadata = _headers(purpose, epsilon)
        self.timeout = timeout
        # The `x-sluice-receipt` header (JSON) of every DoGet: the receipt of
        # its release record.
        self.receipts: list[dict] = []

    def get_flight_info(self, sql: str) -> list[bytes]:
        """The tickets (serialized Ticket messages) of the query."""
        with grpc_channel(self.daemon, self.identity) as channel:
            info = channel.unary_unary("/arrow.flight.protocol.FlightService/GetFlightInfo",
                                       request_serializer=lambda b: b, response_deserializer=lambda b: b)
            reply = info(statement_descriptor(sql), timeout=self.timeout, metadata=self.metadata)
        tickets = []
        for number, _, endpoint in _fields(reply):
            if number == 3:
                for n, _, ticket in _fields(endpoint):
                    if n == 1:
                        tickets.append(ticket)
        return tickets

    def do_get(self, tickets: list[bytes]) -> pa.Table:
        tables = []
        with grpc_channel(self.daemon, self.identity) as channel:
            get = channel.unary_stream("/arrow.flight.protocol.FlightService/DoGet",
                                       request_serializer=lambda b: b, response_deserializer=lambda b: b)
            for ticket in tickets:
                stream = io.BytesIO()
                call = get(ticket, timeout=self.timeout, metadata=self.metadata)
                for data in call:
                    header = body = b""
                    for number, _, value in _fields(data):
                        if number == 2:
                            header = value
                        elif number == 1000:
                            body = value
                    if not header:
                        continue
                    pad = (-len(header)) % 8
                    stream.write(b"\xff\xff\xff\xff" + struct.pack("<i", len(header) + pad) + header
                                 + b"\x00" * pad + body + b"\x00" * ((-len(body)) % 8))
                self.receipts.extend(json.loads(value) for key, value in call.initial_metadata() or ()
                                     if key == "x-sluice-receipt")
                stream.write(b"\xff\xff\xff\xff\x00\x00\x00\x00")
                tables.append(pa.ipc.open_stream(stream.getvalue()).read_all())
        if len(tables) == 1:
            return tables[0]
        return pa.concat_tables(tables)

    def run(self, sql: str) -> Outcome:
        import grpc
        stage = "GetFlightInfo"
        try:
            tickets = self.get_flight_info(sql)
            stage = "DoGet"
            return Outcome("OK", table=self.do_get(tickets))
        except grpc.RpcError as e:
            return Outcome(e.code().name, e.details() or "", stage=stage)


def run(daemon: Daemon, sql: str, identity: str = "planning", purpose: str | None = None,
        epsilon: str | None = None, timeout: float = 180) -> Outcome:
    return FlightCall(daemon, identity, purpose, epsilon, timeout).run(sql)


def key_encodings(key: bytes) -> list[str]:
    """The texts a binary key could appear as in a log."""
    return [key.hex(), key.hex().upper(), base64.b64encode(key).decode(),
            base64.urlsafe_b64encode(key).decode().rstrip("="), base64.b64encode(key).decode().rstrip("=")]


def audit_record(daemon: Daemon, receipt_id: str, identity: str = "planning") -> dict:
    """The audit record `receipt_id` as AuditService.GetReceipt gives it to
    `identity`: its record_json (seq, time, receipt_id, prev_hash, entry)."""
    from conftest import sluice_v1
    pb = sluice_v1()
    with grpc_channel(daemon, identity) as channel:
        record = pb.audit_pb2_grpc.AuditServiceStub(channel).GetReceipt(
            pb.audit_pb2.GetReceiptRequest(receipt_id=receipt_id), timeout=30)
    assert record.receipt_id == receipt_id, record
    return json.loads(record.record_json)


def release_record(daemon: Daemon, call: FlightCall) -> dict:
    """The entry of the release record of `call`'s one DoGet (through the
    control plane, by the receipt in its `x-sluice-receipt` header)."""
    assert len(call.receipts) == 1, f"expected one receipt header, got {call.receipts}"
    record = audit_record(daemon, call.receipts[0]["receipt_id"], call.identity)
    assert record["entry"]["event"] == "release", record
    return record["entry"]
