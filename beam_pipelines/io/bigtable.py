"""Bigtable at the edge of the streaming job: the feature cells of the contract, setup and checks.

Cell layout (docs/architecture.md): row key `{key name}#{key value}#{W zero-padded epoch ms}`, one
column family per feature set (its name), one column per aggregate, cell timestamp W. Values
are UTF-8 text: numbers as `repr` (counts as integers, the others as floats that round-trip
exactly), texts (first/last of a string field), lists (last_k) and maps (histogram, most
frequent first) as JSON.

Idempotency: every write of a cell uses the same timestamp W, and Bigtable keeps one version per
(row, column, timestamp): a retry, a replay or a late pane REPLACES the value instead of adding a
version. The family's GC rule also keeps at most one version (and bounds the age).
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

from transforms.aggregations import CellKey, explode_cells, parse_row_key, row_key
from transforms.validation import dead_letter

NAMESPACE = "skewless"
LOG = logging.getLogger("skewless.bigtable")
FLUSH_ROWS = 500
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


def check_table(project: str, instance: str, table_id: str, family: str) -> None:
    """Fail with a clear message, before the job starts, if the table or the family is missing."""
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
    if family not in families:
        raise BigtableSetupError(
            f"Bigtable table {table_id!r} has no column family {family!r} (has "
            f"{sorted(families)}): run `skewless bigtable-setup` for this feature set"
        )


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
DEFAULT_WRITE_RETRY_S = 600.0
ATTEMPT_TIMEOUT_S = 10.0


class _WriteCellsFn(beam.DoFn):
    """Cells (or AggregateBlocks) -> one DirectRow per (key, W), written with mutate_rows per
    batch; rows that cannot be written -> dead letters (the DoFn's output).

    Writes are idempotent (same timestamp W), so a failed row is simply written again: rows
    that failed transiently (or a call that raised) are retried with exponential backoff for
    up to `retry_s` (a Bigtable or network outage delays cells, it loses none); rows rejected
    with a permanent status, or still failing after the budget, become dead letters with
    stage `write`, the status as reason and the cell as record, and the job goes on.
    """

    def __init__(self, project: str, instance: str, table: str, family: str, retry_s: float):
        self.project = project
        self.instance = instance
        self.table_id = table
        self.family = family
        self.retry_s = retry_s

    def setup(self) -> None:
        self._table = shared_table(self.project, self.instance, self.table_id)
        self._written = Metrics.counter(NAMESPACE, "cells_written")
        self._failed = Metrics.counter(NAMESPACE, "cells_dead_lettered")
        self._retries = Metrics.counter(NAMESPACE, "cell_write_retries")

    def start_bundle(self) -> None:
        self._rows = []

    def process(self, element) -> Iterator[dict]:
        for key, values in explode_cells(element):
            self._rows.append((key, values, cell_row(self._table, self.family, key, values)))
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
                    [row for *_, row in pending], retry=None, timeout=ATTEMPT_TIMEOUT_S
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
        key, values, _ = item
        record = {"row_key": row_key(*key), "cells": values}
        return dead_letter("write", f"Bigtable write failed: {reason}", record, self.family)


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


def read_cells(table, family: str) -> dict[CellKey, dict]:
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
