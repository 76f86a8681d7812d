"""Tickets through pyarrow.flight (Arrow C++ Flight client) over mTLS.

Flight SQL commands travel as protobuf `Any` messages; the two-field
encoding below is the wire format, not a client of our own.
"""

import pyarrow.flight as flight
import pytest

from conftest import flight_client


def _field(number: int, payload: bytes) -> bytes:
    key = (number << 3) | 2  # length-delimited
    return bytes([key]) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def statement_query(sql: str) -> flight.FlightDescriptor:
    command = _field(1, sql.encode())
    any_message = _field(1, b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery") + _field(2, command)
    return flight.FlightDescriptor.for_command(any_message)


SQL = "SELECT mode, count(*) AS n FROM trips GROUP BY mode ORDER BY mode"


def test_ticket_replayed_by_another_certificate_is_refused(daemon):
    planning = flight_client(daemon, "planning")
    supplier = flight_client(daemon, "supplier")
    info = planning.get_flight_info(statement_query(SQL))
    ticket = info.endpoints[0].ticket
    with pytest.raises(flight.FlightUnauthorizedError, match="different principal"):
        supplier.do_get(ticket).read_all()
    # The rightful holder still gets the result, exactly the advertised schema.
    table = planning.do_get(ticket).read_all()
    assert table.schema == info.schema
    assert sum(table.column("n").to_pylist()) == 1_000_000
    # And only once.
    # (pyarrow maps gRPC NOT_FOUND to KeyError.)
    with pytest.raises(KeyError, match="single-use"):
        planning.do_get(ticket).read_all()


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_altered_ticket_is_refused(daemon, where):
    client = flight_client(daemon)
    ticket = client.get_flight_info(statement_query(SQL)).endpoints[0].ticket.ticket
    position = {"start": 120, "middle": len(ticket) // 2, "end": len(ticket) - 1}[where]
    altered = bytearray(ticket)
    altered[position] ^= 0x20
    with pytest.raises(flight.FlightUnauthorizedError, match="ticket rejected"):
        client.do_get(flight.Ticket(bytes(altered))).read_all()
    # Untouched, it works.
    assert client.do_get(flight.Ticket(ticket)).read_all().num_rows > 0


def test_client_without_certificate_is_refused(daemon):
    client = flight.FlightClient(daemon.uri, tls_root_certs=daemon.pem("ca.pem"))
    with pytest.raises(flight.FlightError):
        client.get_flight_info(statement_query("SELECT 1"), options=flight.FlightCallOptions(timeout=10))
    assert daemon.running()
