"""The training data's own stages, shared by the jobs that write prepare's layout (prepare,
label-join): the split and schema flags, the train/eval split of example batches, statistics,
the schema and validation against a baseline, and the tf.Transform pass with its TFRecords.

`config` below is a job's resolved configuration (prepare's PrepareConfig, label-join's
LabelJoinConfig); these stages read its `fs`, `output_dir`, `temp_dir`, `schema`,
`statistics`, `drift_span` and `baseline`.
"""

from __future__ import annotations

import json
import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import tensorflow_transform.beam as tft_beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import TaggedOutput
from tensorflow_metadata.proto.v0 import schema_pb2

from skewless.beam_pipelines.io.file_sinks import WriteTFRecords
from skewless.beam_pipelines.validation.baseline import EXIT_BLOCKING, FEATURES, not_compared
from skewless.beam_pipelines.validation.files import (
    drift_thresholds_path,
    schema_path,
    statistics_path,
)
from skewless.beam_pipelines.validation.steps import (
    CheckAgainstBaseline,
    WriteSchema,
    WriteStatistics,
    WriteText,
)
from skewless.transforms.drift_calibration import Span, calibrate
from skewless.transforms.example_schema import tft_tensor_adapter_config, to_tft_record_batch
from skewless.transforms.featureset import FeatureSet
from skewless.transforms.split import Split
from skewless.transforms.statistics import infer_schema
from skewless.transforms.statistics_fn import ComputeSpanStatistics, ComputeStatistics


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
            "--drift_span",
            help="Calibrate the schema's drift thresholds on spans of this size of the train "
            "examples' event time: 'month' (calendar months, the default), a duration such as "
            "30d or 7d, or 0 / none for no calibration. Each span's statistics are measured "
            "against the whole train statistics as validate measures new data; a threshold is "
            "1.5 x the largest, at least 0.01 (statistics/drift_thresholds.json says how each "
            "was set). A --schema is kept as given.",
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


class SplitBatch(beam.DoFn):
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



def write_statistics_and_schema(p, config, examples, splits) -> None:
    """statistics/ of the train and eval examples, the schema (given, or inferred from the
    train statistics, its drift thresholds calibrated on spans of the train examples with a
    drift span: statistics/drift_thresholds.json) and, against a baseline, validation/ of
    all examples."""
    fs, output_dir, schema = config.fs, config.output_dir, config.schema
    statistics, validate_against = config.statistics, config.baseline
    span = config.drift_span if calibrates(config) else None  # a given schema is kept as is
    if statistics:
        if span is None:
            train_stats = splits.train | "TrainStatistics" >> ComputeStatistics("train")
        else:
            with_spans = splits.train | "TrainStatistics" >> ComputeSpanStatistics(
                "train", fs, span
            )
            train_stats = with_spans | "Whole" >> beam.Map(lambda both: both[0])
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
    elif span is not None:  # statistics, no given schema
        calibrated = with_spans | "InferSchema" >> beam.Map(_calibrated_schema, fs, span)
        schemas = calibrated | "Schema" >> beam.Map(lambda both: both[0])
        _ = (
            calibrated
            | "Record" >> beam.Map(lambda both: both[1])
            | "WriteDriftThresholds"
            >> WriteText(drift_thresholds_path(output_dir), lambda r: json.dumps(r, indent=1))
        )
    elif statistics:
        schemas = train_stats | "InferSchema" >> beam.Map(infer_schema)
    else:
        schemas = None
    if schemas is not None:
        _ = schemas | "WriteSchema" >> WriteSchema(schema_path(output_dir))


def _calibrated_schema(with_spans, fs: FeatureSet, span: Span) -> tuple[schema_pb2.Schema, dict]:
    train, spans = with_spans
    return calibrate(train, spans, infer_schema(train), span, not_compared(fs))


def transform_and_write(fs: FeatureSet, splits, output_dir: str, temp_dir: str) -> None:
    """tf.Transform analyzed on the train batches and applied to both splits, written as gzip
    TFRecords under train/ and eval/, with the transform graph under transform/ (the steps
    keep their top-level names)."""
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



def library_versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("apache-beam", "tensorflow", "tensorflow-transform", "tfx-bsl", "pyarrow")
    return {n: version(n) for n in names}



def calibrates(config) -> bool:
    return config.statistics and config.schema is None and config.drift_span is not None



def validation_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "validation")
