"""Benchmark: the prepare job on all 336,776 flights next to its floor, in the same invocation.

    python bench/prepare.py [--out DIR] [--workers N]

The floor (bench/floor_prepare.py) does the same work with pyarrow + numpy + tfx_bsl in one
process. Both run as whole processes (imports included), one after the other, and the ratio
of wall times is what to compare: these machines are shared and noisy; ratios hold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import measure  # noqa: E402

ROWS = 336_776


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", default="out/bench/prepare")
    parser.add_argument("--workers", type=int, default=0, help="also run with N local processes")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    runs = [
        measure("floor", [python, "bench/floor_prepare.py", str(out / "floor")], str(out / "floor.log")),
        measure(
            "prepare",
            [python, "-m", "skewless.beam_pipelines.jobs.prepare", "--output_dir", str(out / "job")],
            str(out / "job.log"),
        ),
    ]
    if args.workers:
        runs.append(
            measure(
                f"prepare x{args.workers} processes",
                [
                    python, "-m", "skewless.beam_pipelines.jobs.prepare", "--output_dir", str(out / "job_mp"),
                    f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing",
                ],
                str(out / "job_mp.log"),
            )
        )  # fmt: skip
    summary = json.loads((out / "job" / "summary.json").read_text())
    assert summary["records_read"] == ROWS, summary
    floor = runs[0].seconds
    print(f"{'run':<26}{'wall s':>9}{'rows/s':>11}{'x floor':>9}{'peak RSS MiB':>14}")
    for r in runs:
        print(f"{r.name:<26}{r.seconds:>9.1f}{ROWS / r.seconds:>11,.0f}{r.seconds / floor:>9.2f}{r.peak_rss_mib:>14,.0f}")
    print(
        f"job: {summary['examples_train']} train + {summary['examples_eval']} eval examples, "
        f"{summary['records_not_events']} cancelled, {summary['records_rejected']} rejected; "
        "peak RSS of the multi-process run counts the launcher only"
    )
    print(
        json.dumps(
            {
                "rows": ROWS,
                "runs": [
                    {"name": r.name, "seconds": round(r.seconds, 2),
                     "rows_per_s": round(ROWS / r.seconds),
                     "x_floor": round(r.seconds / floor, 3), "peak_rss_mib": round(r.peak_rss_mib)}
                    for r in runs
                ],
            }
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
