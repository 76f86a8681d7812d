#!/usr/bin/env bash
# The industry data space, on one machine: two manufacturers (Kessler Werke
# and Nordhavn Motion) each run their own Sluice connector over their own
# machine telemetry; the Axle Supplier Consortium queries both.
#
#   examples/industry/run.sh           run the client demo, then keep the
#                                      connectors running until Ctrl-C
#   examples/industry/run.sh --check  run the demo and exit with the client's status
#
# Environment: SLUICE_BIN (default: cargo build --release), SLUICE_PYTHON
# (default: a virtualenv, see ../common.sh), SLUICE_EXAMPLE_PORT_BASE
# (default 50071: Kessler gRPC base, Nordhavn base+1, their metrics base+2
# and base+3). Everything it writes goes to examples/industry/.run/, which
# each run starts afresh.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../common.sh
source "$HERE/../common.sh"

mode=serve
case ${1:-} in
    "") ;;
    --check) mode=check ;;
    -h | --help)
        sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument \`$1\`: use --check or nothing" ;;
esac

BASE=$(port_base 50071)
KESSLER_PORT=$BASE
NORDHAVN_PORT=$((BASE + 1))
KESSLER_METRICS=$((BASE + 2))
NORDHAVN_METRICS=$((BASE + 3))
KESSLER=grpc+tls://127.0.0.1:$KESSLER_PORT
NORDHAVN=grpc+tls://127.0.0.1:$NORDHAVN_PORT

RUN=$HERE/.run
PKI=$RUN/pki
PURPOSE=quality-benchmarking

find_sluice
find_python
for port in "$KESSLER_PORT" "$NORDHAVN_PORT" "$KESSLER_METRICS" "$NORDHAVN_METRICS"; do
    port_free "$port"
done
install_traps

rm -rf "$RUN"
mkdir -p "$RUN/data" "$RUN/kessler/state" "$RUN/nordhavn/state"

step "PKI: one CA for the industry data space, a certificate per connector and for the consortium"
"$SLUICE" certs ca --dir "$PKI" --name "Industry Data Space CA" --org "Industry Data Space" >/dev/null
for maker in kessler nordhavn; do
    "$SLUICE" certs server --dir "$PKI" --name "$maker" --ip 127.0.0.1 --dns localhost >/dev/null
done
"$SLUICE" certs client --dir "$PKI" --name consortium --cn "consortium client" \
    --org "Axle Supplier Consortium" --uri spiffe://industry.example/org/supplier-consortium >/dev/null
echo "CA $PKI/ca.pem; connectors kessler.pem, nordhavn.pem; consortium.pem (spiffe://industry.example/org/supplier-consortium)"

step "machine telemetry: each manufacturer's own (sluice generate machine-events)"
"$SLUICE" generate machine-events --manufacturer "Kessler Werke" --seed 1001 --rows 20000 \
    --out "$RUN/data/kessler-machine-events.csv"
"$SLUICE" generate machine-events --manufacturer "Nordhavn Motion" --seed 2002 --rows 20000 \
    --out "$RUN/data/nordhavn-machine-events.csv"

step "starting the connectors (config and policy in kessler/ and nordhavn/)"
start_daemon kessler "$RUN/kessler/serve.log" serve --config "$HERE/kessler/sluice.toml" \
    --listen "127.0.0.1:$KESSLER_PORT" --metrics-listen "127.0.0.1:$KESSLER_METRICS"
start_daemon nordhavn "$RUN/nordhavn/serve.log" serve --config "$HERE/nordhavn/sluice.toml" \
    --listen "127.0.0.1:$NORDHAVN_PORT" --metrics-listen "127.0.0.1:$NORDHAVN_METRICS"
CONN=(--ca "$PKI/ca.pem" --cert "$PKI/consortium.pem" --key "$PKI/consortium.key")
wait_ready kessler "$KESSLER" "$PKI/ca.pem" "$PKI/consortium.pem" "$PKI/consortium.key"
wait_ready nordhavn "$NORDHAVN" "$PKI/ca.pem" "$PKI/consortium.pem" "$PKI/consortium.key"

step "the consortium's client (ADBC): $HERE/client.py"
client_status=0
"$PYTHON" "$HERE/client.py" --pki "$PKI" \
    --connector "Kessler Werke=$KESSLER" --connector "Nordhavn Motion=$NORDHAVN" || client_status=$?
if ((client_status != 0)); then
    echo "the client failed (status $client_status); connector logs: $RUN/*/serve.log" >&2
    exit "$client_status"
fi

step "the same through the sluice CLI"
echo "\$ sluice whoami --endpoint $KESSLER …"
"$SLUICE" whoami --endpoint "$KESSLER" "${CONN[@]}"
echo
echo "\$ sluice catalog --endpoint $KESSLER machine_events"
"$SLUICE" catalog --endpoint "$KESSLER" "${CONN[@]}" machine_events
echo
echo "\$ sluice query --endpoint $NORDHAVN -p $PURPOSE \"SELECT event_type, count(*) …\""
"$SLUICE" query --endpoint "$NORDHAVN" "${CONN[@]}" -p "$PURPOSE" \
    "SELECT event_type, count(*) AS events, count(DISTINCT machine_serial) AS machines, round(avg(energy_kwh), 2) AS avg_kwh FROM machine_events GROUP BY event_type ORDER BY event_type"
echo
echo "\$ sluice query --endpoint $KESSLER -p $PURPOSE \"SELECT machine_serial, temperature_c FROM machine_events LIMIT 3\""
if refusal=$("$SLUICE" query --endpoint "$KESSLER" "${CONN[@]}" -p "$PURPOSE" \
    "SELECT machine_serial, temperature_c FROM machine_events LIMIT 3" 2>&1); then
    die "raw rows were released by the Kessler connector: $refusal"
fi
echo "$refusal"
[[ $refusal == *"releases only aggregates"* ]] || die "the CLI refusal does not name the aggregation rule: $refusal"

echo
echo "industry example: OK"
if [[ $mode == check ]]; then
    exit 0
fi

cat <<EOF

Query the connectors yourself (from the repository root):

  SLUICE=$SLUICE
  CONN="--ca $PKI/ca.pem --cert $PKI/consortium.pem --key $PKI/consortium.key"
  \$SLUICE query --endpoint $KESSLER \$CONN -p $PURPOSE "SELECT site, count(*) AS events FROM machine_events GROUP BY site"
  \$SLUICE query --endpoint $NORDHAVN \$CONN -p $PURPOSE "SELECT event_type, round(avg(temperature_c), 1) AS t FROM machine_events GROUP BY event_type"
  \$SLUICE tables --endpoint $KESSLER \$CONN
  $PYTHON $HERE/client.py --pki $PKI --connector "Kessler Werke=$KESSLER" --connector "Nordhavn Motion=$NORDHAVN"

Policies: $HERE/kessler/policy.yaml, $HERE/nordhavn/policy.yaml (edit them: the connectors reload).
Logs: $RUN/kessler/serve.log, $RUN/nordhavn/serve.log; metrics: http://127.0.0.1:$KESSLER_METRICS/metrics, http://127.0.0.1:$NORDHAVN_METRICS/metrics
EOF
serve_until_interrupted
