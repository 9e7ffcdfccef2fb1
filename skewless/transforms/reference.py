"""Reference tables joined point-in-time: the batch join of prepare and batch scoring.

A reference table (featureset.ReferenceTable) holds attributes of an entity: static (one row
per key) or slowly changing (rows valid from a time on). The row joined to an event at t is
the latest one of the event's key with valid_from <= t - D_ref (static: the key's row), the
one rule batch and serving share (`row_as_of`).

Batch: the table's rows are validated like events (the table is read as a feature set of its
own, `rows_feature_set`, so files, BigQuery, dead letters and counters work unchanged), then
gathered into one index per table (`ReferenceIndex`: rows sorted by key and validity time, as
Arrow columns; duplicates go to dead letters), which every worker gets as a side input of the
as-of join's block step (aggregations._JoinBlock): the examples of a block are joined at once
after the shuffle (`join_reference_columns`: one vectorised binary search and one Arrow take per
table), linear in events + table rows, no shuffle of the table.
Tables are small next to events (the bundled ones: 26,115, 3,322 and 1,458 rows); a table too
large for worker memory would need a keyed join instead.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

from skewless.transforms.example_schema import arrow_schema
from skewless.transforms.featureset import FeatureSet, Field, ReferenceTable
from skewless.transforms.partials import NAMESPACE, entity_value
from skewless.transforms.record_checks import (
    CheckRecords,
    RecordChecker,
    dead_letter,
    ms_to_datetime,
)
from skewless.transforms.records import TracedRecord

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


def validity_fields(table: ReferenceTable) -> tuple[str, ...]:
    """The table's validity time, rounded up to the millisecond when typed (an event time is
    rounded down), so `valid_from <= t - D_ref` on the typed values equals the comparison of
    the exact times: a row is never joined before it is valid (validation.to_epoch_ms)."""
    return (table.valid_from,) if table.valid_from is not None else ()


def reference_row_validator(table: ReferenceTable) -> RecordChecker:
    """The validator of one table's rows (the rule of CheckReferenceRows, in one process)."""
    return RecordChecker(rows_feature_set(table), round_up=validity_fields(table))


