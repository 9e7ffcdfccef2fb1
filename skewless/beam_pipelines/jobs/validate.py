"""The validate job (batch): statistics of new data against a prepared baseline -> anomalies of
the six questions, a report, and an exit code (3 when an anomaly blocks)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import apache_beam as beam

# tf.Transform (every feature set's preprocessing_fn needs it) is imported with this module,
# while the CLI quiets TensorFlow's native start-up lines; inside run() it would print them.
import tensorflow_transform  # noqa: F401
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from skewless.beam_pipelines.io.files import check_input
from skewless.beam_pipelines.io.serving_log import ReadServingLog, log_glob
from skewless.beam_pipelines.runtime.job import EMULATOR_ONLY, Job, Template
from skewless.beam_pipelines.runtime.launch import launch
from skewless.beam_pipelines.runtime.options import (
    BigQueryEndpointOptions,
    FeatureSetOptions,
    OutputDirOptions,
    ServingLogOptions,
    SourceOptions,
)
from skewless.beam_pipelines.runtime.parsing import (
    is_dry_run,
    parse_job_options,
)
from skewless.beam_pipelines.runtime.process import before_run, check_output_dir, configure_logging
from skewless.beam_pipelines.validation.baseline import (
    EXIT_BLOCKING,
    FEATURES,
    RAW,
    SERVING_LOG,
    Baseline,
    conclude,
    feature_set_of,
    load_baseline,
    report_title,
)
from skewless.beam_pipelines.validation.files import (
    ANOMALIES_FILE,
    NEW_DATASET,
    NEW_STATISTICS_FILE,
    features_glob,
    read_anomalies,
)
from skewless.beam_pipelines.validation.steps import (
    CheckAgainstBaseline,
    ReadInferredFiles,
    RecordsToBatches,
    WriteStatistics,
)
from skewless.transforms.featureset import FeatureSet
from skewless.transforms.statistics_fn import ComputeStatistics

LOG = logging.getLogger("skewless.validate")
DESCRIPTION = (
    "Batch job: compute statistics of new data (raw files, a BigQuery table or query, the "
    "features/ of another prepare run, or a serving log) as read, compare them with a prepared "
    "baseline's train statistics and schema, and write anomalies.json, statistics.pb and "
    f"report.html under --output_dir. Exit code 0: no blocking anomaly; {EXIT_BLOCKING}: at "
    "least one blocking anomaly; 1: the job failed; 2: bad options or inputs."
)


class ValidateOptions(PipelineOptions):
    """validate's own flags; --output_dir, --input/--bigquery_*, --serving_log and
    --feature_set are shared (options.py)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--baseline",
            help="Output directory of the `skewless prepare` run to compare with (its "
            "statistics/statistics.pb and schema/schema.pbtxt) (required).",
        )
        parser.add_argument(
            "--prepared_dir",
            help="Validate the features/ (Parquet) of this prepare run: every example column.",
        )
        parser.add_argument(
            "--baseline_schema",
            help="Schema to validate against (a text Schema proto, schema.pbtxt). Default: the "
            "baseline's schema/schema.pbtxt, edits included.",
        )


JOB = Job(
    name="validate",
    in_process="skewless.beam_pipelines.validation.in_process",
    summary="batch: new data's statistics vs a prepared baseline",
    description=DESCRIPTION,
    groups=(
        ValidateOptions,
        OutputDirOptions,
        SourceOptions,
        BigQueryEndpointOptions,
        ServingLogOptions,
        FeatureSetOptions,
    ),
    required=("baseline", "output_dir"),
    template=Template(
        "validate",
        not_parameters={
            **EMULATOR_ONLY,
            "reference": "validate reads no reference tables (their columns are in features/)",
            "serving_log_sample": "the scorer's sampling: validate reads every logged event",
            "serving_log_window_s": "the scorer's log files: validate reads every logged event",
        },
    ),
)


def source_kind(options: PipelineOptions) -> str:
    """Which one of the four inputs the options name; ValueError unless exactly one."""
    src = options.view_as(SourceOptions)
    given = [
        ("--input", RAW, src.input),
        ("--bigquery_table/--bigquery_query", RAW, src.bigquery_table or src.bigquery_query),
        ("--prepared_dir", FEATURES, options.view_as(ValidateOptions).prepared_dir),
        ("--serving_log", SERVING_LOG, options.view_as(ServingLogOptions).serving_log),
    ]
    named = [(flag, kind) for flag, kind, value in given if value]
    if len(named) != 1:
        flags = ", ".join(flag for flag, _ in named) or "none"
        raise ValueError(
            "give exactly one input: --input, --bigquery_table/--bigquery_query, --prepared_dir "
            f"or --serving_log (got {flags})"
        )
    return named[0][1]


