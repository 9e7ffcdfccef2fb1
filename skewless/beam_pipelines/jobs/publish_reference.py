"""`skewless publish-reference` (batch): one reference table's rows -> Bigtable, for serving.

Reads the table's rows (files or BigQuery, the source options of the batch jobs), validates
them against the table's declaration like events (`rows_feature_set`: dead letters, counters
`reference_<name>_rows_*`), sends a second row for the same key and validity time to dead
letters (the rule of the batch join, `BuildReferenceIndex`: the first by value order is kept),
and writes one Bigtable row mutation per (key, valid_from) in the online layout of
skewless/transforms/reference.py: row key `{table}#{key}`, family `{feature set}_ref` (cell timestamp
valid_from) or `{feature set}_static` (timestamp 0), one cell per declared field.

Validity times before 1970: a Bigtable cell timestamp cannot be negative, so of a key's versions
valid before 1970-01-01T00:00:00Z only the latest is written, stamped 0 (valid at or before
1970; `cell_timestamp_ms`): it is the row of that key for every as-of time from 1970 on, the
only ones the online store can be asked for (the streaming jobs take events from 1970 on). The
earlier versions are dead letters with a reason saying so (stage `reference`), and a version
valid exactly at 1970-01-01 supersedes them all.

Idempotent: a re-run writes the same cells at the same timestamps, which Bigtable replaces
rather than adding versions. It only upserts: a row missing from the input is not deleted.
The duplicate check is keyed (a GroupByKey on key and valid_from), so no worker holds the
whole table. Rows that cannot be written go to dead letters with stage `write` after the
retries of io/bigtable.py (`--write_retry_s`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import TaggedOutput

from skewless.beam_pipelines.io.bigtable import (
    BigtableOptions,
    BigtableSetupError,
    BigtableWriteOptions,
    WriteReferenceRows,
    cell_timestamp_ms,
    check_reference_families,
    valid_from_ms,
)
from skewless.beam_pipelines.io.file_sinks import WriteDeadLetterFiles
from skewless.beam_pipelines.runtime.inputs import reference_table_source
from skewless.beam_pipelines.runtime.job import EMULATOR_ONLY, Job, Template
from skewless.beam_pipelines.runtime.launch import launch
from skewless.beam_pipelines.runtime.options import (
    BigQueryEndpointOptions,
    DeadLetterDirOptions,
    FeatureSetOptions,
    SourceOptions,
    feature_set_spec,
)
from skewless.beam_pipelines.runtime.parsing import (
    is_dry_run,
    parse_job_options,
    run_and_summarise,
)
from skewless.beam_pipelines.runtime.process import before_run, check_output_dir, configure_logging
from skewless.transforms.featureset import FeatureSet, ReferenceTable, load_feature_set
from skewless.transforms.partials import entity_value
from skewless.transforms.record_checks import NAMESPACE, dead_letter
from skewless.transforms.records import TracedRecord
from skewless.transforms.reference import (
    CheckReferenceRows,
    duplicate_letter,
    duplicate_order,
    iso_time,
    reference_family,
)

LOG = logging.getLogger("skewless.publish_reference")
PROG = "skewless publish-reference"
DEAD = "dead"
DESCRIPTION = (
    "Batch job: publish one reference table of the feature set to Bigtable for streaming "
    "scoring. Reads the table's rows (--input, --reference NAME=PATH or the table's default "
    "input; or --bigquery_table / --bigquery_query), validates them against the table's "
    "declaration, sends duplicates (same key and valid_from) and invalid rows to "
    "--dead_letter_dir, and writes one row version per (key, valid_from): row key "
    "<table>#<key>, family <feature set>_ref (cell timestamp = valid_from) or <feature "
    "set>_static (timestamp 0), one cell per field. Re-runs write the same cells. Run "
    "`skewless bigtable-setup` for the feature set first."
)


class PublishReferenceOptions(PipelineOptions):
    """publish-reference's own flag; the source, Bigtable, retry, dead-letter and feature-set
    flags are shared (options.py, io/bigtable.py)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--table", help="Name of the feature set's reference table to publish (required)."
        )


