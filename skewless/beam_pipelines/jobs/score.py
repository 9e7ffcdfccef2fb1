"""The score job (batch): raw events -> validate -> as-of examples -> RunInference -> predictions.

The examples are built by the same composite as prepare (BuildExamples), and the model takes
raw features with the tf.Transform graph inside, so scoring re-implements no feature logic.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from skewless.beam_pipelines.io.file_sinks import WriteDeadLetterFiles
from skewless.beam_pipelines.runtime.inputs import (
    ReadReferenceIndexes,
    read_source,
    reference_sources,
    reference_summary,
)
from skewless.beam_pipelines.runtime.job import EMULATOR_ONLY, Job, Template
from skewless.beam_pipelines.runtime.launch import launch
from skewless.beam_pipelines.runtime.options import (
    BigQueryEndpointOptions,
    DeadLetterDirOptions,
    FeatureSetOptions,
    ModelOptions,
    PeriodOptions,
    PredictionTableOptions,
    SourceOptions,
)
from skewless.beam_pipelines.runtime.parsing import (
    parse_job_options,
    run_and_summarise,
)
from skewless.beam_pipelines.runtime.process import before_run, check_output_dir, configure_logging
from skewless.beam_pipelines.score_core import (
    MODEL_ERRORS,
    LoadedVersion,
    ScoreWithModel,
    ToPredictionBatch,
    load_model,
    prediction_schema,
)
from skewless.models.handler import SkewlessModelHandler
from skewless.transforms.examples import BuildExamples, SelectPeriod
from skewless.transforms.featureset import FeatureSet
from skewless.transforms.record_checks import CheckRecords, to_epoch_ms

LOG = logging.getLogger("skewless.score")
OUTPUT_FORMATS = ("parquet", "jsonl")
DESCRIPTION = (
    "Batch scoring: read raw events (files or BigQuery), validate them, build the same "
    "point-in-time-correct examples as prepare, score them with a numbered model version "
    "(RunInference) and write one prediction per example to --output (Parquet or JSON lines) "
    "or --output_table (BigQuery). Bad records and failed inferences go to dead letters. "
    "Source options as for `skewless prepare`: --input, --input_format, --bigquery_table, "
    "--bigquery_query, --bigquery_query_param, --bigquery_project, --bigquery_endpoint, "
    "--bigquery_storage_endpoint. The feature set is the one recorded with the model version."
)


class ScoreOptions(PipelineOptions):
    """The batch scorer's own flags; --model_dir, the batch sizes, the source flags,
    --dead_letter_dir and --feature_set are shared (options.py)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--output", help="Directory for predictions/, dead_letters/, summary.json.")
        parser.add_argument(
            "--output_format",
            choices=OUTPUT_FORMATS,
            default="parquet",
            help="Format of the prediction files under --output: Parquet or JSON lines.",
        )
        parser.add_argument(
            "--output_method",
            choices=("load", "insert"),
            default="load",
            help="How --output_table is written: load jobs (batch) or streaming inserts.",
        )


GROUPS = (
    ScoreOptions,
    PeriodOptions,
    PredictionTableOptions,
    DeadLetterDirOptions,
    ModelOptions,
    SourceOptions,
    BigQueryEndpointOptions,
    FeatureSetOptions,
)


JOB = Job(
    name="score",
    summary="batch or streaming scoring with RunInference",
    description=DESCRIPTION,
    groups=GROUPS,
    required=("model_dir",),
    template=Template("score", not_parameters=dict(EMULATOR_ONLY)),
)


def _rechunk(batch: pa.RecordBatch, max_rows: int) -> Iterator[pa.RecordBatch]:
    for start in range(0, batch.num_rows, max_rows):
        yield batch.slice(start, max_rows)


class ScoreExamples(ScoreWithModel):
    """Example RecordBatches -> (prediction RecordBatches, dead letters).

    Elements larger than the handler's max batch are sliced (zero-copy) first; RunInference
    then packs them into batches of min..max examples (skewless.beam_pipelines.score_core).
    """

    def __init__(self, fs: FeatureSet, handler: SkewlessModelHandler):
        super().__init__(handler, ToPredictionBatch(fs))
        self.fs = fs

    def expand(self, examples):
        max_rows = self.handler.batch_elements_kwargs().get("max_batch_size", 8192)
        return super().expand(examples | "Rechunk" >> beam.FlatMap(_rechunk, max_rows))


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
    references: dict[str, beam.PTransform] | None = None,
) -> None:
    """Wire the batch score job. `sink` takes prediction RecordBatches and returns dead letters;
    `references` ({table name: source}) reads the feature set's reference tables."""
    raw = p | "Read" >> source
    events, invalid = raw | "Validate" >> CheckRecords(fs, batches=True)
    indexes = None
    if fs.references:
        indexes, reference_dead = p | "References" >> ReadReferenceIndexes(fs, references or {})
        invalid = (invalid, reference_dead) | "InvalidAndReferences" >> beam.Flatten()
    examples = events | "BuildExamples" >> BuildExamples(
        fs, require_label=False, references=indexes
    )
    if start_ms is not None or end_ms is not None:
        examples = examples | "SelectPeriod" >> beam.ParDo(SelectPeriod(fs, start_ms, end_ms))
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


