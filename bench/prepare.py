"""Benchmark: the prepare job next to its floor, at two sizes, in the same invocation.

    python bench/prepare.py [--out DIR] [--copies 3] [--pairs 1] [--workers N]

Sizes: the bundled year (336,776 flights) and the year xC (--copies, default 3): C copies of it,
copy k shifted by k x 365 days (the years 2014 and 2015; the local date fields move with
time_hour, so no example key repeats), written once as a zipped CSV like the bundled file. At each size
the floor (bench/floor_prepare.py: the same work with pyarrow + numpy + tfx_bsl in one process)
and `skewless prepare` run as whole processes (imports included), alternating, --pairs times;
the medians are compared. The line through the two sizes splits each into a fixed part
(imports, pipeline construction, tf.Transform tracing) and a per-row part (what a large run
pays). Peak memory is the process's maximum RSS. With --workers N, prepare also runs with N
local processes (multi_processing) on the bundled year: its speed-up over one process.

These machines are shared and noisy: the ratios, measured side by side, hold; absolute seconds
do not. The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import zipfile
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Measured, measure  # noqa: E402

ROWS = 336_776
SHIFT = timedelta(days=365)  # 2013 is not a leap year: copy k covers the year 2013 + k


def bundled() -> str:
    from skewless.examples.flights import bundled_path

    return bundled_path("flights.csv.zip")


def write_copies(copies: int, path: Path) -> int:
    """The bundled year and copies-1 shifted copies as one zipped CSV; returns its rows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    with zipfile.ZipFile(bundled()) as archive:
        table = pacsv.read_csv(io.BytesIO(archive.read(archive.namelist()[0])))
    dates = pc.strptime(
        pc.binary_join_element_wise(
            pc.cast(table["year"], pa.string()), pc.cast(table["month"], pa.string()),
            pc.cast(table["day"], pa.string()), "-",
        ),
        format="%Y-%m-%d", unit="s",
    )  # fmt: skip
    parts = []
    for k in range(copies):
        shift = pa.scalar(SHIFT * k, pa.duration("s"))
        moved = pc.add(dates, shift)
        part = table
        for name, values in (
            ("year", pc.year(moved)), ("month", pc.month(moved)), ("day", pc.day(moved)),
            ("time_hour", pc.add(table["time_hour"], pa.scalar(SHIFT * k, pa.duration("s")))),
        ):  # fmt: skip
            index = part.schema.get_field_index(name)
            part = part.set_column(index, name, values.cast(part.schema.field(name).type))
        parts.append(part)
    everything = pa.concat_tables(parts)
    buffer = io.BytesIO()
    pacsv.write_csv(everything, buffer)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"flights_x{copies}.csv", buffer.getvalue())
    return everything.num_rows


def median_run(runs: list[Measured]) -> Measured:
    seconds = statistics.median(r.seconds for r in runs)
    return Measured(runs[0].name, seconds, max(r.peak_rss_mib for r in runs), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", default="out/bench/prepare")
    parser.add_argument("--copies", type=int, default=3, help="the larger size: the year x this")
    parser.add_argument("--pairs", type=int, default=1, help="floor/prepare pairs at each size")
    parser.add_argument("--workers", type=int, default=0, help="also run with N local processes")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    larger = out / f"flights_x{args.copies}.csv.zip"
    sizes = [(1, ROWS, None), (args.copies, write_copies(args.copies, larger), str(larger))]

    results = []
    for copies, rows, path in sizes:
        floors, jobs = [], []
        source = ["--input", path] if path else []
        for i in range(args.pairs):
            tag = f"x{copies}-{i}"
            floors.append(measure("floor", [python, "bench/floor_prepare.py", str(out / f"floor-{tag}"), *source], str(out / f"floor-{tag}.log")))
            jobs.append(measure("prepare", [python, "-m", "skewless.beam_pipelines.jobs.prepare", "--output_dir", str(out / f"job-{tag}"), *source], str(out / f"job-{tag}.log")))  # fmt: skip
            summary = json.loads((out / f"job-{tag}" / "summary.json").read_text())
            assert summary["records_read"] == rows and not summary["records_rejected"], summary
        results.append((copies, rows, median_run(floors), median_run(jobs)))

    (_, n1, floor1, job1), (_, n3, floor3, job3) = results
    per_row = {
        "prepare": (job3.seconds - job1.seconds) / (n3 - n1) * 1e6,
        "floor": (floor3.seconds - floor1.seconds) / (n3 - n1) * 1e6,
    }
    fixed = {
        "prepare": job1.seconds - per_row["prepare"] * n1 / 1e6,
        "floor": floor1.seconds - per_row["floor"] * n1 / 1e6,
    }
    print(f"{'size':<8}{'rows':>11}{'floor s':>9}{'prepare s':>11}{'ratio':>7}{'floor MiB':>11}{'prepare MiB':>13}")
    for copies, rows, floor, job in results:
        print(f"x{copies:<7}{rows:>11,}{floor.seconds:>9.1f}{job.seconds:>11.1f}{job.seconds / floor.seconds:>7.2f}"
              f"{floor.peak_rss_mib:>11,.0f}{job.peak_rss_mib:>13,.0f}")  # fmt: skip
    print(
        f"per row: prepare {per_row['prepare']:.1f} µs, floor {per_row['floor']:.1f} µs "
        f"({per_row['prepare'] / per_row['floor']:.2f}x); fixed: prepare {fixed['prepare']:.1f} s, "
        f"floor {fixed['floor']:.1f} s; peak memory x{args.copies} / x1: prepare "
        f"{job3.peak_rss_mib / job1.peak_rss_mib:.2f}, floor {floor3.peak_rss_mib / floor1.peak_rss_mib:.2f}"
    )
    figures = {
        "rows": [n1, n3],
        "prepare_s": [round(job1.seconds, 2), round(job3.seconds, 2)],
        "floor_s": [round(floor1.seconds, 2), round(floor3.seconds, 2)],
        "ratio": [round(job1.seconds / floor1.seconds, 2), round(job3.seconds / floor3.seconds, 2)],
        "per_row_us": {k: round(v, 2) for k, v in per_row.items()},
        "per_row_ratio": round(per_row["prepare"] / per_row["floor"], 2),
        "fixed_s": {k: round(v, 2) for k, v in fixed.items()},
        "peak_mib": {
            "prepare": [round(job1.peak_rss_mib), round(job3.peak_rss_mib)],
            "floor": [round(floor1.peak_rss_mib), round(floor3.peak_rss_mib)],
        },
        "pairs": args.pairs,
    }
    if args.workers:
        mp = measure(
            f"prepare x{args.workers} processes",
            [python, "-m", "skewless.beam_pipelines.jobs.prepare", "--output_dir", str(out / "job_mp"),
             f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"],
            str(out / "job_mp.log"),
        )  # fmt: skip
        print(f"x1 with {args.workers} processes: {mp.seconds:.1f} s, speed-up {job1.seconds / mp.seconds:.2f}x "
              "(its peak RSS counts the launcher only)")  # fmt: skip
        figures["multi_processing"] = {"workers": args.workers, "seconds": round(mp.seconds, 2),
                                       "speedup": round(job1.seconds / mp.seconds, 2)}  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
