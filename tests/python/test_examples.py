"""The runnable example scenarios (examples/*/run.sh) end to end: each
`run.sh --check` builds its PKI with `sluice certs`, generates its data with
`sluice generate`, starts its connectors on loopback ports, runs its ADBC
client (which asserts what the policies allow and refuse) and its `sluice`
CLI calls, and exits with the client's status.

They run with the binary under test ($SLUICE_BIN, see conftest.py) and this
interpreter, on port bases of their own so that an example a developer keeps
running on the default ports does not collide."""

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, sluice_bin

EXAMPLES = {
    # name: (port base, text the run must print)
    "industry": (50171, [
        "=== Kessler Werke",
        "=== Nordhavn Motion",
        "Plant B is missing",
        "releases only aggregates over groups of at least 10 distinct privacy units",
        "OK: aggregates from 2 manufacturers",
        "industry example: OK",
    ]),
    "broker": (50191, [
        "north: ε 0.5 charged there",
        "south: ε 0.5 charged there",
        "(95%, noise of both operators combined)",
        "remaining 9.5 ε",
        "provider `south` failed (INVALID_ARGUMENT): No field named age_band",
        "south named missing",
        "broker example: OK",
    ]),
    "city": (50181, [
        "mechanism discrete_laplace",
        "95% of answers within ±",
        "cached true",
        "above the 0.5 allowed per query",
        "remaining 9.5 ε",
        "remaining 9.25 ε",
        "city example: OK",
    ]),
    "distributed": (50301, [
        "every count and average agrees",
        "mechanism discrete_laplace",
        "remaining ε 9.5",
        "PERMISSION_DENIED: this is a Sluice worker: it serves only its coordinators",
        "leaf stages sent to workers, on all 3",
        "worker does not answer: left out of new queries",
        "with the leaf stages on the 2 remaining workers",
        "distributed example: OK",
    ]),
    "postgres": (50281, [
        "live data, so a fresh answer, charged again",
        "cached false; remaining ε 9",
        'SELECT "card_id", "start_zone", "fare_eur" FROM public.trips',
        "postgres example: OK",
    ]),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_and_its_client_passes(name):
    base, expected = EXAMPLES[name]
    env = dict(
        os.environ,
        SLUICE_BIN=sluice_bin(),
        SLUICE_PYTHON=sys.executable,
        SLUICE_EXAMPLE_PORT_BASE=str(base),
    )
    started = time.monotonic()
    run = subprocess.run(
        [str(ROOT / "examples" / name / "run.sh"), "--check"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    took = time.monotonic() - started
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"{name}/run.sh --check exited {run.returncode} after {took:.1f} s:\n{output[-6000:]}"
    for text in expected:
        assert text in run.stdout, f"{name}: expected {text!r} in the output:\n{run.stdout[-6000:]}"
    # Nothing left listening: the trap stopped the connectors (and the
    # distributed example's workers, on base+2 to base+4).
    for port in range(base, base + 5):
        probe = subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], capture_output=True)
        assert probe.returncode != 0, f"{name}: port {port} still open after run.sh exited"
