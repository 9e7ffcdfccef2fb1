"""The prepare job (batch): raw events -> point-in-time-correct examples -> tf.Transform -> TFRecords."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    PipelineOptions,
)
from tensorflow_metadata.proto.v0 import schema_pb2

from skewless.beam_pipelines.io.file_sinks import (
    WriteDeadLetterFiles,
    WriteFeaturesParquet,
)
from skewless.beam_pipelines.io.prepared_examples import (
    ReadPreparedExamples,
    check_example_dirs,
    example_dirs,
)
from skewless.beam_pipelines.runtime.inputs import (
    ReadReferenceIndexes,
    describe_source,
    read_source,
    reference_sources,
    reference_summary,
)
from skewless.beam_pipelines.runtime.job import EMULATOR_ONLY, FLAG_ONLY, Job, Template
from skewless.beam_pipelines.runtime.launch import launch
from skewless.beam_pipelines.runtime.options import (
    BigQueryEndpointOptions,
    FeatureSetOptions,
    OutputDirOptions,
    PeriodOptions,
    SourceOptions,
    feature_set_spec,
    parse_period,
)
from skewless.beam_pipelines.runtime.parsing import (
    parse_job_options,
    run_and_summarise,
)
from skewless.beam_pipelines.runtime.process import before_run, check_output_dir, configure_logging
from skewless.beam_pipelines.training_data import (
    PrepareOptions,
    SplitBatch,
    calibrates,
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
from skewless.transforms.example_schema import (
    features_arrow_schema,
)
from skewless.transforms.examples import (
    BuildExamples,
    CountDuplicateKeys,
    KeepFirstSource,
    SelectPeriod,
)
from skewless.transforms.featureset import FeatureSet, load_feature_set
from skewless.transforms.record_checks import CheckRecords, ms_to_datetime
from skewless.transforms.split import Split

LOG = logging.getLogger("skewless.prepare")
# Benchmarks only (bench/prepare_statistics.py): SKEWLESS_NO_STATISTICS=1 leaves out the
# statistics and the inferred schema, to measure what they cost.
NO_STATISTICS_ENV = "SKEWLESS_NO_STATISTICS"
# summary.json's counts of a run over --examples (ReadPreparedExamples, KeepFirstSource).
EXAMPLES_READ_COUNTS = ("examples_read", "examples_superseded", "examples_superseded_differing")


class ExamplesSourceOptions(PipelineOptions):
    """prepare's other source: examples already built (label-join reads its own)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--examples",
            help="Instead of raw events: examples already built, the features/ of earlier "
            "prepare, label-join or retrain outputs, as comma-separated directories (an entry "
            "may be a glob of directories, e.g. out/labelled/*). An example key held by several "
            "keeps the first directory's example: list label-joined ones first to train on the "
            "features as served where they exist. The tf.Transform pass, statistics and "
            "validation run on them as on new examples; --start/--end select by event time.",
        )


JOB = Job(
    name="prepare",
    summary="batch: raw events -> training data (TFRecords + transform)",
    description="Batch job: read raw events (files or BigQuery), validate them, compute "
    "point-in-time-correct windowed aggregates, analyze and apply the tf.Transform "
    "preprocessing_fn, and write features/ (Parquet), train/ and eval/ (gzip TFRecords), "
    "transform/, statistics/ (of the train and eval examples), schema/, dead_letters/ and "
    "summary.json under --output_dir. With --examples, the examples of earlier prepare or "
    "label-join outputs instead of raw events.",
    groups=(
        PrepareOptions,
        ExamplesSourceOptions,
        PeriodOptions,
        OutputDirOptions,
        SourceOptions,
        BigQueryEndpointOptions,
        FeatureSetOptions,
    ),
    required=("output_dir",),
    template=Template(
        "prepare",
        not_parameters={
            **EMULATOR_ONLY,
            "allow_anomalies": FLAG_ONLY,
            "allow_duplicate_example_keys": FLAG_ONLY,
        },
    ),
)


