"""The label-join job (batch): the serving log of streaming scoring joined with the labels
that arrived later -> training data of what was actually served, in prepare's layout.

Labels land hours after a prediction (a flight's arrival delay is known when it lands). This
job reads the serving log (skewless/beam_pipelines/io/serving_log.py: the features as served,
the prediction, the model version, the example key) and a label source (label files or a
BigQuery table with the example key, the label and its arrival time; by default the feature
set's own raw events, whose `label_time` says when each label arrives), joins each served
example with the label that arrived within --label_window of its serving (the rules:
skewless/transforms/label_join.py), and writes what prepare writes: features/ (Parquet, plus
the prediction and model_version columns), the tf.Transform pass (transform/, train/, eval/),
statistics/, schema/, dead_letters/ and summary.json, so `skewless train --prepared_dir` and
`skewless report` read it like prepare's output, written by the same stages as prepare's
(skewless/beam_pipelines/training_data.py).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import TaggedOutput
from tensorflow_metadata.proto.v0 import schema_pb2

from skewless.beam_pipelines.io.file_sinks import WriteDeadLetterFiles, WriteFeaturesParquet
from skewless.beam_pipelines.io.file_sources import ReadRawFiles
from skewless.beam_pipelines.io.files import check_input
from skewless.beam_pipelines.io.serving_log import ReadServingLog, log_glob
from skewless.beam_pipelines.runtime.inputs import bigquery_source, describe_source, read_source
from skewless.beam_pipelines.runtime.job import EMULATOR_ONLY, FLAG_ONLY, Job, Template
from skewless.beam_pipelines.runtime.launch import launch
from skewless.beam_pipelines.runtime.options import (
    BigQueryEndpointOptions,
    FeatureSetOptions,
    OutputDirOptions,
    ServingLogOptions,
    SourceOptions,
    feature_set_spec,
)
from skewless.beam_pipelines.runtime.parsing import (
    is_dry_run,
    parse_job_options,
    run_and_summarise,
)
from skewless.beam_pipelines.runtime.process import before_run, check_output_dir, configure_logging
from skewless.beam_pipelines.training_data import (
    PrepareOptions,
    SplitBatch,
    library_versions,
    transform_and_write,
    validation_dir,
    write_statistics_and_schema,
)
from skewless.beam_pipelines.validation.baseline import (
    EXIT_BLOCKING,
    Baseline,
    load_baseline,
    validation_outcome,
)
from skewless.beam_pipelines.validation.files import (
    drift_thresholds_path,
    read_schema,
    schema_path,
    statistics_path,
)
from skewless.transforms.drift_calibration import Span, parse_span
from skewless.transforms.example_schema import example_columns, features_arrow_schema
from skewless.transforms.featureset import FeatureSet, load_feature_set
from skewless.transforms.label_join import (
    EXTRA_COLUMNS,
    LABEL_TIME,
    MODEL_VERSION,
    PREDICTION,
    event_label,
    join_key,
    label_of,
    label_window_ms,
    labels_feature_set,
)
from skewless.transforms.record_checks import (
    DEAD,
    NAMESPACE,
    CheckRecords,
    dead_letter,
    event_records,
)
from skewless.transforms.split import Split

LOG = logging.getLogger("skewless.label_join")
BATCH_ROWS = 4096  # examples per RecordBatch of features/ and the tf.Transform input
DESCRIPTION = (
    "Batch job: join the serving log of streaming scoring (--serving_log: the features as "
    "served, the prediction, the model version) with the labels that arrived later: label "
    "files (--label_files: CSV, JSON lines or Parquet with the example key fields, the label and "
    "--label_time_field), a BigQuery table (--label_bigquery_table), or by default the feature "
    "set's raw events (--input / --bigquery_*, default the bundled input; the feature set's "
    "label_time says when each label arrives). A label arriving at most --label_window after "
    "its prediction's serving time (the record's event time; the window's end included) is "
    "joined; later ones are counted late; of two on-time labels the latest arriving is kept. "
    "Writes prepare's layout under --output_dir (features/ with prediction and model_version "
    "columns, transform/, train/, eval/, statistics/, schema/, dead_letters/, summary.json) "
    "for `skewless train --prepared_dir`."
)


class LabelJoinOptions(PipelineOptions):
    """label-join's own flags; the split, schema and validation flags are prepare's
    (PrepareOptions), the log, source and feature-set flags shared (options.py)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--label_window",
            help="How long after a prediction's serving time its label may arrive and still be "
            "joined: '6h', '90m', '2d' or seconds (required). A label arriving exactly at the "
            "window's end is joined; one later is counted late.",
        )
        parser.add_argument(
            "--label_files",
            help="Label files (local or gs:// path or glob; CSV, JSON lines or Parquet): one "
            "row per label with the feature set's example key fields, its label field and "
            "--label_time_field. Default: the labels of the raw events (--input/--bigquery_*).",
        )
        parser.add_argument(
            "--label_bigquery_table",
            help="Read the labels from this BigQuery table (project.dataset.table; the columns "
            "of --label_files) with the --bigquery_* project and endpoints.",
        )
        parser.add_argument(
            "--label_time_field",
            default=LABEL_TIME,
            help=f"The labels' arrival-time column (a timestamp; default {LABEL_TIME}).",
        )


