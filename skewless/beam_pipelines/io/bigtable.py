"""Bigtable at the edge of the streaming job: the feature cells of the contract, setup and checks.

Cell layout (docs/architecture.md): row key `{key name}#{key value}#{W zero-padded epoch ms}`, one
column family per feature set (its name), one column per aggregate, cell timestamp W. Values
are UTF-8 text: numbers as `repr` (counts as integers, the others as floats that round-trip
exactly), texts (first/last of a string field), lists (last_k) and maps (histogram, most
frequent first) as JSON.

Idempotency: every write of a cell uses the same timestamp W, and Bigtable keeps one version per
(row, column, timestamp): a retry, a replay or a late pane REPLACES the value instead of adding a
version. The family's GC rule also keeps at most one version (and bounds the age).

Reference rows (skewless/transforms/reference.py owns the layout): row key `{table}#{key}`, family
`{feature set}_ref` (slowly changing: every version, cell timestamp = valid_from, GC by age) or
`{feature set}_static` (one version, cell timestamp 0); one column per declared field (the
field's own name), values encoded as above with a null as JSON `null`, so every version of a
row has every column. Re-publishing writes the same cells at the same timestamps.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from skewless.transforms.aggregations import CellKey, explode_cells, parse_row_key, row_key
from skewless.transforms.featureset import FeatureSet, ReferenceTable
from skewless.transforms.partials import entity_value
from skewless.transforms.record_checks import dead_letter
from skewless.transforms.reference import reference_families, reference_family, reference_row_key

NAMESPACE = "skewless"
LOG = logging.getLogger("skewless.bigtable")
FLUSH_ROWS = 500
DEFAULT_WRITE_RETRY_S = 600.0
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class BigtableOptions(PipelineOptions):
    """The feature table, shared by `aggregate` and `bigtable-setup` (Beam parses every options
    class of the process with one parser, so a flag is declared once)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--bigtable_project", help="Bigtable project (required).")
        parser.add_argument("--bigtable_instance", help="Bigtable instance (required).")
        parser.add_argument(
            "--bigtable_table", help="Bigtable table of the feature cells (required)."
        )


class BigtableWriteOptions(PipelineOptions):
    """The retry budget of the jobs that write to Bigtable (aggregate, publish-reference)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--write_retry_s",
            type=float,
            default=DEFAULT_WRITE_RETRY_S,
            help="How long a Bigtable write that fails transiently (unavailable, deadline, "
            "internal) is retried before its rows go to dead letters; permanent failures "
            "(invalid argument, not found, permission) are dead-lettered at once.",
        )


class BigtableSetupError(RuntimeError):
    """The table or the column family the job writes to does not exist (or cannot be reached)."""


def encode_value(value: int | float | str | list | dict) -> bytes:
    """A number as its text (`repr`: counts as integers, floats that round-trip exactly); a
    text, list (last_k) or map (histogram) as JSON, whose text never parses as a number."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, (int, float)):
        return repr(value).encode("utf-8")
    return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")


def decode_value(raw: bytes) -> int | float | str | list | dict:
    text = raw.decode("utf-8")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return json.loads(text)


def window_end_timestamp(window_end_ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=window_end_ms)


def cell_row(table, family: str, key: CellKey, values: dict):
    """One DirectRow setting every aggregate of the cell at timestamp W."""
    row = table.direct_row(row_key(*key).encode("utf-8"))
    stamp = window_end_timestamp(key.window_end_ms)
    for name, value in values.items():
        row.set_cell(family, name.encode("utf-8"), encode_value(value), timestamp=stamp)
    return row


def open_table(project: str, instance: str, table: str, admin: bool = False):
    from google.cloud import bigtable

    client = bigtable.Client(project=project, admin=admin)
    return client.instance(instance).table(table)


_SHARED_TABLES: dict = {}
_SHARED_LOCK = threading.Lock()


def shared_table(project: str, instance: str, table: str):
    """One data client per table and process, for DoFn.setup: the local runner calls setup
    for every bundle, and a Bigtable client is costly to make and safe to share."""
    key = (project, instance, table, os.environ.get("BIGTABLE_EMULATOR_HOST"))
    with _SHARED_LOCK:
        found = _SHARED_TABLES.get(key)
        if found is None:
            found = _SHARED_TABLES[key] = open_table(project, instance, table)
        return found


def gc_rule(max_age_s: int):
    """Max age (from the cell timestamp W) and at most one version: the family's GC rule."""
    from google.cloud.bigtable import column_family

    return column_family.GCRuleUnion(
        [
            column_family.MaxAgeGCRule(dt.timedelta(seconds=max_age_s)),
            column_family.MaxVersionsGCRule(1),
        ]
    )


