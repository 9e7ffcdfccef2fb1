"""Benchmark of batch scoring against a floor: the same SavedModel signature on NumPy batches.

    .venv/bin/python bench/score.py --prepared_dir /tmp/p --model_dir /tmp/m [--skip_job]

- floor: every example of features/ (prepare's examples of all flights) as NumPy arrays, the
  serving signature called on slices of --batch_size rows; conversion to NumPy not timed.
- stage: a Beam pipeline (local FnApiRunner) that reads the same examples as Arrow batches and
  runs the job's inference composite (ScoreExamples: input check, RunInference with the
  skewless handler, output rows), minus a pipeline that only reads and counts them; marginal
  cost per row between 1 and --copies copies of the data, so fixed costs (model load, tracing)
  are left out as they are from the floor (also printed with them).
- job: `skewless score` over the raw flights (read, validate, aggregates, as-of join, inference,
  Parquet output), wall time in this process.
Prints rows/s of each and the stage/floor ratio (target: >= 0.5).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_floor(model_dir: str, features: str, batch_size: int):
    import pyarrow.parquet as pq

    from skewless.models.handler import SkewlessModelHandler, arrow_to_feed, predict

    handler = SkewlessModelHandler(model_dir)
    model = handler.load_model()
    feed = arrow_to_feed(pq.read_table(features).combine_chunks(), handler.inputs)
    predict(model, {k: v[:batch_size] for k, v in feed.items()})  # warm-up: trace, allocate
    return model, feed


def floor(model, feed: dict, batch_size: int) -> tuple[int, float]:
    from skewless.models.handler import predict

    n = len(next(iter(feed.values())))
    started = time.perf_counter()
    for start in range(0, n, batch_size):
        predict(model, {k: v[start : start + batch_size] for k, v in feed.items()})
    return n, time.perf_counter() - started


def _pipeline(features: str, handler=None, copies: int = 1) -> tuple[int, float]:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from skewless.beam_pipelines.jobs.score import ScoreExamples
    from skewless.beam_pipelines.runtime.parsing import metric_counters
    from skewless.transforms.featureset import load_feature_set

    fs = load_feature_set("flights")
    started = time.perf_counter()
    p = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    # K copies through ONE read of a glob over symlinks: a Flatten of K reads would add a
    # materialized stage boundary (encode/decode of every batch) on the local runner.
    pattern = os.path.join(features, "*.parquet")
    if copies > 1:
        links = tempfile.mkdtemp(prefix="bench-score-")
        for i in range(copies):
            for path in glob.glob(pattern):
                os.symlink(os.path.abspath(path), os.path.join(links, f"copy{i}-{os.path.basename(path)}"))
        pattern = os.path.join(links, "*.parquet")
    batches = (
        p
        | "Read" >> beam.io.ReadFromParquetBatched(pattern)
        | "ToBatches" >> beam.FlatMap(lambda table: table.to_batches())
    )
    if handler is not None:
        batches, _ = batches | "Score" >> ScoreExamples(fs, handler)
    _ = batches | "Count" >> beam.Map(_count)
    result = p.run()
    result.wait_until_finish()
    elapsed = time.perf_counter() - started
    return metric_counters(result, "bench").get("rows", 0), elapsed


def _count(batch) -> None:
    from apache_beam.metrics import Metrics

    Metrics.counter("bench", "rows").inc(batch.num_rows)


def job(model_dir: str, out: str) -> tuple[int, int, float]:
    from skewless.beam_pipelines.jobs import score

    started = time.perf_counter()
    summary = score.run(["--model_dir", model_dir, "--output", out])
    return summary["records_read"], summary["examples_scored"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prepared_dir", required=True, help="`skewless prepare` output (all flights)."
    )
    parser.add_argument(
        "--model_dir", required=True, help="Base dir of model versions (`skewless train`)."
    )
    parser.add_argument("--batch_size", type=int, default=8192)
    parser.add_argument(
        "--copies", type=int, default=4, help="Data copies for the marginal stage cost."
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="Best of this many runs of each measure."
    )
    parser.add_argument("--skip_job", action="store_true", help="Only the floor and the stage.")
    args = parser.parse_args()

    from skewless.models.handler import SkewlessModelHandler

    features = os.path.join(args.prepared_dir, "features")
    model, feed = load_floor(args.model_dir, features, args.batch_size)
    handler = SkewlessModelHandler(
        args.model_dir, min_batch_size=args.batch_size, max_batch_size=args.batch_size
    )
    # Marginal cost: the same pipeline on 1 and on K copies of the examples; the difference
    # is free of the fixed costs (pipeline start, model load and first-call tracing) that do
    # not grow with the data, and the read-only pipeline's difference is subtracted. Every
    # measure is the best of --repeats, interleaved, so a busy machine hurts all alike.
    k = args.copies
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        n, t = floor(model, feed, args.batch_size)
        runs.setdefault("floor", []).append(t)
        for name, h, copies in (
            ("read_1", None, 1),
            ("read_k", None, k),
            ("score_1", handler, 1),
            ("score_k", handler, k),
        ):
            rows, t = _pipeline(features, h, copies)
            assert rows == copies * n, (name, rows, n)
            runs.setdefault(name, []).append(t)
    best = {name: min(ts) for name, ts in runs.items()}
    t_floor, read_1, read_k, score_1, score_k = (
        best[x] for x in ("floor", "read_1", "read_k", "score_1", "score_k")
    )
    extra = (k - 1) * n
    t_stage = max((score_k - score_1) - (read_k - read_1), 1e-9)
    floor_rate, stage_rate = n / t_floor, extra / t_stage
    print(f"examples: {n:,}, batch size {args.batch_size}, best of {args.repeats}")
    print(
        f"floor  (signature on NumPy batches)          {t_floor:7.2f} s  {floor_rate:12,.0f} rows/s"
    )
    print(
        f"stage  (ScoreExamples: RunInference etc.)    marginal over {extra:,} rows:"
        f" {t_stage:.2f} s  {stage_rate:12,.0f} rows/s"
    )
    print(
        f"       pipeline walls: read 1x {read_1:.2f} s, {k}x {read_k:.2f} s; "
        f"score 1x {score_1:.2f} s, {k}x {score_k:.2f} s"
    )
    print(
        f"       1x with fixed costs (load, tracing), read subtracted: {score_1 - read_1:.2f} s"
        f"  {n / max(score_1 - read_1, 1e-9):12,.0f} rows/s"
    )
    print(f"ratio stage/floor: {stage_rate / floor_rate:.2f} (target >= 0.5)")
    figures = {
        "examples": n, "batch_size": args.batch_size, "repeats": args.repeats,
        "floor_rows_per_s": round(floor_rate), "stage_rows_per_s": round(stage_rate),
        "stage_vs_floor": round(stage_rate / floor_rate, 3),
    }  # fmt: skip
    if not args.skip_job:
        with tempfile.TemporaryDirectory() as out:
            read, scored, t_job = job(args.model_dir, out)
        print(
            f"job    (skewless score, {read:,} flights -> {scored:,} predictions) {t_job:7.2f} s  "
            f"{read / t_job:10,.0f} flights/s  {scored / t_job:10,.0f} predictions/s"
        )
        figures.update(job_seconds=round(t_job, 2), job_flights_per_s=round(read / t_job))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
