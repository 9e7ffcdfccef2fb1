"""The prepare job (batch): raw events -> point-in-time-correct examples -> tf.Transform -> TFRecords."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import tensorflow_transform.beam as tft_beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    PipelineOptions,
)
from apache_beam.pvalue import TaggedOutput
from tensorflow_metadata.proto.v0 import schema_pb2

from beam_pipelines.baseline_check import (
    EXIT_BLOCKING,
    FEATURES,
    Baseline,
    load_baseline,
    validation_outcome,
)
from beam_pipelines.common import (
    before_run,
    check_output_dir,
    configure_logging,
    is_dry_run,
    metric_counters,
    parse_job_options,
)
from beam_pipelines.io.sinks import WriteDeadLetters, WriteFeaturesParquet, WriteTFRecords
from beam_pipelines.io.sources import (
    ReadReferenceIndexes,
    describe_source,
    read_source,
    reference_sources,
    reference_summary,
)
from beam_pipelines.io.statistics_io import read_schema, schema_path, statistics_path
from beam_pipelines.io.validation_io import CheckAgainstBaseline, WriteSchema, WriteStatistics
from beam_pipelines.options import (
    FeatureSetOptions,
    OutputDirOptions,
    SourceOptions,
    feature_set_spec,
)
from transforms.example_schema import (
    features_arrow_schema,
    tft_tensor_adapter_config,
    to_tft_record_batch,
)
from transforms.examples import BuildExamples, CountDuplicateKeys
from transforms.featureset import FeatureSet, load_feature_set
from transforms.split import Split
from transforms.statistics import infer_schema
from transforms.statistics_fn import ComputeStatistics
from transforms.validation import ValidateRecords, ms_to_datetime

LOG = logging.getLogger("skewless.prepare")
DESCRIPTION = (
    "Batch job: read raw events (files or BigQuery), validate them, compute point-in-time-correct "
    "windowed aggregates, analyze and apply the tf.Transform preprocessing_fn, and write "
    "features/ (Parquet), train/ and eval/ (gzip TFRecords), transform/, statistics/ (of the "
    "train and eval examples), schema/, dead_letters/ and summary.json under --output_dir."
)
# Benchmarks only (bench/prepare_statistics.py): SKEWLESS_NO_STATISTICS=1 leaves out the
# statistics and the inferred schema, to measure what they cost.
NO_STATISTICS_ENV = "SKEWLESS_NO_STATISTICS"


class PrepareOptions(PipelineOptions):
    """prepare's own flags; --output_dir, --input/--bigquery_* and --feature_set are in
    options.py."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--eval_start",
            help="Time split: examples with event time at or after this ISO-8601 instant go to "
            "eval/. Default: the feature set's eval_start, else a hashed split of its "
            "eval_fraction.",
        )
        parser.add_argument(
            "--eval_fraction",
            type=float,
            help="Hashed split: this fraction of examples (by a stable hash of the example key) "
            "goes to eval/. Overrides the time split.",
        )
        parser.add_argument(
            "--schema",
            help="A schema.pbtxt to keep (for example one from an earlier run, edited): copied to "
            "schema/schema.pbtxt instead of inferring a schema from the train statistics.",
        )
        parser.add_argument(
            "--validate_against",
            help="A prepared directory (its statistics/ and schema/) to validate this run's "
            "examples against, as `skewless validate` does: anomalies in validation/; on a blocking "
            f"one summary.json records the refusal and the job exits {EXIT_BLOCKING}.",
        )
        parser.add_argument(
            "--allow_anomalies",
            action="store_true",
            help="With --validate_against: record blocking anomalies without refusing the data.",
        )
        parser.add_argument(
            "--allow_duplicate_example_keys",
            action="store_true",
            help="Finish even when examples share an example key (summary.json counts them; "
            "the report's and the audit's joins by key are then ambiguous). Default: fail.",
        )


class ToTFTBatches(beam.PTransform):
    """Day-sized example batches -> tf.Transform input batches of about `rows` rows.

    Every tf.Transform batch is one call into the TF graph; a few large batches beat hundreds
    of small ones.
    """

    def __init__(self, fs: FeatureSet, batches: int = 32):
        super().__init__()
        self.fs = fs
        self.batches = batches

    def expand(self, pcoll):
        fs = self.fs
        return (
            pcoll
            | "Group"
            >> beam.BatchElements(min_batch_size=self.batches, max_batch_size=self.batches)
            | "Concat"
            >> beam.Map(lambda bs: pa.Table.from_batches(bs).combine_chunks().to_batches()[0])
            | "ToListColumns" >> beam.Map(lambda b: to_tft_record_batch(fs, b))
        )


