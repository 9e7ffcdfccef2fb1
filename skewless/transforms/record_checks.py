"""Raw record -> typed event, or a dead letter carrying the stage, the reason and the original."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

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

_UTC = dt.UTC
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=_UTC)

# What the typed pipeline can carry. Integers become Arrow int64 and tf.int64; floats become
# float64 in features/ and float32 in tf.Transform, so a finite float64 beyond float32 would
# silently turn into an infinity there.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
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
        return record

    def validate(self, raw: dict) -> dict | None:
        return self.derive(self.typed(raw))


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
    keeping their original and origin for a later step's dead letter.
    """

    def __init__(
        self,
        fs: FeatureSet,
        counters: str = "records",
        round_up: Iterable[str] = (),
        traced: bool = False,
    ):
        self.fs = fs
        self.counters = counters
        self.round_up = frozenset(round_up)
        self.traced = traced

    def setup(self) -> None:
        self._validator = RecordChecker(self.fs, self.round_up)
        prefix = self.counters
        self._read = Metrics.counter(NAMESPACE, f"{prefix}_read")
        self._valid = Metrics.counter(NAMESPACE, f"{prefix}_valid")
        self._rejected = Metrics.counter(NAMESPACE, f"{prefix}_rejected")
        self._not_events = Metrics.counter(NAMESPACE, f"{prefix}_not_events")

    def process(self, element: Any) -> Iterable:
        validator = self._validator
        name = self.fs.name
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
            except InvalidRecord as exc:
                rejected += 1
                original = _original(raw, where)
                yield TaggedOutput(
                    DEAD, dead_letter(stage, str(exc), original, name, origin_of(where))
                )
                continue
            except Exception as exc:  # noqa: BLE001 - a user's derive() bug must not kill the job
                rejected += 1
                reason = f"{type(exc).__name__}: {exc}"
                original = _original(raw, where)
                yield TaggedOutput(
                    DEAD, dead_letter(stage, reason, original, name, origin_of(where))
                )
                continue
            if event is None:
                not_events += 1
                continue
            valid += 1
            yield TracedRecord(event, _original(raw, where), origin_of(where)) if self.traced else event
        self._read.inc(read)
        self._valid.inc(valid)
        self._rejected.inc(rejected)
        self._not_events.inc(not_events)


class CheckRecords(beam.PTransform):
    """PCollection of raw elements -> (events, dead letters). Used by every job; `counters`
    names the counters (`records_read`, ...; a reference table's rows count apart);
    `round_up` and `traced` as CheckRecordsFn's."""

    def __init__(
        self,
        fs: FeatureSet,
        counters: str = "records",
        round_up: Iterable[str] = (),
        traced: bool = False,
    ):
        super().__init__()
        self.fs = fs
        self.counters = counters
        self.round_up = tuple(round_up)
        self.traced = traced

    def expand(self, pcoll):
        results = pcoll | "ValidateAndDerive" >> beam.ParDo(
            CheckRecordsFn(self.fs, self.counters, self.round_up, self.traced)
        ).with_outputs(DEAD, main=VALID)
        return results[VALID], results[DEAD]
