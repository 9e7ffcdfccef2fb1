"""Raw record -> typed event, or a dead letter carrying the stage, the reason and the original."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from skewless.transforms.example_schema import event_arrow_schema
from skewless.transforms.featureset import FeatureSet
from skewless.transforms.records import (
    RawBatch,
    RawLine,
    StampedPayload,
    TracedRecord,
    UnparseableRow,
)

VALID = "valid"
DEAD = "dead"
NAMESPACE = "skewless"
LOG = logging.getLogger(__name__)

_UTC = dt.UTC
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=_UTC)

# What the typed pipeline can carry. Integers become Arrow int64 and tf.int64; floats become
# float64 in features/ and float32 in tf.Transform, so a finite float64 beyond float32 would
# silently turn into an infinity there.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
# Valid events per RecordBatch when the events are batched (CheckRecordsFn `batches`).
EVENT_BATCH_ROWS = 20_000
# Entity key values end up in Bigtable row keys (at most 4 KiB with the key name and W).
MAX_KEY_BYTES = 1024


class InvalidRecord(ValueError):
    """A record breaks the schema; the message is the dead letter's reason."""


def dead_letter(
    stage: str, reason: str, record: Any, feature_set: str = "", origin: dict | None = None
) -> dict:
    """A dead-letter record: JSON-serialisable, with the original payload kept whole.

    `origin` says where the record came from: {"file": path, "line": n} (CSV, JSON lines; the
    first physical line of the record, 1-based, the header is line 1) or {"file", "row"}
    (Parquet: the 0-based row index in the file).
    """
    letter = {
        "stage": stage,
        "reason": reason,
        "feature_set": feature_set,
        "record": _jsonable(record),
    }
    if isinstance(record, bytes) and not _is_utf8(record):
        # Bytes that are not text are kept exactly, as base64, not re-encoded with U+FFFD.
        letter["record"] = base64.b64encode(record).decode("ascii")
        letter["record_encoding"] = "base64"
    if origin:
        letter.update(origin)
    return letter


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _jsonable(value: Any) -> Any:
    if isinstance(value, (UnparseableRow, RawLine)):
        return value.text
    if isinstance(value, str):
        # A lone surrogate (JSON "\\ud800") cannot be written as UTF-8 by any sink.
        return value if value.isascii() else value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return repr(value)


