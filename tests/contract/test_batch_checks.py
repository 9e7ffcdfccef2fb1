"""The columnar checks (CheckRecords with `batches=True`: BatchChecker, derive_batch) accept,
reject and type exactly what the record-by-record checks do, with the same dead letters.

The record-by-record path (`batches=False`, what the streaming jobs run) states the rules;
the batch jobs check whole Arrow batches column by column and hand a row to it only when a
rule rejects the row. For generated files of every format (the fuzz strategies of
test_fuzz_inputs.py: hostile text, corrupt values, nulls, truncations) and for generated
typed batches with values at and beyond every declared limit, both paths must give the same
events (value by value), the same dead letters (stage, reason, original, location) and the
same counts. The bundled flights and weather derive by `derive_batch`, the toy clicks record
by record.
"""

from __future__ import annotations

import json
import math

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from skewless.beam_pipelines.io.files import read_file_records
from skewless.examples.flights import FLIGHTS
from skewless.examples.weather import WEATHER
from skewless.transforms.example_schema import event_arrow_schema
from skewless.transforms.record_checks import DEAD, MAX_KEY_BYTES, CheckRecordsFn, event_records
from skewless.transforms.records import RawBatch
from tests.contract.test_fuzz_inputs import FUZZ, _Counter, cases, value_strategy, write_case
from tests.support.toy_featureset import CLICKS


def check(fs, elements: list, batches: bool) -> tuple[list[str], list[str], dict]:
    """CheckRecordsFn over the elements in one bundle -> (events, dead letters, counts), the
    events and letters as canonical JSON (NaN kept), sorted."""
    fn = CheckRecordsFn(fs, batches=batches)
    fn.setup()
    counters = {name: _Counter() for name in ("_read", "_valid", "_rejected", "_not_events")}
    for name, counter in counters.items():
        setattr(fn, name, counter)
    fn.start_bundle()
    outputs = []
    for element in elements:
        outputs.extend(fn.process(element))
    outputs.extend(fn.finish_bundle() or [])
    names = event_arrow_schema(fs).names
    events, dead = [], []
    for out in outputs:
        if isinstance(out, beam.pvalue.TaggedOutput):
            assert out.tag == DEAD
            value = getattr(out.value, "value", out.value)
            dead.append(json.dumps(value, sort_keys=True))
            continue
        value = getattr(out, "value", out)  # finish_bundle's WindowedValue
        if isinstance(value, pa.RecordBatch):
            rows = event_records(value)  # what the jobs that take events one by one get
        else:
            rows = [value]
        events.extend(json.dumps({n: row.get(n) for n in names}, sort_keys=True) for row in rows)
    counts = {name.strip("_"): c.value for name, c in counters.items()}
    return sorted(events), sorted(dead), counts


def assert_same(fs, elements: list) -> tuple[list, list, dict]:
    rows = check(fs, elements, batches=False)
    columnar = check(fs, elements, batches=True)
    assert columnar[2] == rows[2], "counts"
    assert columnar[1] == rows[1], "dead letters"
    assert columnar[0] == rows[0], "events"
    return rows


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
@pytest.mark.timeout(600)
def test_generated_files_checked_by_batch_as_record_by_record(fmt, tmp_path_factory):
    @FUZZ
    @given(case=cases(fmt))
    def run(case):
        path = write_case(case, tmp_path_factory.mktemp(fmt) / f"input.{fmt}")
        try:
            elements = list(read_file_records(str(path), fmt, case.fs))
        except ValueError:  # a file the input check refuses whole (test_fuzz_inputs)
            return
        assert_same(case.fs, elements)

    run()


# --- typed batches at and beyond every limit ------------------------------------------------------

_ARROW = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "string": pa.string()}
_F32 = 3.4028234663852886e38


def _edge_values(f) -> st.SearchStrategy:
    """Values of a field's Arrow type: inside, at and just beyond its declared range, the
    float32 limit, non-finite floats, far timestamps, entity keys longer than a row key."""
    if f.type == "int":
        edges = [v for b in (f.min_value, f.max_value) if b is not None for v in (int(b) - 1, int(b), int(b) + 1)]
        return st.one_of(st.sampled_from(edges or [0]), st.integers(-(2**63), 2**63 - 1))
    if f.type == "float":
        edges = [math.nan, math.inf, -math.inf, _F32, -_F32, 3.5e38, -1e300]
        for b in (f.min_value, f.max_value):
            if b is not None:
                edges += [b, math.nextafter(b, -math.inf), math.nextafter(b, math.inf)]
        return st.one_of(st.sampled_from(edges), st.floats(-1e6, 1e6))
    if f.type == "bool":
        return st.booleans()
    if f.type == "timestamp":  # epoch ms, up to the year 2262 (Arrow's ns limit is not hit)
        return st.one_of(
            st.integers(-2_208_988_800_000 - 5, -2_208_988_800_000 + 5),  # 1900-01-01
            st.integers(7_289_654_400_000 - 5, 7_289_654_400_000 + 5),  # 2201-01-01
            st.integers(1_350_000_000_000, 1_400_000_000_000),
            st.integers(-9_000_000_000_000, 9_000_000_000_000),
        )
    long_key = "k" * (MAX_KEY_BYTES - 1) + "é"  # 1,024 characters, 1,025 bytes
    return st.one_of(st.sampled_from(["EWR", "", "é字", long_key, "x" * MAX_KEY_BYTES]), st.text(max_size=5))


