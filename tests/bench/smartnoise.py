"""SmartNoise SQL reference for the differentially private GROUP BY benchmark.

Run through tests/bench/smartnoise.sh, which provides the pinned virtualenv
(tests/bench/smartnoise-requirements.txt). For the benchmark only.

Reads the trips Parquet data (one file or a directory of files; only the five
columns the query needs) into pandas, hands it to SmartNoise SQL with
snsql.from_df, and runs

    SELECT start_zone, COUNT(*) AS n, SUM(fare_eur) AS fares,
           AVG(distance_km) AS km
    FROM trips.trips WHERE mode <> 'ferry' GROUP BY start_zone

once as a warm-up and then --runs times, timing only reader.execute() with
time.perf_counter. The same query is computed exactly with pandas, and one
line is printed on stdout:

    SMARTNOISE rows=<input rows> seconds=<median s/query> err_n=<…>
        err_fares=<…> err_km=<…> missing=<n>

err_* is the median over all (group, timed run) pairs of
|noisy - exact| / |exact|, groups matched by start_zone; groups absent from
SmartNoise's answer are skipped and counted in missing (once per run).
Everything else goes to stderr.

What SmartNoise SQL 1.0.10 does with this metadata (read from its source, see
snsql/sql/private_rewriter.py, private_reader.py, _ast/ast.py,
sql/_mechanisms/laplace.py):

- from_df copies the DataFrame into an in-memory SQLite database (pandas
  to_sql) when the reader is created; execute() rewrites the query into SQL
  that SQLite runs, then adds noise in Python, row by row. The load is
  reported on stderr but is not part of `seconds`.
- max_ids is enforced by "reservoir sampling" in SQL: after the WHERE filter
  and clamping, ROW_NUMBER() OVER (PARTITION BY card_id ORDER BY RANDOM()) and
  row_num <= max_ids, i.e. each card keeps at most max_ids random rows of the
  filtered table, across all groups together (not per group).
- clamp_columns clamps fare_eur and distance_km to their bounds (CASE WHEN)
  before aggregation; clamp_counts sets negative noisy counts to 0.
- Every aggregate column gets the full epsilon (no split): COUNT(*), SUM(fare),
  and AVG(km) rewritten as SUM(km) / COUNT(km), so 4 releases of epsilon each
  per query (reported on stderr from get_privacy_cost).
- Sensitivity: COUNT 1, SUM max(|lower|, |upper|) of the column, each times
  max_ids. The Laplace scale is found by OpenDP's binary search on
  clamp(0, sensitivity) >> sum with d_in = max_ids (symmetric distance), so
  scale ~ max_ids * sensitivity / epsilon (a little above, for float
  rounding). Counts and float sums both use opendp make_laplace on floats
  (SmartNoise maps geometric/discrete_laplace to the same Laplace class);
  here the map is set to Mechanism.laplace explicitly anyway.
- censor_dims False: no threshold, all groups of the data are released. delta
  is then unused by Laplace.
"""

import argparse
import math
import os
import statistics
import sys
import time
from importlib.metadata import version

import pandas as pd
import pyarrow.dataset as ds

import snsql
from snsql import Privacy
from snsql.sql.privacy import Stat
from snsql.sql._mechanisms.base import Mechanism

QUERY = (
    "SELECT start_zone, COUNT(*) AS n, SUM(fare_eur) AS fares, AVG(distance_km) AS km "
    "FROM trips.trips WHERE mode <> 'ferry' GROUP BY start_zone"
)
FARE_BOUNDS = (0.0, 10.0)
KM_BOUNDS = (0.0, 30.0)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def load(path, private_id):
    columns = [private_id, "mode", "start_zone", "fare_eur", "distance_km"]
    t0 = time.perf_counter()
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet")
        )
        if not files:
            sys.exit(f"smartnoise.py: no .parquet files in {path}")
    else:
        files = [path]
    table = ds.dataset(files, format="parquet").to_table(columns=columns)
    df = table.to_pandas()
    df["fare_eur"] = df["fare_eur"].astype("float64")
    df["distance_km"] = df["distance_km"].astype("float64")
    log(f"loaded {len(df)} rows from {len(files)} file(s) in {time.perf_counter() - t0:.2f}s")
    return df


