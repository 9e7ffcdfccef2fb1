"""The audit job (batch): the serving log of streaming scoring against the batch path.

For every event the streaming scorer logged (skewless/beam_pipelines/io/serving_log.py), the audit
rebuilds the example from the raw events by the batch path (BuildExamples, as prepare and
batch score), scores it with the model version the log names through the scoring core, and
compares served and batch features and predictions (skewless/transforms/consistency.py). The report,
`audit.json`, goes to --output_dir; the exit code is 0 when it is clean, 3 when any served
value or prediction differs from its batch recomputation (or an event is missing on either
side), 1 on errors.

Only the raw events that can reach a logged example are read into the batch path: event times
from the earliest logged one minus (serving delay + period + largest window) to the latest.
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
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import AsSingleton, TaggedOutput

from skewless.beam_pipelines.io.file_sinks import WriteDeadLetterFiles
from skewless.beam_pipelines.io.serving_log import ReadServingLog, scan_serving_log
from skewless.beam_pipelines.runtime.inputs import (
    ReadReferenceIndexes,
    read_source,
    reference_sources,
)
from skewless.beam_pipelines.runtime.job import EMULATOR_ONLY, Job, Template
from skewless.beam_pipelines.runtime.launch import launch
from skewless.beam_pipelines.runtime.options import (
    BigQueryEndpointOptions,
    FeatureSetOptions,
    ModelOptions,
    OutputDirOptions,
    ServingLogOptions,
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
    load_model,
)
from skewless.models.handler import SkewlessModelHandler
from skewless.transforms.consistency import (
    audit_report,
    example_key,
    is_sampled,
    logged_key,
    plain,
    sample_threshold,
)
from skewless.transforms.example_schema import example_columns
from skewless.transforms.examples import BuildExamples
from skewless.transforms.featureset import FeatureSet
from skewless.transforms.record_checks import NAMESPACE, CheckRecords

LOG = logging.getLogger("skewless.audit")
EXIT_MISMATCH = 3
REPORT = "audit.json"
NOT_LOGGED = "not_logged"
DESCRIPTION = (
    "Online/offline consistency audit: recompute the events of a streaming scorer's serving "
    "log (--serving_log) by the batch path (the raw events of --input or BigQuery, default the "
    "feature set's bundled input; the same examples as prepare and batch score; the model "
    "version the log names, or --model_version) and write audit.json to --output_dir: per "
    "feature the compared events, mismatch / missing / extra rates and the distribution of "
    "|served - batch|, per prediction the absolute differences, and the events missing on "
    "either side (--serving_log_sample: the fraction the scorer logged). Exit 0 when clean, "
    f"{EXIT_MISMATCH} when anything differs, 1 on errors."
)


# The audit's flags are all shared (options.py): --output_dir, --serving_log*, --model_dir /
# --model_version, the source flags and --feature_set.
GROUPS = (
    OutputDirOptions,
    ServingLogOptions,
    ModelOptions,
    SourceOptions,
    BigQueryEndpointOptions,
    FeatureSetOptions,
)


JOB = Job(
    name="audit",
    summary="batch: the serving log of streaming scoring vs the batch path",
    description=DESCRIPTION,
    groups=GROUPS,
    required=("serving_log", "model_dir", "output_dir"),
    template=Template("audit", not_parameters=dict(EMULATOR_ONLY)),
)


class LogIndex(beam.CombineFn):
    """Serving log records -> {"keys": set of example keys, "start": ms, "end": ms}."""

    def __init__(self, fs: FeatureSet):
        self.fs = fs

    def create_accumulator(self):
        return {"keys": set(), "start": None, "end": None}

    def add_input(self, acc, record):
        acc["keys"].add(logged_key(self.fs, record))
        t = record.get("event_time")
        if t is not None:
            acc["start"] = t if acc["start"] is None else min(acc["start"], t)
            acc["end"] = t if acc["end"] is None else max(acc["end"], t)
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for acc in accs:
            out["keys"] |= acc["keys"]
            for name, pick in (("start", min), ("end", max)):
                if acc[name] is not None:
                    out[name] = acc[name] if out[name] is None else pick(out[name], acc[name])
        return out

    def extract_output(self, acc):
        return acc


class _KeyRecord(beam.DoFn):
    def __init__(self, fs: FeatureSet):
        self.fs = fs

    def setup(self) -> None:
        self._read = Metrics.counter(NAMESPACE, "serving_log_records_read")

    def process(self, record: dict) -> Iterator:
        self._read.inc()
        yield logged_key(self.fs, record), record


class _InSpan(beam.DoFn):
    """Typed event RecordBatches -> the events with event time in [lo, hi]: only they reach a
    logged example."""

    def __init__(self, fs: FeatureSet, lo: int | None, hi: int | None):
        self.fs = fs
        self.lo = lo
        self.hi = hi

    def process(self, batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        times = batch.column(self.fs.event_time).cast(pa.int64())
        keep = pc.and_(
            pc.greater_equal(times, self.lo if self.lo is not None else times),
            pc.less_equal(times, self.hi if self.hi is not None else times),
        )
        selected = batch.filter(keep)
        if selected.num_rows:
            yield selected


class _SelectLogged(beam.DoFn):
    """Example RecordBatches -> the examples of logged keys; to NOT_LOGGED, the keys of the
    examples the sample selects, inside the log's span of event times, missing from the log."""

    def __init__(self, fs: FeatureSet, sample: float):
        self.fs = fs
        self.sample = sample

    def setup(self) -> None:
        self._selected = Metrics.counter(NAMESPACE, "examples_logged")
        self._missing = Metrics.counter(NAMESPACE, "examples_sampled_not_logged")

    def process(self, batch: pa.RecordBatch, index: dict) -> Iterator:
        fs = self.fs
        columns = [batch.column(name).to_pylist() for name in fs.example_key]
        times = batch.column(fs.event_time).cast(pa.int64()).to_pylist()
        keep = []
        for key, t in zip(zip(*columns, strict=True), times, strict=True):
            key = tuple(plain(v) for v in key)
            logged = key in index["keys"]
            keep.append(logged)
            in_span = index["start"] is not None and index["start"] <= t <= index["end"]
            if not logged and in_span and is_sampled(key, self.sample):
                self._missing.inc()
                yield TaggedOutput(NOT_LOGGED, key)
        selected = batch.filter(pa.array(keep, type=pa.bool_()))
        self._selected.inc(selected.num_rows)
        if selected.num_rows:
            yield selected