@st.composite
def typed_batches(draw, fs) -> RawBatch:
    n = draw(st.integers(1, 30))
    # A few columns with values at and beyond their limits, the others valid (nulls where
    # nullable), so that most batches hold both rejected and accepted rows.
    hostile = draw(st.sets(st.sampled_from([f.name for f in fs.schema]), max_size=3))
    arrays, names = [], []
    for f in fs.schema:
        if draw(st.integers(0, 19)) == 0 and f.nullable:
            continue  # a nullable column missing from the file
        if f.name in hostile:
            values = st.none() | _edge_values(f)
        else:
            values = (st.none() | value_strategy(f)) if f.nullable else value_strategy(f)
        values = draw(st.lists(values, min_size=n, max_size=n))
        if f.type == "timestamp":
            arrays.append(pa.array(values, pa.int64()).cast(pa.timestamp("ms", tz="UTC")))
        else:
            arrays.append(pa.array(values, _ARROW[f.type]))
        names.append(f.name)
    batch = pa.RecordBatch.from_arrays(arrays, names=names)
    if draw(st.booleans()):
        return batch  # as BigQuery gives them: no positions
    return RawBatch(batch, "gen.parquet", np.arange(n), "row")


@pytest.mark.parametrize("fs", [FLIGHTS, WEATHER, CLICKS], ids=lambda fs: fs.name)
@pytest.mark.timeout(600)
def test_typed_batches_at_every_limit_checked_as_record_by_record(fs):
    @FUZZ
    @given(batch=typed_batches(fs))
    def run(batch):
        assert_same(fs, [batch])

    run()


def test_the_batch_checks_see_the_rejections_they_must():
    """Not vacuous: a batch with a value beyond each kind of limit is rejected row by row, the
    same way, and its valid rows stay columnar events."""
    good = {
        "year": 2013, "month": 1, "day": 1, "dep_time": 517.0, "sched_dep_time": 515, "dep_delay": 2.0,
        "arr_time": 830.0, "sched_arr_time": 819, "arr_delay": 11.0, "carrier": "UA", "flight": 1545,
        "tailnum": "N14228", "origin": "EWR", "dest": "IAH", "air_time": 227.0, "distance": 1400.0,
        "hour": 5, "minute": 15, "time_hour": 1357034400000,
    }  # fmt: skip
    rows = [
        good,
        {**good, "dep_delay": 2881.0},  # above the maximum
        {**good, "distance": math.nan},  # not finite
        {**good, "air_time": 1e39},  # beyond float32
        {**good, "carrier": None},  # required
        {**good, "origin": "x" * (MAX_KEY_BYTES + 1)},  # an entity key too long
        {**good, "time_hour": 7_289_654_400_000},  # 2201-01-01: outside the time range
        {**good, "dep_delay": None},  # cancelled: not an event
    ]
    schema = pa.schema(
        [pa.field(f.name, pa.timestamp("ms", tz="UTC") if f.type == "timestamp" else _ARROW[f.type]) for f in FLIGHTS.schema]
    )
    batch = pa.RecordBatch.from_pylist(rows, schema=schema)
    events, dead, counts = assert_same(FLIGHTS, [RawBatch(batch, "f.parquet", range(len(rows)), "row")])
    assert counts == {"read": 8, "valid": 1, "rejected": 6, "not_events": 1}
    reasons = [json.loads(letter)["reason"] for letter in dead]
    assert any("above the maximum" in r for r in reasons), reasons
    assert any("longer than 1024 bytes" in r for r in reasons), reasons
    assert any("outside the accepted time range" in r for r in reasons), reasons
    assert sorted(json.loads(letter)["row"] for letter in dead) == [1, 2, 3, 4, 5, 6]


def _bundled(name: str):
    from skewless.examples.flights import bundled_flights_path
    from skewless.examples.weather import weather_path

    if name == "flights":
        return FLIGHTS, bundled_flights_path()
    return WEATHER, weather_path()


@pytest.mark.parametrize(
    "name, counts",
    [
        ("flights", {"read": 336_776, "valid": 328_521, "rejected": 0, "not_events": 8_255}),
        ("weather", {"read": 26_115, "valid": 26_115, "rejected": 0, "not_events": 0}),
    ],
)
@pytest.mark.timeout(300)
def test_derive_and_derive_batch_give_the_same_events_on_the_bundled_data(name, counts):
    """A bundled feature set's columnar derive (derive_batch) against its per-record derive,
    on its whole bundled file (the 336,776 flights of 2013; the 26,115 weather observations):
    the same events, value by value (the examples are built from the events alone, by the
    same transforms), and the same counts."""
    from dataclasses import replace

    fs, path = _bundled(name)
    elements = list(read_file_records(path, "csv", fs))
    per_record = replace(fs, derive_batch=None)
    events, dead, counts_seen = check(fs, elements, batches=True)
    assert (events, dead, counts_seen) == check(per_record, elements, batches=True)
    assert counts_seen == counts
    assert len(events) == counts["valid"]