def metadata(private_id, max_ids):
    return {
        "trips": {
            "trips": {
                "trips": {
                    "row_privacy": False,
                    "max_ids": max_ids,
                    "sample_max_ids": True,
                    "censor_dims": False,
                    "clamp_counts": True,
                    "clamp_columns": True,
                    "use_dpsu": False,
                    private_id: {"type": "string", "private_id": True},
                    "mode": {"type": "string"},
                    "start_zone": {"type": "string"},
                    "fare_eur": {
                        "type": "float",
                        "lower": FARE_BOUNDS[0],
                        "upper": FARE_BOUNDS[1],
                        "nullable": False,
                    },
                    "distance_km": {
                        "type": "float",
                        "lower": KM_BOUNDS[0],
                        "upper": KM_BOUNDS[1],
                        "nullable": False,
                    },
                }
            }
        }
    }


def exact(df):
    f = df[df["mode"] != "ferry"]
    g = f.groupby("start_zone", sort=False)
    out = pd.DataFrame(
        {"n": g.size(), "fares": g["fare_eur"].sum(), "km": g["distance_km"].mean()}
    )
    return out


def rel(noisy, true):
    if true == 0:
        return math.inf if noisy != 0 else 0.0
    return abs(float(noisy) - float(true)) / abs(float(true))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="Parquet file or directory of Parquet files")
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--delta", type=float, default=1e-8)
    p.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up")
    p.add_argument("--max-ids", type=int, default=1, help="max rows per privacy unit")
    p.add_argument("--private-id", default="card_id")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be at least 1")

    df = load(args.data, args.private_id)
    rows = len(df)
    truth = exact(df)
    log(f"exact answer: {len(truth)} groups")

    privacy = Privacy(epsilon=args.epsilon, delta=args.delta)
    for stat in (Stat.count, Stat.sum_int, Stat.sum_large_int, Stat.sum_float,
                 Stat.sum_large_float, Stat.threshold):
        privacy.mechanisms.map[stat] = Mechanism.laplace

    t0 = time.perf_counter()
    reader = snsql.from_df(df, privacy=privacy, metadata=metadata(args.private_id, args.max_ids))
    log(f"snsql.from_df (copy into in-memory SQLite) took {time.perf_counter() - t0:.2f}s")
    del df

    # What SmartNoise will do, for the record.
    subquery, _ = reader._rewrite(QUERY)
    versions = ", ".join(f"{d} {version(d)}" for d in ("smartnoise-sql", "opendp", "pandas", "pyarrow"))
    log(f"{versions}; rewritten inner query: {subquery}")
    for sym in subquery._select_symbols:
        m = sym.mechanism
        if m is not None:
            log(f"  {sym.name}: {type(m).__name__} ({m.mechanism.name}) epsilon={m.epsilon} "
                f"bounds=({m.lower},{m.upper}) max_contrib={m.max_contrib} scale={m.scale:.4f}")
    eps, delta = reader.get_privacy_cost(QUERY)
    log(f"privacy cost per query (odometer): epsilon={eps} delta={delta}")

    errs = {"n": [], "fares": [], "km": []}
    missing = 0
    times = []
    for run in range(args.runs + 1):
        t = time.perf_counter()
        res = reader.execute(QUERY)
        dt = time.perf_counter() - t
        header, body = list(res[0]), res[1:]
        got = {r[header.index("start_zone")]: r for r in body}
        log(f"run {run}{' (warm-up)' if run == 0 else ''}: {dt:.3f}s, {len(body)} groups")
        if run == 0:
            continue
        times.append(dt)
        for zone, ex in truth.iterrows():
            r = got.get(zone)
            if r is None:
                missing += 1
                continue
            for col in errs:
                errs[col].append(rel(r[header.index(col)], ex[col]))
        extra = set(got) - set(truth.index)
        if extra:
            log(f"  groups not in the exact answer: {sorted(extra)}")

    def med(xs):
        return f"{statistics.median(xs):.6g}" if xs else "nan"

    print(
        f"SMARTNOISE rows={rows} seconds={statistics.median(times):.6g} "
        f"err_n={med(errs['n'])} err_fares={med(errs['fares'])} err_km={med(errs['km'])} "
        f"missing={missing}",
        flush=True,
    )


if __name__ == "__main__":
    main()
