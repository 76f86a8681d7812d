#!/usr/bin/env bash
# Streaming throughput and small-query latency of `sluice serve` against a
# pyarrow Flight server holding the same data in memory, both over mTLS and
# read by pyarrow.flight (tests/bench/stream.py has the details). Uses the
# virtualenv of tests/run.sh; installs nothing.
#
#   tests/bench/stream.sh [--bin PATH] [--runs K] [--latency-runs N]
#
#   --bin   the sluice binary (default $CARGO_TARGET_DIR/release/sluice,
#           CARGO_TARGET_DIR default /root/.cache/sluice-release)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
VENV=${SLUICE_VENV:-$HOME/.cache/sluice-venv}
TARGET=${CARGO_TARGET_DIR:-/root/.cache/sluice-release}
if [[ ! -x $VENV/bin/python ]]; then
    echo "stream.sh: no virtualenv at $VENV: run tests/run.sh --python once (it installs tests/python/requirements.txt)" >&2
    exit 2
fi
args=("$@")
if [[ " $* " != *" --bin "* ]]; then
    args+=(--bin "$TARGET/release/sluice")
fi
exec "$VENV/bin/python" tests/bench/stream.py "${args[@]}"