@dataclass(frozen=True)
class PrepareConfig:
    """Everything a prepare run needs, resolved from its options before any pipeline exists
    (an error here is a one-line usage error): the feature set, the split, the sources, the
    output directory and the optional schema and baseline."""

    fs: FeatureSet
    feature_set_spec: str
    output_dir: str
    split: Split
    period: tuple[int | None, int | None]
    source: beam.PTransform
    input_desc: dict
    references: dict[str, beam.PTransform]
    examples: tuple[str, ...]
    schema: schema_pb2.Schema | None
    statistics: bool
    drift_span: Span | None
    baseline: Baseline | None
    validate_against: str | None
    allow_anomalies: bool
    allow_duplicate_example_keys: bool
    options: PipelineOptions

    @property
    def temp_dir(self) -> str:
        return os.path.join(self.output_dir, "tmp")

    @classmethod
    def from_options(cls, options: PipelineOptions) -> PrepareConfig:
        opts = options.view_as(PrepareOptions)
        output_dir = options.view_as(OutputDirOptions).output_dir
        spec = feature_set_spec(options)
        with before_run():
            fs = load_feature_set(spec)
            statistics = os.environ.get(NO_STATISTICS_ENV, "") in ("", "0")
            if opts.validate_against and not statistics:
                raise ValueError(
                    f"--validate_against needs the statistics ({NO_STATISTICS_ENV} is set)"
                )
            given = options.view_as(ExamplesSourceOptions).examples
            examples = tuple(example_dirs(given)) if given is not None else ()
            if examples:
                _no_raw_sources(options)
                check_example_dirs(list(examples), fs)
            config = cls(
                fs=fs,
                feature_set_spec=spec,
                output_dir=output_dir,
                split=Split.from_settings(fs, opts.eval_start, opts.eval_fraction),
                period=parse_period(
                    options.view_as(PeriodOptions).start, options.view_as(PeriodOptions).end
                ),
                source=ReadPreparedExamples(list(examples), fs)
                if examples
                else read_source(options, fs),
                input_desc={"examples_from": list(examples)}
                if examples
                else describe_source(options, fs),
                references={} if examples else reference_sources(options, fs),
                examples=examples,
                schema=read_schema(opts.schema) if opts.schema else None,
                statistics=statistics,
                drift_span=parse_span(opts.drift_span),
                baseline=load_baseline(opts.validate_against) if opts.validate_against else None,
                validate_against=opts.validate_against,
                allow_anomalies=opts.allow_anomalies,
                allow_duplicate_example_keys=opts.allow_duplicate_example_keys,
                options=options,
            )
            check_output_dir(output_dir, "--output_dir")
        return config


def build_pipeline(p: beam.Pipeline, config: PrepareConfig) -> None:
    """Wire the prepare job: `config.source` yields raw elements (or, with `config.examples`,
    (directory position, example RecordBatch) pairs read back), `config.references` ({table
    name: source}) the rows of the feature set's reference tables; every output lands under
    `config.output_dir`. `config.schema` is written as the run's schema instead of one
    inferred from the train statistics; `statistics=False` (benchmarks only) leaves the
    statistics and the inferred schema out; `config.baseline` checks the statistics of all
    examples against that baseline (validation/)."""
    fs, output_dir, temp_dir, split = config.fs, config.output_dir, config.temp_dir, config.split
    if config.examples:
        examples = p | "ReadExamples" >> config.source
        if config.period != (None, None):
            examples = examples | "SelectPeriod" >> beam.ParDo(SelectPeriod(fs, *config.period))
        if len(config.examples) > 1:
            examples = examples | "KeepFirstSource" >> KeepFirstSource(
                fs, features_arrow_schema(fs)
            )
        else:
            examples = examples | "Batches" >> beam.Values()
    else:
        examples = build_examples(p, config)
    _ = (
        examples
        | "DuplicateKeys" >> CountDuplicateKeys(fs)
        | "WriteDuplicateKeys" >> beam.Map(_write_json, duplicate_keys_path(temp_dir))
    )
    _ = examples | "WriteFeatures" >> WriteFeaturesParquet(
        os.path.join(output_dir, "features", "part"), features_arrow_schema(fs)
    )
    splits = examples | "Split" >> beam.ParDo(SplitBatch(fs, split)).with_outputs(
        "eval", main="train"
    )
    write_statistics_and_schema(p, config, examples, splits)
    transform_and_write(fs, splits, output_dir, temp_dir)


