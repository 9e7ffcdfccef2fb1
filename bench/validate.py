"""Benchmark: `skewless validate` of one month of flights against the year's baseline vs the same
statistics computed with pyarrow + numpy alone in one process.

    python bench/validate.py [--out DIR] [--month 12] [--repeat 3] [--baseline PREPARED_DIR]

The baseline is prepare on all 336,776 flights (run once, kept under --out). Each repeat runs,
alternately:
- `job`: the command as a user runs it (`skewless validate --baseline B --input CSV
  --output_dir D`, a whole process). Local files on the local default run in that process
  without a Beam pipeline (validate_local.py);
- `floor`: the floor as a whole process (`python bench/validate.py --floor CSV`: read the CSV
  with Arrow's type inference, then per column counts, missing, min/max/mean/std/zeros, 1,001
  exact quantiles, a 10-bucket histogram, value counts and distinct strings, list lengths);
- `beam_job`: the same command with `--runner FnApiRunner`, i.e. the Beam job (as on Dataflow,
  but on the local runner), for reference;
- `job_imports`: a process that only loads what `job` loads;
- `job_in_process`, `floor_in_process`, `beam_in_process`: the three again inside this process
  once their imports are loaded (validate_local.run, the floor's function, the Beam job's
  pipeline through build_pipeline on FnApiRunner).
Best of the repeats; the issue's target is job / floor <= 2. These machines are shared and
noisy: ratios hold, absolute seconds do not. The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.flights_data import flights_csv_lines as flights_csv  # noqa: E402

ROWS = 336_776
# What the job's process loads before it reads the data: the CLI, the in-process path, the
# feature set's module.
IMPORTS = "import skewless.beam_pipelines.runtime.cli, skewless.beam_pipelines.validation.in_process; import skewless.transforms.featureset as f; f.load_feature_set('flights')"


def month_csv(month: int, path: Path) -> int:
    """The bundled flights of one month (0: the year), as the CSV lines they are; the rows."""
    return flights_csv(path, None if month == 0 else (month,))


def floor_statistics(path: str) -> dict:
    """The statistics validate computes, with pyarrow + numpy in this process."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(path)
    out = {"num_examples": table.num_rows}
    for name, column in zip(table.column_names, table.columns, strict=True):
        column = column.combine_chunks()
        stats = {"num_non_missing": len(column) - column.null_count}
        values = column.drop_null()
        if pa.types.is_list(values.type):
            lengths = pc.list_value_length(values).to_numpy()
            stats["value_counts"] = (int(lengths.min()), int(lengths.max()))
            values = pc.list_flatten(values)
        t = values.type
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_temporal(t):
            if pa.types.is_temporal(t):
                values = values.cast(pa.int64())
            x = values.to_numpy(zero_copy_only=False).astype(np.float64)
            if len(x):
                stats.update(
                    mean=float(x.mean()),
                    std=float(x.std()),
                    min=float(x.min()),
                    max=float(x.max()),
                    zeros=int((x == 0).sum()),
                    quantiles=np.quantile(x, np.linspace(0, 1, 1001)),
                    histogram=np.histogram(x, 10),
                )
        else:
            counts = pc.value_counts(values)
            order = np.argsort(-counts.field("counts").to_numpy(), kind="stable")
            stats.update(
                unique=len(counts),
                top=counts.take(pa.array(order[:1000])),
                avg_length=float(pc.mean(pc.binary_length(values)).as_py() or 0.0),
            )
        out[name] = stats
    return out


def run_child(argv: list[str], log: Path) -> tuple[float, int]:
    """Wall seconds and exit code of a child process (0 and 3, 'anomalies found', are fine)."""
    with open(log, "wb") as f:
        started = time.perf_counter()
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - started
    if code not in (0, 3):
        raise SystemExit(f"{argv[:4]} failed (exit {code}); see {log}")
    return seconds, code


def in_process_local(baseline_dir: str, csv: str, out: str) -> float:
    """validate_local.run in this process, imports loaded (its log lines silenced)."""
    import logging

    from skewless.beam_pipelines.validation import in_process as validate_local

    argv = ["--baseline", baseline_dir, "--input", csv, "--output_dir", out]
    started = time.perf_counter()
    logging.disable(logging.CRITICAL)
    try:
        validate_local.run(argv)
    except SystemExit as exc:  # 3: anomalies found, as the job's exit code
        if exc.code not in (0, 3, None):
            raise
    finally:
        logging.disable(logging.NOTSET)
    return time.perf_counter() - started


