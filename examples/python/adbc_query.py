"""Query a Sluice connector with ADBC over mTLS.

    pip install adbc-driver-flightsql pyarrow
    cargo run --release -- serve            # in another terminal
    python examples/python/adbc_query.py [STATE_DIR] [ENDPOINT]
"""

import sys
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql

state = Path(sys.argv[1] if len(sys.argv) > 1 else ".sluice")
endpoint = sys.argv[2] if len(sys.argv) > 2 else "grpc+tls://127.0.0.1:50051"
pki = state / "pki"

with flightsql.connect(endpoint, db_kwargs={
    "adbc.flight.sql.client_option.tls_root_certs": (pki / "ca.pem").read_text(),
    "adbc.flight.sql.client_option.mtls_cert_chain": (pki / "planning.pem").read_text(),
    "adbc.flight.sql.client_option.mtls_private_key": (pki / "planning.key").read_text(),
    # The demo policy lets the planning agency use trips for declared purposes only.
    "adbc.flight.sql.rpc.call_header.x-sluice-purpose": "research",
}, autocommit=True) as conn, conn.cursor() as cur:
    # A prepared statement with a bound parameter. The demo policy releases
    # only aggregates of trips, over groups of at least 10 distinct cards.
    cur.execute(
        "SELECT start_zone, count(*) AS trips, round(avg(distance_km), 2) AS avg_km "
        "FROM trips WHERE mode = ? GROUP BY start_zone ORDER BY trips DESC LIMIT 5",
        parameters=("bus",),
    )
    print(cur.fetch_arrow_table())

    # Catalog metadata.
    for catalog in conn.adbc_get_objects(depth="tables").read_all().to_pylist():
        for schema in catalog["catalog_db_schemas"]:
            for table in schema["db_schema_tables"]:
                print(f'{catalog["catalog_name"]}.{schema["db_schema_name"]}.{table["table_name"]}')