def build_examples(p: beam.Pipeline, config: PrepareConfig):
    """Raw events -> validated, typed (dead letters written) -> example RecordBatches of the
    period (the reference tables joined as of each event)."""
    fs, output_dir, references = config.fs, config.output_dir, config.references
    raw = p | "Read" >> config.source
    events, dead = raw | "Validate" >> CheckRecords(fs, batches=True)
    indexes = None
    if fs.references:
        indexes, reference_dead = p | "References" >> ReadReferenceIndexes(fs, references or {})
        dead = (dead, reference_dead) | "AllDeadLetters" >> beam.Flatten()
    _ = dead | "DeadLetters" >> WriteDeadLetterFiles(
        os.path.join(output_dir, "dead_letters", "part")
    )

    examples = events | "BuildExamples" >> BuildExamples(fs, references=indexes)
    if config.period != (None, None):
        # After the join: events before --start still feed the aggregates of the kept examples.
        examples = examples | "SelectPeriod" >> beam.ParDo(SelectPeriod(fs, *config.period))
    return examples


def _no_raw_sources(options: PipelineOptions) -> None:
    source = options.view_as(SourceOptions)
    given = [flag for flag, value in (
        ("--input", source.input), ("--bigquery_table", source.bigquery_table),
        ("--bigquery_query", source.bigquery_query), ("--reference", source.reference),
    ) if value]  # fmt: skip
    if given:
        raise ValueError(
            f"--examples reads examples already built: {given[0]} does not apply (give one or "
            "the other; reference tables are already joined in the examples)"
        )


def duplicate_keys_path(temp_dir: str) -> str:
    """Where the job leaves CountDuplicateKeys' result for run() (under the temp dir)."""
    return os.path.join(temp_dir, "duplicate_example_keys.json")


def _write_json(value: dict, path: str) -> None:
    with FileSystems.create(path) as f:
        f.write(json.dumps(value).encode())


def duplicate_keys_summary(fs: FeatureSet, found: dict) -> dict:
    """summary.json's account of CountDuplicateKeys' result: the examples that share their
    example key with another, the keys shared, and a sample (values by field, timestamps as
    ISO-8601, and how many examples have the key)."""
    times = {f.name for f in fs.example_fields if f.type == "timestamp"}
    sample = []
    for values, count in found["sample"]:
        key = {
            name: ms_to_datetime(v).isoformat() if name in times and v is not None else v
            for name, v in zip(fs.example_key, values, strict=True)
        }
        sample.append({**key, "examples": count})
    return {
        "duplicate_example_keys": found["examples"],
        "shared_example_keys": found["keys"],
        "duplicate_example_key_sample": sample,
    }


def duplicate_keys_error(fs: FeatureSet, summary: dict) -> str:
    """The one-line refusal of examples that share an example key."""
    first = dict(summary["duplicate_example_key_sample"][0])
    count = first.pop("examples")
    named = ", ".join(f"{k}={v!r}" for k, v in first.items())
    keys = summary["shared_example_keys"]
    return (
        f"{summary['duplicate_example_keys']} examples share their example key with another "
        f"({keys} key{'' if keys == 1 else 's'} shared), e.g. {count} examples with {named}: "
        f"the example_key ({', '.join(fs.example_key)}) of feature set {fs.name!r} must identify "
        f"one event (the hashed split, the report and the audit join by it); declare an "
        f"example_key of example fields that does, or pass --allow_duplicate_example_keys"
    )


def summarize(counters: dict[str, int], **extra) -> dict:
    return {
        "records_read": counters.get("records_read", 0),
        "records_valid": counters.get("records_valid", 0),
        "records_rejected": counters.get("records_rejected", 0),
        "records_not_events": counters.get("records_not_events", 0),
        "events_unlabeled": counters.get("events_unlabeled", 0),
        "examples": counters.get("examples_joined", 0),
        "examples_train": counters.get("examples_train", 0),
        "examples_eval": counters.get("examples_eval", 0),
        "aggregate_blocks": counters.get("aggregate_blocks", 0),
        **extra,
    }


