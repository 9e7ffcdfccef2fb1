"""Raw record -> typed event, or a dead letter carrying the stage, the reason and the original."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from typing import Any, NamedTuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

from transforms.featureset import FeatureSet

VALID = "valid"
DEAD = "dead"
NAMESPACE = "skewless"

_UTC = dt.UTC
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=_UTC)


class InvalidRecord(ValueError):
    """A record breaks the schema; the message is the dead letter's reason."""


def dead_letter(stage: str, reason: str, record: Any, feature_set: str = "") -> dict:
    """A dead-letter record: JSON-serialisable, with the original payload kept whole."""
    return {
        "stage": stage,
        "reason": reason,
        "feature_set": feature_set,
        "record": _jsonable(record),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, UnparseableRow):
        return value.text
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
    if isinstance(value, str):
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
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value)
        except ValueError:
            raise InvalidRecord(f"{value!r} is not a number") from None
    else:
        raise InvalidRecord(f"has type {type(value).__name__}, expected a number")
    if not math.isfinite(out):
        raise InvalidRecord(f"{value!r} is not a finite number")
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
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRecord("is not valid UTF-8") from None
    raise InvalidRecord(f"has type {type(value).__name__}, expected a string")


@lru_cache(maxsize=65536)
def _parse_timestamp_text(text: str) -> int:
    # Timestamps repeat a lot in real data (hours, dates): the cache makes parsing nearly free.
    try:
        parsed = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidRecord(f"{text!r} is not an ISO-8601 timestamp") from None
    return _datetime_to_ms(parsed)


def _datetime_to_ms(value: dt.datetime) -> int:
    if value.tzinfo is None:  # naive timestamps are UTC by contract (documented in the README)
        value = value.replace(tzinfo=_UTC)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def to_epoch_ms(value: Any) -> int:
    """Timestamp -> epoch ms. Accepts ISO-8601 text, datetime, or a number of epoch seconds."""
    if isinstance(value, str):
        return _parse_timestamp_text(value)
    if isinstance(value, dt.datetime):
        return _datetime_to_ms(value)
    if isinstance(value, bool):
        raise InvalidRecord("is a boolean, expected a timestamp")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise InvalidRecord(f"{value!r} is not a timestamp")
        return int(round(value * 1000))
    if isinstance(value, dt.date):
        return _datetime_to_ms(dt.datetime(value.year, value.month, value.day))
    raise InvalidRecord(f"has type {type(value).__name__}, expected a timestamp")


def ms_to_datetime(ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=ms)


_COERCE: dict[str, Callable[[Any], Any]] = {
    "int": _to_int,
    "float": _to_float,
    "bool": _to_bool,
    "string": _to_string,
    "timestamp": to_epoch_ms,
}


class RecordValidator:
    """Validates raw records against a feature set's schema and derives its event fields.

    `validate(raw)` returns the typed record (the derived fields included) or raises
    InvalidRecord; it returns None for a valid record that is not an event.
    """

    def __init__(self, fs: FeatureSet):
        self.fs = fs
        self._plan = [
            (f.name, f.type, _COERCE[f.type], f.nullable, f.min_value, f.max_value)
            for f in fs.schema
        ]
        self._names = frozenset(f.name for f in fs.schema)
        self._reject_unexpected = fs.unexpected_fields == "reject"

    def typed(self, raw: dict) -> dict:
        if not isinstance(raw, dict):
            raise InvalidRecord(f"record is a {type(raw).__name__}, expected a JSON object")
        if self._reject_unexpected and not self._names.issuperset(raw):
            extra = sorted(str(k) for k in raw.keys() - self._names)
            raise InvalidRecord(f"unexpected fields {extra}")
        out = {}
        isfinite = math.isfinite
        # The common cases (values already of their type, as Arrow and JSON give them) are
        # handled inline: this loop runs for every field of every record of every job.
        for name, kind, coerce, nullable, lo, hi in self._plan:
            value = raw.get(name)
            t = type(value)
            if value is None or (t is float and value != value) or (value == "" and kind != "string"):
                if not nullable:
                    if name in raw:
                        raise InvalidRecord(f"required field {name!r} is null")
                    raise InvalidRecord(f"missing required field {name!r}")
                out[name] = None
                continue
            if kind == "float" and (t is float or t is int):
                value = float(value)
                if not isfinite(value):
                    raise InvalidRecord(f"field {name!r} {value!r} is not a finite number")
            elif kind == "timestamp" and (t is float or t is int) and isfinite(value):
                value = int(round(value * 1000))
            elif not ((kind == "int" and t is int) or (kind == "string" and t is str)):
                try:
                    value = coerce(value)
                except InvalidRecord as exc:
                    raise InvalidRecord(f"field {name!r} {exc}") from None
            if lo is not None and value < lo:
                raise InvalidRecord(f"field {name!r} = {value!r} is below the minimum {lo!r}")
            if hi is not None and value > hi:
                raise InvalidRecord(f"field {name!r} = {value!r} is above the maximum {hi!r}")
            out[name] = value
        return out

    def derive(self, record: dict) -> dict | None:
        fs = self.fs
        if fs.derive is not None:
            record = fs.derive(record)
            if record is None:
                return None
        event_time = record.get(fs.event_time)
        if event_time is None:
            raise InvalidRecord(f"missing event time {fs.event_time!r}")
        if not isinstance(event_time, int):
            raise InvalidRecord(f"event time {fs.event_time!r} is not epoch milliseconds")
        return record

    def validate(self, raw: dict) -> dict | None:
        return self.derive(self.typed(raw))