JOB = Job(
    name="label-join",
    summary="batch: serving log + late labels -> training data of what was served",
    description=DESCRIPTION,
    groups=(
        LabelJoinOptions,
        PrepareOptions,
        OutputDirOptions,
        ServingLogOptions,
        SourceOptions,
        BigQueryEndpointOptions,
        FeatureSetOptions,
    ),
    required=("serving_log", "label_window", "output_dir"),
    template=Template(
        "label_join",
        not_parameters={
            **EMULATOR_ONLY,
            "allow_anomalies": FLAG_ONLY,
            "allow_duplicate_example_keys": FLAG_ONLY,
            "reference": "the served features already hold the reference tables' columns",
            "serving_log_sample": "the scorer's sampling: label-join reads every logged event",
            "serving_log_window_s": "the scorer's log files: label-join reads every logged event",
        },
    ),
)


# --- the label sources -------------------------------------------------------------------------


class ReadLabels(beam.PTransform):
    """Raw label rows (files or BigQuery) -> ((example key, (arrival ms, label)), dead
    letters), checked against labels_feature_set (counters labels_read / _valid / _rejected)."""

    def __init__(self, fs: FeatureSet, source: beam.PTransform, time_field: str):
        super().__init__()
        self.fs = fs
        self.source = source
        self.time_field = time_field

    def expand(self, pbegin):
        fs, time_field = self.fs, self.time_field
        rows = pbegin | "Read" >> self.source
        labels, dead = rows | "Check" >> CheckRecords(
            labels_feature_set(fs, time_field), counters="labels"
        )
        return labels | "Key" >> beam.Map(lambda r: label_of(fs, r, time_field)), dead


class _EventLabels(beam.DoFn):
    def __init__(self, fs: FeatureSet):
        self.fs = fs

    def setup(self) -> None:
        self._labels = Metrics.counter(NAMESPACE, "labels_read")
        self._none = Metrics.counter(NAMESPACE, "events_without_label")

    def process(self, event: dict) -> Iterator:
        label = event_label(self.fs, event)
        if label is None:
            self._none.inc()
            return
        self._labels.inc()
        yield label


class LabelsFromEvents(beam.PTransform):
    """Raw events -> ((example key, (arrival ms, label)), dead letters): each event's label,
    arriving at the feature set's `label_time` (counters records_* and labels_read; an event
    without a label or its time counts as events_without_label)."""

    def __init__(self, fs: FeatureSet, source: beam.PTransform):
        super().__init__()
        self.fs = fs
        self.source = source

    def expand(self, pbegin):
        read = pbegin | "Read" >> self.source
        events, dead = read | "Validate" >> CheckRecords(self.fs, batches=True)
        one_by_one = events | "Events" >> beam.FlatMap(event_records)
        return one_by_one | "Labels" >> beam.ParDo(_EventLabels(self.fs)), dead


# --- the join ------------------------------------------------------------------------------------


class _KeyServed(beam.DoFn):
    """Serving log records -> (example key, record); a record without an example key or event
    time to dead letters."""

    def __init__(self, fs: FeatureSet):
        self.fs = fs

    def setup(self) -> None:
        self._read = Metrics.counter(NAMESPACE, "serving_log_records_read")
        self._rejected = Metrics.counter(NAMESPACE, "serving_log_records_rejected")

    def process(self, record) -> Iterator:
        from skewless.transforms.consistency import logged_key

        self._read.inc()
        problem = None
        if not isinstance(record, dict):
            problem = f"a serving log line is a {type(record).__name__}, expected a JSON object"
        elif not isinstance(record.get("event_time"), int):
            problem = "serving log record has no integer 'event_time' (epoch ms)"
        else:
            key = logged_key(self.fs, record)
            missing = [n for n, v in zip(self.fs.example_key, key, strict=True) if v is None]
            if missing:
                problem = f"serving log record's example_key lacks {missing}"
        if problem is not None:
            self._rejected.inc()
            yield TaggedOutput(DEAD, dead_letter("serving_log", problem, record, self.fs.name))
            return
        yield key, record