GROUPS = (
    PublishReferenceOptions,
    DeadLetterDirOptions,
    SourceOptions,
    BigQueryEndpointOptions,
    BigtableOptions,
    BigtableWriteOptions,
    FeatureSetOptions,
)


JOB = Job(
    name="publish-reference",
    summary="batch: publish a reference table's rows to Bigtable for serving",
    description=DESCRIPTION,
    groups=GROUPS,
    required=("table", "bigtable_project", "bigtable_instance", "bigtable_table", "dead_letter_dir"),
    template=Template(
        "publish_reference",
        not_parameters={
            **EMULATOR_ONLY,
            "reference": "publish_reference reads one table: its file is the input parameter",
        },
    ),
)


class _KeepFirst(beam.DoFn):
    """((key, cell timestamp), traced rows) -> the row written; the others -> dead letters
    (stage `reference`): a second row for the same valid_from (the first by value order is
    kept), and, in the group stamped 0, the versions valid before a later one that is still
    before 1970 (they could not be told apart in Bigtable)."""

    def __init__(self, table: ReferenceTable):
        self.table = table

    def setup(self) -> None:
        prefix = f"reference_{self.table.name}_rows"
        self._duplicates = Metrics.counter(NAMESPACE, f"{prefix}_duplicate")
        self._superseded = Metrics.counter(NAMESPACE, f"{prefix}_superseded_before_1970")

    def process(self, element) -> Iterator:
        (key, _), grouped = element
        rows = list(grouped)
        table = self.table
        latest = max(valid_from_ms(table, r.record) for r in rows)
        current = [r for r in rows if valid_from_ms(table, r.record) == latest]
        first, *others = sorted(current, key=lambda r: duplicate_order(table, r.record))
        yield first.record
        self._duplicates.inc(len(others))
        for row in others:
            yield TaggedOutput(DEAD, duplicate_letter(table, key, latest, row))
        for row in rows:
            valid_from = valid_from_ms(table, row.record)
            if valid_from < latest:
                self._superseded.inc()
                reason = (
                    f"{table.table_key}={key!r} valid from {iso_time(valid_from)} is superseded "
                    f"by its version valid from {iso_time(latest)}, before 1970 too: Bigtable "
                    "stamps both 1970-01-01 (it holds no earlier time), and only the later one "
                    "is the row of an as-of time from 1970 on"
                )
                yield TaggedOutput(
                    DEAD,
                    dead_letter(
                        "reference", reason, row.original, f"reference:{table.name}", row.origin
                    ),
                )


class DeduplicateRows(beam.PTransform):
    """TracedRecords of a table's rows -> (one typed row per key and cell timestamp, dead
    letters of the others)."""

    def __init__(self, table: ReferenceTable):
        super().__init__()
        self.table = table

    def expand(self, rows):
        table = self.table

        def by_key_and_stamp(row: TracedRecord):
            stamp = cell_timestamp_ms(valid_from_ms(table, row.record))
            return (entity_value(row.record[table.table_key]), stamp), row

        results = (
            rows
            | "ByKeyAndTime" >> beam.Map(by_key_and_stamp)
            | "Group" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(_KeepFirst(table)).with_outputs(DEAD, main="rows")
        )
        return results["rows"], results[DEAD]


def build_pipeline(
    p: beam.Pipeline,
    table: ReferenceTable,
    source: beam.PTransform,
    sink: beam.PTransform,
    dead_letters: beam.PTransform,
) -> None:
    """Wire the job. `source` yields the table's raw rows; `sink` takes typed rows (one per key
    and valid_from) and returns the dead letters of rows it could not write."""
    raw = p | "Read" >> source
    rows, invalid = raw | "Validate" >> CheckReferenceRows(table)
    unique, duplicates = rows | "Deduplicate" >> DeduplicateRows(table)
    unwritten = unique | "Write" >> sink
    _ = (
        (invalid, duplicates, unwritten)
        | "AllDeadLetters" >> beam.Flatten()
        | "DeadLetters" >> dead_letters
    )