def _rechunk(batch: pa.RecordBatch, max_rows: int) -> Iterator[pa.RecordBatch]:
    for start in range(0, batch.num_rows, max_rows):
        yield batch.slice(start, max_rows)


class ToAuditRows:
    """Postprocess fn: PredictionResult of a RecordBatch -> [(example key, {"features": every
    example column (log form), "prediction": probability})]."""

    def __init__(self, fs: FeatureSet):
        self.fs = fs
        self.names = [c.name for c in example_columns(fs)]

    def __call__(self, result) -> list:
        batch = result.example
        present = [n for n in self.names if n in batch.schema.names]
        rows = batch.select(present).to_pylist()
        Metrics.counter(NAMESPACE, "examples_scored").inc(batch.num_rows)
        return [
            (
                example_key(self.fs, row),
                {"features": {k: plain(v) for k, v in row.items()}, "prediction": float(p)},
            )
            for row, p in zip(rows, result.inference, strict=True)
        ]


def _pairs(joined) -> Iterator[tuple]:
    _, groups = joined
    batch = list(groups["batch"])
    for record in groups["served"]:
        yield record, (batch[0] if batch else None)


class _Report(beam.DoFn):
    """All (record, batch) pairs -> the report, written to `path` (one element: the sample)."""

    def __init__(self, fs: FeatureSet, model_version: int, path: str):
        self.fs = fs
        self.model_version = model_version
        self.path = path

    def process(self, pairs: list, not_logged: list) -> Iterator[dict]:
        report = audit_report(self.fs, pairs, self.model_version, batch_not_logged=not_logged)
        with FileSystems.create(self.path) as f:
            f.write(json.dumps(report, indent=2, default=str).encode("utf-8"))
        yield report


