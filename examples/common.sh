# Shared by the examples' run.sh scripts (sourced, not run). Provides:
#
#   ROOT                       the repository root
#   SLUICE                     the sluice binary: $SLUICE_BIN, else built with
#                              `cargo build --release` into $CARGO_TARGET_DIR
#                              (default ~/.cache/sluice-target)
#   PYTHON                     $SLUICE_PYTHON, else a virtualenv at
#                              ${SLUICE_VENV:-~/.cache/sluice-venv} with
#                              tests/python/requirements.txt installed
#   step TEXT                  prints a heading
#   port_base DEFAULT          the first port: $SLUICE_EXAMPLE_PORT_BASE or DEFAULT
#   port_free PORT             fails if something listens on 127.0.0.1:PORT
#   start_daemon NAME LOG ARGS…  runs `sluice ARGS…` in the background
#   wait_ready NAME ENDPOINT CA CERT KEY   polls `sluice whoami` until the
#                              daemon NAME answers; shows its log if not
#   wait_listening NAME LOG    waits for the `listening on` line in LOG
#                              (a broker's grpc+tls://, a worker's https://)
#   install_traps              stops every daemon started when the script
#                              exits, fails or is interrupted (Ctrl-C,
#                              SIGTERM, SIGHUP, a closed output pipe)
#
# The caller sets `set -euo pipefail` before sourcing.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
READY_TIMEOUT=${SLUICE_EXAMPLE_READY_TIMEOUT:-60}

step() { printf '\n==> %s\n' "$*"; }

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

find_sluice() {
    if [[ -n ${SLUICE_BIN:-} ]]; then
        [[ -x $SLUICE_BIN ]] || die "SLUICE_BIN=$SLUICE_BIN is not an executable"
        SLUICE=$SLUICE_BIN
        return
    fi
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sluice-target}
    step "building sluice (cargo build --release; the first build takes a while)"
    (cd "$ROOT" && cargo build --release -p sluice --bin sluice)
    SLUICE=$CARGO_TARGET_DIR/release/sluice
}

find_python() {
    if [[ -n ${SLUICE_PYTHON:-} ]]; then
        PYTHON=$SLUICE_PYTHON
        return
    fi
    local venv=${SLUICE_VENV:-$HOME/.cache/sluice-venv}
    step "Python clients (tests/python/requirements.txt) in $venv"
    if [[ ! -x $venv/bin/python ]]; then
        python3 -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ROOT/tests/python/requirements.txt"
    PYTHON=$venv/bin/python
}

# The first of the example's ports: $SLUICE_EXAMPLE_PORT_BASE, else DEFAULT.
port_base() {
    local base=${SLUICE_EXAMPLE_PORT_BASE:-$1}
    [[ $base =~ ^[0-9]+$ ]] && ((base >= 1024 && base <= 65530)) ||
        die "SLUICE_EXAMPLE_PORT_BASE=$base: give a port from 1024 to 65530"
    echo "$base"
}

port_free() {
    local port=$1
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port on 127.0.0.1 is in use (an earlier run still going?); stop it or set SLUICE_EXAMPLE_PORT_BASE"
    fi
}

DAEMON_PIDS=()
declare -A DAEMON_PID DAEMON_LOG

start_daemon() {
    local name=$1 log=$2
    shift 2
    "$SLUICE" "$@" >"$log" 2>&1 &
    DAEMON_PIDS+=("$!")
    DAEMON_PID[$name]=$!
    DAEMON_LOG[$name]=$log
}

log_tail() {
    local name=$1
    printf -- '--- last lines of %s ---\n' "${DAEMON_LOG[$name]}" >&2
    tail -n 25 "${DAEMON_LOG[$name]}" >&2 || true
    printf -- '---\n' >&2
}

wait_ready() {
    local name=$1 endpoint=$2 ca=$3 cert=$4 key=$5
    local pid=${DAEMON_PID[$name]} deadline=$((SECONDS + READY_TIMEOUT))
    while true; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log_tail "$name"
            die "the $name connector exited before it was ready (log: ${DAEMON_LOG[$name]})"
        fi
        if "$SLUICE" whoami --endpoint "$endpoint" --ca "$ca" --cert "$cert" --key "$key" >/dev/null 2>&1; then
            echo "$name connector ready at $endpoint"
            return
        fi
        if ((SECONDS >= deadline)); then
            log_tail "$name"
            die "the $name connector did not answer at $endpoint within ${READY_TIMEOUT}s (log: ${DAEMON_LOG[$name]})"
        fi
        sleep 0.2
    done
}

# Waits until a daemon's log says `listening on grpc+tls://` or `listening
# on https://` (for daemons `sluice whoami` cannot ask: a broker, a worker).
wait_listening() {
    local name=$1 log=$2
    local pid=${DAEMON_PID[$name]} deadline=$((SECONDS + READY_TIMEOUT))
    until grep -Eq 'listening on (grpc\+tls|https)://' "$log" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log_tail "$name"
            die "the $name exited before it was ready (log: $log)"
        fi
        if ((SECONDS >= deadline)); then
            log_tail "$name"
            die "the $name did not start within ${READY_TIMEOUT}s (log: $log)"
        fi
        sleep 0.2
    done
    echo "$name ready"
}

stop_daemons() {
    local status=$?
    local pid
    for pid in "${DAEMON_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${DAEMON_PIDS[@]}"; do
        # SIGTERM lets in-flight streams finish (shutdown_grace); then SIGKILL.
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    DAEMON_PIDS=()
    return "$status"
}

install_traps() {
    trap stop_daemons EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    trap 'exit 141' PIPE
}

# Keeps the connectors running until Ctrl-C (or until one of them exits).
serve_until_interrupted() {
    echo
    echo "The connectors keep running; press Ctrl-C to stop them."
    local status=0
    wait -n "${DAEMON_PIDS[@]}" || status=$?
    echo "a connector exited (status $status); stopping the others" >&2
    return "$status"
}
