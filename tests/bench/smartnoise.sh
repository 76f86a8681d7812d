#!/usr/bin/env bash
# Reference point for the differentially private GROUP BY benchmark: runs
# SmartNoise SQL (PyPI smartnoise-sql) on the same Parquet trips data, so its
# time and error can be set beside Sluice's (tests/bench/smartnoise.py has
# the details). For the benchmark only: tests/run.sh neither runs nor
# installs this.
#
#   tests/bench/smartnoise.sh --data PATH --epsilon E [--delta D] [--runs K]
#                             [--max-ids N] [--private-id card_id]
#
# Prints one line on stdout:
#   SMARTNOISE rows=… seconds=… err_n=… err_fares=… err_km=… missing=…
#
# Creates (once) its own virtualenv at $SMARTNOISE_VENV (default
# ~/.cache/sluice-smartnoise-venv) from tests/bench/smartnoise-requirements.txt
# (exact pins), and re-installs only when that file changes (a hash of it is
# kept in the virtualenv). Set PYTHON to choose the interpreter that creates
# it (default python3; smartnoise-sql 1.0.10 needs 3.10 to 3.14).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
VENV=${SMARTNOISE_VENV:-$HOME/.cache/sluice-smartnoise-venv}
REQS=tests/bench/smartnoise-requirements.txt
STAMP=$VENV/.sluice-requirements.sha256

want=$(sha256sum "$REQS" | cut -d' ' -f1)
have=$(cat "$STAMP" 2>/dev/null || true)
if [[ ! -x $VENV/bin/python || $want != "$have" ]]; then
    echo "smartnoise.sh: installing $REQS into $VENV" >&2
    if [[ ! -x $VENV/bin/python ]]; then
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$REQS" >&2
    echo "$want" >"$STAMP"
fi

exec "$VENV/bin/python" tests/bench/smartnoise.py "$@"
