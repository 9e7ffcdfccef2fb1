"""Reference tables joined point-in-time: the batch join of prepare and batch scoring.

A reference table (featureset.ReferenceTable) holds attributes of an entity: static (one row
per key) or slowly changing (rows valid from a time on). The row joined to an event at t is
the latest one of the event's key with valid_from <= t - D_ref (static: the key's row), the
one rule batch and serving share (`row_as_of`).

Batch: the table's rows are validated like events (the table is read as a feature set of its
own, `rows_feature_set`, so files, BigQuery, dead letters and counters work unchanged), then
gathered into one index per table (key -> validity times and rows, sorted; duplicates go to
dead letters), which every worker gets as a side input. Each event then costs one dict lookup
and one binary search per table: linear in events + table rows, no shuffle of the events.
Tables are small next to events (the bundled ones: 26,115, 3,322 and 1,458 rows); a table too
large for worker memory would need a keyed join instead.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton, TaggedOutput

from transforms.featureset import FeatureSet, Field, ReferenceTable
from transforms.partials import NAMESPACE, entity_value
from transforms.validation import dead_letter

DEAD = "dead"
STATIC_VALID_FROM = "valid_from"  # the derived validity time of a static table's rows: 0


@functools.cache
def rows_feature_set(table: ReferenceTable) -> FeatureSet:
    """The table's rows as a feature set of their own: its schema, columns of the file that
    it does not declare ignored, the validity time as the event time (0 for a static table)."""

    def derive(row: dict) -> dict:
        row[STATIC_VALID_FROM] = 0
        return row

    static = table.valid_from is None
    return FeatureSet(
        name=f"reference:{table.name}",
        schema=table.schema,
        derived_fields=(Field(STATIC_VALID_FROM, "timestamp", nullable=False),) if static else (),
        derive=derive if static else None,
        event_time=STATIC_VALID_FROM if static else table.valid_from,
        keys=(table.table_key,),
        aggregates=(),
        label=table.table_key,
        example_fields=(),
        preprocessing_fn=dict,
        unexpected_fields="ignore",
    )


def row_as_of(entry: tuple[list, list] | None, t: int, delay_ms: int) -> tuple | None:
    """The row valid for an event at t: the latest with valid_from <= t - D_ref, or None.

    `entry` is one key of the index: (sorted validity times, the rows' values in that order).
    """
    if entry is None:
        return None
    times, rows = entry
    i = bisect.bisect_right(times, t - delay_ms)
    return rows[i - 1] if i else None


def duplicate_order(table: ReferenceTable, row: dict) -> tuple:
    """Of the rows sharing a key and valid_from, the first in this order is kept (the batch
    index and publish-reference apply the same rule, so they keep the same row)."""
    return tuple(str(row.get(f.name)) for f in table.fields)


def duplicate_letter(table: ReferenceTable, key: str, valid_from: int, row: dict) -> dict:
    """The dead letter of a row that repeats a key (and valid_from) of its table."""
    reason = f"duplicate row for {table.table_key}={key!r}" + (
        f" valid from {valid_from}" if table.valid_from else ""
    )
    return dead_letter("reference", reason, row, f"reference:{table.name}")


class _BuildIndex(beam.DoFn):
    """All typed rows of a table (one list) -> the index {key: (times, rows)}; a second row for
    the same key and validity time -> dead letter (the first by value order is kept)."""

    def __init__(self, table: ReferenceTable):
        self.table = table

    def process(self, rows: list[dict]) -> Iterator:
        table = self.table
        time_field = table.valid_from or STATIC_VALID_FROM
        names = [f.name for f in table.fields]
        by_key: dict[str, dict[int, tuple]] = {}
        for row in sorted(rows, key=lambda r: duplicate_order(table, r)):
            key = entity_value(row[table.table_key])
            versions = by_key.setdefault(key, {})
            valid_from = row[time_field]
            if valid_from in versions:
                yield TaggedOutput(DEAD, duplicate_letter(table, key, valid_from, row))
                continue
            versions[valid_from] = tuple(row[n] for n in names)
        index = {}
        for key, versions in by_key.items():
            times = sorted(versions)
            index[key] = (times, [versions[t] for t in times])
        Metrics.counter(NAMESPACE, f"reference_{table.name}_rows").inc(
            sum(len(v) for v in by_key.values())
        )
        yield index


class BuildReferenceIndex(beam.PTransform):
    """Typed table rows -> (a one-element PCollection: the index, duplicate dead letters)."""

    def __init__(self, table: ReferenceTable):
        super().__init__()
        self.table = table

    def expand(self, rows):
        results = (
            rows
            | "AllRows" >> beam.combiners.ToList()
            | "Index" >> beam.ParDo(_BuildIndex(self.table)).with_outputs(DEAD, main="index")
        )
        return results["index"], results[DEAD]


class _Join(beam.DoFn):
    def __init__(self, fs: FeatureSet):
        self.fs = fs

    def setup(self) -> None:
        self._missing = {
            t.name: Metrics.counter(NAMESPACE, f"reference_{t.name}_missing")
            for t in self.fs.references
        }

    def process(self, event: dict, *indexes: dict) -> Iterator[dict]:
        yield join_references(self.fs, event, indexes, self._missing)


def join_references(fs: FeatureSet, event: dict, indexes: Iterable[dict], missing=None) -> dict:
    """`event` with the columns of every reference table as of its event time (nulls where no
    row applies; `missing[name].inc()` counts them)."""
    out = dict(event)
    t = event[fs.event_time]
    for table, index in zip(fs.references, indexes, strict=True):
        key = entity_value(event.get(table.key))
        row = row_as_of(index.get(key), t, table.availability_delay_ms) if key else None
        if row is None:
            if missing is not None:
                missing[table.name].inc()
            for column in table.columns:
                out[column.name] = None
        else:
            for column, value in zip(table.columns, row, strict=True):
                out[column.name] = value
    return out


class JoinReferences(beam.PTransform):
    """Events -> events with every reference table's columns as of the event time.

    `indexes`: {table name: the one-element PCollection of BuildReferenceIndex}.
    """

    def __init__(self, fs: FeatureSet, indexes: dict):
        super().__init__()
        missing = [t.name for t in fs.references if t.name not in indexes]
        if missing:
            raise ValueError(f"no rows given for reference table(s) {missing}")
        self.fs = fs
        self.indexes = indexes

    def expand(self, events):
        sides = [AsSingleton(self.indexes[t.name]) for t in self.fs.references]
        return events | "Join" >> beam.ParDo(_Join(self.fs), *sides)


# --- the online store layout (Bigtable), shared by publish-reference and streaming scoring ---


def reference_row_key(table: ReferenceTable, key: str) -> str:
    """Row key of one entity's rows of a table: `{table name}#{key}` (every version in one row)."""
    return f"{table.name}#{key}"


def reference_family(fs: FeatureSet, table: ReferenceTable) -> str:
    """Column family of a table's cells: `{feature set}_ref` for slowly changing tables (every
    version kept until the retention age, cell timestamp = valid_from), `{feature set}_static`
    for static ones (one version, cell timestamp 0)."""
    return f"{fs.name}_ref" if table.valid_from is not None else f"{fs.name}_static"


def reference_families(fs: FeatureSet) -> tuple[str, ...]:
    return tuple(dict.fromkeys(reference_family(fs, t) for t in fs.references))