class CheckReferenceRows(beam.PTransform):
    """A table's raw rows -> (TracedRecords of the valid rows, dead letters): validated as a
    feature set of their own (counters `reference_<name>_rows_*`), the validity time rounded
    up, each row keeping its original text and location for a duplicate's dead letter."""

    def __init__(self, table: ReferenceTable):
        super().__init__()
        self.table = table

    def expand(self, raw):
        return raw | CheckRecords(
            rows_feature_set(self.table),
            counters=f"reference_{self.table.name}_rows",
            round_up=validity_fields(self.table),
            traced=True,
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


def duplicate_letter(table: ReferenceTable, key: str, valid_from: int, row: TracedRecord) -> dict:
    """The dead letter of a row that repeats a key (and valid_from) of its table: its original
    text and location, as every other dead letter."""
    reason = f"duplicate row for {table.table_key}={key!r}" + (
        f" valid from {iso_time(valid_from)}" if table.valid_from else ""
    )
    return dead_letter("reference", reason, row.original, f"reference:{table.name}", row.origin)


def iso_time(ms: int) -> str:
    """Epoch ms as ISO-8601 UTC text with milliseconds: 2013-01-05T10:00:00.000Z."""
    return ms_to_datetime(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ReferenceIndex:
    """One table's rows for the batch join: the rows sorted by (key, validity time), the first
    row of each key, and their validity times (0 for a static table).

    `rows_as_of` is the rule vectorised over a batch of examples; `get` gives one key's
    (times, rows) for `row_as_of`, the per-event form streaming scoring uses.
    """

    def __init__(self, keys: list[str], starts: list[int], times: np.ndarray, rows: pa.Table):
        self.ordinal = {key: i for i, key in enumerate(keys)}  # keys in sorted order
        self.starts = np.array([*starts, len(times)], dtype=np.int64)
        self.times = times
        self.rows = rows
        # One sorted array over (key, time): key ordinal * stride + the time's rank among the
        # distinct validity times (1-based), so one binary search answers every example.
        self.distinct = np.unique(times)
        self.stride = len(self.distinct) + 1
        key_of_row = np.repeat(np.arange(len(keys), dtype=np.int64), np.diff(self.starts))
        ranks = np.searchsorted(self.distinct, times) + 1
        self.sorted_keys = key_of_row * self.stride + ranks

    def get(self, key: str | None) -> tuple[list, list] | None:
        i = self.ordinal.get(key)
        if i is None:
            return None
        start, stop = int(self.starts[i]), int(self.starts[i + 1])
        rows = self.rows.slice(start, stop - start).to_pylist()
        return self.times[start:stop].tolist(), [tuple(r.values()) for r in rows]

    def rows_as_of(self, keys: pa.Array, t: np.ndarray, delay_ms: int) -> np.ndarray:
        """Per example, the number of the row valid at t - D_ref, or -1 (no key, no row): the
        rule of `row_as_of`, as one binary search of (key, rank of t - D_ref) for all."""
        if not len(keys):
            return np.full(0, -1, dtype=np.int64)
        encoded = pc.dictionary_encode(keys)
        ordinals = np.array(
            [self.ordinal.get(entity_value(k), -1) for k in encoded.dictionary.to_pylist()]
            + [-1],  # a null key
            dtype=np.int64,
        )
        codes = encoded.indices.fill_null(len(ordinals) - 1).to_numpy(zero_copy_only=False)
        key = ordinals[codes]
        rank = np.searchsorted(self.distinct, t - delay_ms, side="right")
        found = np.searchsorted(self.sorted_keys, key * self.stride + rank, side="right") - 1
        usable = (key >= 0) & (found >= self.starts[np.maximum(key, 0)])
        return np.where(usable, found, -1)


class _BuildIndex(beam.DoFn):
    """All typed rows of a table (one list of TracedRecords) -> its ReferenceIndex; a second
    row for the same key and validity time -> dead letter (the first by value order is kept)."""

    def __init__(self, table: ReferenceTable):
        self.table = table

    def process(self, traced: list[TracedRecord]) -> Iterator:
        table = self.table
        time_field = table.valid_from or STATIC_VALID_FROM
        by_key: dict[str, dict[int, dict]] = {}
        for item in sorted(traced, key=lambda r: duplicate_order(table, r.record)):
            row = item.record
            key = entity_value(row[table.table_key])
            versions = by_key.setdefault(key, {})
            valid_from = row[time_field]
            if valid_from in versions:
                yield TaggedOutput(DEAD, duplicate_letter(table, key, valid_from, item))
                continue
            versions[valid_from] = row
        keys, starts, times, ordered = sorted(by_key), [], [], []
        for key in keys:
            versions = by_key[key]
            starts.append(len(times))
            for valid_from in sorted(versions):
                times.append(valid_from)
                ordered.append(versions[valid_from])
        columns = {
            column.name: [row[f.name] for row in ordered]
            for column, f in zip(table.columns, table.fields, strict=True)
        }
        rows_table = pa.Table.from_pydict(columns, schema=arrow_schema(table.columns))
        Metrics.counter(NAMESPACE, f"reference_{table.name}_rows").inc(len(times))
        yield ReferenceIndex(keys, starts, np.array(times, dtype=np.int64), rows_table)


class BuildReferenceIndex(beam.PTransform):
    """TracedRecords of a table's rows (CheckReferenceRows) -> (a one-element PCollection:
    the ReferenceIndex, duplicate letters)."""

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


def join_reference_columns(
    fs: FeatureSet, examples: pa.Table, indexes: Iterable[ReferenceIndex], missing=None
) -> pa.Table:
    """Example table -> the same with every reference table's columns as of each example's
    event time (nulls where no row applies; `missing[name].inc(n)` counts them): the batch
    join, columnar (one `take` per table)."""
    t = examples.column(fs.event_time).cast(pa.int64()).to_numpy()
    for table, index in zip(fs.references, indexes, strict=True):
        found = index.rows_as_of(
            examples.column(table.key).combine_chunks(), t, table.availability_delay_ms
        )
        absent = found < 0
        if missing is not None and absent.any():
            missing[table.name].inc(int(absent.sum()))
        joined = index.rows.take(pa.array(found, mask=absent))
        for column in table.columns:
            examples = examples.append_column(
                joined.schema.field(column.name), joined.column(column.name)
            )
    return examples


def reference_keys(fs: FeatureSet) -> tuple[str, ...]:
    """Fields the batch join reads from an example: each table's key."""
    return tuple(dict.fromkeys(t.key for t in fs.references))


def join_references(fs: FeatureSet, event: dict, indexes: Iterable, missing=None) -> dict:
    """`event` with the columns of every reference table as of its event time (nulls where no
    row applies; `missing[name].inc()` counts them): the per-event join of streaming scoring.
    `indexes`: per table, {key: (times, rows)} (or a ReferenceIndex)."""
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
