"""Issue 11: fast tests that guard the promises a hand-made bug could break unnoticed.

- validation ranges exactly at a field's minimum and maximum, and one step outside;
- dead letters keep the original record as read, for every input kind and stage;
- an empty window at serving time gives the declared default (lookup and batch join), and
  the serving delay D (not a multiple of P) moves both back;
- sum, mean over nullable values, min and max read off by hand on a toy feature set;
- the model watcher serves the highest complete version;
- merge_accumulators of the batch blocks and of the streaming tiles: any split, any order,
  the same cells as one accumulator, and no partial shared with or changed in an input.

Every test here is fast (no emulator, no `slow` mark): `make test-fast` and `make mutation`
run them.
"""

from __future__ import annotations

import base64
import json
import math
import pickle
import random
from dataclasses import replace
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from skewless.examples.flights import FLIGHTS
from skewless.transforms.aggregations import BucketAccumulatorFn, attach_aggregates
from skewless.transforms.example_schema import event_arrow_schema
from skewless.transforms.featureset import FeatureSet, Field, WindowedAggregate, as_of_window_end
from skewless.transforms.operations import (
    Count,
    First,
    Histogram,
    Last,
    LastK,
    Max,
    Mean,
    Min,
    StdDev,
    Sum,
    UniqueCount,
    Variance,
)
from skewless.transforms.partials import (
    CellKey,
    add_batch,
    add_to_slot,
    entity_codes,
    entity_value,
    key_specs,
    new_slot,
    window_cell,
)
from skewless.transforms.record_checks import (
    DEAD,
    CheckRecordsFn,
    InvalidRecord,
    RecordChecker,
    to_epoch_ms,
)
from skewless.transforms.tiles import _MergePartials, to_partials
from tests.support.flights_data import CSV_COLUMNS, real_flights, write_csv
from tests.support.pipelines import typed_events

# --- 1. validation ranges: at the bounds accepted, one step outside rejected --------------------

GOOD = {
    "year": 2013, "month": 1, "day": 1, "dep_time": 517.0, "sched_dep_time": 515,
    "dep_delay": 2.0, "arr_time": 830.0, "sched_arr_time": 819, "arr_delay": 11.0,
    "carrier": "UA", "flight": 1545, "tailnum": "N14228", "origin": "EWR", "dest": "IAH",
    "air_time": 227.0, "distance": 1400.0, "hour": 5, "minute": 15,
    "time_hour": "2013-01-01T10:00:00Z",
}  # fmt: skip

# (field, minimum, maximum) of FLIGHTS' raw schema, ints and floats.
RANGES = [
    ("minute", 0, 59),
    ("month", 1, 12),
    ("hour", 0, 23),
    ("sched_dep_time", 0, 2359),
    ("dep_delay", -2880.0, 2880.0),
    ("arr_delay", -2880.0, 2880.0),
    ("distance", 0.0, 20_000.0),
]


def _declared(name: str) -> Field:
    return next(f for f in FLIGHTS.schema if f.name == name)


def _below(field: Field, value):
    return value - 1 if field.type == "int" else math.nextafter(float(value), -math.inf)


def _above(field: Field, value):
    return value + 1 if field.type == "int" else math.nextafter(float(value), math.inf)


def test_the_ranges_tested_here_are_the_declared_ones():
    for name, lo, hi in RANGES:
        field = _declared(name)
        assert (field.min_value, field.max_value) == (lo, hi), name  # -2880 == -2880.0
        assert field.type == ("int" if isinstance(lo, int) else "float"), name


@pytest.mark.parametrize("as_text", [False, True], ids=["typed", "text"])
@pytest.mark.parametrize("name, lo, hi", RANGES)
def test_values_at_the_minimum_and_maximum_are_accepted(name, lo, hi, as_text):
    validator = RecordChecker(FLIGHTS)
    for value in (lo, hi):
        raw = {**GOOD, name: repr(value) if as_text else value}
        typed = validator.typed(raw)
        assert typed[name] == value and type(typed[name]) is type(value), (name, value)


@pytest.mark.parametrize("as_text", [False, True], ids=["typed", "text"])
@pytest.mark.parametrize("name, lo, hi", RANGES)
def test_one_step_outside_the_range_is_rejected_with_the_bound_in_the_reason(name, lo, hi, as_text):
    field = _declared(name)
    validator = RecordChecker(FLIGHTS)
    for value, side, bound in ((_below(field, lo), "below the minimum", field.min_value),
                               (_above(field, hi), "above the maximum", field.max_value)):  # fmt: skip
        raw = {**GOOD, name: repr(value) if as_text else value}
        with pytest.raises(InvalidRecord) as exc:
            validator.typed(raw)
        assert str(exc.value) == f"field {name!r} = {value!r} is {side} {bound!r}", str(exc.value)


def test_a_record_outside_a_range_is_a_validate_dead_letter_naming_field_and_bound():
    letters = _dead_letters(
        [json.dumps({**GOOD, "minute": 60}), json.dumps({**GOOD, "dep_delay": 2880.0})]
    )
    assert [(d["stage"], d["reason"]) for d in letters] == [
        ("validate", "field 'minute' = 60 is above the maximum 59")
    ]


# --- 2. dead letters keep the original record, every input kind and stage ----------------------


def _dead_letters(elements) -> list[dict]:
    """CheckRecordsFn (the validation step of every job) over elements -> its dead letters."""
    fn = CheckRecordsFn(FLIGHTS)
    fn.setup()
    letters = []
    for element in elements:
        for out in fn.process(element):
            if getattr(out, "tag", None) == DEAD:
                letters.append(out.value)
    return letters


