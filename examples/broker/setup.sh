#!/usr/bin/env bash
# Writes everything the regional mobility data space (examples/broker)
# needs into one directory: a data-space CA and certificates, each
# operator's journeys, each connector's config and policy, the broker's
# config. run.sh calls it for loopback ports; docker/compose.yaml runs it in
# its init container with container host names.
#
#   setup.sh OUT_DIR
#
# Environment (defaults for loopback):
#   SLUICE        the sluice binary (default: sluice on PATH)
#   BIND          address the daemons listen on (127.0.0.1; 0.0.0.0 in containers)
#   NORTH_PORT SOUTH_PORT BROKER_PORT   (50091, 50092, 50093)
#   NORTH_HOST SOUTH_HOST               how the broker reaches the operators (127.0.0.1)
#   TRIPS_ROWS                          journeys per operator (200000)
set -euo pipefail

OUT=${1:?usage: setup.sh OUT_DIR}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SLUICE=${SLUICE:-sluice}
BIND=${BIND:-127.0.0.1}
NORTH_PORT=${NORTH_PORT:-50091}
SOUTH_PORT=${SOUTH_PORT:-50092}
BROKER_PORT=${BROKER_PORT:-50093}
NORTH_HOST=${NORTH_HOST:-127.0.0.1}
SOUTH_HOST=${SOUTH_HOST:-127.0.0.1}
TRIPS_ROWS=${TRIPS_ROWS:-200000}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PKI=$OUT/pki
mkdir -p "$PKI" "$OUT/data" "$OUT/north/state" "$OUT/south/state"

# One CA for the data space. Server certificates name the loopback address
# and the container host names, so one PKI serves both deployments.
"$SLUICE" certs ca --dir "$PKI" --name "Regional Mobility Data Space CA" --org "Regional Mobility Data Space" --force >/dev/null
for name in north south broker-server; do
    "$SLUICE" certs server --dir "$PKI" --name "$name" --ip 127.0.0.1 \
        --dns localhost --dns north --dns south --dns broker --force >/dev/null
done
# The broker's client identity at the operators (it also signs the
# on-behalf-of assertions with this key), and the planning agency's.
"$SLUICE" certs client --dir "$PKI" --name broker --cn "regional broker" \
    --org "Regional Mobility Broker" --uri spiffe://mobility.example/org/regional-broker --force >/dev/null
"$SLUICE" certs client --dir "$PKI" --name planning --cn "planning client" \
    --org "City Planning Agency" --uri spiffe://mobility.example/org/city-planning --force >/dev/null
# Someone the broker does not serve.
"$SLUICE" certs client --dir "$PKI" --name stranger --cn "stranger" \
    --org "Unknown Analytics" --uri spiffe://elsewhere.example/org/unknown --force >/dev/null

# Each operator's own journeys: same schema, different seeds.
"$SLUICE" generate trips --seed 101 --rows "$TRIPS_ROWS" --out "$OUT/data/north-trips.parquet"
"$SLUICE" generate trips --seed 202 --rows "$TRIPS_ROWS" --out "$OUT/data/south-trips.parquet"

# The south operator does not release age bands at all.
cp "$HERE/operator-policy.yaml" "$OUT/north/policy.yaml"
grep -v 'AGE_BAND' "$HERE/operator-policy.yaml" >"$OUT/south/policy.yaml"

operator_config() {
    local name=$1 port=$2
    cat >"$OUT/$name/sluice.toml" <<EOT
# The $name operator's connector (written by examples/broker/setup.sh).
[server]
listen = "$BIND:$port"
state_dir = "state"
shutdown_grace = "5s"

[tls]
cert = "../pki/$name.pem"
key = "../pki/$name.key"
client_ca = "../pki/ca.pem"

[policy]
file = "policy.yaml"

[metrics]
listen = "off"

[[datasets]]
name = "trips"
format = "parquet"
path = "../data/$name-trips.parquet"
description = "The $name operator's journeys (synthetic)."
EOT
}
operator_config north "$NORTH_PORT"
operator_config south "$SOUTH_PORT"

cat >"$OUT/broker.toml" <<EOT
# The regional mobility broker (written by examples/broker/setup.sh).
# Reference: docs/federation.md.
[server]
listen = "$BIND:$BROKER_PORT"
shutdown_grace = "5s"

# Serving consumers over mTLS.
[tls]
cert = "pki/broker-server.pem"
key = "pki/broker-server.key"
client_ca = "pki/ca.pem"

# Reaching the operators: the broker's own client certificate, whose key
# also signs the on-behalf-of assertions.
[upstream]
cert = "pki/broker.pem"
key = "pki/broker.key"
ca = "pki/ca.pem"
timeout = "20s"

# Who may ask through the broker; everyone else is refused.
[access]
consumers = [{ organization = "City Planning Agency" }]

[[providers]]
name = "north"
endpoint = "grpc+tls://$NORTH_HOST:$NORTH_PORT"

[[providers]]
name = "south"
endpoint = "grpc+tls://$SOUTH_HOST:$SOUTH_PORT"

[[federated]]
name = "trips"
description = "Journeys of both operators."
sources = { north = "trips", south = "trips" }
EOT
echo "regional mobility data space written to $OUT"