def in_process_beam(baseline_dir: str, csv: str, out: str) -> float:
    """The job's pipeline (build_pipeline, FnApiRunner) in this process, imports loaded."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from skewless.beam_pipelines.jobs import validate
    from skewless.beam_pipelines.validation.baseline import RAW, load_baseline
    from skewless.beam_pipelines.validation.steps import ReadInferredFiles
    from skewless.transforms.featureset import load_feature_set

    started = time.perf_counter()
    baseline = load_baseline(baseline_dir)
    fs = load_feature_set(baseline.summary["feature_set_spec"])
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        validate.build_pipeline(p, ReadInferredFiles(csv), baseline, fs, RAW, out, "bench")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="out/bench/validate")
    parser.add_argument("--month", type=int, default=12, help="1-12; 0: the whole year")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--baseline", help="A prepared directory of all flights (default: made once under --out)."
    )
    parser.add_argument("--floor", help=argparse.SUPPRESS)  # the floor's child process
    args = parser.parse_args()
    if args.floor:
        started = time.perf_counter()
        floor_statistics(args.floor)
        print(json.dumps({"seconds": time.perf_counter() - started}))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    baseline = Path(args.baseline) if args.baseline else out / "baseline"
    if not (baseline / "statistics" / "statistics.pb").exists():
        print(f"preparing the baseline (all {ROWS:,} flights) in {baseline} ...", flush=True)
        run_child(
            [sys.executable, "-m", "skewless.beam_pipelines.jobs.prepare", "--output_dir", str(baseline)],
            out / "prepare.log",
        )
    csv = out / f"month_{args.month:02d}.csv"
    rows = month_csv(args.month, csv)
    env_python = [sys.executable]
    runs: dict[str, list[float]] = {
        "job": [],
        "floor": [],
        "beam_job": [],
        "job_imports": [],
        "job_in_process": [],
        "floor_in_process": [],
        "beam_in_process": [],
    }
    command = [*env_python, "-m", "skewless.beam_pipelines.runtime.cli", "validate", "--baseline", str(baseline),
               "--input", str(csv)]  # fmt: skip
    code = None
    for i in range(args.repeat):
        seconds, code = run_child(
            [*command, "--output_dir", str(out / f"job_{i}")], out / f"job_{i}.log"
        )
        runs["job"].append(seconds)
        seconds, _ = run_child([*env_python, __file__, "--floor", str(csv)], out / f"floor_{i}.log")
        runs["floor"].append(seconds)
        seconds, beam_code = run_child(
            [*command, "--output_dir", str(out / f"beam_job_{i}"), "--runner", "FnApiRunner"],
            out / f"beam_job_{i}.log",
        )
        runs["beam_job"].append(seconds)
        if beam_code != code:
            raise SystemExit(f"the Beam job exited {beam_code}, the in-process run {code}")
        seconds, _ = run_child([*env_python, "-c", IMPORTS], out / f"imports_{i}.log")
        runs["job_imports"].append(seconds)
        runs["job_in_process"].append(
            in_process_local(str(baseline), str(csv), str(out / f"warm_{i}"))
        )
        started = time.perf_counter()
        floor_statistics(str(csv))
        runs["floor_in_process"].append(time.perf_counter() - started)
        runs["beam_in_process"].append(
            in_process_beam(str(baseline), str(csv), str(out / f"warm_beam_{i}"))
        )
    best = {k: min(v) for k, v in runs.items()}
    anomalies = json.loads((out / "job_0" / "anomalies.json").read_text())
    beam_anomalies = json.loads((out / "beam_job_0" / "anomalies.json").read_text())
    same = [(a["question"], a["feature"], a["kind"], a["blocking"]) for a in anomalies] == [
        (a["question"], a["feature"], a["kind"], a["blocking"]) for a in beam_anomalies
    ]
    ratio = best["job"] / best["floor"]
    warm_ratio = best["job_in_process"] / best["floor_in_process"]
    print(
        f"month {args.month or 'all'}: {rows:,} flights against the year's baseline; best of {args.repeat}"
    )
    print(f"{'run':<18}{'best s':>9}{'rows/s':>10}")
    for name, seconds in best.items():
        print(f"{name:<18}{seconds:>9.2f}{rows / seconds:>10,.0f}")
    print(
        f"job / floor, whole processes: {ratio:.2f}; in process, imports loaded: {warm_ratio:.2f} (target <= 2)"
    )
    print(f"the job's process without its imports: {best['job'] - best['job_imports']:.2f} s")
    print(f"the Beam job / floor, whole processes: {best['beam_job'] / best['floor']:.2f}")
    print(f"the in-process run and the Beam job find the same anomalies: {same}")
    print(
        f"exit code {code}; anomalies: {[(a['question'], a['feature'], a['kind'], a['blocking']) for a in anomalies]}"
    )
    print(
        json.dumps(
            {
                "rows": rows,
                "month": args.month,
                "seconds": {k: round(v, 3) for k, v in best.items()},
                "rows_per_s": {k: round(rows / v) for k, v in best.items()},
                "ratio": round(ratio, 2),
                "ratio_in_process": round(warm_ratio, 2),
                "job_without_imports_s": round(best["job"] - best["job_imports"], 3),
                "ratio_beam_job": round(best["beam_job"] / best["floor"], 2),
                "same_anomalies_as_beam_job": same,
                "exit_code": code,
                "anomalies": len(anomalies),
                "blocking": sum(a["blocking"] for a in anomalies),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