# --- coercion of one value to its declared type -------------------------------------------------


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidRecord("is a boolean, expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidRecord(f"{value!r} is not an integer")
        return int(value)
    if isinstance(value, decimal.Decimal):  # BigQuery NUMERIC
        if not value.is_finite() or value != value.to_integral_value():
            raise InvalidRecord(f"{value} is not an integer")
        return int(value)
    if isinstance(value, str):
        if "_" in value:  # Python's int() reads "1_000"; no file format means that
            raise InvalidRecord(f"{value!r} is not an integer")
        try:
            return int(value)
        except ValueError:
            try:
                as_float = float(value)
            except ValueError:
                raise InvalidRecord(f"{value!r} is not an integer") from None
            return _to_int(as_float)
    raise InvalidRecord(f"has type {type(value).__name__}, expected an integer")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidRecord("is a boolean, expected a number")
    if isinstance(value, (int, float, decimal.Decimal)):
        out = float(value)
    elif isinstance(value, str):
        try:
            if "_" in value:
                raise ValueError(value)
            out = float(value)
        except ValueError:
            raise InvalidRecord(f"{value!r} is not a number") from None
    else:
        raise InvalidRecord(f"has type {type(value).__name__}, expected a number")
    return out


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise InvalidRecord(f"{value!r} is not a boolean")


def _to_string(value: Any) -> str:
    if isinstance(value, str):
        if not value.isascii():
            _check_utf8(value)
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRecord("is not valid UTF-8") from None
    raise InvalidRecord(f"has type {type(value).__name__}, expected a string")


def _check_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRecord("is not valid Unicode (a lone surrogate)") from None


_NUMBER_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
# The fraction of an ISO-8601 time past the microsecond, which datetime.fromisoformat drops.
_SUB_MICROSECOND = re.compile(r"[.,]\d{6}(\d+)")

# Timestamps become epoch milliseconds. An event time is rounded down (floor): every window
# bound, period and delay is a whole number of milliseconds, so the window an event falls in
# is the same as for its exact time. A validity time (a reference row's valid_from) is
# rounded up: `valid_from <= t - D` then holds for the rounded value exactly when it holds for
# the exact one, so a row is never joined before it is valid, at any precision the input
# carries (docs/architecture.md, "Reference tables"). The parsers below give the floor and
# whether a nonzero part below the millisecond was dropped; `to_epoch_ms` applies the rule.


@lru_cache(maxsize=65536)
def _parse_timestamp_text(text: str) -> tuple[int, bool]:
    # Timestamps repeat a lot in real data (hours, dates): the cache makes parsing nearly free.
    stripped = text.strip()
    if _NUMBER_TEXT.fullmatch(stripped):
        # Epoch seconds as text: what a CSV or a text column holds where JSON has a number.
        # (ISO-8601's basic form 20130101 is taken as epoch seconds too: one rule for digits.)
        digits = stripped.lstrip("+-")
        if digits.isdigit() and len(digits) <= 18:  # exact, no float rounding
            return int(stripped) * 1000, False
        try:
            millis = decimal.Decimal(stripped) * 1000
            floor = int(millis.to_integral_value(rounding=decimal.ROUND_FLOOR))
        except (decimal.InvalidOperation, OverflowError):
            raise InvalidRecord(f"{text!r} is not a timestamp") from None
        return floor, millis != floor
    try:
        parsed = dt.datetime.fromisoformat(stripped)
    except ValueError:
        raise InvalidRecord(f"{text!r} is not an ISO-8601 timestamp or epoch seconds") from None
    floor, below = _datetime_ms(parsed)
    beyond = _SUB_MICROSECOND.search(stripped)
    return floor, below or bool(beyond and beyond.group(1).strip("0"))


def _epoch_seconds_ms(seconds: float | int) -> tuple[int, bool]:
    if isinstance(seconds, int):
        return seconds * 1000, False
    if not math.isfinite(seconds):
        raise InvalidRecord(f"{seconds!r} is not a timestamp")
    # A float carries about 16 significant digits, i.e. microseconds for epoch seconds of
    # today: rounded to the microsecond first, so 1357016400.123 is 123 ms, not 122.999...
    micros = round(seconds * 1_000_000)
    return micros // 1000, micros % 1000 != 0


def _datetime_ms(value: dt.datetime) -> tuple[int, bool]:
    if value.tzinfo is None:  # naive timestamps are UTC by contract (documented in the README)
        value = value.replace(tzinfo=_UTC)
    delta = value - _EPOCH
    floor = (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
    return floor, delta.microseconds % 1000 != 0


def _epoch_seconds_to_ms(seconds: float | int, round_up: bool = False) -> int:
    floor, below = _epoch_seconds_ms(seconds)
    return floor + (round_up and below)


def to_epoch_ms(value: Any, round_up: bool = False) -> int:
    """Timestamp -> epoch ms. Accepts ISO-8601 text, datetime, or a number of epoch seconds.

    Rounded down (an event time), or up with `round_up` (a validity time), at any precision
    the value carries."""
    if isinstance(value, str):
        floor, below = _parse_timestamp_text(value)
    elif isinstance(value, dt.datetime):
        floor, below = _datetime_ms(value)
    elif isinstance(value, bool):
        raise InvalidRecord("is a boolean, expected a timestamp")
    elif isinstance(value, (int, float)):
        floor, below = _epoch_seconds_ms(value)
    elif isinstance(value, dt.date):
        floor, below = _datetime_ms(dt.datetime(value.year, value.month, value.day))
    else:
        raise InvalidRecord(f"has type {type(value).__name__}, expected a timestamp")
    return floor + (round_up and below)


def ms_to_datetime(ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=ms)


_COERCE: dict[str, Callable[[Any], Any]] = {
    "int": _to_int,
    "float": _to_float,
    "bool": _to_bool,
    "string": _to_string,
    "timestamp": to_epoch_ms,
}


class RecordChecker:
    """Validates raw records against a feature set's schema and derives its event fields.

    `validate(raw)` returns the typed record (the derived fields included) or raises
    InvalidRecord; it returns None for a valid record that is not an event.

    Besides each field's declared type, nullability and range, a value must be one the typed
    pipeline can carry, whatever the input format: integers within int64, floats finite and
    within float32 (NaN and infinities only in fields listed in the feature set's
    `allow_non_finite`), timestamps within the feature set's `timestamp_range` (default
    1900-01-01 to 2201-01-01, end excluded), text that is valid Unicode, entity keys of at most
    MAX_KEY_BYTES bytes. NaN is never taken for null.
    """

    def __init__(self, fs: FeatureSet, round_up: Iterable[str] = ()):
        """`round_up`: timestamp fields that are validity times, rounded up to the millisecond
        (every other timestamp is rounded down; see `to_epoch_ms`)."""
        self.fs = fs
        self.round_up = frozenset(round_up)
        non_finite_ok = frozenset(fs.allow_non_finite)
        start, end = fs.timestamp_range
        self.timestamp_range = (str(start), str(end))
        self._ts_lo, self._ts_hi = to_epoch_ms(start), to_epoch_ms(end)
        self._plan = [
            (
                f.name,
                f.type,
                _COERCE[f.type],
                f.nullable,
                f.min_value,
                f.max_value,
                f.name in non_finite_ok,
                f.name in self.round_up,
            )
            for f in fs.schema
        ]
        self._names = frozenset(f.name for f in fs.schema)
        self._reject_unexpected = fs.unexpected_fields == "reject"
        self._derived = [(f.name, f.type) for f in fs.derived_fields if f.type != "string"]
        self._keys = tuple(fs.keys)

    def typed(self, raw: dict) -> dict:
        if not isinstance(raw, dict):
            raise InvalidRecord(f"record is a {type(raw).__name__}, expected a JSON object")
        if self._reject_unexpected and not self._names.issuperset(raw):
            extra = sorted(str(k) for k in raw.keys() - self._names)
            raise InvalidRecord(f"unexpected fields {extra}")
        out = {}
        ts_lo, ts_hi = self._ts_lo, self._ts_hi
        # The common cases (values already of their type, as Arrow and JSON give them) are
        # handled inline: this loop runs for every field of every record of every job.
        for name, kind, coerce, nullable, lo, hi, non_finite_ok, up in self._plan:
            value = raw.get(name)
            t = type(value)
            if value is None or (t is str and kind != "string" and value == ""):
                if not nullable:
                    if name in raw:
                        raise InvalidRecord(f"required field {name!r} is null")
                    raise InvalidRecord(f"missing required field {name!r}")
                out[name] = None
                continue
            if kind == "string":
                if t is not str or not value.isascii():
                    value = self._coerce(name, kind, coerce, value)
                out[name] = value
                continue
            if kind == "int" and t is int and INT64_MIN <= value <= INT64_MAX:
                pass
            elif kind == "float" and t is float and -FLOAT32_MAX <= value <= FLOAT32_MAX:
                pass  # NaN fails the comparison and takes the slow path
            elif (
                kind == "timestamp"
                and t is float
                and -1e12 < value < 1e12  # NaN fails the comparison and takes the slow path
                and ts_lo <= (ms := _epoch_seconds_to_ms(value, up)) < ts_hi
            ):
                value = ms  # epoch seconds, as Arrow timestamps reach here
            else:
                value = self._coerce(name, kind, coerce, value, non_finite_ok, up)
            if lo is not None and value < lo:
                raise InvalidRecord(f"field {name!r} = {value!r} is below the minimum {lo!r}")
            if hi is not None and value > hi:
                raise InvalidRecord(f"field {name!r} = {value!r} is above the maximum {hi!r}")
            out[name] = value
        return out

    def _coerce(
        self,
        name: str,
        kind: str,
        coerce,
        original: Any,
        non_finite_ok: bool = False,
        round_up: bool = False,
    ):
        """The value of one field as its type, or InvalidRecord naming the field."""
        value = original
        try:
            if type(value) is bytes and kind != "string":
                value = _to_string(value)
            if kind == "float":
                value = float(value) if type(value) in (float, int) else coerce(value)
                if not math.isfinite(value):
                    if non_finite_ok:
                        return value  # a declared range still applies to infinities
                    raise InvalidRecord(f"{original!r} is not a finite number")
                if not -FLOAT32_MAX <= value <= FLOAT32_MAX:
                    raise InvalidRecord(f"{original!r} is beyond the float32 range")
            elif kind == "int":
                if type(value) is not int:
                    value = coerce(value)
                if not INT64_MIN <= value <= INT64_MAX:
                    raise InvalidRecord(f"{original!r} is outside the 64-bit integer range")
            elif kind == "timestamp":
                value = to_epoch_ms(value, round_up)
                if not self._ts_lo <= value < self._ts_hi:
                    raise InvalidRecord(
                        f"{original!r} is outside the accepted time range "
                        f"[{self.timestamp_range[0]}, {self.timestamp_range[1]})"
                    )
            else:
                value = coerce(value)
        except OverflowError:  # float() of an integer beyond float64
            raise InvalidRecord(f"field {name!r} {original!r} is beyond the float range") from None
        except InvalidRecord as exc:
            raise InvalidRecord(f"field {name!r} {exc}") from None
        return value

    def derive(self, record: dict) -> dict | None:
        fs = self.fs
        if fs.derive is not None:
            record = fs.derive(record)
            if record is None:
                return None
        self.check_derived(record)
        return record

    def check_derived(self, record: dict) -> None:
        """The rules of a derived record: an event time in epoch ms, derived values within
        what the pipeline carries, entity keys short enough for a row key."""
        fs = self.fs
        event_time = record.get(fs.event_time)
        if event_time is None:
            raise InvalidRecord(f"missing event time {fs.event_time!r}")
        if not isinstance(event_time, int) or isinstance(event_time, bool):
            raise InvalidRecord(f"event time {fs.event_time!r} is not epoch milliseconds")
        # Derived values obey the same limits as raw ones: a derive() that adds minutes to an
        # hour can still leave the range, and its output is what the pipeline carries.
        lo, hi = self._ts_lo, self._ts_hi
        for name, kind in self._derived:
            value = record.get(name)
            if value is None:
                continue
            if kind == "timestamp":
                if not lo <= value < hi:
                    raise InvalidRecord(
                        f"derived {name!r} = {value!r} ms is outside the accepted time range "
                        f"[{self.timestamp_range[0]}, {self.timestamp_range[1]})"
                    )
            elif kind == "int":
                if not INT64_MIN <= value <= INT64_MAX:
                    raise InvalidRecord(
                        f"derived {name!r} = {value!r} is outside the 64-bit integer range"
                    )
            elif kind == "float" and not -FLOAT32_MAX <= value <= FLOAT32_MAX:
                raise InvalidRecord(f"derived {name!r} = {value!r} is not a finite float32")
        for key in self._keys:
            value = record.get(key)
            if type(value) is str and len(value) * 4 > MAX_KEY_BYTES:
                if len(value.encode("utf-8")) > MAX_KEY_BYTES:
                    raise InvalidRecord(f"entity key {key!r} is longer than {MAX_KEY_BYTES} bytes")

    def validate(self, raw: dict) -> dict | None:
        return self.derive(self.typed(raw))


class BatchChecker:
    """RecordChecker's type, null and range rules, vectorised over an Arrow batch.

    `typed(batch)` gives the batch typed to the raw schema (timestamps as epoch ms, the
    rounding of `to_epoch_ms`) and a mask of the rows that pass every rule; a row outside the
    mask is handed to RecordChecker, which names the rule it breaks (or, for the few values only
    it can coerce, accepts it). It returns None when a column is of a type it does not type
    the way RecordChecker would (numbers as text, integers stored as floats, timestamps as
    text or numbers, a column the feature set rejects as unexpected): such a batch is checked
    row by row. The rules are RecordChecker's, column by column, so the two accept the same
    rows with the same values (tests/contract/test_batch_checks.py).
    """

    def __init__(self, checker: RecordChecker):
        self.checker = checker
        fs = checker.fs
        self._fields = fs.schema
        self._names = frozenset(f.name for f in fs.schema)
        self._non_finite_ok = frozenset(fs.allow_non_finite)
        self._schema = pa.schema(
            [event_arrow_schema(fs).field(f.name) for f in fs.schema]
        )

    def typed(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, np.ndarray] | None:
        if self.checker._reject_unexpected and not self._names.issuperset(batch.schema.names):
            return None
        n = batch.num_rows
        ok = np.ones(n, dtype=bool)
        arrays = []
        try:
            for f in self._fields:
                index = batch.schema.get_field_index(f.name)
                column = batch.column(index) if index >= 0 else pa.nulls(n)
                typed = self._column(f, column, ok)
                if typed is None:
                    return None
                arrays.append(typed)
        except (pa.ArrowException, ValueError, OverflowError):
            return None
        return pa.RecordBatch.from_arrays(arrays, schema=self._schema), ok

    def _column(self, f, column: pa.Array, ok: np.ndarray) -> pa.Array | None:
        """`column` typed as field `f`, clearing in `ok` the rows that break a rule of `f`;
        None if its type is not one handled here."""
        kind, t = f.type, column.type
        target = self._schema.field(f.name).type
        if pa.types.is_null(t):
            column = pa.nulls(len(column), target)
        elif kind == "int":
            if not pa.types.is_integer(t) or t == pa.uint64():
                return None
            column = column.cast(pa.int64())
        elif kind == "float":
            if not (pa.types.is_floating(t) or pa.types.is_integer(t)):
                return None
            column = column.cast(pa.float64(), safe=False)
            values = column.to_numpy(zero_copy_only=False)
            with np.errstate(invalid="ignore"):
                finite = np.isfinite(values)
                if f.name not in self._non_finite_ok:
                    ok &= finite | np.isnan(values) & ~column.is_valid().to_numpy(
                        zero_copy_only=False
                    )
                ok &= ~finite | (np.abs(values) <= FLOAT32_MAX)
        elif kind == "bool":
            if pa.types.is_boolean(t):
                pass
            elif pa.types.is_string(t) or pa.types.is_large_string(t):
                lower = pc.utf8_lower(column)
                known = pc.is_in(lower, value_set=pa.array(["true", "false", "1", "0"]))
                # "" is null for a non-string field, as RecordChecker reads it.
                ok &= pc.or_kleene(known, pc.equal(column, "")).fill_null(True).to_numpy(
                    zero_copy_only=False
                )
                truthy = pc.is_in(lower, value_set=pa.array(["true", "1"]))
                column = pc.if_else(pc.and_(known, pc.is_valid(column)), truthy, None)
            else:
                return None
        elif kind == "string":
            if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
                return None
            column = column.cast(pa.string())
        elif kind == "timestamp":
            if pa.types.is_date(t):
                column = column.cast(pa.timestamp("s"))
            elif not pa.types.is_timestamp(column.type):
                return None
            to_ms = pc.ceil_temporal if f.name in self.checker.round_up else pc.floor_temporal
            millis = to_ms(column, unit="millisecond").cast(pa.timestamp("ms")).cast(pa.int64())
            lo, hi = self.checker._ts_lo, self.checker._ts_hi
            inside = pc.and_(pc.greater_equal(millis, lo), pc.less(millis, hi))
            ok &= inside.fill_null(True).to_numpy(zero_copy_only=False)
            column = millis.cast(target)
        else:
            return None
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        if not f.nullable:
            ok &= valid
        if kind in ("int", "float") and (f.min_value is not None or f.max_value is not None):
            _within(column, f, ok)
        return column


    def derive(self, typed: pa.RecordBatch) -> tuple[pa.RecordBatch, np.ndarray, np.ndarray]:
        """Typed records -> (their events as a batch of `event_arrow_schema`, the mask of the
        records that are events, the mask of those whose derived values pass RecordChecker's
        `check_derived` rules), by the feature set's `derive_batch`."""
        fs, checker = self.checker.fs, self.checker
        derived, is_event = fs.derive_batch(epoch_ms_table(typed))
        schema = event_arrow_schema(fs)
        n = typed.num_rows
        arrays = list(typed.columns)
        for f in fs.derived_fields:
            if f.name not in derived:
                raise ValueError(f"derive_batch gave no column {f.name!r}")
            column = derived[f.name]
            if isinstance(column, pa.ChunkedArray):
                column = column.combine_chunks()
            elif not isinstance(column, pa.Array):
                column = pa.array(column)
            if len(column) != n:
                raise ValueError(f"derive_batch gave {len(column)} values of {f.name!r} for {n}")
            arrays.append(column.cast(schema.field(f.name).type))
        events = pa.RecordBatch.from_arrays(arrays, schema=schema)
        if is_event is None:
            event_mask = np.ones(n, dtype=bool)
        else:
            event_mask = pa.array(is_event).fill_null(False).to_numpy(zero_copy_only=False)
        ok = events.column(fs.event_time).is_valid().to_numpy(zero_copy_only=False)
        for f in fs.derived_fields:
            column = events.column(f.name)
            if f.type == "timestamp":
                millis = column.cast(pa.int64())
                inside = pc.and_(
                    pc.greater_equal(millis, checker._ts_lo), pc.less(millis, checker._ts_hi)
                )
                ok &= inside.fill_null(True).to_numpy(zero_copy_only=False)
            elif f.type == "float":
                within = pc.less_equal(pc.abs(column), FLOAT32_MAX)  # NaN is not within
                ok &= within.fill_null(True).to_numpy(zero_copy_only=False)
        for key in fs.keys:
            column = events.column(key)
            if pa.types.is_string(column.type):
                short = pc.less_equal(pc.binary_length(column), MAX_KEY_BYTES)
                ok &= short.fill_null(True).to_numpy(zero_copy_only=False)
        return events, event_mask, ok


def epoch_ms_table(batch: pa.RecordBatch) -> pa.Table:
    """A batch of typed records or events as a Table with its timestamps as epoch ms: as
    `derive_batch` and `derive` take records."""
    table = pa.Table.from_batches([batch])
    for i, field in enumerate(table.schema):
        if pa.types.is_timestamp(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(pa.int64()))
    return table


def event_records(batch: pa.RecordBatch) -> list[dict]:
    """A batch of `CheckRecords(batches=True)`'s events as the dicts its record-by-record
    path gives (timestamps as epoch ms), for a step that takes one event at a time."""
    return epoch_ms_table(batch).to_pylist()


def _within(column: pa.Array, f, ok: np.ndarray) -> None:
    """Clear in `ok` the rows of a number column below f.min_value or above f.max_value, as
    Python compares them (integers against integral bounds exactly)."""
    lo, hi = f.min_value, f.max_value
    if f.type == "int":
        lo = None if lo is None else math.ceil(lo)
        hi = None if hi is None else math.floor(hi)
    if lo is not None:
        ok &= pc.greater_equal(column, lo).fill_null(True).to_numpy(zero_copy_only=False) | _nan(column)
    if hi is not None:
        ok &= pc.less_equal(column, hi).fill_null(True).to_numpy(zero_copy_only=False) | _nan(column)


def _nan(column: pa.Array) -> np.ndarray:
    """NaN passes a range check (Python's comparisons with NaN are all false)."""
    if not pa.types.is_floating(column.type):
        return np.zeros(len(column), dtype=bool)
    return pc.is_nan(column).fill_null(False).to_numpy(zero_copy_only=False)


def parse_json_payload(payload: str | bytes) -> Any:
    """JSON text (a Pub/Sub message, a JSON-lines row) -> value; InvalidRecord if unparseable."""
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRecord(
                f"not UTF-8: byte 0x{payload[exc.start]:02x} at offset {exc.start}"
            ) from None
    try:
        return json.loads(payload)
    except ValueError as exc:
        raise InvalidRecord(f"not JSON: {exc}") from None


# (file, unit, position[, original text]) of one record, turned into a dict only for dead
# letters; the original text, when a reader kept it, replaces the parsed row in the letter.
Where = tuple


def origin_of(where: Where | None) -> dict | None:
    if where is None:
        return None
    file, unit, position = where[:3]
    out = {"file": file} if file else {}
    if position is not None and position >= 0:  # -1: the reader could not tell
        out[unit] = int(position)
    return out or None


def iter_raw_records(
    element: Any, round_up: frozenset[str] = frozenset()
) -> Iterator[tuple[str, Any, Where | None]]:
    """Flatten what a source emits into (stage, raw record, where it came from) triples.

    Sources emit RecordBatches (plain or as RawBatch with positions), dicts, JSON text (plain
    or as RawLine) and UnparseableRows. `round_up`: timestamp columns of a batch rounded up to
    the millisecond (validity times), the others down.
    """
    if isinstance(element, RawBatch):
        file, unit, positions = element.file, element.unit, element.positions
        positions = positions.tolist() if hasattr(positions, "tolist") else positions
        originals = _row_texts(element.texts, len(positions))
        for row, position, original in zip(
            _rows_or_unparseable(element.batch, round_up), positions, originals, strict=True
        ):
            stage = "parse" if type(row) is UnparseableRow else "validate"
            yield stage, row, (file, unit, position, original)
        return
    if isinstance(element, RawLine):
        yield "parse", element.text, (element.file, "line", element.line)
        return
    if isinstance(element, StampedPayload):
        yield "parse", element.data, None
        return
    if isinstance(element, UnparseableRow):
        where = (element.file, "line", element.line) if element.file or element.line else None
        yield "parse", element, where
        return
    if isinstance(element, (str, bytes)):
        yield "parse", element, None
        return
    if isinstance(element, pa.RecordBatch):
        for row in _rows_or_unparseable(element, round_up):
            yield ("parse" if isinstance(row, UnparseableRow) else "validate"), row, None
        return
    yield "validate", element, None


def _row_texts(texts: tuple | None, n: int) -> list:
    """The original text of each row of a RawBatch (None where the reader could not tell)."""
    if texts is None:
        return [None] * n
    chunk, starts, ends = texts
    out = []
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        out.append(None if start < 0 else chunk[start:end].decode("utf-8", "replace"))
    return out


def _batch_rows(batch: pa.RecordBatch, round_up: frozenset[str] = frozenset()) -> list[dict]:
    # Timestamp and date columns become epoch seconds: converting them to datetime objects row
    # by row costs more than all the validation (to_epoch_ms takes numbers as epoch seconds),
    # and Python's datetime cannot even hold the years past 9999 a corrupt file may carry.
    columns = []
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
            if pa.types.is_date(column.type):
                column = column.cast(pa.timestamp("s"))
            # Whole milliseconds by the rule of to_epoch_ms (down; up for a validity time),
            # toward minus infinity for the times before 1970 too.
            to_ms = pc.ceil_temporal if name in round_up else pc.floor_temporal
            millis = to_ms(column, unit="millisecond").cast(pa.timestamp("ms")).cast(pa.int64())
            column = pc.divide(millis.cast(pa.float64()), 1000.0)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names).to_pylist()


def _rows_or_unparseable(
    batch: pa.RecordBatch, round_up: frozenset[str] = frozenset()
) -> Iterator[dict | UnparseableRow]:
    """Rows of a batch as dicts; a row Python cannot represent becomes an UnparseableRow."""
    try:
        yield from _batch_rows(batch, round_up)
        return
    except (pa.ArrowException, ValueError, OverflowError):
        pass
    for i in range(batch.num_rows):
        row = batch.slice(i, 1)
        try:
            yield _batch_rows(row, round_up)[0]
        except (pa.ArrowException, ValueError, OverflowError) as exc:
            yield UnparseableRow(repr(row.to_pydict())[:2000], f"row cannot be read: {exc}")


def _original(raw: Any, where: Where | None) -> Any:
    """What a dead letter keeps: the record's original text when the reader kept it."""
    if where is not None and len(where) > 3 and where[3] is not None:
        return where[3]
    return raw


def check_stamp(fs: FeatureSet, event: dict, stamped_ms: int) -> None:
    """A message's timestamp attribute must carry its payload's event time: the attribute
    drives the watermark and the lateness of the streaming jobs, the payload the windows and
    the as-of time, and both jobs must read the same instant off the same message."""
    if event[fs.event_time] != stamped_ms:
        raise InvalidRecord(
            f"the timestamp attribute says {ms_to_datetime(stamped_ms).isoformat()} "
            f"({stamped_ms} ms) but the payload's event time {fs.event_time!r} is "
            f"{ms_to_datetime(event[fs.event_time]).isoformat()} ({event[fs.event_time]} ms)"
        )


class CheckRecordsFn(beam.DoFn):
    """Raw element(s) -> typed events on the main output, dead letters on `dead`.

    Counts every record read, valid, rejected and valid-but-not-an-event. `round_up`: the
    validity-time fields (RecordChecker); `traced`: valid records come as TracedRecords,
    keeping their original and origin for a later step's dead letter. `batches` (the bounded
    jobs): valid events come as RecordBatches of `event_arrow_schema`, up to `batch_rows` per
    batch, gathered over the bundle (global window), so what follows is columnar.
    """

    def __init__(
        self,
        fs: FeatureSet,
        counters: str = "records",
        round_up: Iterable[str] = (),
        traced: bool = False,
        batches: bool = False,
        batch_rows: int = EVENT_BATCH_ROWS,
    ):
        if traced and batches:
            raise ValueError("traced records are not batched")
        self.fs = fs
        self.counters = counters
        self.round_up = frozenset(round_up)
        self.traced = traced
        self.batches = batches
        self.batch_rows = batch_rows

    def setup(self) -> None:
        self._validator = RecordChecker(self.fs, self.round_up)
        prefix = self.counters
        self._read = Metrics.counter(NAMESPACE, f"{prefix}_read")
        self._valid = Metrics.counter(NAMESPACE, f"{prefix}_valid")
        self._rejected = Metrics.counter(NAMESPACE, f"{prefix}_rejected")
        self._not_events = Metrics.counter(NAMESPACE, f"{prefix}_not_events")
        if self.batches:
            self._schema = event_arrow_schema(self.fs)
            self._batch_checker = BatchChecker(self._validator)
            self._warned = False

    def start_bundle(self) -> None:
        # Events not yet in a batch: (event, original, origin) or (event, batch, row), and
        # event batches (derive_batch).
        self._pending: list[tuple] = []
        self._batches: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def process(self, element: Any) -> Iterable:
        if self.batches and isinstance(element, (RawBatch, pa.RecordBatch)):
            yield from self._columnar(element)
        else:
            yield from self._rows(element)
        if self.batches and self._pending_rows >= self.batch_rows:
            yield from self._flush()

    def _rows(self, element: Any) -> Iterator:
        """Record by record (RecordChecker): every element that is not an Arrow batch, and
        the rows of a batch that BatchChecker does not accept."""
        validator = self._validator
        read = valid = rejected = not_events = 0
        stamped = element.event_ms if type(element) is StampedPayload else None
        for stage, raw, where in iter_raw_records(element, self.round_up):
            read += 1
            try:
                record = raw
                if isinstance(raw, UnparseableRow):
                    raise InvalidRecord(raw.reason)
                if stage == "parse":
                    record = parse_json_payload(raw)
                    stage = "validate"
                record = validator.typed(record)
                stage = "derive"
                event = validator.derive(record)
                if stamped is not None and event is not None:
                    stage = "timestamp"
                    check_stamp(self.fs, event, stamped)
            except Exception as exc:  # noqa: BLE001 - a user's derive() bug must not kill the job
                rejected += 1
                yield TaggedOutput(DEAD, self._dead(stage, exc, _original(raw, where), where))
                continue
            if event is None:
                not_events += 1
                continue
            if self.batches:
                self._pending.append((event, _original(raw, where), origin_of(where)))
                self._pending_rows += 1
                continue
            valid += 1
            yield TracedRecord(event, _original(raw, where), origin_of(where)) if self.traced else event
        self._read.inc(read)
        self._valid.inc(valid)
        self._rejected.inc(rejected)
        self._not_events.inc(not_events)

    def _dead(self, stage: str, exc: Exception, original: Any, where: Where | None) -> dict:
        reason = str(exc) if isinstance(exc, InvalidRecord) else f"{type(exc).__name__}: {exc}"
        return dead_letter(stage, reason, original, self.fs.name, origin_of(where))

    def _columnar(self, element: RawBatch | pa.RecordBatch) -> Iterator:
        """An Arrow batch checked column by column (BatchChecker); the rows it does not
        accept go record by record, for their reason. Derived by `derive_batch` where the
        feature set has one, else by `derive` over the rows."""
        batch = element.batch if isinstance(element, RawBatch) else element
        checked = self._batch_checker.typed(batch)
        if checked is None:
            yield from self._rows(element)
            return
        typed, ok = checked
        rows = np.arange(batch.num_rows)
        if not ok.all():
            yield from self._rows(_take(element, np.flatnonzero(~ok)))
            typed, rows = typed.filter(pa.array(ok)), rows[ok]
        self._read.inc(typed.num_rows)
        if not typed.num_rows:
            return
        if self.fs.derive_batch is not None:
            try:
                derived = self._batch_checker.derive(typed)
            except Exception as exc:  # noqa: BLE001 - derive, record by record, names the rows
                if not self._warned:
                    LOG.warning("derive_batch failed (%s); deriving record by record", exc)
                    self._warned = True
                derived = None
            if derived is not None:
                yield from self._derived_batch(element, rows, *derived)
                return
        records = epoch_ms_table(typed).to_pylist()
        rejected = not_events = 0
        for record, row in zip(records, rows.tolist(), strict=True):
            try:
                event = self._validator.derive(record)
            except Exception as exc:  # noqa: BLE001 - a user's derive() bug must not kill the job
                rejected += 1
                original, where = _source_at(element, row, self.round_up)
                yield TaggedOutput(DEAD, self._dead("derive", exc, original, where))
                continue
            if event is None:
                not_events += 1
                continue
            self._pending.append((event, element, row))
            self._pending_rows += 1
        self._rejected.inc(rejected)
        self._not_events.inc(not_events)

    def _derived_batch(self, element, rows, events, is_event, derived_ok) -> Iterator:
        keep = is_event & derived_ok
        self._not_events.inc(int((~is_event).sum()))
        for i in np.flatnonzero(is_event & ~derived_ok).tolist():
            record = event_records(events.slice(i, 1))[0]
            try:
                self._validator.check_derived(record)
            except InvalidRecord as exc:
                self._rejected.inc()
                original, where = _source_at(element, int(rows[i]), self.round_up)
                yield TaggedOutput(DEAD, self._dead("derive", exc, original, where))
                continue
            keep[i] = True
        kept = events.filter(pa.array(keep))
        if kept.num_rows:
            self._batches.append(kept)
            self._pending_rows += kept.num_rows

    def finish_bundle(self) -> Iterator:
        if not self.batches:
            return
        for out in self._flush():
            tag = out.tag if isinstance(out, TaggedOutput) else None
            value = out.value if tag else out
            windowed = WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])
            yield TaggedOutput(tag, windowed) if tag else windowed

    def _flush(self) -> Iterator:
        """The pending events as one RecordBatch; an event whose derived values do not fit
        their declared types (a derive() returning text for an int field) is a dead letter."""
        pending, self._pending = self._pending, []
        batches, self._batches = self._batches, []
        self._pending_rows = 0
        schema = self._schema
        if pending:
            try:
                batches.append(pa.RecordBatch.from_pylist([p[0] for p in pending], schema=schema))
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                rows = []
                for entry in pending:
                    try:
                        pa.RecordBatch.from_pylist([entry[0]], schema=schema)
                    except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
                        self._rejected.inc()
                        yield TaggedOutput(DEAD, self._unfit(entry, exc))
                        continue
                    rows.append(entry[0])
                batches.append(pa.RecordBatch.from_pylist(rows, schema=schema))
        if not batches:
            return
        batch = batches[0]
        if len(batches) > 1:
            batch = pa.Table.from_batches(batches, schema=schema).combine_chunks().to_batches()[0]
        self._valid.inc(batch.num_rows)
        if batch.num_rows:
            yield batch

    def _unfit(self, entry: tuple, exc: Exception) -> dict:
        """The dead letter of a pending event (event, original, origin) or (event, batch, row)
        whose values do not fit the declared types."""
        event, source, detail = entry
        if isinstance(source, (RawBatch, pa.RecordBatch)):
            original, where = _source_at(source, detail, self.round_up)
            origin = origin_of(where)
        else:
            original, origin = source, detail
        reason = f"the derived record does not fit the declared field types: {exc}"
        return dead_letter("derive", reason, original, self.fs.name, origin)