class _JoinLabels(beam.DoFn):
    """(key, {"served": records, "labels": labels}) -> labelled example dicts, counting every
    outcome (join_key's counts are the job's counters of the same names)."""

    COUNTS = (
        "examples_served",
        "examples_labelled",
        "examples_not_yet_labelled",
        "examples_labelled_late",
        "labels_late",
        "labels_duplicate",
        "labels_without_prediction",
        "serving_log_duplicates",
    )

    def __init__(self, fs: FeatureSet, window_ms: int):
        self.fs = fs
        self.window_ms = window_ms

    def setup(self) -> None:
        self._counters = {name: Metrics.counter(NAMESPACE, name) for name in self.COUNTS}
        self._rejected = Metrics.counter(NAMESPACE, "serving_log_records_rejected")

    def process(self, element) -> Iterator:
        _, groups = element
        served = list(groups["served"])
        try:
            example, counts = join_key(self.fs, served, groups["labels"], self.window_ms)
        except (ValueError, TypeError, KeyError) as exc:  # InvalidRecord is a ValueError
            self._rejected.inc(len(served))
            reason = f"{type(exc).__name__}: {exc}"
            for record in served:
                yield TaggedOutput(DEAD, dead_letter("label_join", reason, record, self.fs.name))
            return
        for name, count in counts.items():
            if count:
                self._counters[name].inc(count)
        if example is not None:
            yield example


def joined_arrow_schema(fs: FeatureSet) -> pa.Schema:
    """features/ of label-join: prepare's columns, then the prediction and its model version."""
    schema = features_arrow_schema(fs)
    schema = schema.append(pa.field(PREDICTION, pa.float64(), nullable=False))
    return schema.append(pa.field(MODEL_VERSION, pa.int64(), nullable=False))


class _ToRecordBatches(beam.DoFn):
    """Lists of example dicts -> RecordBatches of joined_arrow_schema; an example whose values
    do not fit the feature set's types to dead letters (the batch is retried row by row)."""

    def __init__(self, fs: FeatureSet):
        self.fs = fs

    def setup(self) -> None:
        self._schema = joined_arrow_schema(self.fs)
        self._joined = Metrics.counter(NAMESPACE, "examples_joined")
        self._rejected = Metrics.counter(NAMESPACE, "examples_rejected")

    def process(self, examples: list[dict]) -> Iterator:
        try:
            batch = pa.RecordBatch.from_pylist(examples, schema=self._schema)
        except (pa.ArrowException, ValueError, TypeError, OverflowError):
            rows = []
            for example in examples:
                try:
                    pa.RecordBatch.from_pylist([example], schema=self._schema)
                    rows.append(example)
                except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
                    self._rejected.inc()
                    reason = f"served features do not fit the feature set's types: {exc}"
                    yield TaggedOutput(
                        DEAD, dead_letter("label_join", reason, example, self.fs.name)
                    )
            if not rows:
                return
            batch = pa.RecordBatch.from_pylist(rows, schema=self._schema)
        self._joined.inc(batch.num_rows)
        yield batch


def _feature_columns(batch: pa.RecordBatch, names: tuple[str, ...]) -> pa.RecordBatch:
    return batch.select(list(names))


def build_pipeline(
    p: beam.Pipeline,
    config: LabelJoinConfig,
    log_source: beam.PTransform | None = None,
    labels: beam.PTransform | None = None,
) -> None:
    """Wire the label join: `log_source` yields serving log records (default: the files of
    config.serving_log), `labels` ((key, (arrival ms, label)), dead letters) (default:
    config.labels); every output lands under config.output_dir, written by prepare's steps."""
    fs, output_dir = config.fs, config.output_dir
    logged = p | "ReadLog" >> (log_source or ReadServingLog(config.serving_log))
    served = logged | "KeyLog" >> beam.ParDo(_KeyServed(fs)).with_outputs(DEAD, main="served")
    arrived, label_dead = p | "ReadLabels" >> (labels or config.labels)
    joined = (
        {"served": served.served, "labels": arrived}
        | "Join" >> beam.CoGroupByKey()
        | "LabelJoin"
        >> beam.ParDo(_JoinLabels(fs, config.window_ms)).with_outputs(DEAD, main="examples")
    )
    batches = (
        joined.examples
        | "Batch" >> beam.BatchElements(min_batch_size=BATCH_ROWS, max_batch_size=BATCH_ROWS)
        | "ToRecordBatches" >> beam.ParDo(_ToRecordBatches(fs)).with_outputs(DEAD, main="batches")
    )
    _ = (
        (served[DEAD], label_dead, joined[DEAD], batches[DEAD])
        | "AllDeadLetters" >> beam.Flatten()
        | "DeadLetters" >> WriteDeadLetterFiles(os.path.join(output_dir, "dead_letters", "part"))
    )
    _ = batches.batches | "WriteFeatures" >> WriteFeaturesParquet(
        os.path.join(output_dir, "features", "part"), joined_arrow_schema(fs)
    )
    # Statistics, schema and tf.Transform see prepare's columns only: the same schema as a
    # prepare run's, so either validates against the other.
    names = tuple(c.name for c in example_columns(fs))
    examples = batches.batches | "FeatureColumns" >> beam.Map(_feature_columns, names)
    splits = examples | "Split" >> beam.ParDo(SplitBatch(fs, config.split)).with_outputs(
        "eval", main="train"
    )
    write_statistics_and_schema(p, config, examples, splits)
    transform_and_write(fs, splits, output_dir, config.temp_dir)


