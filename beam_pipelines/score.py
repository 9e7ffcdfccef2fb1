"""The score job (batch): raw events -> validate -> as-of examples -> RunInference -> predictions.

The examples are built by the same composite as prepare (BuildExamples), and the model takes
raw features with the tf.Transform graph inside, so scoring re-implements no feature logic.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
from apache_beam.pvalue import TaggedOutput

from beam_pipelines.common import (
    before_run,
    check_output_dir,
    configure_logging,
    is_dry_run,
    metric_counters,
    parse_job_options,
)
from beam_pipelines.io.sinks import WriteDeadLetters
from beam_pipelines.io.sources import read_source
from beam_pipelines.options import FeatureSetOptions, SourceOptions
from models.handler import InputError, SkewlessModelHandler, example_count
from models.versions import ModelDirError
from transforms.example_schema import features_arrow_schema
from transforms.examples import BuildExamples
from transforms.featureset import FeatureSet, load_feature_set
from transforms.validation import NAMESPACE, ValidateRecords, dead_letter, to_epoch_ms

LOG = logging.getLogger("skewless.score")
DEAD = "dead"
OUTPUT_FORMATS = ("parquet", "jsonl")
DESCRIPTION = (
    "Batch scoring: read raw events (files or BigQuery), validate them, build the same "
    "point-in-time-correct examples as prepare, score them with a numbered model version "
    "(RunInference) and write one prediction per example to --output (Parquet or JSON lines) "
    "or --output_table (BigQuery). Bad records and failed inferences go to dead letters. "
    "Source options as for `skewless prepare`: --input, --input_format, --bigquery_table, "
    "--bigquery_query, --bigquery_query_param, --bigquery_project, --bigquery_endpoint, "
    "--bigquery_storage_endpoint, --feature_set."
)


class ScoreOptions(PipelineOptions):
    """The score job's own flags; the source flags and --feature_set are in options.py."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--model_dir", help="Base directory of numbered model versions (required).")
        parser.add_argument("--model_version", type=int, help="Version to use (default: the highest).")
        parser.add_argument("--output", help="Directory for predictions/, dead_letters/, summary.json.")
        parser.add_argument("--output_format", choices=OUTPUT_FORMATS, default="parquet")
        parser.add_argument("--output_table", help="Write predictions to this BigQuery table instead.")
        parser.add_argument(
            "--output_method", choices=("load", "insert"), default="load", help="BigQuery write method."
        )
        parser.add_argument(
            "--dead_letter_dir", help="Dead-letter directory (default: --output/dead_letters)."
        )
        parser.add_argument(
            "--start", help="Score only examples with event time >= this ISO-8601 instant."
        )
        parser.add_argument("--end", help="Score only examples with event time < this ISO-8601 instant.")
        parser.add_argument("--min_batch_size", type=int, default=1, help="Inference batch, examples.")
        parser.add_argument("--max_batch_size", type=int, default=8192, help="Inference batch, examples.")


def prediction_schema(fs: FeatureSet) -> pa.Schema:
    """Output rows: the example key, the event time, the probability and the model version."""
    by_name = {f.name: f for f in features_arrow_schema(fs)}
    key = list(fs.example_key)
    fields = [by_name[k] for k in dict.fromkeys([*key, fs.event_time])]
    return pa.schema([*fields, pa.field("probability", pa.float64()), pa.field("model_version", pa.int64())])


