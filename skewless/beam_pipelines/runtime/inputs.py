"""The raw-record source of the batch jobs, chosen by SourceOptions: files or BigQuery."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from skewless.beam_pipelines.io.file_sources import ReadRawFiles
from skewless.beam_pipelines.io.files import check_input
from skewless.beam_pipelines.runtime.options import BigQueryEndpointOptions, SourceOptions
from skewless.beam_pipelines.runtime.parsing import is_dry_run
from skewless.transforms.featureset import FeatureSet, ReferenceTable
from skewless.transforms.reference import (
    BuildReferenceIndex,
    CheckReferenceRows,
    rows_feature_set,
)


def default_input(fs: FeatureSet) -> str:
    default = fs.resolve_default_input()
    if default is None:
        raise ValueError(f"feature set {fs.name!r} has no default input: pass --input")
    return default


def read_source(options: PipelineOptions, fs: FeatureSet) -> beam.PTransform:
    """The source named by the options; checks the input before any pipeline is built."""
    opts = options.view_as(SourceOptions)
    if opts.bigquery_table or opts.bigquery_query:
        if opts.input:
            raise ValueError("give --input or --bigquery_table/--bigquery_query, not both")
        return bigquery_source(options, fs, opts.bigquery_table, opts.bigquery_query)
    pattern = opts.input or default_input(fs)
    check_input(pattern, opts.input_format, fs)
    return ReadRawFiles(pattern, opts.input_format, fs=fs)


def bigquery_source(
    options: PipelineOptions, fs: FeatureSet, table: str | None, query: str | None = None
) -> beam.PTransform:
    """A BigQuery table or query read with the project and endpoints of the source options;
    a table's columns are checked against `fs` now (a query's only once it runs: its rows are
    checked one by one)."""
    from skewless.beam_pipelines.io.bigquery import (
        ReadFromBigQueryStorage,
        check_table_schema,
        parse_query_parameter,
    )

    opts = options.view_as(SourceOptions)
    project = opts.bigquery_project or options.view_as(GoogleCloudOptions).project
    endpoint = options.view_as(BigQueryEndpointOptions).bigquery_endpoint
    source = ReadFromBigQueryStorage(
        table=table,
        query=query,
        query_parameters=[parse_query_parameter(p) for p in opts.bigquery_query_param]
        if query
        else [],
        project=project,
        bigquery_endpoint=endpoint,
        storage_endpoint=opts.bigquery_storage_endpoint,
        temp_dataset=opts.bigquery_temp_dataset,
    )
    if table and not is_dry_run(options):
        check_table_schema(table, fs, project, endpoint)
    return source


def describe_source(options: PipelineOptions, fs: FeatureSet) -> dict:
    """What was read, for summary.json."""
    opts = options.view_as(SourceOptions)
    if opts.bigquery_table:
        return {"bigquery_table": opts.bigquery_table}
    if opts.bigquery_query:
        return {
            "bigquery_query": opts.bigquery_query,
            "bigquery_query_param": opts.bigquery_query_param,
        }
    return {"input": opts.input or default_input(fs)}


def _given_references(options: PipelineOptions, fs: FeatureSet) -> dict[str, str]:
    """{table name: path} of the `--reference NAME=PATH` options; unknown names are an error."""
    given = {}
    for spec in options.view_as(SourceOptions).reference:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--reference {spec!r}: expected NAME=PATH")
        given[name] = path
    tables = {t.name for t in fs.references}
    unknown = sorted(set(given) - tables)
    if unknown:
        raise ValueError(
            f"--reference names {unknown}, not reference tables of {fs.name!r} "
            f"({sorted(tables) or 'none'})"
        )
    return given


BIGQUERY_REFERENCE = "bigquery:"  # --reference NAME=bigquery:PROJECT.DATASET.TABLE


def reference_sources(options: PipelineOptions, fs: FeatureSet) -> dict[str, beam.PTransform]:
    """A source per reference table of the feature set: `--reference NAME=PATH` (a file) or
    `NAME=bigquery:PROJECT.DATASET.TABLE` (read like --bigquery_table, with the same endpoint
    and project options), else the table's default_input; each is checked against the table's
    schema before the run."""
    given = _given_references(options, fs)
    return {t.name: _reference_source(options, t, given.get(t.name))[0] for t in fs.references}


def _reference_source(
    options: PipelineOptions,
    table: ReferenceTable,
    spec: str | None,
    input_format: str | None = None,
) -> tuple[beam.PTransform, dict]:
    """The source of `--reference NAME=spec` (a file, or `bigquery:` a table) or, without a
    spec, of the table's default_input; checked now. With what it reads, for a summary."""
    if spec and spec.startswith(BIGQUERY_REFERENCE):
        name = spec[len(BIGQUERY_REFERENCE) :]
        return bigquery_source(options, rows_feature_set(table), name), {"bigquery_table": name}
    source = _table_file(options, table, spec, input_format)
    return source, {"input": source.pattern}


