#!/usr/bin/env bash
# A throwaway S3-compatible object store (moto's server) for tests and
# examples, on 127.0.0.1:PORT; state (pid, log) in DIR. Any access key is
# accepted; buckets and objects live in memory and go with the process.
#
#   moto.sh start DIR PORT    start in the background, wait until it answers
#   moto.sh stop DIR          stop it
#
# moto_server comes from $VENV/bin, else $SLUICE_VENV/bin (default
# ~/.cache/sluice-venv, where tests/run.sh installs the pinned moto[server]),
# else PATH.
set -euo pipefail

usage() { sed -n '2,11p' "$0" >&2; exit 2; }
die() { printf 'moto.sh: %s\n' "$*" >&2; exit 1; }

find_moto() {
    local venv
    for venv in "${VENV:-}" "${SLUICE_VENV:-$HOME/.cache/sluice-venv}"; do
        if [[ -n $venv && -x $venv/bin/moto_server ]]; then
            echo "$venv/bin/moto_server"
            return
        fi
    done
    command -v moto_server || die "moto_server not found: install tests/python/requirements.txt (moto[server]) into \$VENV"
}

running() { [[ -f $1/moto.pid ]] && kill -0 "$(cat "$1/moto.pid")" 2>/dev/null; }

cmd_start() {
    [[ $# -eq 2 ]] || usage
    local dir port=$2 moto
    mkdir -p "$1"
    dir=$(cd "$1" && pwd)
    running "$dir" && die "moto is already running in $dir (pid $(cat "$dir/moto.pid"))"
    moto=$(find_moto)
    # Its own session: a Ctrl-C in the caller's terminal does not reach it;
    # `stop` ends it.
    setsid "$moto" -H 127.0.0.1 -p "$port" >"$dir/moto.log" 2>&1 </dev/null &
    echo $! >"$dir/moto.pid"
    local deadline=$((SECONDS + 30))
    until curl -fsS -o /dev/null "http://127.0.0.1:$port/moto-api/data.json" 2>/dev/null; do
        running "$dir" || die "moto_server exited: $(tail -n 20 "$dir/moto.log")"
        ((SECONDS < deadline)) || { cmd_stop "$dir"; die "moto_server did not answer on port $port within 30 s"; }
        sleep 0.2
    done
}

cmd_stop() {
    [[ $# -eq 1 ]] || usage
    local dir=$1 pid
    [[ -f $dir/moto.pid ]] || return 0
    pid=$(cat "$dir/moto.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$dir/moto.pid"
}

[[ $# -ge 1 ]] || usage
command=$1
shift
case $command in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    *) usage ;;
esac
