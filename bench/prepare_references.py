"""Benchmark: prepare with the three reference tables joined vs without, on all 336,776 flights.

    python bench/prepare_references.py [--out DIR] [--repeat N] [--scaling]

`flights` and `flights_plus` (the same feature set with weather at the origin, the aircraft
and the destination airport joined as of each departure) run as whole processes, alternately,
in one invocation; the ratio of wall times is the figure (issue 12's target: <= 1.3). A third
run, `join_only`, joins the same tables but keeps flights' preprocessing_fn: it splits the cost
into the join and the preprocessing of the joined columns. These machines are shared and
noisy: ratios hold, absolute seconds do not.

--scaling also runs `flights` and `flights_plus` on the first half of the year (January to
June, 166,158 flights) and splits each wall time into a fixed part and a part per row (a line
through the two sizes): the per-row ratio is what the tables cost as the data grows, the
fixed parts what they cost once a run (tf.Transform tracing its graph, imports, the pipeline).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataclasses import replace  # noqa: E402

from bench.common import measure  # noqa: E402
from skewless.examples.flights import FLIGHTS, FLIGHTS_PLUS  # noqa: E402
from tests.support.flights_data import flights_csv_lines as flights_csv  # noqa: E402

ROWS = 336_776
HALF_MONTHS = range(1, 7)
# The tables joined, their columns written to features/ and TFRecords, but not preprocessed.
JOIN_ONLY = replace(
    FLIGHTS_PLUS, name="flights_join_only", preprocessing_fn=FLIGHTS.preprocessing_fn
)
SPECS = {
    "flights": "flights",
    "flights_plus": "flights_plus",
    "join_only": "bench.prepare_references:JOIN_ONLY",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="out/bench/prepare_references")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--scaling", action="store_true", help="also January-June: fixed and per-row parts"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = {name: (spec, []) for name, spec in SPECS.items()}
    half_rows = 0
    if args.scaling:
        half_rows = flights_csv(out / "half.csv", HALF_MONTHS)
        half = ["--input", str(out / "half.csv")]
        plan |= {f"{name}_half": (SPECS[name], half) for name in ("flights", "flights_plus")}
    runs: dict[str, list] = {name: [] for name in plan}
    for i in range(args.repeat):
        for name, (spec, extra) in plan.items():
            target = out / f"{name}_{i}"
            cmd = [sys.executable, "-m", "skewless.beam_pipelines.jobs.prepare", "--feature_set", spec,
                   "--output_dir", str(target), *extra]  # fmt: skip
            runs[name].append(measure(name, cmd, str(out / f"{name}_{i}.log")))
    summary = json.loads((out / "flights_plus_0" / "summary.json").read_text())
    assert summary["records_read"] == ROWS, summary
    best = {name: min(r.seconds for r in rs) for name, rs in runs.items()}
    rows = {name: half_rows if name.endswith("_half") else ROWS for name in runs}
    ratio = best["flights_plus"] / best["flights"]
    join_ratio = best["join_only"] / best["flights"]
    if args.scaling:
        half_summary = json.loads((out / "flights_plus_half_0" / "summary.json").read_text())
        assert half_summary["records_read"] == half_rows, half_summary
    print(f"{'run':<18}{'best wall s':>12}{'rows/s':>10}{'peak RSS MiB':>14}")
    for name, rs in runs.items():
        rss = max(r.peak_rss_mib for r in rs)
        print(f"{name:<18}{best[name]:>12.1f}{rows[name] / best[name]:>10,.0f}{rss:>14,.0f}")
    print(f"with tables / without: {ratio:.3f} (target <= 1.3); join only: {join_ratio:.3f}")
    print(f"references: {summary['references']}")
    scaling = {}
    if args.scaling:
        scaling = split_fixed_and_per_row(best, half_rows)
        print(
            f"per row (s per {ROWS:,} rows): flights {scaling['per_rows']['flights']:.1f}, "
            f"flights_plus {scaling['per_rows']['flights_plus']:.1f}: "
            f"{scaling['ratio_per_row']:.3f}; fixed: flights {scaling['fixed_s']['flights']:.1f} s, "
            f"flights_plus {scaling['fixed_s']['flights_plus']:.1f} s (January-June: "
            f"{half_rows:,} rows)"
        )
    print(
        json.dumps(
            {
                "rows": ROWS,
                "seconds": {k: round(v, 2) for k, v in best.items()},
                "rows_per_s": {k: round(rows[k] / v) for k, v in best.items()},
                "ratio_with_tables": round(ratio, 3),
                "ratio_join_only": round(join_ratio, 3),
                "peak_rss_mib": {
                    k: round(max(r.peak_rss_mib for r in rs)) for k, rs in runs.items()
                },
                "references": summary["references"],
                **({"scaling": scaling} if scaling else {}),
            }
        )
    )


def split_fixed_and_per_row(best: dict[str, float], half_rows: int) -> dict:
    """Wall = fixed + rows x per-row, through the year and its first half: each feature set's
    fixed seconds and seconds per ROWS rows, and the ratio of the per-row parts."""
    share = half_rows / ROWS
    per_rows, fixed = {}, {}
    for name in ("flights", "flights_plus"):
        per_rows[name] = (best[name] - best[f"{name}_half"]) / (1 - share)
        fixed[name] = best[name] - per_rows[name]
    return {
        "half_rows": half_rows,
        "per_rows": {k: round(v, 2) for k, v in per_rows.items()},
        "fixed_s": {k: round(v, 2) for k, v in fixed.items()},
        "ratio_per_row": round(per_rows["flights_plus"] / per_rows["flights"], 3),
    }


if __name__ == "__main__":
    main()