def _take(element: RawBatch | pa.RecordBatch, rows: np.ndarray) -> RawBatch | pa.RecordBatch:
    """The given rows of a batch, with their positions and original texts."""
    if isinstance(element, pa.RecordBatch):
        return element.take(pa.array(rows))
    texts = element.texts
    if texts is not None:
        chunk, starts, ends = texts
        texts = (chunk, np.asarray(starts)[rows], np.asarray(ends)[rows])
    positions = np.asarray(element.positions)[rows]
    return RawBatch(element.batch.take(pa.array(rows)), element.file, positions, element.unit, texts)


def _source_at(
    element: RawBatch | pa.RecordBatch, row: int, round_up: frozenset[str]
) -> tuple[Any, Where | None]:
    """What a dead letter of one row of a batch keeps (its original) and its location, as
    the record-by-record path gives them."""
    one = _take(element, np.array([row]))
    (_, raw, where), = iter_raw_records(one, round_up)
    return _original(raw, where), where


class CheckRecords(beam.PTransform):
    """PCollection of raw elements -> (events, dead letters). Used by every job; `counters`
    names the counters (`records_read`, ...; a reference table's rows count apart);
    `round_up`, `traced` and `batches` (events as RecordBatches) as CheckRecordsFn's."""

    def __init__(
        self,
        fs: FeatureSet,
        counters: str = "records",
        round_up: Iterable[str] = (),
        traced: bool = False,
        batches: bool = False,
    ):
        super().__init__()
        self.fs = fs
        self.counters = counters
        self.round_up = tuple(round_up)
        self.traced = traced
        self.batches = batches

    def expand(self, pcoll):
        results = pcoll | "ValidateAndDerive" >> beam.ParDo(
            CheckRecordsFn(self.fs, self.counters, self.round_up, self.traced, self.batches)
        ).with_outputs(DEAD, main=VALID)
        return results[VALID], results[DEAD]