def parse_json_payload(payload: str | bytes) -> Any:
    """JSON text (a Pub/Sub message, a JSON-lines row) -> value; InvalidRecord if unparseable."""
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRecord(f"not JSON: {exc}") from None


class UnparseableRow(NamedTuple):
    """A row a source could not even split into fields (e.g. a CSV line with too many columns)."""

    text: str
    reason: str


def iter_raw_records(element: Any) -> Iterator[tuple[str, Any]]:
    """Flatten what a source emits (RecordBatch, dict, JSON text) into (stage, raw) pairs."""
    if isinstance(element, (dict, str, bytes, UnparseableRow)):
        yield ("validate" if isinstance(element, dict) else "parse"), element
        return
    if isinstance(element, pa.RecordBatch):
        yield from (("validate", row) for row in _batch_rows(element))
        return
    yield "validate", element


def _batch_rows(batch: pa.RecordBatch) -> list[dict]:
    # Timestamp columns become epoch seconds: converting them to datetime objects row by
    # row costs more than all the validation (to_epoch_ms takes numbers as epoch seconds).
    columns = []
    for column in batch.columns:
        if pa.types.is_timestamp(column.type):
            millis = column.cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64())
            column = pc.divide(millis.cast(pa.float64()), 1000.0)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names).to_pylist()


class ValidateRecordsFn(beam.DoFn):
    """Raw element(s) -> typed events on the main output, dead letters on `dead`.

    Counts every record read, valid, rejected and valid-but-not-an-event.
    """

    def __init__(self, fs: FeatureSet):
        self.fs = fs

    def setup(self) -> None:
        self._validator = RecordValidator(self.fs)
        self._read = Metrics.counter(NAMESPACE, "records_read")
        self._valid = Metrics.counter(NAMESPACE, "records_valid")
        self._rejected = Metrics.counter(NAMESPACE, "records_rejected")
        self._not_events = Metrics.counter(NAMESPACE, "records_not_events")

    def process(self, element: Any) -> Iterable:
        validator = self._validator
        name = self.fs.name
        read = valid = rejected = not_events = 0
        for stage, raw in iter_raw_records(element):
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
            except InvalidRecord as exc:
                rejected += 1
                yield TaggedOutput(DEAD, dead_letter(stage, str(exc), raw, name))
                continue
            except Exception as exc:  # noqa: BLE001 - a user's derive() bug must not kill the job
                rejected += 1
                reason = f"{type(exc).__name__}: {exc}"
                yield TaggedOutput(DEAD, dead_letter(stage, reason, raw, name))
                continue
            if event is None:
                not_events += 1
                continue
            valid += 1
            yield event
        self._read.inc(read)
        self._valid.inc(valid)
        self._rejected.inc(rejected)
        self._not_events.inc(not_events)


class ValidateRecords(beam.PTransform):
    """PCollection of raw elements -> (events, dead letters). Used by every job."""

    def __init__(self, fs: FeatureSet):
        super().__init__()
        self.fs = fs

    def expand(self, pcoll):
        results = pcoll | "ValidateAndDerive" >> beam.ParDo(
            ValidateRecordsFn(self.fs)
        ).with_outputs(DEAD, main=VALID)
        return results[VALID], results[DEAD]
