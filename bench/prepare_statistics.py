"""Benchmark: prepare with its statistics and inferred schema vs without, on all 336,776 flights.

    python bench/prepare_statistics.py [--out DIR] [--repeat N]

Both run as whole processes, alternately, in one invocation; "without" sets
SKEWLESS_NO_STATISTICS=1 (a switch for this benchmark only). The figure is the overhead,
(with - without) / with, of the best wall times (issue 13's target: <= 15%), and the same
ratio of CPU seconds (user + system), which other work on a shared machine disturbs less. For
scale, the same statistics are also computed in this process, without Beam, on the run's
features/ rows. These machines are shared and noisy: ratios hold, absolute seconds do not.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import measure  # noqa: E402

ROWS = 336_776


def cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def in_process_seconds(features_dir: Path) -> tuple[float, int]:
    """Seconds to compute the statistics of features/ (read beforehand) in one process."""
    import pyarrow.parquet as pq

    from skewless.transforms.statistics import statistics_of_batches

    batches = pq.read_table(features_dir).to_batches(max_chunksize=1024)
    started = time.perf_counter()
    stats = statistics_of_batches(batches, "all")
    return time.perf_counter() - started, stats.num_examples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="out/bench/prepare_statistics")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"with": [], "without": ["env", "SKEWLESS_NO_STATISTICS=1"]}
    runs: dict[str, list] = {"with": [], "without": []}
    cpu: dict[str, list[float]] = {"with": [], "without": []}
    for i in range(args.repeat):
        for name in runs:
            target = out / f"{name}_{i}"
            cmd = [
                *env[name],
                sys.executable,
                "-m",
                "skewless.beam_pipelines.jobs.prepare",
                "--output_dir",
                str(target),
            ]
            before = cpu_seconds_of_children()
            runs[name].append(measure(name, cmd, str(out / f"{name}_{i}.log")))
            cpu[name].append(cpu_seconds_of_children() - before)
    summary = json.loads((out / "with_0" / "summary.json").read_text())
    assert summary["records_read"] == ROWS, summary
    assert (out / "with_0" / "statistics" / "statistics.pb").exists()
    assert not (out / "without_0" / "statistics").exists()
    best = {name: min(r.seconds for r in rs) for name, rs in runs.items()}
    best_cpu = {name: min(c) for name, c in cpu.items()}
    overhead = (best["with"] - best["without"]) / best["with"]
    cpu_overhead = (best_cpu["with"] - best_cpu["without"]) / best_cpu["with"]
    alone, examples = in_process_seconds(out / "with_0" / "features")
    print(
        f"{'prepare':<20}{'best wall s':>12}{'rows/s':>9}{'best CPU s':>11}{'peak RSS MiB':>13}  wall s of each run"
    )
    for name, rs in runs.items():
        rss = max(r.peak_rss_mib for r in rs)
        every = " ".join(f"{r.seconds:.1f}" for r in rs)
        label = f"{name} statistics"
        print(
            f"{label:<20}{best[name]:>12.1f}{ROWS / best[name]:>9,.0f}{best_cpu[name]:>11.1f}{rss:>13,.0f}  {every}"
        )
    print(
        f"statistics' share of prepare's wall time: {overhead:.1%} (target <= 15%); of its CPU time: {cpu_overhead:.1%}"
    )
    print(
        f"the same statistics in one process without Beam: {alone:.2f} s for {examples:,} examples"
    )
    print(
        json.dumps(
            {
                "rows": ROWS,
                "examples": examples,
                "seconds": {k: round(v, 2) for k, v in best.items()},
                "all_seconds": {k: [round(r.seconds, 2) for r in rs] for k, rs in runs.items()},
                "rows_per_s": {k: round(ROWS / v) for k, v in best.items()},
                "overhead": round(overhead, 4),
                "cpu_seconds": {k: round(v, 2) for k, v in best_cpu.items()},
                "cpu_overhead": round(cpu_overhead, 4),
                "in_process_statistics_s": round(alone, 3),
                "peak_rss_mib": {
                    k: round(max(r.peak_rss_mib for r in rs)) for k, rs in runs.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