def new_data_source(
    options: PipelineOptions, fs: FeatureSet, kind: str
) -> tuple[beam.PTransform, str]:
    """(the source of RecordBatches as read, a description of it); inputs checked now."""
    src = options.view_as(SourceOptions)
    dry = is_dry_run(options)
    if kind == FEATURES:
        directory = options.view_as(ValidateOptions).prepared_dir
        if not dry:
            check_input(features_glob(directory), "parquet")
        return ReadInferredFiles(features_glob(directory), "parquet"), f"features of {directory}"
    if kind == SERVING_LOG:
        path = options.view_as(ServingLogOptions).serving_log
        if not dry and not FileSystems.match([log_glob(path)])[0].metadata_list:
            raise ValueError(f"--serving_log {path!r}: no serving log files ({log_glob(path)})")
        return _ServingLogBatches(path, fs.label), f"serving log {path}"
    if src.input:
        if not dry:
            check_input(src.input, src.input_format)
        return ReadInferredFiles(src.input, src.input_format), src.input
    from skewless.beam_pipelines.io.bigquery import ReadFromBigQueryStorage, parse_query_parameter

    # No schema check against the feature set: a renamed or retyped column is what validate
    # reports, as an anomaly.
    source = ReadFromBigQueryStorage(
        table=src.bigquery_table,
        query=src.bigquery_query,
        query_parameters=[parse_query_parameter(p) for p in src.bigquery_query_param],
        project=src.bigquery_project or options.view_as(GoogleCloudOptions).project,
        bigquery_endpoint=options.view_as(BigQueryEndpointOptions).bigquery_endpoint,
        storage_endpoint=src.bigquery_storage_endpoint,
        temp_dataset=src.bigquery_temp_dataset,
    )
    return source, src.bigquery_table or "BigQuery query"


class _ServingLogBatches(beam.PTransform):
    """Serving log records -> RecordBatches of their served features (the label left out)."""

    def __init__(self, path: str, label: str):
        super().__init__()
        self.path = path
        self.label = label

    def expand(self, pbegin):
        return (
            pbegin
            | "ReadLog" >> ReadServingLog(self.path)
            | "Features" >> beam.Map(lambda record: record["features"])
            | "ToBatches" >> RecordsToBatches(drop=(self.label,))
        )


def build_pipeline(
    p: beam.Pipeline,
    source: beam.PTransform,
    baseline: Baseline,
    fs: FeatureSet,
    kind: str,
    output_dir: str,
    title: str,
) -> None:
    """Read -> statistics (one pass) -> anomalies against the baseline -> the outputs."""
    stats = p | "Read" >> source | "Statistics" >> ComputeStatistics(NEW_DATASET)
    _ = stats | "WriteStatistics" >> WriteStatistics(
        FileSystems.join(output_dir, NEW_STATISTICS_FILE)
    )
    _ = stats | "Check" >> CheckAgainstBaseline(baseline, fs, kind, output_dir, title)


def run(argv: Sequence[str] | None = None) -> dict | None:
    """Parse options, build and run the job; returns {anomalies, blocking} and exits
    EXIT_BLOCKING when an anomaly blocks."""
    configure_logging(batch=True)
    options = parse_job_options(argv, JOB)
    opts = options.view_as(ValidateOptions)
    output_dir = options.view_as(OutputDirOptions).output_dir
    with before_run():
        kind = source_kind(options)
        baseline = load_baseline(opts.baseline, opts.baseline_schema)
        fs = feature_set_of(options.view_as(FeatureSetOptions).feature_set, baseline)
        source, described = new_data_source(options, fs, kind)
        check_output_dir(output_dir, "--output_dir")
    p = beam.Pipeline(options=options)
    title = report_title(described, opts.baseline)
    build_pipeline(p, source, baseline, fs, kind, output_dir, title)
    p.run().wait_until_finish()
    if is_dry_run(options):
        LOG.info("dry run: the job graph was built and not run")
        return None
    return conclude(read_anomalies(FileSystems.join(output_dir, ANOMALIES_FILE)), output_dir)


if __name__ == "__main__":
    launch(JOB, run)
