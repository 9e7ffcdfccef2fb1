"""The raw-record source of the batch jobs, chosen by SourceOptions: files or BigQuery."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from beam_pipelines.common import is_dry_run
from beam_pipelines.io.files import ReadRawFiles, check_input
from beam_pipelines.options import SourceOptions
from transforms.featureset import FeatureSet


def default_input(fs: FeatureSet) -> str:
    default = fs.resolve_default_input()
    if default is None:
        raise ValueError(f"feature set {fs.name!r} has no default input: pass --input")
    return default


def read_source(options: PipelineOptions, fs: FeatureSet) -> beam.PTransform:
    """The source named by the options; checks the input before any pipeline is built."""
    opts = options.view_as(SourceOptions)
    if opts.bigquery_table or opts.bigquery_query:
        from beam_pipelines.io.bigquery import (
            ReadFromBigQueryStorage,
            check_table_schema,
            parse_query_parameter,
        )

        if opts.input:
            raise ValueError("give --input or --bigquery_table/--bigquery_query, not both")
        project = opts.bigquery_project or options.view_as(GoogleCloudOptions).project
        source = ReadFromBigQueryStorage(
            table=opts.bigquery_table,
            query=opts.bigquery_query,
            query_parameters=[parse_query_parameter(p) for p in opts.bigquery_query_param],
            project=project,
            bigquery_endpoint=opts.bigquery_endpoint,
            storage_endpoint=opts.bigquery_storage_endpoint,
            temp_dataset=opts.bigquery_temp_dataset,
        )
        if opts.bigquery_table and not is_dry_run(options):
            # A query's columns are only known once it runs: its rows are checked one by one.
            check_table_schema(opts.bigquery_table, fs, project, opts.bigquery_endpoint)
        return source
    pattern = opts.input or default_input(fs)
    check_input(pattern, opts.input_format, fs)
    return ReadRawFiles(pattern, opts.input_format, fs=fs)


def describe_source(options: PipelineOptions, fs: FeatureSet) -> dict:
    """What was read, for summary.json."""
    opts = options.view_as(SourceOptions)
    if opts.bigquery_table:
        return {"bigquery_table": opts.bigquery_table}
    if opts.bigquery_query:
        return {"bigquery_query": opts.bigquery_query, "bigquery_query_param": opts.bigquery_query_param}
    return {"input": opts.input or default_input(fs)}
