"""`skewless publish-reference` (batch): one reference table's rows -> Bigtable, for serving.

Reads the table's rows (files or BigQuery, the source options of the batch jobs), validates
them against the table's declaration like events (`rows_feature_set`: dead letters, counters
`reference_<name>_rows_*`), sends a second row for the same key and validity time to dead
letters (the rule of the batch join, `BuildReferenceIndex`: the first by value order is kept),
and writes one Bigtable row mutation per (key, valid_from) in the online layout of
transforms/reference.py: row key `{table}#{key}`, family `{feature set}_ref` (cell timestamp
valid_from) or `{feature set}_static` (timestamp 0), one cell per declared field.

Idempotent: a re-run writes the same cells at the same timestamps, which Bigtable replaces
rather than adding versions. It only upserts: a row missing from the input is not deleted.
The duplicate check is keyed (a GroupByKey on key and valid_from), so no worker holds the
whole table. Rows that cannot be written go to dead letters with stage `write` after the
retries of io/bigtable.py (`--write_retry_s`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import TaggedOutput

from beam_pipelines.common import (
    before_run,
    check_output_dir,
    configure_logging,
    is_dry_run,
    metric_counters,
    parse_job_options,
)
from beam_pipelines.io.bigtable import (
    BigtableOptions,
    BigtableSetupError,
    BigtableWriteOptions,
    WriteReferenceRows,
    check_reference_families,
    valid_from_ms,
)
from beam_pipelines.io.sinks import WriteDeadLetters
from beam_pipelines.io.sources import reference_table_source
from beam_pipelines.options import (
    DeadLetterDirOptions,
    FeatureSetOptions,
    SourceOptions,
    feature_set_spec,
)
from transforms.featureset import FeatureSet, ReferenceTable, load_feature_set
from transforms.partials import entity_value
from transforms.reference import (
    duplicate_letter,
    duplicate_order,
    reference_family,
    rows_feature_set,
)
from transforms.validation import NAMESPACE, ValidateRecords

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
    BigtableOptions,
    BigtableWriteOptions,
    FeatureSetOptions,
)


class _KeepFirst(beam.DoFn):
    """((key, valid_from), rows) -> the row kept; the others -> dead letters (stage `reference`)."""

    def __init__(self, table: ReferenceTable):
        self.table = table

    def setup(self) -> None:
        self._duplicates = Metrics.counter(NAMESPACE, f"reference_{self.table.name}_rows_duplicate")

    def process(self, element) -> Iterator:
        (key, valid_from), rows = element
        table = self.table
        first, *others = sorted(rows, key=lambda r: duplicate_order(table, r))
        yield first
        if not others:
            return
        self._duplicates.inc(len(others))
        for row in others:
            yield TaggedOutput(DEAD, duplicate_letter(table, key, valid_from, row))


class DeduplicateRows(beam.PTransform):
    """Typed table rows -> (one row per key and valid_from, dead letters of the others)."""

    def __init__(self, table: ReferenceTable):
        super().__init__()
        self.table = table

    def expand(self, rows):
        table = self.table
        results = (
            rows
            | "ByKeyAndTime"
            >> beam.Map(lambda r: ((entity_value(r[table.table_key]), valid_from_ms(table, r)), r))
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
    rows, invalid = raw | "Validate" >> ValidateRecords(
        rows_feature_set(table), counters=f"reference_{table.name}_rows"
    )
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


def run(argv: Sequence[str] | None = None) -> dict | None:
    """Parse options, check the table and the Bigtable family, publish; return the summary
    (None after a Dataflow dry run)."""
    configure_logging(batch=True)
    options = parse_job_options(
        argv,
        prog=PROG,
        description=DESCRIPTION,
        groups=GROUPS,
        required=(
            (PublishReferenceOptions, "table"),
            (BigtableOptions, "bigtable_project"),
            (BigtableOptions, "bigtable_instance"),
            (BigtableOptions, "bigtable_table"),
            (DeadLetterDirOptions, "dead_letter_dir"),
        ),
    )
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
    started = time.monotonic()
    p = beam.Pipeline(options=options)
    build_pipeline(
        p,
        table,
        source,
        WriteReferenceRows(
            bt.bigtable_project, bt.bigtable_instance, bt.bigtable_table, fs, table, retry_s
        ),
        WriteDeadLetters(os.path.join(dead_dir, "part")),
    )
    result = p.run()
    result.wait_until_finish()
    if is_dry_run(options):
        LOG.info("dry run: the job graph was built and not run")
        return None
    counters = metric_counters(result)
    prefix = f"reference_{table.name}"

    def count(name: str) -> int:
        return counters.get(f"{prefix}_{name}", 0)

    summary = {
        "feature_set": fs.name,
        "table": table.name,
        "static": table.valid_from is None,
        "source": described,
        "bigtable_table": bt.bigtable_table,
        "family": reference_family(fs, table),
        "rows_read": count("rows_read"),
        "rows_valid": count("rows_valid"),
        "rows_rejected": count("rows_rejected"),
        "rows_duplicate": count("rows_duplicate"),
        "rows_written": count("rows_written"),
        "rows_write_failed": count("rows_write_failed"),
        "rows_dead_lettered": count("rows_rejected")
        + count("rows_duplicate")
        + count("rows_write_failed"),
        "write_retries": count("write_retries"),
        "dead_letter_dir": dead_dir,
        "elapsed_seconds": round(time.monotonic() - started, 2),
    }
    LOG.info("publish-reference finished: %s", json.dumps(summary))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    from beam_pipelines.cli import main

    main(["publish-reference", *sys.argv[1:]], run)