def build_pipeline(
    p: beam.Pipeline,
    fs: FeatureSet,
    handler: SkewlessModelHandler,
    log_source: beam.PTransform,
    source: beam.PTransform,
    report_path: str,
    dead_letters: beam.PTransform,
    *,
    sample: float = 1.0,
    span: tuple[int | None, int | None] = (None, None),
    references: dict[str, beam.PTransform] | None = None,
) -> None:
    """Wire the audit. `log_source` yields serving log records, `source` raw records (only
    those with event time in `span` are used); the report is written to `report_path`."""
    logged = p | "ReadLog" >> log_source
    index = logged | "LogIndex" >> beam.CombineGlobally(LogIndex(fs))
    served = logged | "KeyLog" >> beam.ParDo(_KeyRecord(fs))

    events, invalid = p | "Read" >> source | "Validate" >> CheckRecords(fs, batches=True)
    events = events | "InSpan" >> beam.ParDo(_InSpan(fs, *span))
    indexes = None
    if fs.references:
        indexes, reference_dead = p | "References" >> ReadReferenceIndexes(fs, references or {})
        invalid = (invalid, reference_dead) | "InvalidAndReferences" >> beam.Flatten()
    examples = events | "BuildExamples" >> BuildExamples(
        fs, require_label=False, references=indexes
    )
    selected = examples | "SelectLogged" >> beam.ParDo(
        _SelectLogged(fs, sample), AsSingleton(index)
    ).with_outputs(NOT_LOGGED, main="logged")
    max_rows = handler.batch_elements_kwargs().get("max_batch_size", 8192)
    scored, failed = (
        selected.logged
        | "Rechunk" >> beam.FlatMap(_rechunk, max_rows)
        | "Score" >> ScoreWithModel(handler, ToAuditRows(fs))
    )
    batch = scored | "AuditRows" >> beam.FlatMap(lambda rows: rows)
    pairs = (
        {"served": served, "batch": batch}
        | "Join" >> beam.CoGroupByKey()
        | "Pairs" >> beam.FlatMap(_pairs)
        | "AllPairs" >> beam.combiners.ToList()
    )
    not_logged = selected[NOT_LOGGED] | "AllNotLogged" >> beam.combiners.ToList()
    _ = pairs | "Report" >> beam.ParDo(
        _Report(fs, handler.version, report_path), AsSingleton(not_logged)
    )
    _ = (invalid, failed) | "AllDeadLetters" >> beam.Flatten() | "DeadLetters" >> dead_letters


def _fail(message: str) -> SystemExit:
    return SystemExit(f"skewless audit: {message}")