def _table_file(
    options: PipelineOptions, table: ReferenceTable, path: str | None, input_format: str | None
) -> ReadRawFiles:
    """The file source of a table's rows (`path`, else its default_input), checked now."""
    path = path or table.resolve_default_input()
    if path is None:
        raise ValueError(f"reference table {table.name!r} has no default input: pass its path")
    rows_fs = rows_feature_set(table)
    if not is_dry_run(options):
        check_input(path, input_format, rows_fs)
    return ReadRawFiles(path, input_format, fs=rows_fs)


def reference_table_source(
    options: PipelineOptions, fs: FeatureSet, table: ReferenceTable
) -> tuple[beam.PTransform, dict]:
    """The source of one reference table's rows and what it reads (for the summary): the
    source options of the batch jobs, read as the table's rows (`rows_feature_set`):
    --bigquery_table/--bigquery_query, else the file of --input, else `--reference NAME=PATH`
    or `NAME=bigquery:PROJECT.DATASET.TABLE`, else the table's default_input. Checked before
    the run like read_source."""
    opts = options.view_as(SourceOptions)
    rows_fs = rows_feature_set(table)
    if opts.bigquery_table or opts.bigquery_query:
        return read_source(options, rows_fs), describe_source(options, rows_fs)
    if opts.input:
        source = _table_file(options, table, opts.input, opts.input_format)
        return source, {"input": source.pattern}
    return _reference_source(
        options, table, _given_references(options, fs).get(table.name), opts.input_format
    )


def describe_references(options: PipelineOptions, fs: FeatureSet) -> dict:
    given = dict(s.partition("=")[::2] for s in options.view_as(SourceOptions).reference)
    return {t.name: given.get(t.name) or t.resolve_default_input() for t in fs.references}


def reference_summary(options: PipelineOptions, fs: FeatureSet, counters: dict[str, int]) -> dict:
    """A batch job's summary of its reference tables: per table the rows read, valid,
    rejected and indexed and the examples without a row (`references`), and what each was
    read from (`reference_inputs`); nothing for a feature set without tables."""
    if not fs.references:
        return {}
    counts = ("rows_read", "rows_valid", "rows_rejected", "rows", "missing")
    return {
        "references": {
            t.name: {what: counters.get(f"reference_{t.name}_{what}", 0) for what in counts}
            for t in fs.references
        },
        "reference_inputs": describe_references(options, fs),
    }


class ReadReferenceIndexes(beam.PTransform):
    """Every reference table's rows -> ({table name: its index}, dead letters of its rows).

    Rows are validated against the table's schema like events (counters
    `reference_<name>_rows_read`, `_valid`, `_rejected`); duplicates are dead letters too."""

    def __init__(self, fs: FeatureSet, sources: dict[str, beam.PTransform]):
        super().__init__()
        self.fs = fs
        self.sources = sources

    def expand(self, pbegin):
        indexes, dead = {}, []
        for table in self.fs.references:
            name = table.name
            rows, invalid = (
                pbegin
                | f"Read_{name}" >> self.sources[name]
                | f"Validate_{name}"
                >> CheckReferenceRows(table)
            )
            index, duplicates = rows | f"Index_{name}" >> BuildReferenceIndex(table)
            indexes[name] = index
            dead += [invalid, duplicates]
        letters = (
            dead | "ReferenceDeadLetters" >> beam.Flatten()
            if dead
            else pbegin | "NoReferenceDeadLetters" >> beam.Create([])
        )
        return indexes, letters
