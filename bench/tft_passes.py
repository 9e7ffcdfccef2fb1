"""Benchmark: tf.Transform's two passes apart, at several batch sizes, on the bundled year.

    python bench/tft_passes.py [--out DIR] [--features DIR] [--rows 4096,16384,32768,131072]
                               [--repeat 2]

prepare feeds tf.Transform Arrow record batches through TFXIO (a TensorAdapterConfig): the
analysis pass (AnalyzeDataset: the preprocessing_fn's analyzers over the train split) and the
transform pass (TransformDataset: the transform graph applied to every example). Each batch is
one call into the TF graph, so the batch size sets how often the per-call cost is paid.

Input: the features/ of one prepare run of the bundled year (its examples, both splits; run
here unless --features names one), read by Beam's Parquet source and cut into batches of
--rows rows, as prepare's ToTFTBatches does. Each pass runs as its own pipeline in this
process (imports paid once, before any timing), alternating, --repeat times; a third pipeline
only reads and cuts the batches, and its time is taken off both passes. Every pipeline also
runs on the first 1/100 of the examples: the line through the two sizes splits a pass into a
fixed part (graph construction, tracing, the SavedModel) and a part per row.

These machines are shared and noisy: compare the batch sizes within one run. The last line
is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PASSES = ("read", "analyze", "transform")


def cut_batches_fn(fs, rows: int):
    """The DoFn class cutting features/ batches into tf.Transform input of `rows` rows."""
    import apache_beam as beam
    import pyarrow as pa
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue

    from skewless.transforms.example_schema import to_tft_record_batch

    class CutBatches(beam.DoFn):
        """Record batches of the features/ schema -> tf.Transform input of `rows` rows."""

        def start_bundle(self):
            self.pending, self.held = [], 0

        def process(self, table):  # the Parquet source gives pyarrow Tables
            self.pending.extend(table.to_batches())
            self.held += table.num_rows
            while self.held >= rows:
                yield from self._emit(rows)

        def finish_bundle(self):
            while self.held:
                for out in self._emit(min(rows, self.held)):
                    yield WindowedValue(out, GlobalWindow().max_timestamp(), [GlobalWindow()])

        def _emit(self, n):
            table = pa.Table.from_batches(self.pending).combine_chunks()
            head, rest = table.slice(0, n), table.slice(n)
            self.pending = rest.to_batches() if rest.num_rows else []
            self.held = rest.num_rows
            yield to_tft_record_batch(fs, head.combine_chunks().to_batches()[0])

    return CutBatches


def run_pass(kind: str, fs, files: str, rows: int, transform_dir: str, work: Path) -> tuple[float, int]:
    """Build and run one pipeline; its wall seconds and the rows it passed on."""
    import apache_beam as beam
    import tensorflow_transform.beam as tft_beam
    from apache_beam.metrics.metric import Metrics, MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    from skewless.transforms.example_schema import tft_tensor_adapter_config

    counted = Metrics.counter("bench", "rows")

    def count(batch):
        counted.inc(batch.num_rows)

    cut = cut_batches_fn(fs, rows)
    started = time.perf_counter()
    p = beam.Pipeline(options=PipelineOptions(["--runner", "FnApiRunner"]))
    batches = (
        p
        | "Read" >> beam.io.ReadFromParquetBatched(files)
        | "Cut" >> beam.ParDo(cut())
    )
    adapter = tft_tensor_adapter_config(fs)
    with tft_beam.Context(temp_dir=str(work / "tmp")):
        if kind == "read":
            _ = batches | "Count" >> beam.Map(count)
        elif kind == "analyze":
            _ = batches | "Count" >> beam.Map(count)
            transform_fn = (batches, adapter) | "Analyze" >> tft_beam.AnalyzeDataset(
                fs.preprocessing_fn
            )
            _ = transform_fn | "Write" >> tft_beam.WriteTransformFn(str(work / "transform"))
        else:
            transform_fn = p | "ReadTransform" >> tft_beam.ReadTransformFn(transform_dir)
            out, _ = ((batches, adapter), transform_fn) | "Transform" >> tft_beam.TransformDataset(
                output_record_batches=True
            )
            _ = out | "Count" >> beam.Map(lambda pair: count(pair[0]))
    result = p.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - started
    counters = result.metrics().query(MetricsFilter().with_name("rows"))["counters"]
    return seconds, sum(c.committed for c in counters)


def features_of_prepare(out: Path) -> Path:
    target = out / "prepare"
    if not (target / "features").exists():
        subprocess.run(
            [sys.executable, "-m", "skewless.beam_pipelines.jobs.prepare", "--output_dir", str(target)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    return target / "features"


def slice_of(features: Path, fraction: float, out: Path) -> Path:
    import pyarrow.parquet as pq

    table = pq.read_table(features)
    small = out / "features_small"
    small.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.slice(0, int(table.num_rows * fraction)), small / "part.parquet")
    return small


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", default="out/bench/tft_passes")
    parser.add_argument("--features", help="features/ of a prepare run (default: run one)")
    parser.add_argument("--rows", default="4096,16384,32768,131072")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(r) for r in args.rows.split(",")]

    import pyarrow.parquet as pq
    import tensorflow_transform.beam  # noqa: F401  (imports paid before any timing)

    from skewless.transforms.featureset import load_feature_set

    fs = load_feature_set("flights")
    features = Path(args.features) if args.features else features_of_prepare(out)
    inputs = {"full": features, "small": slice_of(features, 0.01, out)}
    examples = {name: pq.read_metadata(next(d.glob("*.parquet"))).num_rows for name, d in inputs.items()}

    # One transform graph for every transform pass (its analysis is timed below).
    reference = Path(tempfile.mkdtemp(dir=out))
    run_pass("analyze", fs, str(features / "*.parquet"), 32768, "", reference)
    transform_dir = str(reference / "transform")

    seconds: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(args.repeat):
        for rows in sizes:
            for name, directory in inputs.items():
                for kind in PASSES:
                    work = Path(tempfile.mkdtemp(dir=out))
                    took, counted = run_pass(kind, fs, str(directory / "*.parquet"), rows, transform_dir, work)
                    assert counted == examples[name], (kind, name, counted, examples[name])
                    seconds.setdefault((kind, name, rows), []).append(took)

    med = {key: statistics.median(v) for key, v in seconds.items()}
    full, small = examples["full"], examples["small"]
    figures: dict[str, dict] = {}
    print(f"{examples['full']:,} examples (both splits); the read-and-cut pipeline taken off each pass")
    print(f"{'batch rows':>10} {'pass':<10}{'year s':>8}{'1% s':>7}{'fixed s':>8}{'µs/row':>8}{'rows/s':>10}")
    for rows in sizes:
        for kind in ("analyze", "transform"):
            whole = med[(kind, "full", rows)] - med[("read", "full", rows)]
            part = med[(kind, "small", rows)] - med[("read", "small", rows)]
            per_row = (whole - part) / (full - small)
            fixed = part - per_row * small
            figures.setdefault(str(rows), {})[kind] = {
                "seconds": round(whole, 2),
                "fixed_s": round(fixed, 2),
                "per_row_us": round(per_row * 1e6, 2),
                "rows_per_s": round(1 / per_row) if per_row > 0 else None,
            }
            print(
                f"{rows:>10} {kind:<10}{whole:>8.2f}{part:>7.2f}{fixed:>8.2f}{per_row * 1e6:>8.2f}"
                f"{(1 / per_row if per_row > 0 else float('nan')):>10,.0f}"
            )
    read_s = {str(rows): round(med[("read", "full", rows)], 2) for rows in sizes}
    print(json.dumps({"examples": full, "read_and_cut_s": read_s, "passes": figures}))


if __name__ == "__main__":
    main()