class _SplitBatch(beam.DoFn):
    def __init__(self, fs: FeatureSet, split: Split):
        self.fs = fs
        self.split = split

    def process(self, batch: pa.RecordBatch):
        is_eval = self.split.is_eval(self.fs, batch)
        train = batch.filter(pc.invert(is_eval))
        evaluation = batch.filter(is_eval)
        if train.num_rows:
            yield train
        if evaluation.num_rows:
            yield TaggedOutput("eval", evaluation)


def build_pipeline(
    p: beam.Pipeline,
    fs: FeatureSet,
    output_dir: str,
    source: beam.PTransform,
    split: Split,
    temp_dir: str,
    references: dict[str, beam.PTransform] | None = None,
    schema: schema_pb2.Schema | None = None,
    statistics: bool = True,
    validate_against: Baseline | None = None,
) -> None:
    """Wire the prepare job. `source` yields raw elements, `references` ({table name: source})
    the rows of the feature set's reference tables; every output lands under output_dir.

    `schema` is written as the run's schema instead of one inferred from the train statistics;
    `statistics=False` (benchmarks only) leaves the statistics and the inferred schema out;
    `validate_against` checks the statistics of all examples against that baseline
    (validation/)."""
    raw = p | "Read" >> source
    events, dead = raw | "Validate" >> ValidateRecords(fs)
    indexes = None
    if fs.references:
        indexes, reference_dead = p | "References" >> ReadReferenceIndexes(fs, references or {})
        dead = (dead, reference_dead) | "AllDeadLetters" >> beam.Flatten()
    _ = dead | "DeadLetters" >> WriteDeadLetters(os.path.join(output_dir, "dead_letters", "part"))

    examples = events | "BuildExamples" >> BuildExamples(fs, references=indexes)
    _ = (
        examples
        | "DuplicateKeys" >> CountDuplicateKeys(fs)
        | "WriteDuplicateKeys" >> beam.Map(_write_json, duplicate_keys_path(temp_dir))
    )
    _ = examples | "WriteFeatures" >> WriteFeaturesParquet(
        os.path.join(output_dir, "features", "part"), features_arrow_schema(fs)
    )
    splits = examples | "Split" >> beam.ParDo(_SplitBatch(fs, split)).with_outputs(
        "eval", main="train"
    )
    if statistics:
        train_stats = splits.train | "TrainStatistics" >> ComputeStatistics("train")
        eval_stats = splits.eval | "EvalStatistics" >> ComputeStatistics("eval")
        _ = (
            (train_stats, eval_stats)
            | "BothStatistics" >> beam.Flatten()
            | "WriteStatistics" >> WriteStatistics(statistics_path(output_dir), ("train", "eval"))
        )
    if validate_against is not None:
        # All examples of the run, whatever the split (a time split may put them all in eval).
        new_stats = examples | "ExampleStatistics" >> ComputeStatistics("examples")
        _ = new_stats | "ValidateAgainst" >> CheckAgainstBaseline(
            validate_against, fs, FEATURES, validation_dir(output_dir),
            f"skewless prepare: {output_dir} against {validate_against.directory}",
        )  # fmt: skip
    if schema is not None:
        schemas = p | "GivenSchema" >> beam.Create([schema])
    elif statistics:
        schemas = train_stats | "InferSchema" >> beam.Map(infer_schema)
    else:
        schemas = None
    if schemas is not None:
        _ = schemas | "WriteSchema" >> WriteSchema(schema_path(output_dir))
    adapter = tft_tensor_adapter_config(fs)
    with tft_beam.Context(temp_dir=temp_dir):
        train = splits.train | "TrainToTFT" >> ToTFTBatches(fs)
        evaluation = splits.eval | "EvalToTFT" >> ToTFTBatches(fs)
        (train_out, _), transform_fn = (
            train,
            adapter,
        ) | "AnalyzeAndTransform" >> tft_beam.AnalyzeAndTransformDataset(
            fs.preprocessing_fn, output_record_batches=True
        )
        eval_out, _ = (
            (evaluation, adapter),
            transform_fn,
        ) | "TransformEval" >> tft_beam.TransformDataset(output_record_batches=True)
        _ = transform_fn | "WriteTransform" >> tft_beam.WriteTransformFn(
            os.path.join(output_dir, "transform")
        )
    _ = train_out | "WriteTrain" >> WriteTFRecords(
        os.path.join(output_dir, "train", "part"), "examples_train"
    )
    _ = eval_out | "WriteEval" >> WriteTFRecords(
        os.path.join(output_dir, "eval", "part"), "examples_eval"
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
        "examples": counters.get("examples_joined", 0),
        "examples_train": counters.get("examples_train", 0),
        "examples_eval": counters.get("examples_eval", 0),
        "aggregate_blocks": counters.get("aggregate_blocks", 0),
        **extra,
    }