def reference_gc_rules(fs: FeatureSet, retention_s: int) -> dict:
    """{family: GC rule} of the feature set's reference families.

    `{fs}_ref`: a cell is collected only when it is older than `retention_s` (counted from its
    timestamp, valid_from) AND not the newest version of its column. The intersection keeps
    the row that is still valid, however long ago it became valid (a plane's seat count set in
    2001), so serving never sees null where the batch join finds the row; older versions, which
    only events older than the retention need, are collected. `{fs}_static`: one version and no
    age limit (its cells are stamped 0: an age limit would delete them at once)."""
    from google.cloud.bigtable import column_family

    rules = {}
    for table in fs.references:
        family = reference_family(fs, table)
        if table.valid_from is None:
            rules[family] = column_family.MaxVersionsGCRule(1)
        else:
            rules[family] = column_family.GCRuleIntersection(
                [
                    column_family.MaxAgeGCRule(dt.timedelta(seconds=retention_s)),
                    column_family.MaxVersionsGCRule(1),
                ]
            )
    return rules


def gc_max_age_s(rule) -> float | None:
    """The max age of a GC rule in seconds (the first max-age part of a union or intersection);
    None when the rule has none (cells never expire by age)."""
    if rule is None:
        return None
    max_age = getattr(rule, "max_age", None)
    if max_age is not None:
        return max_age.total_seconds()
    for part in getattr(rule, "rules", ()):
        found = gc_max_age_s(part)
        if found is not None:
            return found
    return None


def describe_gc_rule(rule) -> str:
    """What a GC rule collects, in words: 'age > 90000 s or beyond 1 version'."""
    from google.cloud.bigtable import column_family

    if rule is None:
        return "nothing"
    if isinstance(rule, column_family.MaxAgeGCRule):
        seconds = rule.max_age.total_seconds()
        return f"age > {int(seconds) if seconds.is_integer() else seconds} s"
    if isinstance(rule, column_family.MaxVersionsGCRule):
        return f"beyond {rule.max_num_versions} version{'s' if rule.max_num_versions != 1 else ''}"
    joiner = " or " if isinstance(rule, column_family.GCRuleUnion) else " and "
    return joiner.join(describe_gc_rule(part) for part in rule.rules)


def with_max_age(rule, max_age_s: float):
    """The same rule with its max-age part(s) set to `max_age_s`."""
    from google.cloud.bigtable import column_family

    if isinstance(rule, column_family.MaxAgeGCRule):
        return column_family.MaxAgeGCRule(dt.timedelta(seconds=max_age_s))
    if isinstance(rule, (column_family.GCRuleUnion, column_family.GCRuleIntersection)):
        return type(rule)([with_max_age(part, max_age_s) for part in rule.rules])
    return rule


