"""Pipeline options shared by several jobs, each flag declared once.

Beam parses every PipelineOptions subclass imported into a process with one parser, so a flag
declared by two classes breaks every job of that process: shared flags live here.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from skewless.transforms.record_checks import to_epoch_ms

DEFAULT_FEATURE_SET = "flights"  # of the jobs that read raw events; the others follow the model
DEFAULT_ALLOWED_LATENESS_S = 600


class FeatureSetOptions(PipelineOptions):
    """--feature_set. No parser default: the jobs that read raw events (prepare, aggregate,
    replay, bigtable-setup) use `feature_set_spec(options)`, i.e. the bundled default, and the
    scorers use the feature set recorded with the model unless this names one."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--feature_set",
            help=f"The feature set: '{DEFAULT_FEATURE_SET}' (bundled) or package.module:NAME. "
            f"Default: jobs that read raw events use '{DEFAULT_FEATURE_SET}'; score takes the "
            "feature set recorded with the model version (naming another one is an error).",
        )


def feature_set_spec(options: PipelineOptions, default: str = DEFAULT_FEATURE_SET) -> str:
    """The --feature_set given, else the default of the jobs that read raw events."""
    given = options.view_as(FeatureSetOptions).feature_set
    return default if given is None else given  # '' is an error of load_feature_set, not flights


class SubscriptionOptions(PipelineOptions):
    """The events subscription and the dead-letter topic of the streaming jobs (aggregate,
    score --streaming)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--subscription", help="projects/P/subscriptions/S to read events from (required)."
        )
        parser.add_argument(
            "--dead_letter_topic",
            help="projects/P/topics/D for bad messages (payload + stage/reason attributes). "
            "Without it, bad messages are counted and logged.",
        )


class TableCheckOptions(PipelineOptions):
    """The start-up check of the Bigtable feature table (aggregate, score --streaming)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--skip_table_check",
            action="store_true",
            help="Do not check at start that the Bigtable table and column family exist (score "
            "--streaming: nor create or check --output_table, which must then exist).",
        )


class LatenessOptions(PipelineOptions):
    """The aggregate job's allowed lateness, which bigtable-setup needs for the GC rule."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--allowed_lateness_s",
            type=int,
            default=DEFAULT_ALLOWED_LATENESS_S,
            help="Events up to this late (after the watermark passed their window end) update "
            "their cells; later updates are dropped and counted.",
        )


class ModelOptions(PipelineOptions):
    """The model version the scorers use and their inference batches (score, score --streaming)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--model_dir", help="Base directory of numbered model versions (required)."
        )
        parser.add_argument(
            "--model_version", type=int, help="Version to use (default: the highest)."
        )
        parser.add_argument(
            "--min_batch_size", type=int, default=1, help="Inference batch, examples."
        )
        parser.add_argument(
            "--max_batch_size", type=int, default=8192, help="Inference batch, examples."
        )


class DeadLetterDirOptions(PipelineOptions):
    """Where the batch jobs that write elsewhere than files write their dead letters (score,
    publish-reference); each job's description says its default."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--dead_letter_dir",
            help="Directory (local or gs://) for the dead letters, JSON lines with stage and "
            "reason. score: default --output/dead_letters; publish-reference: required.",
        )


class SourceOptions(PipelineOptions):
    """Where batch jobs read raw records: files (default: the bundled input) or BigQuery."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--input",
            help="Local or gs:// path or glob of CSV (.csv, .csv.gz, .zip), Parquet or JSON-lines "
            "files. Default: the feature set's bundled input (default_input), if it has one.",
        )
        parser.add_argument(
            "--input_format", choices=("csv", "parquet", "jsonl"), help="Override format detection."
        )
        parser.add_argument(
            "--bigquery_table", help="Read this table (project.dataset.table) instead of files."
        )
        parser.add_argument(
            "--bigquery_query",
            help="Read the result of this GoogleSQL query; reference values as @name parameters.",
        )
        parser.add_argument(
            "--bigquery_query_param",
            action="append",
            default=[],
            help="A query parameter NAME=TYPE:VALUE (e.g. region=STRING:EU); repeatable.",
        )
        parser.add_argument(
            "--bigquery_project",
            help="Project that runs the query/read session (default --project).",
        )
        parser.add_argument(
            "--bigquery_temp_dataset",
            help="project.dataset where a query writes its result table (expires after a day). "
            "Default: BigQuery's anonymous result table. Needed on the BigQuery emulator.",
        )
        parser.add_argument(
            "--bigquery_storage_endpoint", help="BigQuery Storage Read gRPC host:port (emulators)."
        )
        parser.add_argument(
            "--reference",
            action="append",
            default=[],
            help="NAME=PATH: read the feature set's reference table NAME from this file (CSV, "
            "Parquet or JSON lines, local or gs://), or NAME=bigquery:PROJECT.DATASET.TABLE from "
            "that BigQuery table (same --bigquery_* endpoint and project options), instead of "
            "its default_input; repeatable.",
        )