class _SelectPeriod(beam.DoFn):
    """Keep the examples with start <= event time < end (aggregates were computed before)."""

    def __init__(self, fs: FeatureSet, start_ms: int | None, end_ms: int | None):
        self.fs = fs
        self.start_ms = start_ms
        self.end_ms = end_ms

    def setup(self) -> None:
        self._outside = Metrics.counter(NAMESPACE, "examples_outside_period")

    def process(self, batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        times = batch.column(self.fs.event_time).cast(pa.int64())
        keep = None
        if self.start_ms is not None:
            keep = pc.greater_equal(times, self.start_ms)
        if self.end_ms is not None:
            before = pc.less(times, self.end_ms)
            keep = before if keep is None else pc.and_(keep, before)
        selected = batch if keep is None else batch.filter(keep)
        self._outside.inc(batch.num_rows - selected.num_rows)
        if selected.num_rows:
            yield selected


def _rechunk(batch: pa.RecordBatch, max_rows: int) -> Iterator[pa.RecordBatch]:
    for start in range(0, batch.num_rows, max_rows):
        yield batch.slice(start, max_rows)


class _CheckExample(beam.DoFn):
    """Per element, before batching: an example that does not fit the model's inputs becomes a
    dead letter on its own instead of failing the whole inference batch it would join."""

    def __init__(self, inputs: list[dict]):
        self.inputs = inputs

    def setup(self) -> None:
        self._rejected = Metrics.counter(NAMESPACE, "examples_rejected_by_model_inputs")

    def process(self, element) -> Iterator:
        names = set(element.schema.names) if isinstance(element, pa.RecordBatch) else None
        try:
            if names is None:
                raise InputError(f"an example is a {type(element).__name__}, expected a RecordBatch")
            for spec in self.inputs:
                if spec["name"] not in names:
                    raise InputError(f"missing feature {spec['name']!r}")
                column = element.column(spec["name"])
                if not spec["nullable"] and column.null_count:
                    raise InputError(f"required feature {spec['name']!r} is null")
                if not _castable(column.type, spec["dtype"]):
                    raise InputError(f"feature {spec['name']!r} has type {column.type}, expected {spec['dtype']}")
        except InputError as exc:
            self._rejected.inc(example_count(element))
            for row in _rows(element):
                yield TaggedOutput(DEAD, dead_letter("model_input", str(exc), row))
            return
        yield element


def _castable(arrow_type: pa.DataType, dtype: str) -> bool:
    if dtype == "string":
        return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
    return (
        pa.types.is_integer(arrow_type)
        or pa.types.is_floating(arrow_type)
        or pa.types.is_timestamp(arrow_type)
        or pa.types.is_boolean(arrow_type)
    )


def _rows(element) -> list:
    if isinstance(element, pa.RecordBatch):
        return element.to_pylist()
    return [element]


class _ToPredictions(beam.DoFn):
    """PredictionResult (a batch of examples + their probabilities) -> output RecordBatch."""

    def __init__(self, schema: pa.Schema):
        self.schema = schema

    def setup(self) -> None:
        self._scored = Metrics.counter(NAMESPACE, "examples_scored")

    def process(self, result: PredictionResult) -> Iterator[pa.RecordBatch]:
        batch, probabilities = result.example, result.inference
        n = batch.num_rows
        arrays = [batch.column(f.name) for f in self.schema if f.name not in ("probability", "model_version")]
        arrays.append(pa.array(probabilities, type=pa.float32()).cast(pa.float64()))
        arrays.append(pa.array([int(result.model_id)] * n, type=pa.int64()))
        self._scored.inc(n)
        yield pa.RecordBatch.from_arrays(arrays, schema=self.schema)


class _FailedInferences(beam.DoFn):
    """(failed batch, exception) from RunInference -> one dead letter per example, with the reason."""

    def setup(self) -> None:
        self._failed = Metrics.counter(NAMESPACE, "inference_failures")

    def process(self, failure) -> Iterator[dict]:
        batch, error = failure
        reason = _reason(error)
        for element in batch:
            rows = _rows(element)
            self._failed.inc(len(rows))
            for row in rows:
                yield dead_letter("inference", reason, row)


def _reason(error) -> str:
    """RunInference reports (exception type, repr, traceback lines); keep 'Type: message'."""
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    if isinstance(error, tuple) and len(error) == 3 and error[2]:
        return str(error[2][-1]).strip()
    return str(error)


class ScoreExamples(beam.PTransform):
    """Example RecordBatches -> (prediction RecordBatches, dead letters).

    Elements larger than the handler's max batch are sliced (zero-copy) first; RunInference
    then packs them into batches of min..max examples; inference failures become dead letters.
    """

    def __init__(self, fs: FeatureSet, handler: SkewlessModelHandler):
        super().__init__()
        self.fs = fs
        self.handler = handler

    def expand(self, examples):
        handler = self.handler
        max_rows = handler.batch_elements_kwargs().get("max_batch_size", 8192)
        checked = (
            examples
            | "Rechunk" >> beam.FlatMap(_rechunk, max_rows)
            | "CheckInputs" >> beam.ParDo(_CheckExample(handler.inputs)).with_outputs(DEAD, main="ok")
        )
        results, failures = checked.ok | "RunInference" >> RunInference(handler).with_exception_handling()
        predictions = results | "ToPredictions" >> beam.ParDo(_ToPredictions(prediction_schema(self.fs)))
        failed = failures.failed_inferences | "FailedInferences" >> beam.ParDo(_FailedInferences())
        dead = (checked[DEAD], failed) | "DeadLetters" >> beam.Flatten()
        return predictions, dead


class WritePredictionFiles(beam.PTransform):
    """Prediction RecordBatches -> Parquet or JSON lines files under `prefix`.

    Like every sink of this job it returns its dead letters: none here (a failed file write
    is retried by the runner and fails the job if it keeps failing).
    """

    def __init__(self, prefix: str, schema: pa.Schema, output_format: str = "parquet"):
        super().__init__()
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format must be one of {OUTPUT_FORMATS}")
        self.prefix = prefix
        self.schema = schema
        self.output_format = output_format

    def expand(self, batches):
        if self.output_format == "parquet":
            _ = (
                batches
                | "ToTable" >> beam.Map(lambda rb: pa.Table.from_batches([rb]))
                | "WriteParquet"
                >> beam.io.WriteToParquetBatched(
                    self.prefix, schema=self.schema, codec="snappy", file_name_suffix=".parquet"
                )
            )
        else:
            _ = (
                batches
                | "ToJson" >> beam.FlatMap(_json_lines)
                | "WriteJsonl" >> beam.io.WriteToText(self.prefix, file_name_suffix=".jsonl")
            )
        return batches.pipeline | "NoDeadLetters" >> beam.Create([])


def _json_lines(batch: pa.RecordBatch) -> Iterator[str]:
    for row in batch.to_pylist():
        yield json.dumps({k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in row.items()})


def build_pipeline(
    p: beam.Pipeline,
    fs: FeatureSet,
    handler: SkewlessModelHandler,
    source: beam.PTransform,
    sink: beam.PTransform,
    dead_letters: beam.PTransform,
    start_ms: int | None = None,
    end_ms: int | None = None,
) -> None:
    """Wire the batch score job. `sink` takes prediction RecordBatches and returns dead letters."""
    raw = p | "Read" >> source
    events, invalid = raw | "Validate" >> ValidateRecords(fs)
    examples = events | "BuildExamples" >> BuildExamples(fs, require_label=False)
    if start_ms is not None or end_ms is not None:
        examples = examples | "SelectPeriod" >> beam.ParDo(_SelectPeriod(fs, start_ms, end_ms))
    predictions, failed = examples | "Score" >> ScoreExamples(fs, handler)
    write_failed = predictions | "Write" >> sink
    _ = (invalid, failed, write_failed) | "AllDeadLetters" >> beam.Flatten() | "WriteDeadLetters" >> dead_letters


def _instant(value: str | None, flag: str) -> int | None:
    if not value:
        return None
    try:
        return to_epoch_ms(value)
    except ValueError as exc:
        raise SystemExit(f"skewless score: {flag} {value!r} is not an ISO-8601 instant ({exc})") from None


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse options, check the model, build and run the batch score job; return its summary.

    With --streaming, runs the streaming scorer instead (beam_pipelines.score_stream)."""
    if "--streaming" in (sys.argv[1:] if argv is None else argv):
        from beam_pipelines import score_stream

        return score_stream.run(argv)
    configure_logging(batch=True)
    options = parse_job_options(
        argv,
        prog="skewless score",
        description=DESCRIPTION,
        groups=(ScoreOptions, SourceOptions, FeatureSetOptions),
        required=((ScoreOptions, "model_dir"),),
    )
    with before_run():
        opts = options.view_as(ScoreOptions)
        source_opts = options.view_as(SourceOptions)
        if bool(opts.output) == bool(opts.output_table):
            raise SystemExit("skewless score: give exactly one of --output or --output_table")
        dead_dir = opts.dead_letter_dir or (os.path.join(opts.output, "dead_letters") if opts.output else None)
        if dead_dir is None:
            raise SystemExit("skewless score: --output_table needs --dead_letter_dir")
        start_ms, end_ms = _instant(opts.start, "--start"), _instant(opts.end, "--end")
        if start_ms is not None and end_ms is not None and start_ms >= end_ms:
            raise SystemExit("skewless score: --start must be before --end")
        try:
            handler = SkewlessModelHandler(
                opts.model_dir,
                opts.model_version,
                min_batch_size=opts.min_batch_size,
                max_batch_size=opts.max_batch_size,
            )
        except (ModelDirError, ValueError) as exc:
            raise SystemExit(f"skewless score: {exc}") from None
        metadata = handler.model_version.metadata
        fs = load_feature_set(options.view_as(FeatureSetOptions).feature_set)
        if metadata.get("feature_set") not in (None, fs.name):
            raise SystemExit(
                f"skewless score: model version {handler.version} was trained on feature set "
                f"{metadata['feature_set']!r}, not {fs.name!r}"
            )
        schema = prediction_schema(fs)
        if opts.output_table:
            from beam_pipelines.io.bigquery_sink import WriteArrowToBigQuery

            sink = WriteArrowToBigQuery(
                opts.output_table,
                schema,
                project=source_opts.bigquery_project or options.view_as(GoogleCloudOptions).project,
                endpoint=source_opts.bigquery_endpoint,
                method=opts.output_method,
            )
        else:
            sink = WritePredictionFiles(
                os.path.join(opts.output, "predictions", "part"), schema, opts.output_format
            )
        source = read_source(options, fs)
        if opts.output:
            check_output_dir(opts.output, "--output")
        check_output_dir(dead_dir, "--dead_letter_dir")
    started = time.monotonic()
    p = beam.Pipeline(options=options)
    build_pipeline(
        p, fs, handler, source, sink, WriteDeadLetters(os.path.join(dead_dir, "part")), start_ms, end_ms
    )
    result = p.run()
    result.wait_until_finish()
    if is_dry_run(options):
        LOG.info("dry run: the job graph was built and not run")
        return None
    counters = metric_counters(result)
    summary = {
        "records_read": counters.get("records_read", 0),
        "records_valid": counters.get("records_valid", 0),
        "records_rejected": counters.get("records_rejected", 0),
        "records_not_events": counters.get("records_not_events", 0),
        "examples": counters.get("examples_joined", 0),
        "examples_outside_period": counters.get("examples_outside_period", 0),
        "examples_scored": counters.get("examples_scored", 0),
        "examples_rejected_by_model_inputs": counters.get("examples_rejected_by_model_inputs", 0),
        "inference_failures": counters.get("inference_failures", 0),
        "rows_write_failed": counters.get("rows_write_failed", 0),
        "model_dir": opts.model_dir,
        "model_version": handler.version,
        "feature_set": fs.name,
        "period": {"start": opts.start, "end": opts.end},
        "output": opts.output or opts.output_table,
        "elapsed_seconds": round(time.monotonic() - started, 2),
    }
    if opts.output:
        if not FileSystems.exists(opts.output):
            FileSystems.mkdirs(opts.output)
        with FileSystems.create(os.path.join(opts.output, "summary.json")) as f:
            f.write(json.dumps(summary, indent=2).encode())
    LOG.info("score finished: %s", json.dumps(summary))
    return summary


if __name__ == "__main__":
    from beam_pipelines.cli import main

    main(["score", *sys.argv[1:]], run)