# --- configuration and run -----------------------------------------------------------------------


def _fail(message: str) -> ValueError:
    return ValueError(f"skewless label-join: {message}")


@dataclass(frozen=True)
class LabelJoinConfig:
    """A label join resolved from its options before any pipeline exists (an error here is a
    one-line usage error). It carries the attributes prepare's writing steps read
    (write_statistics_and_schema), so they run unchanged."""

    fs: FeatureSet
    feature_set_spec: str
    output_dir: str
    serving_log: str
    labels: beam.PTransform
    labels_desc: dict
    window_ms: int
    split: Split
    schema: schema_pb2.Schema | None
    drift_span: Span | None
    baseline: Baseline | None
    validate_against: str | None
    allow_anomalies: bool
    options: PipelineOptions
    statistics: bool = True

    @property
    def temp_dir(self) -> str:
        return os.path.join(self.output_dir, "tmp")

    @classmethod
    def from_options(cls, options: PipelineOptions) -> LabelJoinConfig:
        opts = options.view_as(LabelJoinOptions)
        prep = options.view_as(PrepareOptions)
        log = options.view_as(ServingLogOptions).serving_log
        output_dir = options.view_as(OutputDirOptions).output_dir
        spec = feature_set_spec(options)
        with before_run():
            if prep.allow_duplicate_example_keys:
                raise _fail(
                    "--allow_duplicate_example_keys does not apply: the join groups by example "
                    "key, so every example of its output has its own"
                )
            if options.view_as(SourceOptions).reference:
                raise _fail(
                    "--reference does not apply: the served features already hold the "
                    "reference tables' columns"
                )
            fs = load_feature_set(spec)
            window_ms = label_window_ms(opts.label_window)
            if not is_dry_run(options) and not FileSystems.match([log_glob(log)])[0].metadata_list:
                raise _fail(f"--serving_log {log!r}: no serving log files ({log_glob(log)})")
            labels, labels_desc = label_source(options, fs)
            config = cls(
                fs=fs,
                feature_set_spec=spec,
                output_dir=output_dir,
                serving_log=log,
                labels=labels,
                labels_desc=labels_desc,
                window_ms=window_ms,
                split=Split.from_settings(fs, prep.eval_start, prep.eval_fraction),
                schema=read_schema(prep.schema) if prep.schema else None,
                drift_span=parse_span(prep.drift_span),
                baseline=load_baseline(prep.validate_against) if prep.validate_against else None,
                validate_against=prep.validate_against,
                allow_anomalies=prep.allow_anomalies,
                options=options,
            )
            check_output_dir(output_dir, "--output_dir")
        return config


def label_source(options: PipelineOptions, fs: FeatureSet) -> tuple[beam.PTransform, dict]:
    """(the labels' PTransform, their description for summary.json), from the options: label
    files, a BigQuery label table, or the raw events' labels; inputs checked now."""
    opts = options.view_as(LabelJoinOptions)
    src = options.view_as(SourceOptions)
    raw_given = src.input or src.bigquery_table or src.bigquery_query
    if opts.label_files and opts.label_bigquery_table:
        raise _fail("give --label_files or --label_bigquery_table, not both")
    if (opts.label_files or opts.label_bigquery_table) and raw_given:
        raise _fail(
            "--input/--bigquery_table/--bigquery_query name raw events, which are the labels "
            "only without --label_files or --label_bigquery_table: give one label source"
        )
    if opts.label_files or opts.label_bigquery_table:
        label_fs = labels_feature_set(fs, opts.label_time_field)
        if opts.label_files:
            if not is_dry_run(options):
                check_input(opts.label_files, src.input_format, label_fs)
            source = ReadRawFiles(opts.label_files, src.input_format, fs=label_fs)
            desc = {"label_files": opts.label_files}
        else:
            source = bigquery_source(options, label_fs, opts.label_bigquery_table)
            desc = {"label_bigquery_table": opts.label_bigquery_table}
        desc["label_time_field"] = opts.label_time_field
        return ReadLabels(fs, source, opts.label_time_field), desc
    if fs.label_time is None:
        raise _fail(
            f"feature set {fs.name!r} declares no label_time (when a raw event's label becomes "
            "known): give --label_files or --label_bigquery_table"
        )
    desc = {"labels_from_events": describe_source(options, fs)}
    return LabelsFromEvents(fs, read_source(options, fs)), desc


