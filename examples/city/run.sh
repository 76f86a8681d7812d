#!/usr/bin/env bash
# The city data space, on one machine: the City Transport Agency runs a
# Sluice connector over its journey data (`trips`, personal data) and the
# fare zones; the City Planning Agency gets differentially private answers
# only, charged to a privacy budget.
#
#   examples/city/run.sh           run the client demo, then keep the
#                                  connector running until Ctrl-C
#   examples/city/run.sh --check  run the demo and exit with the client's status
#
# Environment: SLUICE_BIN (default: cargo build --release), SLUICE_PYTHON
# (default: a virtualenv, see ../common.sh), SLUICE_EXAMPLE_PORT_BASE
# (default 50081: gRPC on base, metrics on base+1). Everything it writes
# goes to examples/city/.run/, which each run starts afresh (so the budget
# starts full).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../common.sh
source "$HERE/../common.sh"

mode=serve
case ${1:-} in
    "") ;;
    --check) mode=check ;;
    -h | --help)
        sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument \`$1\`: use --check or nothing" ;;
esac

BASE=$(port_base 50081)
PORT=$BASE
METRICS=$((BASE + 1))
TRANSPORT=grpc+tls://127.0.0.1:$PORT

RUN=$HERE/.run
PKI=$RUN/pki
PURPOSE=urban-planning

find_sluice
find_python
for port in "$PORT" "$METRICS"; do
    port_free "$port"
done
install_traps

rm -rf "$RUN"
mkdir -p "$RUN/data" "$RUN/transport/state"

step "PKI: one CA for the city data space, a certificate for the connector and for the planning agency"
"$SLUICE" certs ca --dir "$PKI" --name "City Data Space CA" --org "City Data Space" >/dev/null
"$SLUICE" certs server --dir "$PKI" --name transport --ip 127.0.0.1 --dns localhost >/dev/null
"$SLUICE" certs client --dir "$PKI" --name planning --cn "planning client" \
    --org "City Planning Agency" --uri spiffe://city.example/org/planning-agency >/dev/null
echo "CA $PKI/ca.pem; connector transport.pem; planning.pem (spiffe://city.example/org/planning-agency)"

step "the transport agency's data (sluice generate trips, zones)"
"$SLUICE" generate trips --seed 7 --rows 300000 --out "$RUN/data/trips.parquet"
"$SLUICE" generate zones --out "$RUN/data/zones.json"

step "starting the connector (config and policy in transport/)"
start_daemon transport "$RUN/transport/serve.log" serve --config "$HERE/transport/sluice.toml" \
    --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$METRICS"
CONN=(--ca "$PKI/ca.pem" --cert "$PKI/planning.pem" --key "$PKI/planning.key")
wait_ready transport "$TRANSPORT" "$PKI/ca.pem" "$PKI/planning.pem" "$PKI/planning.key"

step "the planning agency's client (ADBC): $HERE/client.py"
client_status=0
"$PYTHON" "$HERE/client.py" --pki "$PKI" --endpoint "$TRANSPORT" --sluice "$SLUICE" || client_status=$?
if ((client_status != 0)); then
    echo "the client failed (status $client_status); connector log: $RUN/transport/serve.log" >&2
    exit "$client_status"
fi

step "the same through the sluice CLI"
echo "\$ sluice catalog --endpoint $TRANSPORT trips"
"$SLUICE" catalog --endpoint "$TRANSPORT" "${CONN[@]}" trips
echo
echo "\$ sluice query --endpoint $TRANSPORT -p $PURPOSE -e 0.25 \"SELECT mode, count(*) AS trips, avg(distance_km) AS avg_km FROM trips GROUP BY mode ORDER BY mode\""
"$SLUICE" query --endpoint "$TRANSPORT" "${CONN[@]}" -p "$PURPOSE" -e 0.25 \
    "SELECT mode, count(*) AS trips, avg(distance_km) AS avg_km FROM trips GROUP BY mode ORDER BY mode"
echo
echo "\$ sluice budget --endpoint $TRANSPORT"
budget=$("$SLUICE" budget --endpoint "$TRANSPORT" "${CONN[@]}")
echo "$budget"
# The client spent 0.5 (its repeat was free), the CLI query 0.25.
[[ $budget == *"remaining 9.25 ε"* ]] || die "sluice budget should show 9.25 ε remaining"

echo
echo "city example: OK"
if [[ $mode == check ]]; then
    exit 0
fi

cat <<EOT

Query the connector yourself (from the repository root); each new question
spends ε from the planning agency's budget, a repeated one is free:

  SLUICE=$SLUICE
  CONN="--ca $PKI/ca.pem --cert $PKI/planning.pem --key $PKI/planning.key"
  \$SLUICE query --endpoint $TRANSPORT \$CONN -p $PURPOSE -e 0.1 "SELECT end_zone, count(*) AS trips FROM trips GROUP BY end_zone ORDER BY trips DESC LIMIT 5"
  \$SLUICE query --endpoint $TRANSPORT \$CONN -p $PURPOSE "SELECT card_id FROM trips LIMIT 1"   # refused
  \$SLUICE budget --endpoint $TRANSPORT \$CONN
  $PYTHON $HERE/client.py --pki $PKI --endpoint $TRANSPORT --sluice \$SLUICE

Policy: $HERE/transport/policy.yaml (edit it: the connector reloads).
Log: $RUN/transport/serve.log; metrics: http://127.0.0.1:$METRICS/metrics
EOT
serve_until_interrupted