def run(argv: Sequence[str] | None = None) -> dict | None:
    """Parse options, build and run the prepare job; write and return summary.json (None
    after a Dataflow dry run)."""
    configure_logging(batch=True)
    options = parse_job_options(argv, JOB)
    config = PrepareConfig.from_options(options)
    p = beam.Pipeline(options=options)
    build_pipeline(p, config)
    summary = run_and_summarise(p, options, functools.partial(finish, config), LOG)
    if summary is not None:
        refuse(config, summary)
    return summary


def finish(config: PrepareConfig, counters: dict[str, int], elapsed_seconds: float) -> dict:
    """After the run: the summary of its counters and outputs, written to summary.json."""
    fs, output_dir, temp_dir = config.fs, config.output_dir, config.temp_dir
    with FileSystems.open(duplicate_keys_path(temp_dir)) as f:
        duplicates = duplicate_keys_summary(fs, json.loads(f.read()))
    # Recorded like a validation refusal, so a later job can tell refused data from allowed.
    duplicates["duplicate_example_keys_refused"] = bool(
        duplicates["duplicate_example_keys"] and not config.allow_duplicate_example_keys
    )
    extra = {}
    if config.examples:  # examples read back instead of raw events
        extra = {name: counters.get(name, 0) for name in EXAMPLES_READ_COUNTS}
        extra["examples"] = counters.get("examples_train", 0) + counters.get("examples_eval", 0)
    summary = summarize(
        counters,
        **extra,
        **duplicates,
        **({} if config.examples else reference_summary(config.options, fs, counters)),
        feature_set=fs.name,
        feature_set_spec=config.feature_set_spec,
        split=config.split.describe(),
        period=_describe_period(config.period),
        examples_outside_period=counters.get("examples_outside_period", 0),
        statistics=statistics_path(output_dir) if config.statistics else None,
        schema=schema_path(output_dir) if config.statistics or config.schema else None,
        schema_source=_schema_source(config),
        drift_thresholds=drift_thresholds_path(output_dir) if calibrates(config) else None,
        elapsed_seconds=elapsed_seconds,
        versions=library_versions(),
        **config.input_desc,
    )
    if config.baseline is not None:
        summary["validation"] = validation_outcome(
            validation_dir(output_dir), config.validate_against, config.allow_anomalies
        )
    if not FileSystems.exists(output_dir):
        FileSystems.mkdirs(output_dir)
    with FileSystems.create(os.path.join(output_dir, "summary.json")) as f:
        f.write(json.dumps(summary, indent=2).encode())
    if FileSystems.exists(temp_dir):
        FileSystems.delete([temp_dir])
    return summary


def _describe_period(period: tuple[int | None, int | None]) -> dict:
    """summary.json's period: ISO-8601 bounds (None where open)."""
    start, end = period
    return {
        "start": ms_to_datetime(start).isoformat() if start is not None else None,
        "end": ms_to_datetime(end).isoformat() if end is not None else None,
    }


def _schema_source(config: PrepareConfig) -> str | None:
    schema_flag = config.options.view_as(PrepareOptions).schema
    return schema_flag or ("inferred" if config.statistics else None)


def refuse(config: PrepareConfig, summary: dict) -> None:
    """Exit non-zero, after the outputs and summary.json are written, when the data is
    refused: examples sharing an example key, or a blocking anomaly against the baseline."""
    if summary["duplicate_example_keys_refused"]:
        raise SystemExit(duplicate_keys_error(config.fs, summary))
    if summary["duplicate_example_keys"]:
        LOG.warning(
            "%d examples share their example key with another (--allow_duplicate_example_keys): "
            "the report's and the audit's joins by key are ambiguous for them",
            summary["duplicate_example_keys"],
        )
    if summary.get("validation", {}).get("refused"):
        LOG.error(
            "REFUSED: %d blocking anomalies against %s (train refuses this data; "
            "--allow_anomalies to accept it): %s",
            len(summary["validation"]["blocking"]),
            config.validate_against,
            summary["validation"]["report"],
        )
        raise SystemExit(EXIT_BLOCKING)


if __name__ == "__main__":
    launch(JOB, run)