class BigQueryEndpointOptions(PipelineOptions):
    """--bigquery_endpoint: every job that talks to BigQuery's REST API, to read (the
    SourceOptions jobs) or to write (score's --output_table, batch and streaming)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--bigquery_endpoint", help="BigQuery REST endpoint override (emulators)."
        )


class PredictionTableOptions(PipelineOptions):
    """--output_table of both scorers: the BigQuery table their predictions go to."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--output_table",
            help="BigQuery table (project.dataset.table or project:dataset.table) for the "
            "predictions, created with the prediction schema if missing. score: instead of "
            "--output; score --streaming: instead of or as well as --output_topic "
            "(streaming inserts, with a `source` column).",
        )


DEFAULT_SERVING_LOG_SAMPLE = 0.01
DEFAULT_SERVING_LOG_WINDOW_S = 60


class ServingLogOptions(PipelineOptions):
    """The serving log of streaming scoring: score --streaming writes it, audit (and validate)
    read it. Format and sampling: skewless/transforms/consistency.py and the README."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--serving_log",
            help="Serving log files (JSON lines, local or gs://): score --streaming writes the "
            "sampled scored events under this prefix; audit and validate read them (a prefix, "
            "directory or glob).",
        )
        parser.add_argument(
            "--serving_log_sample",
            type=float,
            default=DEFAULT_SERVING_LOG_SAMPLE,
            help="Fraction of example keys logged, by a stable hash of the example key (a re-run "
            "logs the same keys; resolution 1/10,000; 1.0 logs every event). audit: the "
            "fraction the scorer used, to find batch examples missing from the log.",
        )
        parser.add_argument(
            "--serving_log_window_s",
            type=int,
            default=DEFAULT_SERVING_LOG_WINDOW_S,
            help="score --streaming: one set of serving log files per this many seconds of "
            "scoring (processing time).",
        )


class PeriodOptions(PipelineOptions):
    """--start/--end of the batch jobs that keep the examples of a period (score, prepare,
    precompute's requests): applied to examples, after the join, so earlier events still feed
    their aggregates."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--start",
            help="Only examples with event time >= this ISO-8601 instant (earlier events still "
            "feed the aggregates of the examples kept).",
        )
        parser.add_argument("--end", help="Only examples with event time < this ISO-8601 instant.")


def parse_period(start: str | None, end: str | None) -> tuple[int | None, int | None]:
    """PeriodOptions' (start, end) in epoch milliseconds, None where not given; ValueError (a
    usage error) on an instant that does not parse or an empty period."""
    bounds = []
    for flag, value in (("--start", start), ("--end", end)):
        try:
            bounds.append(to_epoch_ms(value) if value else None)
        except ValueError as exc:
            raise ValueError(f"{flag} {value!r} is not an ISO-8601 instant ({exc})") from None
    if None not in bounds and bounds[0] >= bounds[1]:
        raise ValueError(f"--start {start} must be before --end {end}")
    return bounds[0], bounds[1]


class OutputDirOptions(PipelineOptions):
    """--output_dir of the batch jobs that write a directory of outputs (prepare, validate, audit)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--output_dir",
            help="Local or gs:// directory for every output (required); the job's description "
            "lists what it writes there.",
        )
