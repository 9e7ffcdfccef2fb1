"""Pipeline options shared by several jobs, each flag declared once.

Beam parses every PipelineOptions subclass imported into a process with one parser, so a flag
declared by two classes breaks every job of that process: shared flags live here.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions


class FeatureSetOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--feature_set",
            default="flights",
            help="The feature set: 'flights' (bundled) or package.module:NAME.",
        )


class SourceOptions(PipelineOptions):
    """Where batch jobs read raw records: files (default: the bundled input) or BigQuery."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--input",
            help="Local or gs:// path or glob of CSV (.csv, .csv.gz, .zip), Parquet or JSON-lines "
            "files. Default: the bundled input of the feature set (all 336,776 NYC flights of 2013).",
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
            help="A query parameter NAME=TYPE:VALUE (e.g. origin=STRING:JFK); repeatable.",
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
            "--bigquery_endpoint", help="BigQuery REST endpoint override (emulators)."
        )
        parser.add_argument(
            "--bigquery_storage_endpoint", help="BigQuery Storage Read gRPC host:port (emulators)."
        )
