#!/usr/bin/env bash
# The city data space with the journeys where the transport agency keeps
# them: in PostgreSQL. The same connector, policy and client as
# examples/city, but `trips` is a table in a local PostgreSQL cluster that
# Sluice reads over the database's own protocol; only the columns and the
# filters the approved plan needs reach the database (see docs/sources.md).
#
#   examples/postgres/run.sh           run the client demo, then keep the
#                                      connector and the database running until Ctrl-C
#   examples/postgres/run.sh --check  run the demo and exit with the client's status
#
# Needs root on a Debian-like machine: PostgreSQL is installed from the
# distribution (package postgresql) if it is missing, and runs as the
# `postgres` user in examples/postgres/.run/db. Environment: SLUICE_BIN,
# SLUICE_PYTHON, SLUICE_EXAMPLE_PORT_BASE (default 50101: gRPC on base,
# metrics on base+1, PostgreSQL on base+2), as in ../common.sh.
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

BASE=$(port_base 50101)
PORT=$BASE
METRICS=$((BASE + 1))
PGPORT=$((BASE + 2))
TRANSPORT=grpc+tls://127.0.0.1:$PORT

RUN=$HERE/.run
PKI=$RUN/pki
DB=$RUN/db
PG=$ROOT/tests/services/postgres.sh
PURPOSE=urban-planning

find_sluice
find_python
for port in "$PORT" "$METRICS" "$PGPORT"; do
    port_free "$port"
done
install_traps
stop_database() { "$PG" stop "$DB" >/dev/null 2>&1 || true; }
trap 'stop_daemons; stop_database' EXIT

[[ -d $DB ]] && stop_database
rm -rf "$RUN"
mkdir -p "$RUN/data" "$RUN/transport/state"

step "PKI: one CA for the city data space, a certificate for the connector and for the planning agency"
"$SLUICE" certs ca --dir "$PKI" --name "City Data Space CA" --org "City Data Space" >/dev/null
"$SLUICE" certs server --dir "$PKI" --name transport --ip 127.0.0.1 --dns localhost >/dev/null
"$SLUICE" certs client --dir "$PKI" --name planning --cn "planning client" \
    --org "City Planning Agency" --uri spiffe://city.example/org/planning-agency >/dev/null

step "the transport agency's database: PostgreSQL on 127.0.0.1:$PGPORT ($DB), trips loaded into public.trips"
"$SLUICE" generate trips --seed 7 --rows 300000 --out "$RUN/data/trips.parquet"
"$SLUICE" generate zones --out "$RUN/data/zones.json"
"$PG" start "$DB" "$PGPORT"
PYTHON=$PYTHON "$PG" load-trips "$DB" "$PGPORT" "$RUN/data/trips.parquet"
# The reader's password stays in a file the config names (never in it).
sed -e "s/@PGPORT@/$PGPORT/" "$HERE/transport/sluice.toml" >"$RUN/transport/sluice.toml"

step "starting the connector (config $HERE/transport/sluice.toml, policy ../city/transport/policy.yaml)"
start_daemon transport "$RUN/transport/serve.log" serve --config "$RUN/transport/sluice.toml" \
    --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$METRICS"
CONN=(--ca "$PKI/ca.pem" --cert "$PKI/planning.pem" --key "$PKI/planning.key")
wait_ready transport "$TRANSPORT" "$PKI/ca.pem" "$PKI/planning.pem" "$PKI/planning.key"

step "the planning agency's client (ADBC) from examples/city, with --live: ../city/client.py"
client_status=0
"$PYTHON" "$HERE/../city/client.py" --pki "$PKI" --endpoint "$TRANSPORT" --sluice "$SLUICE" --live || client_status=$?
if ((client_status != 0)); then
    echo "the client failed (status $client_status); connector log: $RUN/transport/serve.log" >&2
    exit "$client_status"
fi

step "what Sluice sent to PostgreSQL (its statement log, $DB/postgres.log)"
sent=$(grep -o 'SELECT [^;]* FROM public.trips.*' "$DB/postgres.log" | sort -u)
echo "$sent"
[[ -n $sent ]] || die "no scan of public.trips in the statement log"
# The policy never lets card ids leave; the DP plan bounds each card's
# contribution, so it reads card_id, but nothing else it does not need.
if grep -q '"age_band"' <<<"$sent"; then
    die "a column no query needed (age_band) was read from the database"
fi

echo
echo "postgres example: OK"
if [[ $mode == check ]]; then
    exit 0
fi

cat <<EOT

Query the connector yourself (from the repository root); each new question
spends ε from the planning agency's budget:

  SLUICE=$SLUICE
  CONN="--ca $PKI/ca.pem --cert $PKI/planning.pem --key $PKI/planning.key"
  \$SLUICE query --endpoint $TRANSPORT \$CONN -p $PURPOSE -e 0.1 "SELECT mode, count(*) AS trips FROM trips WHERE start_zone = 'Z07' GROUP BY mode"
  $PG psql $DB $PGPORT -c "UPDATE trips SET fare_eur = fare_eur + 1 WHERE trip_id < 1000"   # live data: the next answer reads it

Statement log: $DB/postgres.log; connector log: $RUN/transport/serve.log
EOT
serve_until_interrupted