# Each is a JSON object written as a person or another tool would (spacing, key order, escapes,
# numbers as 2.50 or 1e1), so re-serialising the parsed dict never gives the same text back.
def _json_text(**changes) -> str:
    row = {**GOOD, **changes}
    body = ",  ".join(f'"{k}":{json.dumps(v)}' for k, v in reversed(list(row.items())))
    return "{ " + body.replace('"UA"', '"\\u0055A"') + " }"


JSON_CASES = {
    "parse": ('{"minute": 60, "carrier": "UA"', "not JSON"),
    "validate": (_json_text(minute=60), "field 'minute' = 60 is above the maximum 59"),
    # Scheduled 2200-12-31T23:59Z + 2 days of delay: the derived event time is past the range.
    "derive": (
        _json_text(time_hour="2200-12-31T23:00:00Z", minute=59, dep_delay=2880.0),
        "derived 'event_time'",
    ),
}


def test_the_json_cases_are_valid_json_that_json_dumps_would_not_reproduce():
    for stage in ("validate", "derive"):
        text = JSON_CASES[stage][0]
        parsed = json.loads(text)
        assert isinstance(parsed, dict) and json.dumps(parsed) != text
        assert "\\u0055A" in text


@pytest.mark.parametrize("stage", list(JSON_CASES))
def test_json_lines_dead_letter_keeps_the_line_text_exactly(tmp_path, stage):
    from skewless.beam_pipelines.io.files import read_file_records

    text, reason = JSON_CASES[stage]
    good = json.dumps(GOOD)
    path = tmp_path / "f.jsonl"
    path.write_text(f"{good}\n{text}\n{good}\n", encoding="utf-8")
    (letter,) = _dead_letters(read_file_records(str(path), "jsonl", FLIGHTS))
    assert letter["stage"] == stage and reason in letter["reason"], letter
    assert letter["record"] == text  # the text as read: not the parsed dict, not re-serialised
    assert (letter["file"], letter["line"]) == (str(path), 2)


@pytest.mark.parametrize("stage", list(JSON_CASES))
def test_a_plain_json_text_element_keeps_its_text(stage):
    text, reason = JSON_CASES[stage]
    for element in (text, text.encode("utf-8")):
        (letter,) = _dead_letters([element])
        assert letter["stage"] == stage and reason in letter["reason"]
        assert letter["record"] == text


def _message(payload: bytes, attributes: dict | None = None):
    from apache_beam.io.gcp.pubsub import PubsubMessage

    if attributes is None:
        # The event time the payload itself carries (scheduled departure + delay).
        attributes = {
            "event_time": str(RecordChecker(FLIGHTS).validate(dict(GOOD))["event_time"])
        }
    return PubsubMessage(payload, attributes)


PUBSUB_CASES = {
    "timestamp": (_json_text(), {"event_time": "2013-01-01T10:00:00"}, "has no time zone"),
    **{stage: (text, None, reason) for stage, (text, reason) in JSON_CASES.items()},
}


@pytest.mark.parametrize("stage", list(PUBSUB_CASES))
def test_pubsub_dead_letter_keeps_the_payload_exactly(stage):
    """ParseMessages then CheckRecords, the streaming jobs' first steps; the dead-letter
    message published carries the payload's bytes unchanged."""
    from skewless.beam_pipelines.io.pubsub import _ParseMessages, to_dead_letter_message

    text, attributes, reason = PUBSUB_CASES[stage]
    payload = text.encode("utf-8")
    parse = _ParseMessages("event_time", FLIGHTS)
    parse.setup()
    letters, payloads = [], []
    for out in parse.process(_message(payload, attributes)):
        if getattr(out, "tag", None) == DEAD:
            letters.append(out.value)
        else:
            payloads.append(out.value)
    letters += _dead_letters(payloads)
    (letter,) = letters
    assert letter["stage"] == stage and reason in letter["reason"], letter
    assert letter["record"] == text
    assert to_dead_letter_message(letter).data == payload


def _streaming_letters(message) -> list[dict]:
    """ParseMessages then CheckRecords on one message -> its dead letters."""
    from skewless.beam_pipelines.io.pubsub import _ParseMessages

    parse = _ParseMessages("event_time", FLIGHTS)
    parse.setup()
    letters, payloads = [], []
    for out in parse.process(message):
        if getattr(out, "tag", None) == DEAD:
            letters.append(out.value)
        else:
            payloads.append(out.value)
    return letters + _dead_letters(payloads)


def test_a_payload_that_is_not_utf8_is_said_so_and_kept_byte_for_byte(tmp_path):
    """Not re-encoded with U+FFFD (16 bytes became 22): the dead-letter message carries the
    very bytes, a dead-letter file base64 with its encoding named."""
    from skewless.beam_pipelines.io.file_sinks import WriteDeadLetterFiles
    from skewless.beam_pipelines.io.pubsub import to_dead_letter_message

    payload = b'{"carrier": "\xff\xfeUA"}'
    (letter,) = _streaming_letters(_message(payload))
    assert letter["stage"] == "parse"
    assert letter["reason"] == "not UTF-8: byte 0xff at offset 13"
    assert letter["record_encoding"] == "base64"
    assert base64.b64decode(letter["record"]) == payload
    assert to_dead_letter_message(letter).data == payload
    with TestPipeline(runner="FnApiRunner") as p:
        _ = p | beam.Create([letter]) | WriteDeadLetterFiles(str(tmp_path / "dead" / "part"))
    (line,) = [x for f in (tmp_path / "dead").glob("*") for x in f.read_text().splitlines()]
    assert base64.b64decode(json.loads(line)["record"]) == payload


