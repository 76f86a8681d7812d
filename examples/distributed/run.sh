#!/usr/bin/env bash
# The city data space with distributed execution, on one machine: the City
# Transport Agency's connector (the coordinator) runs the leaf stages of
# each query (scans, filters, partial aggregations) on three `sluice
# worker`s; policy, noise, the budget ledger and the audit log stay on the
# connector. Consumers see one connector, as in examples/city.
#
#   examples/distributed/run.sh           run the demo, then keep the connector
#                                         and the workers running until Ctrl-C
#   examples/distributed/run.sh --check  run the demo and exit with its status
#
# Environment: SLUICE_BIN (default: cargo build --release), SLUICE_PYTHON
# (default: a virtualenv, see ../common.sh), SLUICE_EXAMPLE_PORT_BASE
# (default 50291: gRPC on base, metrics on base+1, the workers on base+2,
# base+3 and base+4). Everything it writes goes to examples/distributed/.run/,
# which each run starts afresh (so the budget starts full).
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

BASE=$(port_base 50291)
PORT=$BASE
METRICS=$((BASE + 1))
WORKER_PORTS=("$((BASE + 2))" "$((BASE + 3))" "$((BASE + 4))")
TRANSPORT=grpc+tls://127.0.0.1:$PORT

RUN=$HERE/.run
PKI=$RUN/pki
DATA=$RUN/data/trips
LOG=$RUN/transport/serve.log
PURPOSE=urban-planning
# trips in 3 Parquet files of 100,000 journeys (one seed each); every card
# travels in every file.
FILES=3
ROWS=100000

find_sluice
find_python
for port in "$PORT" "$METRICS" "${WORKER_PORTS[@]}"; do
    port_free "$port"
done
install_traps
# The connector's log without its colours.
log_text() { sed 's/\x1b\[[0-9;]*m//g' "$LOG"; }

rm -rf "$RUN"
mkdir -p "$DATA" "$RUN/transport/state" "$RUN/workers"

step "PKI: one CA; the connector's server and coordinator certificates, one per worker, two consumers"
"$SLUICE" certs ca --dir "$PKI" --name "City Data Space CA" --org "City Data Space" >/dev/null
"$SLUICE" certs server --dir "$PKI" --name transport --ip 127.0.0.1 --dns localhost >/dev/null
"$SLUICE" certs coordinator --dir "$PKI" --name coordinator >/dev/null
for w in 1 2 3; do
    "$SLUICE" certs worker --dir "$PKI" --name "worker$w" --ip 127.0.0.1 --dns localhost >/dev/null
done
"$SLUICE" certs client --dir "$PKI" --name planning --cn "planning client" \
    --org "City Planning Agency" --uri spiffe://city.example/org/planning-agency >/dev/null
"$SLUICE" certs client --dir "$PKI" --name operations --cn "operations client" \
    --org "City Transport Operations" --uri spiffe://city.example/org/transport-operations >/dev/null
echo "CA $PKI/ca.pem; connector transport.pem (server) and coordinator.pem (role coordinator);"
echo "worker1.pem, worker2.pem, worker3.pem (role worker); planning.pem, operations.pem (consumers)"

step "the transport agency's data: trips in $FILES Parquet files in $DATA"
for k in $(seq "$FILES"); do
    "$SLUICE" generate trips --seed "$k" --rows "$ROWS" --out "$DATA/part-$k.parquet"
done

step "starting three workers (they accept the coordinator's certificate only)"
WORKERS=()
for w in 1 2 3; do
    start_daemon "worker $w" "$RUN/workers/worker$w.log" worker \
        --listen "127.0.0.1:${WORKER_PORTS[w - 1]}" \
        --cert "$PKI/worker$w.pem" --key "$PKI/worker$w.key" \
        --coordinator-ca "$PKI/ca.pem" --memory 1GiB
    WORKERS+=(--worker "https://127.0.0.1:${WORKER_PORTS[w - 1]}")
done
for w in 1 2 3; do
    wait_listening "worker $w" "$RUN/workers/worker$w.log"
done

step "starting the connector, coordinating them (config and policy in transport/)"
start_daemon transport "$LOG" serve --config "$HERE/transport/sluice.toml" \
    --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$METRICS" "${WORKERS[@]}"
CONN=(--ca "$PKI/ca.pem" --cert "$PKI/operations.pem" --key "$PKI/operations.key")
wait_ready transport "$TRANSPORT" "$PKI/ca.pem" "$PKI/operations.pem" "$PKI/operations.key"
echo "connector log: $(log_text | grep -o 'coordinating workers.*' | head -n 1)"

step "the consumers' client (ADBC, gRPC): $HERE/client.py"
client_status=0
"$PYTHON" "$HERE/client.py" --pki "$PKI" --endpoint "$TRANSPORT" --data "$DATA" \
    --worker "127.0.0.1:${WORKER_PORTS[0]}" || client_status=$?
if ((client_status != 0)); then
    echo "the client failed (status $client_status); logs: $LOG $RUN/workers/" >&2
    exit "$client_status"
fi

