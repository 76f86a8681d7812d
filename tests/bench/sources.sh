#!/usr/bin/env bash
# Benchmark of the PostgreSQL and S3 sources against psql and local files
# (tests/bench/sources.py has the details). Installs nothing itself: it uses
# the virtualenv of tests/run.sh and the scripts in tests/services/.
#
#   tests/bench/sources.sh [--bin PATH] [--rows N] [--runs K] [--keep] [--no-demo-policy]
#
#   --bin   the sluice binary (default $CARGO_TARGET_DIR/release/sluice,
#           CARGO_TARGET_DIR default /root/.cache/sluice-release)
#   --rows  trips to generate (default 1000000)
#   --runs  timed runs per query and variant, after one warm-up (default 7)
#
# Environment: SLUICE_VENV (default ~/.cache/sluice-venv). Run as root (the
# PostgreSQL cluster runs as the `postgres` OS user).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
VENV=${SLUICE_VENV:-$HOME/.cache/sluice-venv}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/sluice-release}
if [[ ! -x $VENV/bin/python ]]; then
    echo "sources.sh: no virtualenv at $VENV: run tests/run.sh --python once (it installs tests/python/requirements.txt)" >&2
    exit 2
fi
# postgres.sh and moto.sh find python and moto_server here.
export VENV PYTHON=$VENV/bin/python
exec "$VENV/bin/python" tests/bench/sources.py "$@"
