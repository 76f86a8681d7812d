#!/usr/bin/env bash
# A regional mobility data space on one machine: two transport operators
# (north, south) each run a Sluice connector over their own journeys, and a
# broker federates "trips per zone across all operators" for the City
# Planning Agency. Each operator decides its partial query under its own
# policy, adds its own noise, charges its own budget and signs its own
# receipt; the broker merges.
#
#   examples/broker/run.sh          run the client demo, then keep the three
#                                   daemons running until Ctrl-C
#   examples/broker/run.sh --check  run the demo and exit with its status
#   examples/broker/run.sh --up     start the daemons and return (for tests);
#                                   their pids go to RUN_DIR/pids
#   examples/broker/run.sh --down   stop what --up started
#
# Environment: SLUICE_BIN (default: cargo build --release), SLUICE_PYTHON
# (default: a virtualenv, see ../common.sh), SLUICE_EXAMPLE_PORT_BASE
# (default 50091: north, south, broker on base, base+1, base+2),
# SLUICE_EXAMPLE_RUN_DIR (default examples/broker/.run; each run starts it
# afresh, so the budgets start full).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../common.sh
source "$HERE/../common.sh"

mode=serve
case ${1:-} in
    "") ;;
    --check) mode=check ;;
    --up) mode=up ;;
    --down) mode=down ;;
    -h | --help)
        sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument \`$1\`: use --check, --up, --down or nothing" ;;
esac

RUN=${SLUICE_EXAMPLE_RUN_DIR:-$HERE/.run}
if [[ $mode == down ]]; then
    [[ -f $RUN/pids ]] || die "nothing to stop: $RUN/pids does not exist"
    # shellcheck disable=SC2046
    kill -TERM $(cat "$RUN/pids") 2>/dev/null || true
    rm -f "$RUN/pids"
    echo "stopped"
    exit 0
fi

BASE=$(port_base 50091)
NORTH=grpc+tls://127.0.0.1:$BASE
SOUTH=grpc+tls://127.0.0.1:$((BASE + 1))
BROKER=grpc+tls://127.0.0.1:$((BASE + 2))
PKI=$RUN/pki

find_sluice
if [[ $mode != up ]]; then
    find_python
fi
for port in "$BASE" "$((BASE + 1))" "$((BASE + 2))"; do
    port_free "$port"
done
if [[ $mode != up ]]; then
    trap stop_daemons EXIT
    trap 'exit 130' INT TERM
fi

rm -rf "$RUN"
step "setup.sh: a data-space CA and certificates, each operator's journeys, configs and policies"
SLUICE=$SLUICE NORTH_PORT=$BASE SOUTH_PORT=$((BASE + 1)) BROKER_PORT=$((BASE + 2)) \
    "$HERE/setup.sh" "$RUN"

step "starting the north and south operators' connectors and the broker"
start_daemon north "$RUN/north/serve.log" serve --config "$RUN/north/sluice.toml"
start_daemon south "$RUN/south/serve.log" serve --config "$RUN/south/sluice.toml"
start_daemon broker "$RUN/broker.log" broker --config "$RUN/broker.toml"
AS_PLANNING=("$PKI/ca.pem" "$PKI/planning.pem" "$PKI/planning.key")
wait_ready north "$NORTH" "${AS_PLANNING[@]}"
wait_ready south "$SOUTH" "${AS_PLANNING[@]}"
wait_listening broker "$RUN/broker.log"
printf '%s\n' "${DAEMON_PIDS[@]}" >"$RUN/pids"

if [[ $mode == up ]]; then
    echo "north $NORTH, south $SOUTH, broker $BROKER; stop with: $0 --down"
    exit 0
fi

step "the planning agency's client (ADBC, through the broker): $HERE/client.py"
client_status=0
"$PYTHON" "$HERE/client.py" --pki "$PKI" --broker "$BROKER" --north "$NORTH" --south "$SOUTH" --sluice "$SLUICE" || client_status=$?
if ((client_status != 0)); then
    echo "the client failed (status $client_status); logs: $RUN/north/serve.log $RUN/south/serve.log $RUN/broker.log" >&2
    exit "$client_status"
fi

CONN=(--ca "$PKI/ca.pem" --cert "$PKI/planning.pem" --key "$PKI/planning.key")
step "the same through the sluice CLI"
SQL="SELECT mode, count(*) AS trips, avg(distance_km) AS avg_km FROM trips GROUP BY mode ORDER BY mode"
echo "\$ sluice query --endpoint $BROKER -p urban-planning -e 0.25 \"$SQL\""
"$SLUICE" query --endpoint "$BROKER" "${CONN[@]}" -p urban-planning -e 0.25 "$SQL"
echo
echo "\$ sluice budget --endpoint $NORTH   # each operator keeps its own budget"
"$SLUICE" budget --endpoint "$NORTH" "${CONN[@]}"

echo
echo "broker example: OK"
if [[ $mode == check ]]; then
    exit 0
fi

cat <<EOT

Ask the broker yourself (from the repository root):

  SLUICE=$SLUICE
  CONN="--ca $PKI/ca.pem --cert $PKI/planning.pem --key $PKI/planning.key"
  \$SLUICE query --endpoint $BROKER \$CONN -p urban-planning "SELECT start_zone, count(*) AS trips FROM trips GROUP BY start_zone ORDER BY trips DESC LIMIT 5"
  \$SLUICE query --endpoint $BROKER \$CONN -p urban-planning "SELECT age_band, count(*) FROM trips GROUP BY age_band"                 # south refuses age_band
  \$SLUICE query --endpoint $BROKER \$CONN -p urban-planning --allow-partial "SELECT age_band, count(*) FROM trips GROUP BY age_band" # north only, flagged

Policies: $RUN/north/policy.yaml, $RUN/south/policy.yaml; broker: $RUN/broker.toml.
Logs: $RUN/north/serve.log, $RUN/south/serve.log, $RUN/broker.log
EOT
serve_until_interrupted