def test_the_streaming_jobs_take_the_feature_set_s_time_range_from_1970_on():
    """ParseMessages applied the default range whatever the feature set declared; and Bigtable,
    the online store, holds no time before 1970."""
    from skewless.beam_pipelines.io.pubsub import streaming_time_range

    narrow = replace(FLIGHTS, timestamp_range=("2013-01-01T00:00:00Z", "2014-01-01T00:00:00Z"))
    assert streaming_time_range(narrow) == ("2013-01-01T00:00:00Z", "2014-01-01T00:00:00Z")
    assert streaming_time_range(FLIGHTS)[0] == "1970-01-01T00:00:00+00:00"

    from skewless.beam_pipelines.io.pubsub import _ParseMessages

    for fs, stamp, accepted in (
        (narrow, "2012-12-31T23:59:59Z", False),
        (narrow, "2013-06-01T00:00:00Z", True),
        (FLIGHTS, "1969-12-31T23:59:59Z", False),
        (FLIGHTS, "1970-01-01T00:00:00Z", True),
    ):
        parse = _ParseMessages("event_time", fs)
        parse.setup()
        (out,) = parse.process(_message(b"{}", {"event_time": stamp}))
        assert (getattr(out, "tag", None) != DEAD) == accepted, (fs.timestamp_range, stamp)
        if not accepted:
            assert "outside the accepted time range" in out.value["reason"]


def test_pubsub_dead_letters_keep_the_payload_in_a_pipeline():
    from skewless.beam_pipelines.io.pubsub import ParseMessages
    from skewless.transforms.record_checks import CheckRecords

    cases = {stage: case[0] for stage, case in PUBSUB_CASES.items()}
    messages = [_message(json.dumps(GOOD).encode())] + [
        _message(text.encode(), PUBSUB_CASES[stage][1]) for stage, text in cases.items()
    ]

    def check(letters):
        assert sorted((d["stage"], d["record"]) for d in letters) == sorted(
            (stage, text) for stage, text in cases.items()
        )

    with TestPipeline(runner="FnApiRunner") as p:
        payloads, bad_times = p | beam.Create(messages) | ParseMessages("event_time", FLIGHTS)
        _, invalid = payloads | CheckRecords(FLIGHTS)
        assert_that((bad_times, invalid) | beam.Flatten(), check)


def _csv_file(tmp_path: Path, line: str) -> Path:
    path = write_csv(tmp_path / "f.csv", real_flights(1, 1)[:2], [line])
    return path


def _csv_line(**changes) -> str:
    row = {**GOOD, **changes}
    return ",".join("" if row[c] is None else str(row[c]) for c in CSV_COLUMNS)


def test_csv_line_that_does_not_split_keeps_its_text(tmp_path):
    from skewless.beam_pipelines.io.files import read_file_records

    line = _csv_line() + ",extra"
    path = _csv_file(tmp_path, line)
    (letter,) = _dead_letters(read_file_records(str(path), "csv", FLIGHTS))
    assert letter["stage"] == "parse" and letter["record"] == line and letter["line"] == 4


CSV_CASES = {
    "validate": (_csv_line(minute=60, dep_delay="2.50"), "above the maximum 59"),
    "derive": (
        _csv_line(time_hour="2200-12-31T23:00:00Z", minute=59, dep_delay="2880.0"),
        "derived 'event_time'",
    ),
}


@pytest.mark.parametrize("stage", list(CSV_CASES))
def test_csv_dead_letter_names_the_stage_reason_file_and_line(tmp_path, stage):
    from skewless.beam_pipelines.io.files import read_file_records

    line, reason = CSV_CASES[stage]
    path = _csv_file(tmp_path, line)
    (letter,) = _dead_letters(read_file_records(str(path), "csv", FLIGHTS))
    assert letter["stage"] == stage and reason in letter["reason"], letter
    assert (letter["file"], letter["line"]) == (str(path), 4)
    assert letter["record"] is not None


@pytest.mark.parametrize("stage", list(CSV_CASES))
def test_csv_dead_letter_keeps_the_line_text_exactly(tmp_path, stage):
    from skewless.beam_pipelines.io.files import read_file_records

    line, _ = CSV_CASES[stage]
    path = _csv_file(tmp_path, line)
    (letter,) = _dead_letters(read_file_records(str(path), "csv", FLIGHTS))
    assert letter["record"] == line


def _bigquery_batch(**changes) -> pa.RecordBatch:
    """One row as the BigQuery source emits it: an Arrow batch with BigQuery's column types."""
    row = {**GOOD, **changes}
    types = {f.name: f.type for f in FLIGHTS.schema}
    arrays, names = [], []
    for name, value in row.items():
        if types[name] == "timestamp":
            instant = to_epoch_ms(value) * 1000
            arrays.append(pa.array([instant], pa.timestamp("us", tz="UTC")))
        else:
            arrays.append(pa.array([value]))
        names.append(name)
    return pa.RecordBatch.from_arrays(arrays, names=names)


@pytest.mark.parametrize(
    "stage, changes, reason",
    [
        ("validate", {"minute": 60}, "above the maximum 59"),
        (
            "derive",
            {"time_hour": "2200-12-31T23:00:00Z", "minute": 59, "dep_delay": 2880.0},
            "derived 'event_time'",
        ),
    ],
)
def test_bigquery_dead_letter_is_the_row_as_read(stage, changes, reason):
    """A BigQuery row has no text: its dead letter is the row as the source read it, every
    column with its value and TIMESTAMP columns as epoch seconds (validation.py _batch_rows),
    never the typed or derived record (times in ms, derived fields)."""
    row = {**GOOD, **changes}
    (letter,) = _dead_letters([_bigquery_batch(**changes)])
    assert letter["stage"] == stage and reason in letter["reason"], letter
    expected = {**row, "time_hour": to_epoch_ms(row["time_hour"]) / 1000}
    assert letter["record"] == expected
    assert "file" not in letter and "line" not in letter and "row" not in letter