COUNTED = (
    "serving_log_records_read",
    "serving_log_records_rejected",
    "serving_log_duplicates",
    "examples_served",
    "examples_labelled",
    "examples_not_yet_labelled",
    "examples_labelled_late",
    "examples_rejected",
    "labels_read",
    "labels_valid",
    "labels_rejected",
    "labels_late",
    "labels_duplicate",
    "labels_without_prediction",
    "records_read",
    "records_rejected",
    "events_without_label",
    "examples_joined",
    "examples_train",
    "examples_eval",
)


FILE_COUNTS = ("labels_valid", "labels_rejected")
EVENT_COUNTS = ("records_read", "records_rejected", "events_without_label")


def finish(config: LabelJoinConfig, counters: dict[str, int], elapsed_seconds: float) -> dict:
    """After the run: the counts and outputs, written to summary.json (prepare's keys where
    train and report read them)."""
    fs, output_dir = config.fs, config.output_dir
    # The counters of the other kind of label source do not apply.
    skip = FILE_COUNTS if "labels_from_events" in config.labels_desc else EVENT_COUNTS
    counts = {name: counters.get(name, 0) for name in COUNTED if name not in skip}
    summary = {
        **counts,
        "examples": counts["examples_joined"],
        "duplicate_example_keys": 0,
        "duplicate_example_keys_refused": False,
        "extra_columns": list(EXTRA_COLUMNS),
        "serving_log": config.serving_log,
        **config.labels_desc,
        "label_window_s": config.window_ms // 1000,
        "label_window_end": "included",
        "serving_time": "event_time",
        "feature_set": fs.name,
        "feature_set_spec": config.feature_set_spec,
        "split": config.split.describe(),
        "statistics": statistics_path(output_dir),
        "schema": schema_path(output_dir),
        "schema_source": config.options.view_as(PrepareOptions).schema or "inferred",
        "drift_thresholds": drift_thresholds_path(output_dir)
        if config.schema is None and config.drift_span is not None
        else None,
        "elapsed_seconds": elapsed_seconds,
        "versions": library_versions(),
    }
    if config.baseline is not None:
        summary["validation"] = validation_outcome(
            validation_dir(output_dir), config.validate_against, config.allow_anomalies
        )
    if not FileSystems.exists(output_dir):
        FileSystems.mkdirs(output_dir)
    with FileSystems.create(os.path.join(output_dir, "summary.json")) as f:
        f.write(json.dumps(summary, indent=2).encode())
    if FileSystems.exists(config.temp_dir):
        FileSystems.delete([config.temp_dir])
    return summary


def run(argv: Sequence[str] | None = None) -> dict | None:
    """Parse options, build and run the label join; write and return summary.json (None after
    a Dataflow dry run). Exits EXIT_BLOCKING after a blocking anomaly (--validate_against)."""
    configure_logging(batch=True)
    options = parse_job_options(argv, JOB)
    config = LabelJoinConfig.from_options(options)
    p = beam.Pipeline(options=options)
    build_pipeline(p, config)
    summary = run_and_summarise(p, options, functools.partial(finish, config), LOG)
    if summary is not None and summary["examples"]:
        for split in ("train", "eval"):
            if not summary[f"examples_{split}"]:
                LOG.warning(
                    "no %s examples: the split %s puts every joined example in the other one; "
                    "train needs both (--eval_start / --eval_fraction choose another split)",
                    split,
                    json.dumps(summary["split"]),
                )
    if summary is not None and summary.get("validation", {}).get("refused"):
        LOG.error(
            "REFUSED: %d blocking anomalies against %s (--allow_anomalies to accept): %s",
            len(summary["validation"]["blocking"]),
            config.validate_against,
            summary["validation"]["report"],
        )
        raise SystemExit(EXIT_BLOCKING)
    return summary


if __name__ == "__main__":
    launch(JOB, run)