def check_table(project: str, instance: str, table_id: str, family: str | Iterable[str]) -> None:
    """Fail with a clear message, before the job starts, if the table or a family is missing."""
    wanted = [family] if isinstance(family, str) else list(family)
    try:
        table = open_table(project, instance, table_id, admin=True)
        if not table.exists():
            raise BigtableSetupError(
                f"Bigtable table {table_id!r} does not exist in projects/{project}/instances/"
                f"{instance}: create it with `skewless bigtable-setup`"
            )
        families = table.list_column_families()
    except BigtableSetupError:
        raise
    except Exception as exc:  # noqa: BLE001 - any client error means the same to the user here
        raise BigtableSetupError(
            f"cannot reach Bigtable table {table_id!r} in projects/{project}/instances/{instance}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    missing = [f for f in wanted if f not in families]
    if missing:
        names = ", ".join(repr(f) for f in missing)
        raise BigtableSetupError(
            f"Bigtable table {table_id!r} has no column family {names} (has "
            f"{sorted(families)}): run `skewless bigtable-setup` for this feature set"
        )


def check_reference_families(
    project: str,
    instance: str,
    table_id: str,
    fs: FeatureSet,
    tables: Iterable[ReferenceTable] | None = None,
) -> None:
    """check_table for the reference families of `tables` (default: every reference table of
    the feature set); nothing to check when there are none."""
    chosen = fs.references if tables is None else tuple(tables)
    families = (
        reference_families(fs)
        if tables is None
        else tuple(dict.fromkeys(reference_family(fs, t) for t in chosen))
    )
    if families:
        check_table(project, instance, table_id, families)


# Status codes that no retry can fix: the row goes to dead letters at once. Every other
# failure (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, INTERNAL, ... or an exception from the
# client) is retried with backoff for up to the retry budget, then dead-lettered.
PERMANENT_CODES = {
    3: "INVALID_ARGUMENT",
    5: "NOT_FOUND",
    7: "PERMISSION_DENIED",
    9: "FAILED_PRECONDITION",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    16: "UNAUTHENTICATED",
}
ATTEMPT_TIMEOUT_S = 10.0


class _MutateRowsFn(beam.DoFn):
    """Elements -> DirectRows written with mutate_rows per batch of FLUSH_ROWS; rows that cannot
    be written -> dead letters (the DoFn's output). The one retrying write loop of every writer.

    Subclasses say how an element becomes rows (`rows`) and what a dead letter holds
    (`record`). Writes must be idempotent (each cell at a fixed timestamp), so a failed row is
    simply written again: rows that failed transiently (or a call that raised) are retried with
    exponential backoff for up to `retry_s` (a Bigtable or network outage delays rows, it loses
    none); rows rejected with a permanent status, or still failing after the budget, become
    dead letters with stage `write`, the status as reason, and the job goes on.
    """

    def __init__(
        self,
        project: str,
        instance: str,
        table: str,
        family: str,
        retry_s: float,
        counters: tuple[str, str, str],
    ):
        self.project = project
        self.instance = instance
        self.table_id = table
        self.family = family
        self.retry_s = retry_s
        self.counters = counters  # (written, dead-lettered, retries)
        self.letter_source = family  # the dead letters' feature_set field

    def rows(self, element) -> Iterator[tuple]:
        """(DirectRow, payload) pairs of an element; `payload` is what `record` gets."""
        raise NotImplementedError

    def record(self, payload) -> dict:
        """The dead-letter record of a row that could not be written."""
        raise NotImplementedError

    def setup(self) -> None:
        self._table = shared_table(self.project, self.instance, self.table_id)
        written, failed, retries = self.counters
        self._written = Metrics.counter(NAMESPACE, written)
        self._failed = Metrics.counter(NAMESPACE, failed)
        self._retries = Metrics.counter(NAMESPACE, retries)

    def start_bundle(self) -> None:
        self._rows = []

    def process(self, element) -> Iterator[dict]:
        self._rows.extend(self.rows(element))
        if len(self._rows) >= FLUSH_ROWS:
            yield from self._flush()

    def finish_bundle(self) -> Iterator:
        for letter in self._flush():
            yield WindowedValue(letter, MIN_TIMESTAMP, [GlobalWindow()])

    def _flush(self) -> Iterator[dict]:
        pending, self._rows = self._rows, []
        delay, deadline = 0.1, time.monotonic() + self.retry_s
        while pending:
            retry, last_error = [], ""
            try:
                # One attempt per call (retry=None): the backoff and its budget are this loop's.
                statuses = self._table.mutate_rows(
                    [row for row, _ in pending], retry=None, timeout=ATTEMPT_TIMEOUT_S
                )
            except Exception as exc:  # noqa: BLE001 - the call failed as a whole: retry it all
                statuses, retry = None, pending
                last_error = f"{type(exc).__name__}: {exc}"
            for item, status in zip(pending, statuses or (), strict=False):
                if status.code == 0:
                    self._written.inc()
                elif status.code in PERMANENT_CODES:
                    self._failed.inc()
                    yield self._dead_letter(
                        item, f"{PERMANENT_CODES[status.code]}: {status.message}"
                    )
                else:
                    retry.append(item)
                    last_error = f"code {status.code}: {status.message}"
            if not retry:
                return
            if time.monotonic() + delay > deadline:
                for item in retry:
                    self._failed.inc()
                    yield self._dead_letter(
                        item, f"still failing after {self.retry_s:g} s of retries ({last_error})"
                    )
                return
            self._retries.inc(len(retry))
            LOG.warning("retrying %d Bigtable rows in %.1f s (%s)", len(retry), delay, last_error)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
            pending = retry

    def _dead_letter(self, item, reason: str) -> dict:
        _, payload = item
        return dead_letter(
            "write", f"Bigtable write failed: {reason}", self.record(payload), self.letter_source
        )


class _WriteCellsFn(_MutateRowsFn):
    """Cells (or AggregateBlocks) -> one DirectRow per (key, W); a dead letter holds the row
    key and the cell's values."""

    def __init__(self, project: str, instance: str, table: str, family: str, retry_s: float):
        super().__init__(
            project,
            instance,
            table,
            family,
            retry_s,
            ("cells_written", "cells_dead_lettered", "cell_write_retries"),
        )

    def rows(self, element) -> Iterator[tuple]:
        for key, values in explode_cells(element):
            yield cell_row(self._table, self.family, key, values), (key, values)

    def record(self, payload) -> dict:
        key, values = payload
        return {"row_key": row_key(*key), "cells": values}


class WriteCells(beam.PTransform):
    """Cells (or AggregateBlocks) -> Bigtable cells of the contract (counted as
    `cells_written`); returns the dead letters of cells that could not be written."""

    def __init__(
        self,
        project: str,
        instance: str,
        table: str,
        family: str,
        retry_s: float = DEFAULT_WRITE_RETRY_S,
    ):
        super().__init__()
        self.project = project
        self.instance = instance
        self.table = table
        self.family = family
        self.retry_s = retry_s

    def expand(self, cells):
        return cells | "MutateRows" >> beam.ParDo(
            _WriteCellsFn(self.project, self.instance, self.table, self.family, self.retry_s)
        )


def valid_from_ms(table: ReferenceTable, row: dict) -> int:
    """A typed table row's valid_from (epoch ms), 0 for a static table."""
    return int(row[table.valid_from]) if table.valid_from is not None else 0


def cell_timestamp_ms(valid_from: int) -> int:
    """The Bigtable cell timestamp of a version valid from `valid_from` ms: itself, and 0 for a
    time before 1970 (Bigtable holds no negative timestamp): a version stamped 0 is valid at
    or before 1970-01-01, which answers every as-of time from 1970 on. publish-reference
    writes only the latest of a key's pre-1970 versions."""
    return max(valid_from, 0)


def reference_row(bt_table, fs: FeatureSet, table: ReferenceTable, row: dict):
    """One DirectRow setting every declared field of a typed table row (a null as JSON null)
    at timestamp valid_from (static: 0; before 1970: 0), in the table's reference family."""
    key = reference_row_key(table, entity_value(row[table.table_key]))
    out = bt_table.direct_row(key.encode("utf-8"))
    family = reference_family(fs, table)
    stamp = window_end_timestamp(cell_timestamp_ms(valid_from_ms(table, row)))
    for field in table.fields:
        value = encode_value(row.get(field.name))
        out.set_cell(family, field.name.encode("utf-8"), value, timestamp=stamp)
    return out


class _WriteReferenceRowsFn(_MutateRowsFn):
    """Typed rows of a reference table -> one DirectRow each; a dead letter holds the row key
    and the typed row."""

    def __init__(
        self,
        project: str,
        instance: str,
        table: str,
        fs: FeatureSet,
        ref: ReferenceTable,
        retry_s: float,
    ):
        prefix = f"reference_{ref.name}"
        super().__init__(
            project,
            instance,
            table,
            reference_family(fs, ref),
            retry_s,
            (f"{prefix}_rows_written", f"{prefix}_rows_write_failed", f"{prefix}_write_retries"),
        )
        self.fs = fs
        self.ref = ref
        self.letter_source = f"reference:{ref.name}"

    def rows(self, row: dict) -> Iterator[tuple]:
        yield reference_row(self._table, self.fs, self.ref, row), row

    def record(self, row: dict) -> dict:
        key = reference_row_key(self.ref, entity_value(row[self.ref.table_key]))
        return {"row_key": key, "row": row}


class WriteReferenceRows(beam.PTransform):
    """Typed rows of one reference table (one per key and valid_from) -> Bigtable rows of the
    reference layout (counted as `reference_<name>_rows_written`); returns the dead letters of
    rows that could not be written (stage `write`)."""

    def __init__(
        self,
        project: str,
        instance: str,
        table: str,
        fs: FeatureSet,
        ref: ReferenceTable,
        retry_s: float = DEFAULT_WRITE_RETRY_S,
    ):
        super().__init__()
        self.fn = _WriteReferenceRowsFn(project, instance, table, fs, ref, retry_s)

    def expand(self, rows):
        return rows | "MutateRows" >> beam.ParDo(self.fn)


def read_all_cells(table, family: str) -> dict[CellKey, dict]:
    """Every cell of the family: CellKey -> {aggregate: value} (latest version)."""
    return {key: values for key, values, _ in read_cells_with_versions(table, family)}


def read_cells_with_versions(table, family: str) -> Iterator[tuple[CellKey, dict, int]]:
    """(CellKey, {aggregate: latest value}, largest number of versions of any column)."""
    for row in table.read_rows():
        columns = row.cells.get(family, {})
        if not columns:
            continue
        values = {}
        versions = 0
        for name, cells in columns.items():
            values[name.decode("utf-8")] = decode_value(cells[0].value)
            versions = max(versions, len(cells))
        yield parse_row_key(row.row_key), values, versions


def cells_as_dict(cells: Iterable[tuple[CellKey, dict]]) -> dict[CellKey, dict]:
    return {CellKey(*key): values for key, values in cells}