@dataclass(frozen=True)
class ScoreConfig:
    """A batch scoring run resolved from its options before any pipeline exists (every error
    here is a one-line usage error): the model version and its feature set, the period, the
    source, the sink and where dead letters go."""

    model: LoadedVersion
    model_dir: str
    start: str | None
    end: str | None
    start_ms: int | None
    end_ms: int | None
    source: beam.PTransform
    references: dict[str, beam.PTransform]
    sink: beam.PTransform
    output: str | None
    output_table: str | None
    dead_letter_dir: str
    options: PipelineOptions

    @classmethod
    def from_options(cls, options: PipelineOptions) -> ScoreConfig:
        with before_run():
            opts = options.view_as(ScoreOptions)
            model_opts = options.view_as(ModelOptions)
            output_table = options.view_as(PredictionTableOptions).output_table
            if bool(opts.output) == bool(output_table):
                raise SystemExit("skewless score: give exactly one of --output or --output_table")
            dead_dir = options.view_as(DeadLetterDirOptions).dead_letter_dir
            if not dead_dir and opts.output:
                dead_dir = os.path.join(opts.output, "dead_letters")
            if not dead_dir:
                raise SystemExit("skewless score: --output_table needs --dead_letter_dir")
            period = options.view_as(PeriodOptions)
            start_ms, end_ms = _instant(period.start, "--start"), _instant(period.end, "--end")
            if start_ms is not None and end_ms is not None and start_ms >= end_ms:
                raise SystemExit("skewless score: --start must be before --end")
            try:
                model = load_model(
                    model_opts.model_dir,
                    model_opts.model_version,
                    options.view_as(FeatureSetOptions).feature_set,
                    min_batch_size=model_opts.min_batch_size,
                    max_batch_size=model_opts.max_batch_size,
                )
            except MODEL_ERRORS as exc:
                raise SystemExit(f"skewless score: {exc}") from None
            config = cls(
                model=model,
                model_dir=model_opts.model_dir,
                start=period.start,
                end=period.end,
                start_ms=start_ms,
                end_ms=end_ms,
                source=read_source(options, model.fs),
                references=reference_sources(options, model.fs),
                sink=prediction_sink(options, prediction_schema(model.fs)),
                output=opts.output,
                output_table=output_table,
                dead_letter_dir=dead_dir,
                options=options,
            )
            if opts.output:
                check_output_dir(opts.output, "--output")
            check_output_dir(dead_dir, "--dead_letter_dir")
        return config


def prediction_sink(options: PipelineOptions, schema: pa.Schema) -> beam.PTransform:
    """Where the predictions go: files under --output, or the --output_table BigQuery table."""
    opts = options.view_as(ScoreOptions)
    output_table = options.view_as(PredictionTableOptions).output_table
    if output_table:
        from skewless.beam_pipelines.io.bigquery_sink import WriteArrowToBigQuery

        source_opts = options.view_as(SourceOptions)
        return WriteArrowToBigQuery(
            output_table,
            schema,
            project=source_opts.bigquery_project or options.view_as(GoogleCloudOptions).project,
            endpoint=options.view_as(BigQueryEndpointOptions).bigquery_endpoint,
            method=opts.output_method,
        )
    return WritePredictionFiles(
        os.path.join(opts.output, "predictions", "part"), schema, opts.output_format
    )


def run(argv: Sequence[str] | None = None) -> dict | None:
    """Parse options, check the model, build and run the batch score job; return its summary
    (None after a Dataflow dry run)."""
    configure_logging(batch=True)
    if "--streaming" in (sys.argv[1:] if argv is None else argv):
        # The streaming scorer is its own job (jobs/score_streaming.py); the CLI picks it.
        raise SystemExit(
            "skewless score: --streaming is the streaming scorer: run `skewless score "
            "--streaming ...` (skewless.beam_pipelines.jobs.score_streaming)"
        )
    options = parse_job_options(argv, JOB)
    config = ScoreConfig.from_options(options)
    p = beam.Pipeline(options=options)
    build_pipeline(
        p,
        config.model.fs,
        config.model.handler,
        config.source,
        config.sink,
        WriteDeadLetterFiles(os.path.join(config.dead_letter_dir, "part")),
        config.start_ms,
        config.end_ms,
        config.references,
    )
    return run_and_summarise(p, options, functools.partial(finish, config), LOG)


COUNTED = (
    "records_read", "records_valid", "records_rejected", "records_not_events",
    "examples_outside_period", "examples_scored", "examples_rejected_by_model_inputs",
    "inference_failures", "rows_write_failed",
)  # fmt: skip


def finish(config: ScoreConfig, counters: dict[str, int], elapsed_seconds: float) -> dict:
    """The run's summary, also written to --output/summary.json when scoring to files."""
    fs = config.model.fs
    summary = {
        **{name: counters.get(name, 0) for name in COUNTED},
        "examples": counters.get("examples_joined", 0),
        **reference_summary(config.options, fs, counters),
        "model_dir": config.model_dir,
        "model_version": config.model.handler.version,
        "feature_set": fs.name,
        "period": {"start": config.start, "end": config.end},
        "output": config.output or config.output_table,
        "elapsed_seconds": elapsed_seconds,
    }
    if config.output:
        if not FileSystems.exists(config.output):
            FileSystems.mkdirs(config.output)
        with FileSystems.create(os.path.join(config.output, "summary.json")) as f:
            f.write(json.dumps(summary, indent=2).encode())
    return summary


if __name__ == "__main__":
    launch(JOB, run)