def library_versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("apache-beam", "tensorflow", "tensorflow-transform", "tfx-bsl", "pyarrow")
    return {n: version(n) for n in names}


def run(argv: Sequence[str] | None = None) -> dict | None:
    """Parse options, build and run the prepare job; write and return summary.json."""
    configure_logging(batch=True)
    options = parse_job_options(
        argv,
        prog="skewless prepare",
        description=DESCRIPTION,
        groups=(PrepareOptions, OutputDirOptions, SourceOptions, FeatureSetOptions),
        required=((OutputDirOptions, "output_dir"),),
    )
    opts = options.view_as(PrepareOptions)
    output_dir = options.view_as(OutputDirOptions).output_dir
    feature_set = feature_set_spec(options)
    with before_run():
        fs = load_feature_set(feature_set)
        split = Split.from_settings(fs, opts.eval_start, opts.eval_fraction)
        source = read_source(options, fs)
        input_desc = describe_source(options, fs)
        references = reference_sources(options, fs)
        check_output_dir(output_dir, "--output_dir")
        schema = read_schema(opts.schema) if opts.schema else None
        statistics = os.environ.get(NO_STATISTICS_ENV, "") in ("", "0")
        against = None
        if opts.validate_against:
            if not statistics:
                raise ValueError(
                    f"--validate_against needs the statistics ({NO_STATISTICS_ENV} is set)"
                )
            against = load_baseline(opts.validate_against)
    temp_dir = os.path.join(output_dir, "tmp")
    started = time.monotonic()
    p = beam.Pipeline(options=options)
    build_pipeline(
        p, fs, output_dir, source, split, temp_dir, references, schema, statistics, against
    )
    result = p.run()
    result.wait_until_finish()
    if is_dry_run(options):
        LOG.info("dry run: the job graph was built and not run")
        return None
    counters = metric_counters(result)
    reference_desc = reference_summary(options, fs, counters)
    with FileSystems.open(duplicate_keys_path(temp_dir)) as f:
        duplicates = duplicate_keys_summary(fs, json.loads(f.read()))
    # Recorded like a validation refusal, so a later job can tell refused data from allowed.
    duplicates["duplicate_example_keys_refused"] = bool(
        duplicates["duplicate_example_keys"] and not opts.allow_duplicate_example_keys
    )
    summary = summarize(
        counters,
        **duplicates,
        **reference_desc,
        feature_set=fs.name,
        feature_set_spec=feature_set,
        split=split.describe(),
        statistics=statistics_path(output_dir) if statistics else None,
        schema=schema_path(output_dir) if statistics or schema else None,
        schema_source=opts.schema or ("inferred" if statistics else None),
        elapsed_seconds=round(time.monotonic() - started, 2),
        versions=library_versions(),
        **input_desc,
    )
    if against is not None:
        summary["validation"] = validation_outcome(
            validation_dir(output_dir), opts.validate_against, opts.allow_anomalies
        )
    if not FileSystems.exists(output_dir):
        FileSystems.mkdirs(output_dir)
    with FileSystems.create(os.path.join(output_dir, "summary.json")) as f:
        f.write(json.dumps(summary, indent=2).encode())
    LOG.info("prepare finished: %s", json.dumps(summary))
    if FileSystems.exists(temp_dir):
        FileSystems.delete([temp_dir])
    if summary["duplicate_example_keys_refused"]:
        raise SystemExit(duplicate_keys_error(fs, summary))
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
            opts.validate_against,
            summary["validation"]["report"],
        )
        raise SystemExit(EXIT_BLOCKING)
    return summary


def validation_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "validation")


if __name__ == "__main__":
    from beam_pipelines.cli import main

    main(["prepare", *sys.argv[1:]], run)
