#!/usr/bin/env bash
# The one test command. On a fresh machine it installs what the tests need
# (the pinned Python clients, into a virtualenv), builds Sluice in the debug
# profile, and runs every test: Rust unit and integration tests against the
# real binary, then the Python interop tests (ADBC, pyarrow.flight,
# grpcio stubs generated from proto/ for the control plane, and the web
# console in headless Chromium through Selenium; screenshots go to
# $SLUICE_ARTIFACTS/console, default tests/artifacts/console).
#
#   ./tests/run.sh            everything
#   ./tests/run.sh --rust     Rust tests only
#   ./tests/run.sh --python   Python interop tests only (builds the binary first)
#
# Environment: CARGO_TARGET_DIR (default ~/.cache/sluice-target, kept between
# runs so CI reuses what is built), SLUICE_VENV (default ~/.cache/sluice-venv).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sluice-target}
VENV=${SLUICE_VENV:-$HOME/.cache/sluice-venv}
which=${1:-all}

step() { printf '\n==> %s\n' "$*"; }
started=$SECONDS

if [[ $which != --rust ]]; then
    step "Python test clients (pinned in tests/python/requirements.txt) into $VENV"
    if [[ ! -x $VENV/bin/python ]]; then
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
fi

if [[ $which != --python ]] && ! compgen -G "/usr/lib/*/faketime/libfaketimeMT.so.1" >/dev/null; then
    # connector/tests/faults.rs moves the daemon's wall clock with libfaketime.
    step "libfaketime (Debian package faketime) for the clock-fault tests"
    apt-get update && apt-get install -y faketime
fi

if [[ $which != --rust ]] && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    # tests/python/test_sources.py serves datasets from a throwaway cluster
    # (tests/services/postgres.sh).
    step "PostgreSQL (Debian package postgresql) for the database-source tests"
    apt-get update && apt-get install -y postgresql
fi

if [[ $which != --rust ]] && [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    # tests/python/test_console.py drives the web console in a real, headless
    # browser through Selenium, which uses these and never downloads its own.
    step "Chromium and its WebDriver (Debian packages chromium, chromium-driver) for the web console tests"
    apt-get update && apt-get install -y chromium chromium-driver
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "build (debug profile, target dir $CARGO_TARGET_DIR)"
cargo build --workspace --all-targets --locked

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# One prepared state directory (development PKI + demo data) for all tests.
STATE_DIR=$CARGO_TARGET_DIR/tmp/sluice-demo-state
"$CARGO_TARGET_DIR/debug/sluice" init --state-dir "$STATE_DIR" >/dev/null
# The demo's privacy budget (10 ε a month) would run out over repeated runs
# on one machine: every run starts from an empty ledger, agreement store and
# audit log.
rm -rf "$STATE_DIR"/privacy-ledger.sqlite* "$STATE_DIR"/agreements.sqlite* "$STATE_DIR"/dsp.sqlite* "$STATE_DIR"/audit

if [[ $which != --python ]]; then
    step "Rust unit, integration and doc tests"
    cargo test --workspace --locked
fi

if [[ $which != --rust ]]; then
    step "Python interop tests against the real daemon"
    SLUICE_BIN=$CARGO_TARGET_DIR/debug/sluice SLUICE_TEST_STATE_DIR=$STATE_DIR \
        "$VENV/bin/python" -m pytest tests/python -q -p no:cacheprovider
fi

[[ $which == --python ]] || { step "coverage-guided fuzzing, a minute in all (tests/fuzz.sh --ci; unoptimized build, ~18 min cold)"; tests/fuzz.sh --ci; }

step "all tests passed in $((SECONDS - started)) s"