def reference_table(fs: FeatureSet, name: str | None) -> ReferenceTable:
    """The feature set's reference table called `name`; any other name is a usage error."""
    tables = {t.name: t for t in fs.references}
    if name not in tables:
        declared = f"its tables: {', '.join(sorted(tables))}" if tables else "it declares none"
        raise SystemExit(
            f"{PROG}: --table {name!r} is not a reference table of feature set {fs.name!r} "
            f"({declared})"
        )
    return tables[name]


@dataclass(frozen=True)
class PublishConfig:
    """A publish run resolved from its options before any pipeline exists (every error here
    is a one-line usage error): the table, its source, the Bigtable table (checked to have the
    table's family) and the dead-letter directory."""

    fs: FeatureSet
    table: ReferenceTable
    source: beam.PTransform
    described: dict
    project: str
    instance: str
    bigtable_table: str
    retry_s: float
    dead_letter_dir: str

    @classmethod
    def from_options(cls, options: PipelineOptions) -> PublishConfig:
        with before_run():
            bt = options.view_as(BigtableOptions)
            retry_s = options.view_as(BigtableWriteOptions).write_retry_s
            dead_dir = options.view_as(DeadLetterDirOptions).dead_letter_dir
            if retry_s < 0:
                raise SystemExit(f"{PROG}: --write_retry_s must be >= 0")
            fs = load_feature_set(feature_set_spec(options))
            table = reference_table(fs, options.view_as(PublishReferenceOptions).table)
            source, described = reference_table_source(options, fs, table)
            check_output_dir(dead_dir, "--dead_letter_dir")
            if not is_dry_run(options):
                try:
                    check_reference_families(
                        bt.bigtable_project, bt.bigtable_instance, bt.bigtable_table, fs, [table]
                    )
                except BigtableSetupError as exc:
                    raise SystemExit(f"{PROG}: {exc}") from None
        return cls(
            fs, table, source, described, bt.bigtable_project, bt.bigtable_instance,
            bt.bigtable_table, retry_s, dead_dir,
        )  # fmt: skip


def run(argv: Sequence[str] | None = None) -> dict | None:
    """Parse options, check the table and the Bigtable family, publish; return the summary
    (None after a Dataflow dry run)."""
    configure_logging(batch=True)
    options = parse_job_options(argv, JOB)
    config = PublishConfig.from_options(options)
    p = beam.Pipeline(options=options)
    build_pipeline(
        p,
        config.table,
        config.source,
        WriteReferenceRows(
            config.project, config.instance, config.bigtable_table, config.fs, config.table,
            config.retry_s,
        ),  # fmt: skip
        WriteDeadLetterFiles(os.path.join(config.dead_letter_dir, "part")),
    )
    return run_and_summarise(p, options, functools.partial(finish, config), LOG)


COUNTED = (
    "rows_read", "rows_valid", "rows_rejected", "rows_duplicate", "rows_superseded_before_1970",
    "rows_written", "rows_write_failed",
)  # fmt: skip
DEAD_LETTERED = ("rows_rejected", "rows_duplicate", "rows_superseded_before_1970", "rows_write_failed")


def finish(config: PublishConfig, counters: dict[str, int], elapsed_seconds: float) -> dict:
    """The run's summary: the table's counters (`reference_<table>_<name>`) and where it went."""
    prefix = f"reference_{config.table.name}"

    def count(name: str) -> int:
        return counters.get(f"{prefix}_{name}", 0)

    return {
        "feature_set": config.fs.name,
        "table": config.table.name,
        "static": config.table.valid_from is None,
        "source": config.described,
        "bigtable_table": config.bigtable_table,
        "family": reference_family(config.fs, config.table),
        **{name: count(name) for name in COUNTED},
        "rows_dead_lettered": sum(count(name) for name in DEAD_LETTERED),
        "write_retries": count("write_retries"),
        "dead_letter_dir": config.dead_letter_dir,
        "elapsed_seconds": elapsed_seconds,
    }


if __name__ == "__main__":
    launch(JOB, run)
