"""Property-based fuzzing of the input path: readers + validation + the batch example layout.

Records are generated from a feature set's schema (the bundled flights, which reject
unexpected fields, and the toy clicks, which ignore them), some corrupted on purpose (wrong
types, integers beyond int64, NaN and infinities, nulls in required fields, far timestamps,
lone surrogates, unexpected fields, garbage lines), written as CSV (optionally gzip, CRLF, a
BOM, blank lines), JSON lines or Parquet, sometimes with a broken header (duplicate or missing
columns) or truncated, and read back with the jobs' own code. Properties:

- nothing but a one-line InputError (before the run) escapes; a broken header always is one;
- every record is counted exactly once: records_read == the records written == valid +
  rejected + not_events, and the reader reports each record at its first line (CSV, JSON
  lines) or row index (Parquet);
- every dead letter has a stage, a reason and its original record, and serialises (JSON file,
  Pub/Sub message);
- every valid record's values round-trip exactly; every corrupted record is a dead letter;
- the valid events pass through the example layout (Arrow features, tf.Transform batches,
  Bigtable row keys) that crashed on unchecked values.

Deterministic (derandomized, no example database). The CI run uses SKEWLESS_FUZZ_EXAMPLES
(default 200) examples per format; a long run:
    SKEWLESS_FUZZ_EXAMPLES=3000 .venv/bin/python -m pytest tests/test_fuzz_inputs.py -q
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from skewless.beam_pipelines.io.file_sources import ReadRawFiles
from skewless.beam_pipelines.io.files import (
    CSV_NULL_VALUES,
    InputError,
    check_input,
    read_file_records,
)
from skewless.beam_pipelines.io.pubsub import to_dead_letter_message
from skewless.examples.flights import FLIGHTS
from skewless.transforms.aggregations import attach_aggregates, entity_value, row_key
from skewless.transforms.example_schema import (
    example_fields_record_batch,
    features_arrow_schema,
    to_tft_record_batch,
    with_aggregate_columns,
)
from skewless.transforms.featureset import FeatureSet, as_of_window_end
from skewless.transforms.record_checks import (
    DEAD,
    CheckRecordsFn,
    InvalidRecord,
    RecordChecker,
    UnparseableRow,
    iter_raw_records,
    parse_json_payload,
)
from tests.support.toy_featureset import CLICKS

EXAMPLES = int(os.environ.get("SKEWLESS_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
FEATURE_SETS = {"flights": FLIGHTS, "clicks": CLICKS}
UTC = dt.UTC
# Generated event times stay well inside the accepted range, so that derived times (flights
# add up to two days of delay) never leave it: a valid record must stay valid.
TIME_LO = int(dt.datetime(1950, 1, 1, tzinfo=UTC).timestamp() * 1000)
TIME_HI = int(dt.datetime(2150, 1, 1, tzinfo=UTC).timestamp() * 1000)
HOSTILE_TEXT = list(",\"'\n\r\t \\;|{}[]:\u2028\u2029\u0085\x00\x1c\x0b\ufeffé字🙂\u200b")
NULL_TEXT = {s.lower() for s in CSV_NULL_VALUES}


# --- records generated from the schema -----------------------------------------------------------


def _text():
    # U+10FFFF is the readers' mark for bytes that are not UTF-8: in a CSV file that has such
    # bytes, a record holding a genuine U+10FFFF is a dead letter too (documented).
    chars = st.one_of(
        st.sampled_from(HOSTILE_TEXT),
        st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\U0010ffff"),
    )
    return st.text(chars, min_size=1, max_size=12).filter(lambda s: s.strip().lower() not in NULL_TEXT)


def value_strategy(f):
    if f.type == "int":
        lo = -(2**63) if f.min_value is None else int(f.min_value)
        hi = 2**63 - 1 if f.max_value is None else int(f.max_value)
        return st.integers(lo, hi)
    if f.type == "float":
        lo = -1e30 if f.min_value is None else f.min_value
        hi = 1e30 if f.max_value is None else f.max_value
        return st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    if f.type == "bool":
        return st.booleans()
    if f.type == "timestamp":
        return st.integers(TIME_LO, TIME_HI)
    return _text()


def record_strategy(fs: FeatureSet):
    return st.fixed_dictionaries(
        {f.name: (st.none() | value_strategy(f)) if f.nullable else value_strategy(f) for f in fs.schema}
    )


# Corruptions a validator must reject, whatever the format: (name, applies to field types).
CORRUPTIONS = {
    "not_a_number": ("int", "float", "timestamp", "bool"),
    "int_overflow": ("int",),
    "nan": ("float", "int", "timestamp"),
    "infinity": ("float", "int", "timestamp"),
    "huge_float": ("float", "int"),
    "null_required": ("required",),
    "far_time": ("timestamp",),
    "surrogate": ("string",),
    "unexpected": ("policy_reject",),
}


@dataclass
class Planned:
    """One record to write: its typed values (None for a garbage line), what must happen."""

    values: dict | None
    outcome: str  # "valid", "reject", "either"
    corruption: tuple[str, str] | None = None  # (kind, field)
    garbage: str | None = None
    position: int = 0  # first line (CSV, JSON lines) or row index (Parquet)
    end: int = 0  # byte offset after the record
    complete: bool = True  # fully written (not cut by a truncation)


@dataclass
class Case:
    fs: FeatureSet = field(repr=False)
    fmt: str
    records: list[Planned]
    header_fault: str | None = None  # "duplicate" | "missing"
    truncate_at: float | None = None
    gzip: bool = False
    crlf: bool = False
    bom: bool = False
    blank_after: set = field(default_factory=set)
    ascii_json: bool = True


@st.composite
def cases(draw, fmt: str, fs_name: str | None = None) -> Case:
    fs = FEATURE_SETS[fs_name or draw(st.sampled_from(sorted(FEATURE_SETS)))]
    n = draw(st.integers(0, 12))
    records = []
    for _ in range(n):
        if fmt != "parquet" and draw(st.integers(0, 9)) == 0:
            alphabet = [c for c in HOSTILE_TEXT if c not in "\n\r\"\x00"] + list("abc123")
            garbage = draw(st.text(st.sampled_from(alphabet), min_size=1, max_size=30).filter(str.strip))
            records.append(Planned(None, "either", garbage=garbage))
            continue
        values = draw(record_strategy(fs))
        corruption = None
        if draw(st.integers(0, 3)) == 0:
            kinds = [k for k in CORRUPTIONS if k != "surrogate" or fmt == "jsonl"]
            kinds = [k for k in kinds if k != "unexpected" or (fmt == "jsonl" and fs.unexpected_fields == "reject")]
            kind = draw(st.sampled_from(kinds))
            applies = CORRUPTIONS[kind]
            if "required" in applies:
                names = [f.name for f in fs.schema if not f.nullable]
            elif "policy_reject" in applies:
                names = ["not_in_schema"]
            else:
                names = [f.name for f in fs.schema if f.type in applies]
            if names:
                corruption = (kind, draw(st.sampled_from(names)))
        records.append(Planned(values, "reject" if corruption else "valid", corruption))
    return Case(
        fs=fs,
        fmt=fmt,
        records=records,
        header_fault=draw(st.sampled_from([None] * 8 + ["duplicate", "missing"])) if fmt != "jsonl" else None,
        truncate_at=draw(st.sampled_from([None] * 5 + [0.3, 0.7, 0.95])),
        gzip=fmt != "parquet" and draw(st.booleans()),
        crlf=fmt == "csv" and draw(st.booleans()),
        bom=fmt != "parquet" and draw(st.integers(0, 4)) == 0,
        blank_after=set(draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=3))) if fmt != "parquet" else set(),
        ascii_json=draw(st.booleans()),
    )


# --- writers ------------------------------------------------------------------------------------


def _iso(ms: int) -> str:
    return (dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")


def _hostile(kind: str, f, fmt: str):
    """The corrupt value, as the format can carry it."""
    return {
        "not_a_number": "xyz",
        "int_overflow": 10**20 if fmt == "jsonl" else "99999999999999999999",
        "nan": float("nan") if fmt != "csv" else "NaN",
        "infinity": float("-inf") if fmt != "csv" else "-inf",
        "huge_float": 1e300,
        "null_required": None,
        "far_time": 1e13,  # epoch seconds: the year 318,857
        "surrogate": "N\ud800X",
    }[kind]


def _raw_value(f, value, fmt: str):
    if value is None:
        return None
    if f.type == "timestamp":
        return _iso(value)
    return value


def raw_record(fs: FeatureSet, planned: Planned, fmt: str) -> dict:
    fields = {f.name: f for f in fs.schema}
    raw = {name: _raw_value(fields[name], v, fmt) for name, v in planned.values.items()}
    if planned.corruption:
        kind, name = planned.corruption
        if kind == "unexpected":
            raw[name] = 1
        else:
            raw[name] = _hostile(kind, fields[name], fmt)
    return raw


def _csv_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_case(case: Case, path: Path) -> Path:
    fs = case.fs
    columns = [f.name for f in fs.schema]
    if case.header_fault == "duplicate":
        columns = [*columns, columns[0]]
    elif case.header_fault == "missing":
        columns = [c for c in columns if c != next(f.name for f in fs.schema if not f.nullable)]
    if case.fmt == "parquet":
        return _write_parquet(case, path, columns)
    newline = "\r\n" if case.crlf else "\n"
    # A raw lone surrogate (only from the "surrogate" corruption) is written as the invalid
    # UTF-8 it would be in a broken export.
    chunks = [b"\xef\xbb\xbf"] if case.bom else []
    line = 1
    if case.fmt == "csv":
        chunks.append(_csv_row(columns, newline).encode("utf-8"))
        line += 1
    for i, planned in enumerate(case.records):
        planned.position = line
        if planned.garbage is not None:
            text = planned.garbage + newline
        elif case.fmt == "csv":
            raw = raw_record(fs, planned, "csv")
            text = _csv_row([_csv_text(raw.get(c)) for c in columns], newline)
        else:
            raw = raw_record(fs, planned, "jsonl")
            text = json.dumps(raw, ensure_ascii=case.ascii_json) + "\n"
        line += text.count("\n")
        chunks.append(text.encode("utf-8", "surrogatepass"))
        planned.end = sum(map(len, chunks))
        if i in case.blank_after:
            chunks.append(newline.encode())
            line += 1
    data = b"".join(chunks)
    if case.truncate_at is not None:
        cut = int(len(data) * case.truncate_at)
        for planned in case.records:
            planned.complete = planned.end <= cut
        data = data[:cut]
    if case.gzip:
        data = gzip.compress(data, mtime=0)
        path = path.with_name(path.name + ".gz")
    path.write_bytes(data)
    return path


def _csv_row(values, newline: str) -> str:
    # Python's writer quotes only the characters of its own line terminator: with "\n" it
    # leaves a bare "\r" unquoted, which every CSV reader (RFC 4180) takes as a line break.
    quoting = csv.QUOTE_ALL if any("\r" in v for v in values) else csv.QUOTE_MINIMAL
    out = io.StringIO()
    csv.writer(out, lineterminator=newline, quoting=quoting).writerow(values)
    return out.getvalue()


def _write_parquet(case: Case, path: Path, columns: list[str]) -> Path:
    fs = case.fs
    fields = {f.name: f for f in fs.schema}
    raws = []
    for i, planned in enumerate(case.records):
        planned.position = i
        raws.append(raw_record(fs, planned, "parquet"))
    arrays, names = [], []
    for name in columns:
        if name not in fields:
            continue
        f = fields[name]
        values = [r.get(name) for r in raws]
        arrays.append(_parquet_column(f, values))
        names.append(name)
    table = pa.Table.from_arrays(arrays, names=names)
    pq.write_table(table, path)
    if case.truncate_at is not None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * case.truncate_at)])
    return path


def _parquet_column(f, values: list) -> pa.Array:
    typed = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "string": pa.string()}
    try:
        if f.type == "timestamp":
            stamps = [None if v is None else dt.datetime.fromisoformat(v) for v in values]
            return pa.array(stamps, pa.timestamp("ms", tz="UTC"))
        return pa.array(values, typed[f.type])
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        pass
    # A corrupt value the column type cannot hold: the column is written as text.
    return pa.array([None if v is None else (repr(v) if isinstance(v, float) else str(v)) for v in values], pa.string())


# --- running the jobs' own code -------------------------------------------------------------------


class _Counter:
    def __init__(self):
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n


def validate_elements(fs: FeatureSet, elements: list) -> tuple[list, list, dict]:
    fn = CheckRecordsFn(fs)
    fn.setup()
    counters = {name: _Counter() for name in ("_read", "_valid", "_rejected", "_not_events")}
    for name, counter in counters.items():
        setattr(fn, name, counter)
    events, dead = [], []
    for element in elements:
        for out in fn.process(element):
            if isinstance(out, beam.pvalue.TaggedOutput):
                assert out.tag == DEAD
                dead.append(out.value)
            else:
                events.append(out)
    return events, dead, {name.strip("_"): c.value for name, c in counters.items()}


def typed_by_position(fs: FeatureSet, elements: list) -> dict:
    """Position -> the typed record (or the exception) of every record the reader emitted."""
    validator = RecordChecker(fs)
    out = {}
    for element in elements:
        for stage, raw, where in iter_raw_records(element):
            position = where[2] if where else None
            try:
                if isinstance(raw, UnparseableRow):
                    raise InvalidRecord(raw.reason)
                record = parse_json_payload(raw) if stage == "parse" else raw
                out[int(position)] = validator.typed(record)
            except Exception as exc:  # noqa: BLE001 - recorded, compared below
                out[int(position)] = exc
    return out


def check_example_layout(fs: FeatureSet, events: list) -> None:
    """The layouts valid events go through in prepare and score, on these events."""
    if not events:
        return
    batch = example_fields_record_batch(fs, events)
    joined = [attach_aggregates(fs, e, lambda key: None) for e in events]
    columns = {a.name: [j[a.name] for j in joined] for a in fs.aggregates}
    table = with_aggregate_columns(fs, pa.Table.from_batches([batch]), columns)
    assert table.schema == features_arrow_schema(fs)
    to_tft_record_batch(fs, table.combine_chunks().to_batches()[0])
    for event in events:
        w = as_of_window_end(event[fs.event_time], fs.period_ms, fs.serving_delay_ms)
        for key in fs.aggregate_keys:
            value = entity_value(event.get(key))
            if value is not None:
                assert len(row_key(key, value, w).encode("utf-8")) <= 4096


def run_case(case: Case, tmp: Path) -> None:
    path = write_case(case, tmp / f"input.{case.fmt}")
    fs = case.fs
    try:
        check_input(str(path), None, fs)
    except InputError as exc:
        assert "\n" not in str(exc)
        if case.header_fault or (case.fmt == "parquet" and case.truncate_at is not None):
            return
        # An input truncated inside its header or into nothing is a file error too.
        assert case.truncate_at is not None or not case.records, exc
        return
    if case.truncate_at is None:  # a cut can remove the broken part of a header
        assert case.header_fault is None, "a broken header passed the check"
    elif case.header_fault:
        return
    assert not (case.fmt == "parquet" and case.truncate_at is not None), "a cut Parquet file passed"
    elements = list(read_file_records(str(path), case.fmt, fs))
    events, dead, counts = validate_elements(fs, elements)

    # Every record counted exactly once.
    assert counts["read"] == counts["valid"] + counts["rejected"] + counts["not_events"], counts
    assert counts["valid"] == len(events) and counts["rejected"] == len(dead)
    if case.truncate_at is None:
        assert counts["read"] == len(case.records), (counts, len(case.records))

    # Dead letters: stage, reason, original record, file and position; serialisable.
    for letter in dead:
        assert letter["stage"] in ("parse", "validate", "derive") and letter["reason"], letter
        assert letter["record"] is not None and letter["file"] == str(path)
        assert "line" in letter or "row" in letter, letter
        json.dumps(letter).encode("utf-8")
        to_dead_letter_message(letter)

    # Round trip of every complete record; corrupted ones rejected.
    typed = typed_by_position(fs, elements)
    dead_at = {letter.get("line", letter.get("row")) for letter in dead}
    for planned in case.records:
        if not planned.complete:
            continue
        got = typed.get(planned.position)
        assert planned.position in typed, (planned, sorted(typed))
        if planned.outcome == "valid":
            assert got == planned.values, (planned, got)
            assert planned.position not in dead_at
        elif planned.outcome == "reject":
            assert planned.position in dead_at, (planned, got)
    check_example_layout(fs, events)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.timeout(600)
def test_fuzzed_inputs_never_crash_lose_or_corrupt_a_record(fmt, tmp_path_factory):
    @FUZZ
    @given(case=cases(fmt))
    def check(case):
        run_case(case, tmp_path_factory.mktemp(fmt))

    check()


@pytest.mark.timeout(600)
def test_fuzzed_files_through_the_real_batch_pipeline(tmp_path_factory):
    """Generated files of every format through ReadRawFiles + CheckRecords + BuildExamples
    in one pipeline: the job finishes and every record is counted once."""
    from skewless.beam_pipelines.runtime.parsing import metric_counters
    from skewless.transforms.examples import BuildExamples
    from skewless.transforms.record_checks import CheckRecords

    formats = st.sampled_from(["csv", "jsonl", "parquet"])

    # No shrinking: each example is a pipeline run of several seconds.
    @settings(FUZZ, max_examples=min(10, max(2, EXAMPLES // 100)), phases=(Phase.explicit, Phase.generate))
    @given(st.lists(formats.flatmap(lambda fmt: cases(fmt, "flights")), min_size=3, max_size=6))
    def check(generated):
        root = tmp_path_factory.mktemp("pipeline")
        direct = []
        generated = [c for c in generated if c.records]  # an empty file fails the check
        for i, case in enumerate(generated):
            case.header_fault = case.truncate_at = None
            path = write_case(case, root / f"part{i}.{case.fmt}")
            elements = list(read_file_records(str(path), case.fmt, FLIGHTS))
            direct.append((path.name, len(case.records), validate_elements(FLIGHTS, elements)[2]["read"]))
        p = TestPipeline(runner="FnApiRunner")
        events, _ = p | ReadRawFiles(str(root / "part*"), fs=FLIGHTS) | CheckRecords(FLIGHTS)
        _ = events | BuildExamples(FLIGHTS, require_label=False)
        result = p.run()
        result.wait_until_finish()
        counts = metric_counters(result)
        assert counts.get("records_read", 0) == sum(len(c.records) for c in generated), (counts, direct)
        assert counts.get("records_read", 0) == sum(
            counts.get(k, 0) for k in ("records_valid", "records_rejected", "records_not_events")
        )

    check()
