"""The prediction cache in Bigtable: entries per (model version, key), a completion marker per
version, and their reads.

Layout (family `{feature set}_predictions`, one cell per column, every cell of a version at
the version's training time, so writing a version again rewrites the same cells):
- entry row `{feature set}#prediction#{version}#{hash of the key}`: `probability` (the
  model's output, as float text that round-trips), `key` (the key's text: compared on every
  hit, so a hash collision is a miss) and `requests` (how often the key was asked in the
  period precompute read).
- marker row `{feature set}#prediction#{version}#ready`: written after every entry of the
  version, holding precompute's counts as JSON. A scorer serves a version's entries only once
  its marker exists: before, a lookup could find some entries and miss others, which is
  exact too, but a hot swap's first minutes would then depend on how far precompute got.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator

from skewless.beam_pipelines.io.bigtable import _MutateRowsFn, encode_value
from skewless.transforms.featureset import FeatureSet
from skewless.transforms.prediction_cache import (
    cache_family,
    entry_row_key,
    marker_row_key,
)

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
PROBABILITY = b"probability"
KEY = b"key"
REQUESTS = b"requests"
MARKER = b"marker"


def version_timestamp_ms(created_at: str) -> int:
    """The cells' time: the model version's training time (model.json `created_at`)."""
    moment = dt.datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    return (moment - _EPOCH) // dt.timedelta(milliseconds=1)


def _stamp(ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=ms)


def entry_row(table, fs: FeatureSet, version: int, stamp_ms: int, entry: dict):
    """A DirectRow of one cached prediction ({"key", "probability", "requests"})."""
    row = table.direct_row(entry_row_key(fs, version, entry["key"]).encode("utf-8"))
    family, stamp = cache_family(fs), _stamp(stamp_ms)
    row.set_cell(family, PROBABILITY, encode_value(float(entry["probability"])), timestamp=stamp)
    row.set_cell(family, KEY, entry["key"].encode("utf-8"), timestamp=stamp)
    row.set_cell(family, REQUESTS, encode_value(int(entry["requests"])), timestamp=stamp)
    return row


class WriteEntriesFn(_MutateRowsFn):
    """Cache entries -> Bigtable rows (counted `prediction_cache_entries_written`); entries
    that cannot be written -> dead letters (stage `write`) on the main output."""

    def __init__(self, project: str, instance: str, table: str, fs: FeatureSet, version: int,
                 stamp_ms: int, retry_s: float):  # fmt: skip
        super().__init__(
            project,
            instance,
            table,
            cache_family(fs),
            retry_s,
            (
                "prediction_cache_entries_written",
                "prediction_cache_entries_write_failed",
                "prediction_cache_write_retries",
            ),
        )
        self.fs = fs
        self.version = version
        self.stamp_ms = stamp_ms

    def rows(self, entry: dict) -> Iterator[tuple]:
        yield entry_row(self._table, self.fs, self.version, self.stamp_ms, entry), entry

    def record(self, entry: dict) -> dict:
        return {"row_key": entry_row_key(self.fs, self.version, entry["key"]), "entry": entry}


def write_marker(table, fs: FeatureSet, version: int, stamp_ms: int, marker: dict) -> None:
    """The version's completion marker (raises if Bigtable refuses it: the run then fails,
    and a re-run writes it; the entries are already there)."""
    row = table.direct_row(marker_row_key(fs, version).encode("utf-8"))
    text = json.dumps(marker, sort_keys=True, separators=(",", ":")).encode("utf-8")
    row.set_cell(cache_family(fs), MARKER, text, timestamp=_stamp(stamp_ms))
    status = table.mutate_rows([row])[0]
    if status.code != 0:
        raise RuntimeError(f"the prediction cache marker could not be written: {status.message}")


def read_marker(table, fs: FeatureSet, version: int) -> dict | None:
    """A version's marker, or None before precompute finished it."""
    from google.cloud.bigtable.row_filters import CellsColumnLimitFilter

    row = table.read_row(marker_row_key(fs, version).encode("utf-8"), CellsColumnLimitFilter(1))
    cells = (row.cells.get(cache_family(fs), {}) if row is not None else {}).get(MARKER)
    return json.loads(cells[0].value) if cells else None
