#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser that takes input from outside
# (fuzz/fuzz_targets/*.rs; docs/operations.md).
#
#   tests/fuzz.sh --ci                 # every target, about a minute in all; fails on any crash
#   tests/fuzz.sh --long [target...]   # long campaigns (default: all targets)
#   tests/fuzz.sh --build              # only build the targets
#   tests/fuzz.sh --seeds              # rewrite the committed seed corpora
#
# Long campaigns run sql_policy for FUZZ_SQL_SECONDS (default 1800) and
# every other target for FUZZ_SECONDS (default 300); FUZZ_CI_SECONDS (default
# 60) is the whole CI run's budget. A crash (panic, abort), a hang (one input
# running past -timeout) or an out-of-memory (RSS past -rss_limit_mb: how a
# leak shows without a sanitizer) fails the run; the input is left in
# fuzz/artifacts/<target>/ and `cargo fuzz run <target> <file>` replays it.
#
# cargo-fuzz on the stable toolchain: `--sanitizer none` (AddressSanitizer
# needs nightly; Rust code is memory-safe, what we look for is panics,
# aborts, hangs and unbounded memory). The build is instrumented for
# coverage (SanitizerCoverage): --long uses the release profile of
# fuzz/Cargo.toml (opt-level 1, debug assertions and overflow checks on),
# --ci the dev profile (unoptimized: a third of the cold build time, and a
# one-minute run needs coverage, not speed). Target dir:
# $SLUICE_FUZZ_TARGET_DIR (default ~/.cache/sluice-fuzz-target); the corpora
# grown by campaigns: $SLUICE_FUZZ_CORPUS (default ~/.cache/sluice-fuzz-corpus);
# logs: $SLUICE_FUZZ_LOGS (default ~/.cache/sluice-fuzz-logs), one per target
# and run.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
FUZZ="$ROOT/fuzz"
CARGO_FUZZ_VERSION=0.13.2
TARGETS=(sql_policy broker_sql policy_yaml config_toml ticket on_behalf_of flight_sql_command audit_line receipt)
# Targets whose binary seeds the targets write themselves (see --seeds).
GENERATED_SEEDS=(ticket on_behalf_of flight_sql_command)

export CARGO_TARGET_DIR="${SLUICE_FUZZ_TARGET_DIR:-$HOME/.cache/sluice-fuzz-target}"
CORPUS="${SLUICE_FUZZ_CORPUS:-$HOME/.cache/sluice-fuzz-corpus}"
LOGS="${SLUICE_FUZZ_LOGS:-$HOME/.cache/sluice-fuzz-logs}"
BUILD_FLAGS=(--sanitizer none --codegen-units 16)

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

ensure_cargo_fuzz() {
    if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
        echo "installing cargo-fuzz $CARGO_FUZZ_VERSION"
        cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
    fi
}

build() {
    ensure_cargo_fuzz
    local started=$SECONDS
    (cd "$FUZZ" && cargo fuzz build "${BUILD_FLAGS[@]}" "$@")
    echo "fuzz targets built in $((SECONDS - started)) s"
}

# Per-target libFuzzer options: input size, per-input time limit (a hang),
# memory limit (a leak), dictionary.
options() {
    local target=$1
    local opts=(-rss_limit_mb=2048 -print_final_stats=1)
    case "$target" in
        sql_policy | broker_sql) opts+=(-max_len=8192 -timeout=30 -dict="$FUZZ/dicts/sql.dict") ;;
        policy_yaml) opts+=(-max_len=16384 -timeout=20) ;;
        config_toml) opts+=(-max_len=8192 -timeout=10) ;;
        flight_sql_command) opts+=(-max_len=8192 -timeout=30) ;;
        audit_line) opts+=(-max_len=32768 -timeout=10) ;;
        *) opts+=(-max_len=4096 -timeout=10) ;;
    esac
    printf '%s\n' "${opts[@]}"
}

# run TARGET SECONDS [CORPUS]: fuzzes from the committed seeds and CORPUS
# (default: the corpus grown by campaigns), where new inputs go.
run() {
    local target=$1 seconds=$2 corpus=${3:-$CORPUS/$1}
    local log="$LOGS/$target-$(date +%Y%m%d-%H%M%S)-$$.log"
    mkdir -p "$corpus" "$LOGS" "$FUZZ/artifacts/$target"
    local opts dirs=("$corpus" "$FUZZ/seeds/$target")
    # Inputs that once crashed or hung run first, every time.
    [[ -d $FUZZ/regressions/$target ]] && dirs+=("$FUZZ/regressions/$target")
    mapfile -t opts < <(options "$target")
    echo "== $target: ${seconds} s (log $log)"
    local status=0
    (cd "$FUZZ" && cargo fuzz run "${BUILD_FLAGS[@]}" "$target" "${dirs[@]}" -- \
        -max_total_time="$seconds" "${opts[@]}" \
        -artifact_prefix="$FUZZ/artifacts/$target/") >"$log" 2>&1 || status=$?
    # The last status line (coverage, features, corpus) and the totals.
    grep -aE '^#[0-9]+.*cov: ' "$log" | tail -1 || true
    grep -aE '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" | tr -s ' ' | tr '\n' ' ' || true
    echo
    if [[ $status -ne 0 ]]; then
        echo "FAILED: $target (exit $status); the input is in fuzz/artifacts/$target/:" >&2
        grep -aE 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written|out-of-memory|timeout' "$log" | head -20 >&2 || true
        return 1
    fi
}

seeds() {
    python3 "$FUZZ/make_seeds.py"
    build >/dev/null
    for target in "${GENERATED_SEEDS[@]}"; do
        (cd "$FUZZ" && SLUICE_FUZZ_SEEDS="$FUZZ/seeds/$target" \
            cargo fuzz run "${BUILD_FLAGS[@]}" "$target" -- -runs=0 >/dev/null 2>&1)
        echo "$target $(ls "$FUZZ/seeds/$target" | wc -l)"
    done
}

mode=${1:-}
[[ -n "$mode" ]] || usage
shift
case "$mode" in
    --build)
        build
        ;;
    --seeds)
        seeds
        ;;
    --ci)
        BUILD_FLAGS+=(--dev)
        build
        total=${FUZZ_CI_SECONDS:-60}
        # sql_policy gets a quarter of the budget, the others share the rest.
        sql=$((total / 4))
        each=$(((total - sql) / (${#TARGETS[@]} - 1)))
        failed=0
        # From the committed seeds only, into a scratch corpus: the same
        # start on every machine (a grown corpus of thousands of inputs
        # would take minutes to replay unoptimized).
        scratch=$(mktemp -d)
        trap 'rm -rf "$scratch"' EXIT
        for target in "${TARGETS[@]}"; do
            seconds=$each
            [[ $target == sql_policy ]] && seconds=$sql
            run "$target" "$((seconds > 1 ? seconds : 1))" "$scratch/$target" || failed=1
        done
        exit $failed
        ;;
    --long)
        targets=("$@")
        [[ ${#targets[@]} -gt 0 ]] || targets=("${TARGETS[@]}")
        build
        failed=0
        for target in "${targets[@]}"; do
            seconds=${FUZZ_SECONDS:-300}
            [[ $target == sql_policy ]] && seconds=${FUZZ_SQL_SECONDS:-1800}
            run "$target" "$seconds" || failed=1
        done
        exit $failed
        ;;
    *)
        usage
        ;;
esac