# --- 3. empty windows give the declared defaults; the serving delay D moves W back ----------------

T0 = to_epoch_ms("2013-01-01T00:00:00Z")  # a multiple of P
P_S, S_S, D_S = 60, 120, 90  # D is not a multiple of P

DEFAULTS = {
    "sum_v": 70.5,
    "mean_v": -1.0,
    "min_v": 100.0,
    "max_v": -100.0,
    "first_v": 3.25,
    "last_v": -3.25,
    "var_v": 11.0,
    "sd_v": 12.0,
}

GUARD = FeatureSet(
    name="guard",
    schema=(
        Field("k", "string", nullable=False),
        Field("v", "float"),
        Field("tag", "string"),
        Field("t", "timestamp", nullable=False),
    ),
    event_time="t",
    keys=("k",),
    aggregates=(
        WindowedAggregate("n", "k", Count(), S_S, P_S),
        WindowedAggregate("sum_v", "k", Sum("v"), S_S, P_S, default=70.5),
        WindowedAggregate("mean_v", "k", Mean("v"), S_S, P_S, default=-1.0),
        WindowedAggregate("min_v", "k", Min("v"), S_S, P_S, default=100.0),
        WindowedAggregate("max_v", "k", Max("v"), S_S, P_S, default=-100.0),
        WindowedAggregate("first_v", "k", First("v"), S_S, P_S, default=3.25),
        WindowedAggregate("last_v", "k", Last("v"), S_S, P_S, default=-3.25),
        WindowedAggregate("var_v", "k", Variance("v"), S_S, P_S, default=11.0),
        WindowedAggregate("sd_v", "k", StdDev("v", ddof=1), S_S, P_S, default=12.0),
        WindowedAggregate("last2_v", "k", LastK("v", k=2), S_S, P_S),
        WindowedAggregate("uniq_tag", "k", UniqueCount("tag"), S_S, P_S),
        WindowedAggregate("hist_tag", "k", Histogram("tag", k=2), S_S, P_S),
        WindowedAggregate("n_1m", "k", Count(), P_S, P_S),
    ),
    label="v",
    example_fields=(Field("k", "string", nullable=False), Field("t", "timestamp", nullable=False)),
    preprocessing_fn=lambda inputs: dict(inputs),
    serving_delay_s=D_S,
)

EMPTY = {
    "n": 0,
    **DEFAULTS,
    "last2_v": [],
    "uniq_tag": 0,
    "hist_tag_keys": [],
    "hist_tag_counts": [],
    "n_1m": 0,
}


def _event(k: str, v: float | None, seconds: float, tag: str | None = None) -> dict:
    return {"k": k, "v": v, "tag": tag, "t": T0 + int(seconds * 1000)}


# Key "a": three values and a null in [T0 - 60 s, T0 + 60 s), one more at T0 + 65 s.
EVENTS = [
    _event("a", 1.0, -50, "x"),
    _event("a", 4.0, 0, "y"),  # on a period boundary
    _event("a", None, 30, "x"),
    _event("a", 2.5, 50),
    _event("a", 3.0, 65, "z"),
    _event("a", 9.0, 100),  # W(t) = T0: its window [T0 - 120 s, T0) holds only the first
    _event("a", 5.0, 200),  # W(t) = T0 + 60 s: the window [T0 - 60 s, T0 + 60 s)
    _event("b", 1.0, 30),  # W(t) = T0 - 120 s: empty, every default
]

# What each event sees, by hand: W = floor((t - D) / P) * P, window [W - S, W).
EXPECTED = {
    ("a", -50): EMPTY,
    ("a", 0): EMPTY,
    ("a", 30): EMPTY,
    ("a", 50): EMPTY,
    ("a", 65): EMPTY,
    ("a", 100): {
        **EMPTY, "n": 1, "sum_v": 1.0, "mean_v": 1.0, "min_v": 1.0, "max_v": 1.0,
        "first_v": 1.0, "last_v": 1.0, "var_v": 0.0, "last2_v": [1.0], "uniq_tag": 1,
        "hist_tag_keys": ["x"], "hist_tag_counts": [1], "n_1m": 1,
    },
    ("a", 200): {
        # v: 1.0, 4.0, None, 2.5 (4 events, 3 values: mean 7.5 / 3); tags x, y, x;
        # [T0, T0 + 60 s) for the 1-minute count: 3 events
        "n": 4, "sum_v": 7.5, "mean_v": 2.5, "min_v": 1.0, "max_v": 4.0, "first_v": 1.0,
        "last_v": 2.5, "var_v": 1.5, "sd_v": 1.5, "last2_v": [2.5, 4.0], "uniq_tag": 2,
        "hist_tag_keys": ["x", "y"], "hist_tag_counts": [2, 1], "n_1m": 3,
    },
    ("b", 30): EMPTY,
}  # fmt: skip


def test_the_hand_computed_windows_follow_the_as_of_rule():
    assert D_S % P_S != 0
    assert as_of_window_end(T0 + 200_000, P_S * 1000, D_S * 1000) == T0 + 60_000
    assert as_of_window_end(T0 + 100_000, P_S * 1000, D_S * 1000) == T0
    assert as_of_window_end(T0 + 65_000, P_S * 1000, D_S * 1000) == T0 - 60_000
    # Without D they would see other windows: the expected values tell D from no D.
    assert as_of_window_end(T0 + 200_000, P_S * 1000) == T0 + 180_000