# How many queries ran their leaf stages on N workers.
sent_to() { log_text | grep -c "leaf stages sent to workers workers=$1" || true; }
echo
echo "connector log: leaf stages sent to workers, on all 3, for $(sent_to 3) queries"
(($(sent_to 3) >= 2)) || die "the connector did not send the client's queries to the workers (log: $LOG)"

SQL="SELECT mode, count(*) AS trips FROM trips GROUP BY mode ORDER BY mode"
step "where a query runs: the stages column of EXPLAIN POLICY"
echo "\$ sluice query --endpoint $TRANSPORT -p $PURPOSE -f json \"EXPLAIN POLICY $SQL\""
explained=$("$SLUICE" query --endpoint "$TRANSPORT" "${CONN[@]}" -p "$PURPOSE" -f json "EXPLAIN POLICY $SQL")
stages=$("$PYTHON" -c 'import json, sys; print(json.loads(sys.stdin.read())[0]["stages"])' <<<"$explained")
echo "$stages"
grep -q "on the workers (3 tasks" <<<"$stages" || die "EXPLAIN POLICY does not show a stage on the 3 workers"
# Each worker's metrics arrive when its tasks' channels close, after the answer.
deadline=$((SECONDS + 10))
until (($(log_text | grep -c "worker stage finished") >= 3)); do
    ((SECONDS < deadline)) || die "the workers' metrics are not in the connector log (log: $LOG)"
    sleep 0.2
done
echo
echo "connector log, in each query's span: what each worker did (the last three)"
log_text | grep "worker stage finished" | tail -n 3 | sed 's/^.*worker stage finished/  worker stage finished/'

step "a worker fails: kill -9 worker 2, then the same question through the sluice CLI"
echo "\$ sluice query --endpoint $TRANSPORT -p $PURPOSE \"$SQL\"   # as the operations department"
before=$("$SLUICE" query --endpoint "$TRANSPORT" "${CONN[@]}" -p "$PURPOSE" "$SQL")
echo "$before"
victim=${DAEMON_PID[worker 2]}
echo
echo "\$ kill -9 $victim   # worker 2, https://127.0.0.1:${WORKER_PORTS[1]}"
kill -KILL "$victim"
wait "$victim" 2>/dev/null || true
# It is gone: the traps (and serve_until_interrupted) leave it out.
left=()
for pid in "${DAEMON_PIDS[@]}"; do
    [[ $pid == "$victim" ]] || left+=("$pid")
done
DAEMON_PIDS=("${left[@]}")
# The connector probes its workers every 2 s and leaves out one that does
# not answer (a query already running on it would fail with UNAVAILABLE).
deadline=$((SECONDS + 20))
until log_text | grep -q 'worker does not answer'; do
    ((SECONDS < deadline)) || die "the connector did not notice that worker 2 is gone (log: $LOG)"
    sleep 0.2
done
echo "connector log: $(log_text | grep -o 'worker does not answer.*' | tail -n 1)"
echo
echo "\$ sluice query --endpoint $TRANSPORT -p $PURPOSE \"$SQL\""
after=$("$SLUICE" query --endpoint "$TRANSPORT" "${CONN[@]}" -p "$PURPOSE" "$SQL")
echo "$after"
[[ $after == "$before" ]] || die "with two workers the answer differs from the one with three"
(($(sent_to 2) >= 1)) || die "the last query did not run on the two remaining workers (log: $LOG)"
echo "the same answer, with the leaf stages on the 2 remaining workers (connector log: workers=2)"

echo
echo "distributed example: OK"
if [[ $mode == check ]]; then
    exit 0
fi

cat <<EOT

Query the connector yourself (from the repository root); the planning
agency's questions spend ε from its budget, the operations department's
are free:

  SLUICE=$SLUICE
  OPS="--ca $PKI/ca.pem --cert $PKI/operations.pem --key $PKI/operations.key"
  PLANNING="--ca $PKI/ca.pem --cert $PKI/planning.pem --key $PKI/planning.key"
  \$SLUICE query --endpoint $TRANSPORT \$OPS -p $PURPOSE "SELECT start_zone, count(*) AS trips, avg(fare_eur) AS fare FROM trips GROUP BY start_zone ORDER BY trips DESC LIMIT 5"
  \$SLUICE query --endpoint $TRANSPORT \$PLANNING -p $PURPOSE -e 0.1 "SELECT end_zone, count(*) AS trips FROM trips GROUP BY end_zone ORDER BY end_zone"
  \$SLUICE budget --endpoint $TRANSPORT \$PLANNING

Worker 2 is down: the connector runs the leaf stages on workers 1 and 3.
Start it again (in another terminal) and the connector takes it back
within 2 s (log: \`worker answers again\`):

  \$SLUICE worker --listen 127.0.0.1:${WORKER_PORTS[1]} --cert $PKI/worker2.pem --key $PKI/worker2.key --coordinator-ca $PKI/ca.pem

Policy: $HERE/transport/policy.yaml (edit it: the connector reloads).
Logs: $LOG (each distributed query: \`leaf stages sent to workers\`),
$RUN/workers/; metrics: http://127.0.0.1:$METRICS/metrics
EOT
serve_until_interrupted
