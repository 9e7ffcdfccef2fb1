"""What the file and message readers hand to the validator: records with their origin. No
Beam here, so a reader runs in any process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import pyarrow as pa

# A reader that must hand text to a parser marks each byte that is not UTF-8 with this
# noncharacter and turns the records holding it into dead letters (files.py).
INVALID_UTF8_MARK = "\U0010ffff"


class UnparseableRow(NamedTuple):
    """A record a source could not even split into fields (e.g. a CSV line with too many columns)."""

    text: str
    reason: str
    file: str = ""
    line: int | None = None


class RawLine(NamedTuple):
    """One JSON-lines record, with its file and 1-based line number."""

    text: str | bytes
    file: str = ""
    line: int | None = None


class RawBatch(NamedTuple):
    """Records of one file as an Arrow batch, with the position of each row in the file:
    its first physical line (CSV, `unit="line"`) or its row index (Parquet, `unit="row"`).

    `texts` (CSV): the original text of each row, for its dead letter: (bytes chunk, start
    offsets, end offsets) into the chunk, one pair per row (start -1: unknown)."""

    batch: pa.RecordBatch
    file: str
    positions: Sequence[int]
    unit: str = "line"
    texts: tuple | None = None


class TracedRecord(NamedTuple):
    """A valid, typed record with what its dead letter must keep should a later step reject
    it (a duplicate reference row): the original (the file's text of the row where the reader
    kept it, else the raw record) and where it came from ({"file", "line"} or {"file", "row"})."""

    record: dict
    original: Any
    origin: dict | None


class StampedPayload(NamedTuple):
    """A Pub/Sub message's payload with the event time its timestamp attribute carries (epoch
    ms). The streaming jobs stamp elements with the attribute; validation checks that the
    payload's own event time is the same, so the two cannot disagree silently."""

    data: bytes
    event_ms: int