def _cells_by_hand() -> dict:
    """The cell of every W that holds events, from the toy events, through the shared window_cell."""
    (spec,) = key_specs(GUARD)
    buckets: dict = {}
    for e in EVENTS:
        if e["k"] != "a":
            continue
        bucket = (e["t"] // spec.period_ms) * spec.period_ms
        slot = buckets.setdefault(bucket, new_slot(spec))
        add_to_slot(slot, [e.get(f) for f in spec.value_fields], e["t"])
    out = {}
    for w in range(T0 - 300_000, T0 + 400_000, spec.period_ms):
        cell = window_cell(spec, buckets, w)
        if cell is not None:
            out[CellKey("k", "a", w)] = cell
    return out


def _aggregates(row: dict) -> dict:
    return {c: row[c] for c in EMPTY}


def test_the_lookup_of_an_absent_cell_gives_every_declared_default():
    asked = []

    def lookup(key):
        asked.append(key)
        return None

    event = _event("a", 1.0, 200)
    joined = attach_aggregates(GUARD, event, lookup)
    assert _aggregates(joined) == EMPTY
    assert {k: joined[k] for k in event} == event
    assert asked == [CellKey("k", "a", T0 + 60_000)]  # W of t - D, not of t


def test_a_cell_without_some_aggregates_gives_their_defaults():
    joined = attach_aggregates(GUARD, _event("a", 1.0, 200), lambda key: {"n": 3})
    assert _aggregates(joined) == {**EMPTY, "n": 3}


def test_the_lookup_sees_the_window_of_t_minus_d_by_hand():
    cells = _cells_by_hand()
    for e in EVENTS:
        joined = attach_aggregates(GUARD, e, cells.get)
        expected = EXPECTED[(e["k"], (e["t"] - T0) / 1000)]
        assert _aggregates(joined) == expected, (e, _aggregates(joined))


def test_build_examples_gives_defaults_for_empty_windows_and_sees_t_minus_d():
    from skewless.transforms.examples import BuildExamples

    def check(rows):
        got = {}
        for row in rows:
            t = round(row["t"].timestamp() * 1000)
            got[(row["k"], (t - T0) / 1000)] = _aggregates(row)
        assert got == EXPECTED, {k: v for k, v in got.items() if EXPECTED.get(k) != v}

    with TestPipeline(runner="FnApiRunner") as p:
        rows = (
            p
            | beam.Create(EVENTS)
            | BuildExamples(GUARD, require_label=False)
            | beam.FlatMap(lambda batch: batch.to_pylist())
        )
        assert_that(rows, check)


# --- 4. the model watcher serves the highest complete version ------------------------------------


def _fake_version(base: Path, number: int, complete: bool = True) -> Path:
    """A numbered version that passes (or, without model.json, fails) check_version_dir, with
    no TensorFlow graph: a SavedModel proto holding only the serving signature."""
    from tensorflow.core.protobuf import saved_model_pb2

    from skewless.models.versions import MODEL_FILE, SIGNATURE

    path = base / str(number)
    (path / "variables").mkdir(parents=True, exist_ok=True)
    saved = saved_model_pb2.SavedModel()
    saved.meta_graphs.add().signature_def[SIGNATURE].inputs["x"].name = "x:0"
    (path / "saved_model.pb").write_bytes(saved.SerializeToString())
    (path / "variables" / "variables.index").write_bytes(b"")
    if complete:
        (path / MODEL_FILE).write_text(json.dumps({"serving_inputs": [{"name": "x"}]}))
    return path


def test_resolve_takes_the_highest_version_numerically_and_refuses_an_incomplete_one(tmp_path):
    from skewless.models.versions import ModelDirError, list_versions, resolve

    for n in (1, 2, 10):
        _fake_version(tmp_path, n)
    (tmp_path / ".tmp-abc").mkdir()
    (tmp_path / "rejected").mkdir()
    assert list_versions(str(tmp_path)) == [1, 2, 10]
    assert resolve(str(tmp_path)).version == 10
    assert resolve(str(tmp_path), 2).version == 2
    _fake_version(tmp_path, 11, complete=False)
    with pytest.raises(ModelDirError, match="model.json is missing"):
        resolve(str(tmp_path))  # an explicit error before a job starts, never an older model


@pytest.fixture
def watcher(tmp_path, monkeypatch):
    """A LiveModel serving version 1 of tmp_path/models, whose loads are recorded, not run."""
    from skewless.models import watch
    from skewless.models.handler import LoadedModel

    loads = []
    broken: set[int] = set()

    def load(version):
        loads.append(version.version)
        if version.version in broken:
            raise RuntimeError("TensorFlow cannot load it")
        return LoadedModel(None, None, version.version)

    monkeypatch.setattr(watch, "_load", load)
    base = tmp_path / "models"
    _fake_version(base, 1)
    live = watch.LiveModel(str(base), LoadedModel(None, None, 1), [{"name": "x"}], poll_s=3600)
    try:
        yield live, base, loads, broken
    finally:
        live.stop()


def test_the_watcher_swaps_to_the_highest_complete_version(watcher):
    live, base, loads, broken = watcher
    assert not live.check_now() and live.version == 1  # nothing new
    _fake_version(base, 2)
    _fake_version(base, 3, complete=False)  # being copied
    assert live.check_now() and live.version == 2  # the highest complete one
    assert not live.check_now() and live.version == 2  # 3 is still incomplete
    _fake_version(base, 3)
    assert live.check_now() and live.version == 3 and live.swaps == 2
    _fake_version(base, 4)
    _fake_version(base, 5)
    assert live.check_now() and live.version == 5 and loads == [2, 3, 5]  # 4 skipped
    assert live.current()[1] == [{"name": "x"}]


def test_the_watcher_skips_a_version_that_does_not_load_and_never_goes_back(watcher):
    live, base, loads, broken = watcher
    _fake_version(base, 2)
    broken.add(3)
    _fake_version(base, 3)
    assert live.check_now() and live.version == 2 and loads == [3, 2]
    assert not live.check_now() and loads == [3, 2]  # 3 is not tried again
    _fake_version(base, 4)
    assert live.check_now() and live.version == 4
    (base / "4" / "model.json").unlink()
    _fake_version(base, 10)
    assert live.check_now() and live.version == 10


# --- 5. merge_accumulators: any split, any order, the same cells, nothing shared -----------------

RICH = replace(
    FLIGHTS,
    name="rich",
    aggregates=(
        WindowedAggregate("n_1h", "origin", Count(), 3600, 300),
        WindowedAggregate("sum_delay_1h", "origin", Sum("dep_delay"), 3600, 300),
        WindowedAggregate("mean_arr_30m", "origin", Mean("arr_delay"), 1800, 300, default=-1.0),
        WindowedAggregate("var_delay_1h", "origin", Variance("dep_delay"), 3600, 300),
        WindowedAggregate("min_delay_15m", "origin", Min("dep_delay"), 900, 300),
        WindowedAggregate("max_delay_1h", "origin", Max("dep_delay"), 3600, 300),
        WindowedAggregate("first_dest_1h", "origin", First("dest"), 3600, 300),
        WindowedAggregate("last_tail_1h", "origin", Last("tailnum"), 3600, 300),
        WindowedAggregate("last3_delay_1h", "origin", LastK("arr_delay", k=3), 3600, 300),
        WindowedAggregate("uniq_dest_1h", "origin", UniqueCount("dest"), 3600, 300),
        WindowedAggregate("hist_carrier_1h", "origin", Histogram("carrier", k=4), 3600, 300),
    ),
)


@pytest.fixture(scope="module")
def ewr_contributions() -> list[tuple]:
    """(spec index, bucket, time, values) of each event of one key (origin EWR) from a day of
    real flights, with nulls (cancelled and diverted flights, missing tail numbers) and ties
    in time."""
    events = typed_events(RICH, real_flights(1, 2))
    (spec,) = key_specs(RICH)
    out = []
    for e in events:
        if e["origin"] != "EWR":
            continue
        t = e["event_time"]
        bucket = (t // spec.period_ms) * spec.period_ms
        out.append((0, bucket, t, tuple(e.get(f) for f in spec.value_fields)))
    assert len(out) > 300 and any(None in values for *_, values in out)
    return out


def _slots_event_by_event(spec, events: list[dict]) -> dict:
    """{entity value: {bucket: slot}} of the events, add_to_slot one event at a time: the
    reference the batch path's slots and arrays are held to."""
    out: dict = {}
    for e in events:
        t = e["event_time"]
        bucket = (t // spec.period_ms) * spec.period_ms
        slots = out.setdefault(entity_value(e[spec.key_name]), {})
        slot = slots.get(bucket) or slots.setdefault(bucket, new_slot(spec))
        add_to_slot(slot, [e.get(f) for f in spec.value_fields], t)
    return out


@pytest.mark.parametrize("values", ["as_read", "fractional", "huge"])
def test_slots_added_by_batch_equal_slots_added_event_by_event(values):
    """partials.add_batch (the batch path: groups per entity and bucket, integer sums at once)
    builds exactly the slots of add_to_slot per event, for every operation of RICH: on real
    flights with nulls and ties, with fractional delays (added one at a time: no exact integer
    sum), and with delays too large for an int64 sum of squares."""
    events = typed_events(RICH, real_flights(1, 2))
    scale = {"as_read": lambda v: v, "fractional": lambda v: v + 0.1, "huge": lambda v: v * 2.0**40}[values]
    for e in events:
        for name in ("dep_delay", "arr_delay"):
            if e.get(name) is not None:
                e[name] = scale(e[name])
    (spec,) = key_specs(RICH)
    one_by_one = _slots_event_by_event(spec, events)
    batch = pa.RecordBatch.from_pylist(events, schema=event_arrow_schema(RICH))
    by_batch: dict = {}
    for start in range(0, batch.num_rows, 700):  # several batches into the same slots
        part = batch.slice(start, 700)
        times = part.column("event_time").cast(pa.int64()).to_numpy()
        columns = [part.column(f) for f in spec.value_fields]
        add_batch(spec, by_batch, entity_codes(part.column("origin")), times, columns)
    assert by_batch == one_by_one
    assert sum(slot[0] for slots in by_batch.values() for slot in slots.values()) == len(events)


@pytest.mark.parametrize("values", ["as_read", "fractional"])
def test_summed_buckets_hold_the_slots_added_event_by_event(values):
    """The batch path's SummedBuckets (counts and integer sums as int64 arrays): built per
    batch (partials.summed_batch), merged in any order (merge_summed), they convert to exactly
    the slots of add_to_slot per event; with fractional delays summed_batch declines (None)
    and the slots are added by add_batch."""
    from skewless.transforms.partials import merge_summed, summed_batch, to_slots

    events = typed_events(FLIGHTS, real_flights(1, 2, days=2))
    for e in events:
        if values == "fractional" and e.get("dep_delay") is not None:
            e["dep_delay"] += 0.5
    batch = pa.RecordBatch.from_pylist(events, schema=event_arrow_schema(FLIGHTS))
    rng = random.Random(5)
    for spec in key_specs(FLIGHTS):
        one_by_one = _slots_event_by_event(spec, events)
        parts: dict = {}
        for start in range(0, batch.num_rows, 500):
            part = batch.slice(start, 500)
            times = part.column("event_time").cast(pa.int64()).to_numpy()
            columns = [part.column(f) for f in spec.value_fields]
            summed = summed_batch(spec, entity_codes(part.column(spec.key_name)), times, columns)
            if values == "fractional":
                assert summed is None
                break
            for key, arrays in summed.items():
                parts.setdefault(key, []).append(arrays)
        if values == "fractional":
            continue
        for chunks in parts.values():
            rng.shuffle(chunks)
        merged = {key: to_slots(spec, merge_summed(chunks)) for key, chunks in parts.items()}
        assert merged == one_by_one


@pytest.mark.parametrize("values", ["as_read", "fractional"])
def test_window_columns_read_off_prefix_sums_equal_window_cell(values):
    """partials.window_columns (the batch join's shortcut for counts, sums and means: prefix
    sums of exact integer sums) gives, for every W around three days of real flights, what
    window_cell gives W by W, defaults included; with fractional delays it declines (None)
    and the join reads cell by cell."""
    from skewless.transforms.operations import Sum
    from skewless.transforms.partials import cells_to_columns, window_columns

    fs = replace(
        FLIGHTS,
        name="summed",
        aggregates=(
            *FLIGHTS.aggregates,
            WindowedAggregate("sum_delay_30m", "origin", Sum("dep_delay"), 1800, 300, default=-7.0),
            WindowedAggregate("n_2h", "carrier", Count(), 7200, 300),
        ),
    )
    events = typed_events(fs, real_flights(1, 2, days=3))
    for e in events:
        if values == "fractional" and e.get("dep_delay") is not None:
            e["dep_delay"] += 0.25
    checked = declined = 0
    for spec in key_specs(fs):
        per_key = _slots_event_by_event(spec, events)
        for buckets in per_key.values():
            first, last = min(buckets), max(buckets) + spec.max_size_ms + spec.period_ms
            ws = list(range(first - spec.period_ms, last, spec.period_ms))
            fast = window_columns(spec, buckets, ws)
            if values == "fractional" and any(f for f in spec.value_fields):
                assert fast is None
                declined += 1
                continue
            assert fast is not None
            expected = cells_to_columns(spec, [window_cell(spec, buckets, w) for w in ws])
            got = {name: list(np.asarray(v).tolist()) for name, v in fast.items()}
            assert got == expected
            assert all(type(a) is type(b) for name in got for a, b in zip(got[name], expected[name], strict=True))
            checked += len(ws)
    assert checked > 1000 if values == "as_read" else declined > 10


def _poke(slot: list) -> None:
    """Add one more value to every partial of a slot (to see whether anything shares it)."""
    (spec,) = key_specs(RICH)
    types = {f.name: f.type for f in RICH.schema}
    add_to_slot(slot, ["ZZZ" if types[f] == "string" else 1e6 for f in spec.value_fields], 0)


def _all_cells(buckets: dict, blocks: dict | None = None, block_ms: int = 0) -> dict:
    (spec,) = key_specs(RICH)
    first, last = min(buckets), max(buckets) + spec.max_size_ms
    cells = {}
    for w in range(first, last + spec.period_ms, spec.period_ms):
        cells[w] = window_cell(spec, buckets, w, blocks, block_ms)
    assert any(c is not None for c in cells.values())
    return cells


def _split(items: list, parts: int, rng: random.Random) -> list[list]:
    out = [[] for _ in range(parts)]
    for item in items:
        out[rng.randrange(parts)].append(item)
    return out


def _accumulate(fn: BucketAccumulatorFn, contributions: list) -> dict:
    """BucketAccumulatorFn over the contributions, one {bucket: slot} input per event (the
    finest split _BlockPartials could send)."""
    acc = fn.create_accumulator()
    for element in _tiles(contributions):
        acc = fn.add_input(acc, element)
    return acc


@pytest.mark.parametrize("seed", range(6))
def test_bucket_accumulators_merged_in_any_split_and_order_give_the_same_cells(
    ewr_contributions, seed
):
    rng = random.Random(seed)
    fn = BucketAccumulatorFn()
    whole = fn.extract_output(_accumulate(fn, ewr_contributions))
    expected = _all_cells(whole)
    parts = _split(ewr_contributions, rng.randint(2, 6), rng)
    accumulators = [_accumulate(fn, part) for part in parts]
    rng.shuffle(accumulators)
    before = [pickle.dumps(acc) for acc in accumulators[1:]]
    merged = fn.extract_output(fn.merge_accumulators(iter(accumulators)))
    assert merged == whole
    assert _all_cells(merged) == expected
    # The inputs after the first (which Beam lets a CombineFn reuse) are left as they were ...
    assert [pickle.dumps(acc) for acc in accumulators[1:]] == before
    # ... and share no partial with the result: changing the result leaves them alone.
    for slot in merged.values():
        _poke(slot)
    assert [pickle.dumps(acc) for acc in accumulators[1:]] == before


def test_merging_bucket_accumulators_pairwise_in_a_tree_gives_the_same_cells(ewr_contributions):
    fn = BucketAccumulatorFn()
    expected = _all_cells(_accumulate(fn, ewr_contributions))
    accumulators = [
        _accumulate(fn, part) for part in _split(ewr_contributions, 8, random.Random(9))
    ]
    accumulators.append(fn.create_accumulator())  # an empty part
    while len(accumulators) > 1:
        accumulators = [
            fn.merge_accumulators(accumulators[i : i + 2]) for i in range(0, len(accumulators), 2)
        ]
    assert _all_cells(accumulators[0]) == expected


def _tiles(contributions: list) -> list[dict]:
    """One tile {bucket: slot} per contribution, as _ToTiles makes them (one event each)."""
    (spec,) = key_specs(RICH)
    tiles = []
    for _, bucket, t, values in contributions:
        slot = new_slot(spec)
        add_to_slot(slot, values, t)
        tiles.append({bucket: slot})
    return tiles


@pytest.mark.parametrize("seed", range(4))
def test_tile_partials_merged_in_any_split_and_order_give_the_same_cells(ewr_contributions, seed):
    block_ms = 3 * 300_000
    rng = random.Random(100 + seed)
    fn = _MergePartials()
    tiles = _tiles(ewr_contributions)
    whole = fn.create_accumulator()
    for tile in tiles:
        whole = fn.add_input(whole, to_partials(tile, block_ms))
    buckets_only = _all_cells(BucketAccumulatorFn().extract_output(
        _accumulate(BucketAccumulatorFn(), ewr_contributions)))  # fmt: skip
    expected = _all_cells(*whole, block_ms)
    assert expected == buckets_only  # the blocks read off the same cells as the buckets

    accumulators = []
    for part in _split(tiles, rng.randint(2, 6), rng):
        acc = fn.create_accumulator()
        for tile in part:
            acc = fn.add_input(acc, to_partials(tile, block_ms))
        accumulators.append(acc)
    rng.shuffle(accumulators)
    before = [pickle.dumps(acc) for acc in accumulators]
    merged = fn.extract_output(fn.merge_accumulators(accumulators))
    assert merged == whole
    assert _all_cells(*merged, block_ms) == expected
    assert [pickle.dumps(acc) for acc in accumulators] == before  # no input changed
    inputs = {id(p) for acc in accumulators for part in acc for s in part.values() for p in s[1:]}
    assert not inputs & {id(p) for part in merged for s in part.values() for p in s[1:]}
    for part in merged:
        for slot in part.values():
            _poke(slot)
    assert [pickle.dumps(acc) for acc in accumulators] == before


# --- 6. survivors of `make mutation`, killed ------------------------------------------------------


def test_entity_values_are_text_and_booleans_are_lowercase_words():
    from skewless.transforms.partials import entity_value

    assert entity_value(None) is None
    assert entity_value(True) == "true" and entity_value(False) == "false"
    assert entity_value(7) == "7" and entity_value("JFK") == "JFK"


def test_aggregates_of_one_partial_kind_and_field_share_one_partial_per_bucket():
    """architecture.md: a 1-hour and a 15-minute mean, or a variance and a stddev, share one."""
    fs = replace(
        GUARD,
        name="shared",
        aggregates=(
            WindowedAggregate("n", "k", Count(), 120, 60),
            WindowedAggregate("mean_2m", "k", Mean("v"), 120, 60),
            WindowedAggregate("mean_1m", "k", Mean("v"), 60, 60),
            WindowedAggregate("sum_2m", "k", Sum("v"), 120, 60),
            WindowedAggregate("var", "k", Variance("v"), 120, 60),
            WindowedAggregate("sd", "k", StdDev("v", ddof=1), 120, 60),
        ),
    )
    (spec,) = key_specs(fs)
    assert [op.partial_key() for op in spec.operations] == [("sum", "v"), ("moments", "v")]
    assert spec.value_fields == ("v", "v")
    assert [a.partial_index for a in spec.aggregates] == [0, 1, 1, 1, 2, 2]
    assert spec.steps == ((1, (2,)), (2, (0, 1, 3, 4, 5)))
    assert new_slot(spec)[0] == 0 and len(new_slot(spec)) == 3


def test_key_specs_are_computed_once_per_feature_set_and_never_taken_from_another():
    from skewless.transforms import partials

    first = key_specs(GUARD)
    assert key_specs(GUARD) is first  # cached
    other = replace(GUARD, name="other", aggregates=GUARD.aggregates[:1])
    partials._SPECS[id(other)] = (GUARD, first)  # as if GUARD had had other's id
    (spec,) = key_specs(other)
    assert [a.name for a in spec.aggregates] == ["n"]


def test_operation_parameters_default_and_accept_their_smallest_value():
    assert LastK("v").k == 5 and Histogram("tag").k == 10 and Variance("v").ddof == 0
    assert LastK("v", k=1).k == 1 and Histogram("tag", k=1).k == 1


def test_by_time_operations_read_ints_as_floats_and_strings_as_lists_of_strings():
    fs = replace(
        GUARD,
        name="typed",
        schema=(*GUARD.schema, Field("i", "int")),
        aggregates=(
            WindowedAggregate("first_i", "k", First("i"), 60, 60),
            WindowedAggregate("last2_tag", "k", LastK("tag", k=2), 60, 60),
            WindowedAggregate("last2_v", "k", LastK("v", k=2), 60, 60, default=[-1.0]),
            WindowedAggregate("sum_v", "k", Sum("v"), 60, 60, default=70.5),
        ),
    )
    assert [a.columns for a in fs.aggregates] == [
        (("first_i", "float", False),),
        (("last2_tag", "string", True),),
        (("last2_v", "float", True),),
        (("sum_v", "float", False),),
    ]
    (spec,) = key_specs(fs)
    slot = new_slot(spec)
    values = {"i": 3, "tag": "x", "v": None}  # v only null: last_k and sum read their defaults
    add_to_slot(slot, [values[f] for f in spec.value_fields], T0)
    cell = window_cell(spec, {T0: slot}, T0 + 60_000)
    assert cell == {"first_i": 3.0, "last2_tag": ["x"], "last2_v": [-1.0], "sum_v": 70.5}
    assert type(cell["first_i"]) is float


def test_an_operation_that_takes_no_value_refuses_one():
    from skewless.transforms.featureset import FeatureSetError

    with pytest.raises(FeatureSetError, match="count takes no value field"):
        replace(GUARD, aggregates=(WindowedAggregate("n", "k", Count("v"), 60, 60),))
