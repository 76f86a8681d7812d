#!/usr/bin/env bash
# One node against one coordinator and three workers on this machine, side
# by side in one run: a plain aggregate and a differentially private GROUP
# BY over the same Parquet files (tests/bench/distributed.py has the
# details). Uses the virtualenv of tests/run.sh; installs nothing.
#
#   tests/bench/distributed.sh [--bin PATH] [--rows N] [--files K] [--runs R]
#
#   --bin   the sluice binary (default $CARGO_TARGET_DIR/release/sluice,
#           CARGO_TARGET_DIR default ~/.cache/sluice-target)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
VENV=${SLUICE_VENV:-$HOME/.cache/sluice-venv}
TARGET=${CARGO_TARGET_DIR:-$HOME/.cache/sluice-target}
if [[ ! -x $VENV/bin/python ]]; then
    echo "distributed.sh: no virtualenv at $VENV: run tests/run.sh --python once (it installs tests/python/requirements.txt)" >&2
    exit 2
fi
args=("$@")
if [[ " $* " != *" --bin "* ]]; then
    args+=(--bin "$TARGET/release/sluice")
fi
exec "$VENV/bin/python" tests/bench/distributed.py "${args[@]}"