@dataclass(frozen=True)
class AuditConfig:
    """An audit resolved from its options before any pipeline exists (every error here is a
    one-line usage error): the serving log and what it holds, the model version it logged,
    the raw events' source and the output directory."""

    serving_log: str
    sample: float
    logged: object  # scan_serving_log's summary: versions, start_ms, end_ms
    model: LoadedVersion
    source: beam.PTransform
    references: dict[str, beam.PTransform]
    output_dir: str

    @property
    def report_path(self) -> str:
        return os.path.join(self.output_dir, REPORT)

    @property
    def span(self) -> tuple[int | None, int | None]:
        """The events the logged examples' aggregates need: from the largest window before
        the first logged event (and its serving delay and a period) to the last."""
        fs, logged = self.model.fs, self.logged
        if logged.start_ms is None:
            return None, logged.end_ms
        lo = logged.start_ms - fs.serving_delay_ms - fs.period_ms - fs.max_window_ms
        return lo, logged.end_ms

    @classmethod
    def from_options(cls, options: PipelineOptions) -> AuditConfig:
        with before_run():
            log_opts = options.view_as(ServingLogOptions)
            model_opts = options.view_as(ModelOptions)
            sample_threshold(log_opts.serving_log_sample)
            logged = scan_serving_log(log_opts.serving_log)
            version = model_opts.model_version
            if version is None:
                if not logged.versions:
                    raise _fail(f"--serving_log {log_opts.serving_log!r} has no records")
                version = max(logged.versions)
            try:
                model = load_model(
                    model_opts.model_dir,
                    version,
                    options.view_as(FeatureSetOptions).feature_set,
                    min_batch_size=model_opts.min_batch_size,
                    max_batch_size=model_opts.max_batch_size,
                )
            except MODEL_ERRORS as exc:
                raise _fail(str(exc)) from None
            output_dir = options.view_as(OutputDirOptions).output_dir
            check_output_dir(output_dir, "--output_dir")
            return cls(
                serving_log=log_opts.serving_log,
                sample=log_opts.serving_log_sample,
                logged=logged,
                model=model,
                source=read_source(options, model.fs),
                references=reference_sources(options, model.fs),
                output_dir=output_dir,
            )


def run_audit(argv: Sequence[str] | None = None) -> dict | None:
    """Parse options, check the log and the model, build and run the audit; return the report
    (None for a dry run)."""
    configure_logging(batch=True)
    options = parse_job_options(argv, JOB)
    config = AuditConfig.from_options(options)
    if not FileSystems.exists(config.output_dir):
        FileSystems.mkdirs(config.output_dir)
    p = beam.Pipeline(options=options)
    build_pipeline(
        p,
        config.model.fs,
        config.model.handler,
        ReadServingLog(config.serving_log),
        config.source,
        config.report_path,
        WriteDeadLetterFiles(os.path.join(config.output_dir, "dead_letters", "part")),
        sample=config.sample,
        span=config.span,
        references=config.references,
    )
    return run_and_summarise(
        p,
        options,
        functools.partial(finish, config),
        LOG,
        shown=lambda report: {k: report[k] for k in ("compared", "feature_mismatches", "clean")},
    )


COUNTED = (
    "serving_log_records_read", "records_read", "records_rejected", "examples_logged",
    "examples_sampled_not_logged", "examples_scored", "examples_rejected_by_model_inputs",
    "inference_failures",
)  # fmt: skip


def finish(config: AuditConfig, counters: dict[str, int], elapsed_seconds: float) -> dict:
    """The report the pipeline wrote, with the run's counters added, written back."""
    with FileSystems.open(config.report_path) as f:
        report = json.loads(f.read())
    report["counters"] = {name: counters.get(name, 0) for name in COUNTED}
    report["serving_log"] = config.serving_log
    report["logged_model_versions"] = {str(v): n for v, n in sorted(config.logged.versions.items())}
    report["elapsed_seconds"] = elapsed_seconds
    with FileSystems.create(config.report_path) as f:
        f.write(json.dumps(report, indent=2, default=str).encode("utf-8"))
    return report


def run(argv: Sequence[str] | None = None) -> dict | None:
    """`skewless audit`: the report, and exit code 3 when it is not clean."""
    report = run_audit(argv)
    if report is not None and not report["clean"]:
        bad = sorted(n for n, f in report["features"].items() if f["mismatches"])
        print(
            f"skewless audit: served values differ from the batch path: features {bad}, "
            f"{report['prediction']['mismatches']} prediction(s), "
            f"{report['logged_without_batch_example']} logged event(s) without a batch example, "
            f"{report['batch_examples_not_logged']} sampled example(s) not logged",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_MISMATCH)
    return report


if __name__ == "__main__":
    launch(JOB, run)
