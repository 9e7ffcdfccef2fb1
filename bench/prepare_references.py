"""Benchmark: prepare with the three reference tables joined vs without, on all 336,776 flights.

    python bench/prepare_references.py [--out DIR] [--repeat N]

`flights` and `flights_plus` (the same feature set with weather at the origin, the aircraft
and the destination airport joined as of each departure) run as whole processes, alternately,
in one invocation; the ratio of wall times is the figure (issue 12's target: <= 1.3). A third
run, `join_only`, joins the same tables but keeps flights' preprocessing_fn: it splits the cost
into the join and the preprocessing of the joined columns. These machines are shared and
noisy: ratios hold, absolute seconds do not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataclasses import replace  # noqa: E402

from bench.common import measure  # noqa: E402
from transforms.flights import FLIGHTS, FLIGHTS_PLUS  # noqa: E402

ROWS = 336_776
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
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list] = {name: [] for name in SPECS}
    for i in range(args.repeat):
        for name in runs:
            target = out / f"{name}_{i}"
            cmd = [sys.executable, "-m", "beam_pipelines.prepare", "--feature_set", SPECS[name],
                   "--output_dir", str(target)]  # fmt: skip
            runs[name].append(measure(name, cmd, str(out / f"{name}_{i}.log")))
    summary = json.loads((out / "flights_plus_0" / "summary.json").read_text())
    assert summary["records_read"] == ROWS, summary
    best = {name: min(r.seconds for r in rs) for name, rs in runs.items()}
    ratio = best["flights_plus"] / best["flights"]
    join_ratio = best["join_only"] / best["flights"]
    print(f"{'feature set':<14}{'best wall s':>12}{'rows/s':>10}{'peak RSS MiB':>14}")
    for name, rs in runs.items():
        rss = max(r.peak_rss_mib for r in rs)
        print(f"{name:<14}{best[name]:>12.1f}{ROWS / best[name]:>10,.0f}{rss:>14,.0f}")
    print(f"with tables / without: {ratio:.3f} (target <= 1.3); join only: {join_ratio:.3f}")
    print(f"references: {summary['references']}")
    print(
        json.dumps(
            {
                "rows": ROWS,
                "seconds": {k: round(v, 2) for k, v in best.items()},
                "rows_per_s": {k: round(ROWS / v) for k, v in best.items()},
                "ratio_with_tables": round(ratio, 3),
                "ratio_join_only": round(join_ratio, 3),
                "peak_rss_mib": {
                    k: round(max(r.peak_rss_mib for r in rs)) for k, rs in runs.items()
                },
                "references": summary["references"],
            }
        )
    )


if __name__ == "__main__":
    main()
