"""Reference tables joined point-in-time: real flights x weather / planes / airports against a
brute force, the edges of the rule, no leakage, and the batch join inside a Beam pipeline."""

from __future__ import annotations

import functools
from dataclasses import replace

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skewless.examples.flights import (
    DEST_AIRPORTS,
    FLIGHTS,
    PLANES,
    REFERENCE_TABLES,
    WEATHER_AT_ORIGIN,
)
from skewless.transforms.example_schema import example_fields_record_batch
from skewless.transforms.examples import BuildExamples
from skewless.transforms.featureset import FeatureSetError, Field, ReferenceTable
from skewless.transforms.record_checks import CheckRecordsFn, ms_to_datetime
from skewless.transforms.records import TracedRecord
from skewless.transforms.reference import (
    DEAD,
    BuildReferenceIndex,
    ReferenceIndex,
    _BuildIndex,
    join_reference_columns,
    join_references,
    reference_row_validator,
    row_as_of,
    rows_feature_set,
)
from tests.support.flights_data import real_flights
from tests.support.pipelines import typed_events
from tests.support.reference_tables import FLIGHTS_TABLES as FS
from tests.support.reference_tables import FLIGHTS_TABLES_SPEC, index_of, table_rows, traced

HOUR_MS = 3_600_000

def brute_join(event: dict, table: ReferenceTable, rows) -> dict:
    """From the rule's words: the latest row of the key valid at t - D_ref, by a scan."""
    key = event[table.key]
    t = event[FS.event_time]
    candidates = [
        r
        for r in rows
        if key is not None
        and r[table.table_key] == key
        and (table.valid_from is None or r[table.valid_from] + table.availability_delay_ms <= t)
    ]
    best = max(candidates, key=lambda r: r[table.valid_from]) if table.valid_from else None
    if table.valid_from is None:
        best = candidates[0] if candidates else None
    return {
        c.name: (None if best is None else best[f.name])
        for c, f in zip(table.columns, table.fields, strict=True)
    }


@pytest.fixture(scope="module")
def flights():
    return typed_events(FS, real_flights(month=2, day=11, days=2))


@pytest.fixture(scope="module")
def indexes():
    return {t.name: index_of(t, table_rows(t)) for t in REFERENCE_TABLES}


@functools.cache
def keyed_rows(table: ReferenceTable) -> dict:
    """The table's rows by key, for the brute force (a scan of one key's rows)."""
    by_key: dict = {}
    for row in table_rows(table):
        by_key.setdefault(row[table.table_key], []).append(row)
    return by_key


class Counter:
    def __init__(self, counted: dict, name: str):
        self.counted, self.name = counted, name

    def inc(self, n=1):
        self.counted[self.name] = self.counted.get(self.name, 0) + n


def test_both_joins_equal_a_brute_force_on_real_flights(flights, indexes):
    """The per-event join (streaming scoring) and the columnar batch join (prepare, batch
    score, a whole block of examples at once) against the rule's words, the edges included:
    departures exactly on the hour and 1 ms before it, tailnums without a plane."""
    shifted = [
        {**e, "event_time": e["event_time"] - 1} for e in flights if e["event_time"] % HOUR_MS == 0
    ]
    assert shifted
    events = [*flights, *shifted]
    ordered = [indexes[t.name] for t in FS.references]
    fields = [FS.fields_by_name[n] for n in ("event_time", "origin", "tailnum", "dest")]
    table = pa.Table.from_batches([example_fields_record_batch(FS, events, fields)])
    counted: dict = {}
    missing = {t.name: Counter(counted, t.name) for t in FS.references}
    columnar = join_reference_columns(FS, table, ordered, missing).to_pylist()
    expected_missing: dict = {}
    for event, row in zip(events, columnar, strict=True):
        joined = join_references(FS, event, ordered)
        for t in FS.references:
            expected = brute_join(event, t, keyed_rows(t).get(event[t.key], ()))
            assert {k: joined[k] for k in expected} == expected, (t.name, event["event_time"])
            assert {k: row[k] for k in expected} == expected, (t.name, event["event_time"])
            absent = all(v is None for v in expected.values())
            expected_missing[t.name] = expected_missing.get(t.name, 0) + absent
    assert counted == {k: v for k, v in expected_missing.items() if v}
    assert counted[PLANES.name] > 0


def test_the_edges_of_the_rule_are_in_the_sample_and_hold(flights, indexes):
    weather = table_rows(WEATHER_AT_ORIGIN)
    at_edge = [e for e in flights if e["event_time"] % HOUR_MS == 0]
    assert at_edge, "a departure exactly on the hour: valid_from + D_ref"
    ordered = [indexes[t.name] for t in FS.references]
    for event in at_edge[:20]:
        t = event["event_time"]
        # The observation of the hour before (valid from t - 1 h) is usable exactly at t ...
        row = next(
            r for r in weather if r["origin"] == event["origin"] and r["time_hour"] == t - HOUR_MS
        )
        assert join_references(FS, event, ordered)["origin_weather_temp"] == row["temp"]
        # ... and 1 ms earlier it is not: the one before it is joined.
        before = join_references(FS, {**event, "event_time": t - 1}, ordered)
        older = next(
            r
            for r in weather
            if r["origin"] == event["origin"] and r["time_hour"] == t - 2 * HOUR_MS
        )
        assert before["origin_weather_pressure"] == older["pressure"]
    # A tailnum that is not in planes.csv gives nulls; one with a row gives its values.
    planes = {r["tailnum"] for r in table_rows(PLANES)}
    unknown = [e for e in flights if e["tailnum"] and e["tailnum"] not in planes]
    assert unknown
    joined = join_references(FS, unknown[0], ordered)
    assert all(joined[c.name] is None for c in PLANES.columns)
    # The weather row changes between two departures of one origin an hour apart.
    jfk = sorted((e for e in flights if e["origin"] == "JFK"), key=lambda e: e["event_time"])
    first, later = (
        jfk[0],
        next(e for e in jfk if e["event_time"] >= jfk[0]["event_time"] + 2 * HOUR_MS),
    )
    a, b = (join_references(FS, e, ordered) for e in (first, later))
    assert (a["origin_weather_temp"], a["origin_weather_dewp"]) != (
        b["origin_weather_temp"],
        b["origin_weather_dewp"],
    )


def test_no_leakage_rows_usable_only_after_t_change_nothing_up_to_t(flights):
    cut = sorted(e["event_time"] for e in flights)[len(flights) // 2]
    weather = table_rows(WEATHER_AT_ORIGIN)
    changed = [
        {**r, "temp": -99.0, "pressure": -1.0}
        if r["time_hour"] + WEATHER_AT_ORIGIN.availability_delay_ms > cut
        else r
        for r in weather
    ]
    assert sum(r["temp"] == -99.0 for r in changed) > 1000
    plain = [index_of(t, table_rows(t)) for t in FS.references]
    poisoned = [index_of(WEATHER_AT_ORIGIN, changed), *plain[1:]]
    early = [e for e in flights if e["event_time"] <= cut]
    assert all(join_references(FS, e, plain) == join_references(FS, e, poisoned) for e in early)
    late = [e for e in flights if e["event_time"] > cut + HOUR_MS]
    assert any(join_references(FS, e, poisoned)["origin_weather_temp"] == -99.0 for e in late)
    # The columnar batch join, on the whole sample at once: the same.
    fields = [FS.fields_by_name[n] for n in ("event_time", "origin", "tailnum", "dest")]
    table = pa.Table.from_batches([example_fields_record_batch(FS, flights, fields)])
    before = table.column("event_time").cast(pa.int64()).to_numpy() <= cut
    a, b = (join_reference_columns(FS, table, i).filter(before) for i in (plain, poisoned))
    assert a.num_rows == len(early) and a.equals(b)
    c = join_reference_columns(FS, table, poisoned).filter(~before)
    assert -99.0 in c.column("origin_weather_temp").to_pylist()


def test_duplicate_rows_are_dead_letters_and_the_join_runs_in_the_pipeline(flights):
    weather = list(table_rows(WEATHER_AT_ORIGIN)[:500])
    duplicate = {**weather[10], "temp": 1234.0}
    sample = flights[:200]
    tables = {
        WEATHER_AT_ORIGIN.name: [*weather, duplicate],
        PLANES.name: list(table_rows(PLANES)),
        DEST_AIRPORTS.name: list(table_rows(DEST_AIRPORTS)),
    }
    expected_indexes = [index_of(t, tables[t.name]) for t in FS.references]
    expected = sorted(
        (
            e["flight"],
            e["event_time"],
            join_references(FS, e, expected_indexes)["origin_weather_temp"],
        )
        for e in sample
        if e["label"] is not None
    )
    with TestPipeline(runner="FnApiRunner") as p:
        indexes, dead = {}, []
        for table in FS.references:
            rows = p | f"Rows{table.name}" >> beam.Create(traced(tables[table.name]))
            index, letters = rows | f"Index{table.name}" >> BuildReferenceIndex(table)
            indexes[table.name], dead = index, [*dead, letters]
        examples = (
            p
            | beam.Create(sample)
            | BuildExamples(FS, references=indexes)
            | beam.FlatMap(lambda batch: batch.to_pylist())
        )
        assert_that(
            examples
            | beam.Map(
                lambda r: (
                    r["flight"],
                    round(r["event_time"].timestamp() * 1000),
                    r["origin_weather_temp"],
                )
            ),
            equal_to(expected),
        )
        assert_that(
            dead
            | beam.Flatten()
            | beam.Map(lambda d: (d["stage"], d["reason"].split(" valid")[0])),
            equal_to([("reference", "duplicate row for origin='EWR'")]),
            label="Duplicates",
        )
    assert DEAD == "dead"


@pytest.mark.parametrize(
    "table, message",
    [
        (
            lambda: ReferenceTable(name="w#", key="origin", fields=(FLIGHTS.schema[0],)),
            "without '#'",
        ),
        (lambda: ReferenceTable(name="w", key="origin", fields=()), "no fields"),
        (
            lambda: ReferenceTable(name="w", key="nope", fields=(FLIGHTS.schema[0],)),
            "not a raw or derived",
        ),
        (
            lambda: ReferenceTable(name="w", key="origin", fields=(FLIGHTS.schema[0],), prefix=""),
            "already a field",
        ),
        (
            lambda: ReferenceTable(
                name="w", key="origin", fields=(FLIGHTS.schema[0],), availability_delay_s="soon"
            ),
            "not a duration",
        ),
        (
            lambda: ReferenceTable(
                name="w", key="origin", fields=(FLIGHTS.schema[0],), valid_fro="t"
            ),
            "did you mean 'valid_from'",
        ),
    ],
)
def test_wrong_reference_declarations_fail_when_built(table, message):
    with pytest.raises(FeatureSetError, match=message):
        replace(FLIGHTS, references=(table(),))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prepare_train_and_score_join_the_tables_read_from_files(tmp_path, flights):
    import csv
    import json

    import pyarrow.parquet as pq

    from skewless.beam_pipelines.commands import train
    from skewless.beam_pipelines.jobs import prepare, score
    from tests.support.flights_data import write_csv

    raws = real_flights(month=2, day=10, days=3)
    events_path = write_csv(tmp_path / "flights.csv", raws)
    weather_path = tmp_path / "weather.csv"
    with open(WEATHER_AT_ORIGIN.resolve_default_input(), newline="") as src:
        reader = csv.DictReader(src)
        rows = [r for r in reader if r["time_hour"].startswith("2013-02")]
    with open(weather_path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=reader.fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow({**rows[0], "humid": "140"})  # above the declared maximum: a dead letter
    common = [
        "--feature_set",
        FLIGHTS_TABLES_SPEC,
        "--reference",
        f"origin_weather={weather_path}",
    ]
    summary = prepare.run(
        [*common, "--input", str(events_path), "--output_dir", str(tmp_path / "prepared"),
         "--eval_start", "2013-02-12T00:00:00Z"]
    )  # fmt: skip
    weather = summary["references"]["origin_weather"]
    assert weather["rows_read"] == len(rows) + 1 and weather["rows_rejected"] == 1
    assert summary["references"]["plane"]["missing"] > 0  # tailnums without a plane row
    assert summary["references"]["dest_airport"]["rows"] == 1458  # every airport indexed
    dead = [
        json.loads(line)
        for path in (tmp_path / "prepared" / "dead_letters").glob("*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert [d["stage"] for d in dead if d["feature_set"] == "reference:origin_weather"] == [
        "validate"
    ]
    features = pq.read_table(tmp_path / "prepared" / "features").to_pylist()
    assert sum(r["origin_weather_temp"] is not None for r in features) > 0.9 * len(features)

    train.run(
        [
            "--prepared_dir",
            str(tmp_path / "prepared"),
            "--model_dir",
            str(tmp_path / "m"),
            "--epochs",
            "1",
        ]
    )
    scored = score.run(
        ["--model_dir", str(tmp_path / "m"), "--input", str(events_path), "--output", str(tmp_path / "s"),
         "--reference", f"origin_weather={weather_path}", "--start", "2013-02-12T00:00:00Z"]
    )  # fmt: skip
    assert scored["examples_scored"] > 500


# --- validity times below the millisecond: never joined before they are valid ----------------

OBSERVATIONS = ReferenceTable(
    name="obs",
    key="origin",
    valid_from="time_hour",
    availability_delay_s=3600,
    fields=(Field("temp", "float"),),
)
T0_MS = 1_357_041_600_000  # 2013-01-01T12:00:00Z
D_MS = OBSERVATIONS.availability_delay_ms


def _iso_ns(ns: int) -> str:
    """Epoch nanoseconds as ISO-8601 text with all nine digits."""
    seconds, fraction = divmod(ns, 10**9)
    return f"{ms_to_datetime(seconds * 1000).isoformat()[:19]}.{fraction:09d}Z"


def _index_of_raw(rows: list[dict], arrow: bool) -> ReferenceIndex:
    """The batch index of raw rows typed as prepare types them: text through the validator,
    or an Arrow timestamp[ns] column through the batch reader's conversion."""
    if arrow:
        batch = pa.RecordBatch.from_pydict(
            {
                "origin": [r["origin"] for r in rows],
                "time_hour": pa.array([r["ns"] for r in rows], pa.timestamp("ns", tz="UTC")),
                "temp": [r["temp"] for r in rows],
            }
        )
        fn = CheckRecordsFn(rows_feature_set(OBSERVATIONS), round_up=("time_hour",), traced=True)
        fn.setup()
        typed = list(fn.process(batch))
    else:
        validator = reference_row_validator(OBSERVATIONS)
        typed = traced(
            validator.validate(
                {"origin": r["origin"], "time_hour": _iso_ns(r["ns"]), "temp": r["temp"]}
            )
            for r in rows
        )
    assert all(isinstance(t, TracedRecord) for t in typed) and len(typed) == len(rows)
    return index_of_traced(OBSERVATIONS, typed)


def index_of_traced(table: ReferenceTable, typed: list[TracedRecord]) -> ReferenceIndex:
    out = list(_BuildIndex(table).process(typed))
    assert not [x for x in out if not isinstance(x, ReferenceIndex)], "no duplicates expected"
    (index,) = out
    return index


def _brute_force_temp(rows: list[dict], key: str, t_ms: int) -> float | None:
    """The rule on exact times: the latest row of the key with valid_from <= t - D_ref."""
    usable = [r for r in rows if r["origin"] == key and r["ns"] <= (t_ms - D_MS) * 10**6]
    return max(usable, key=lambda r: r["ns"])["temp"] if usable else None


def _joined_temps(index: ReferenceIndex, events: list[tuple[str, int]]) -> list:
    found = index.rows_as_of(
        pa.array([k for k, _ in events]), np.array([t for _, t in events]), D_MS
    )
    temps = index.rows.column(OBSERVATIONS.columns[0].name).to_pylist()  # obs_temp
    return [temps[i] if i >= 0 else None for i in found]


@pytest.mark.parametrize("arrow", [False, True], ids=["iso_text", "arrow_ns"])
@pytest.mark.parametrize("offset_ns", [1, 500_000, 999_000, 999_999])
def test_a_row_valid_a_fraction_of_a_millisecond_after_t_minus_d_is_not_joined(arrow, offset_ns):
    valid_ns = (T0_MS - D_MS) * 10**6 + offset_ns
    rows = [{"origin": "JFK", "ns": valid_ns, "temp": 1.0}]
    index = _index_of_raw(rows, arrow)
    assert _joined_temps(index, [("JFK", T0_MS), ("JFK", T0_MS + 1)]) == [None, 1.0]
    per_event = [
        row_as_of(index.get("JFK"), t, D_MS) for t in (T0_MS, T0_MS + 1)
    ]  # the per-event form streaming uses
    assert per_event == [None, (1.0,)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    versions=st.lists(
        st.tuples(st.sampled_from("AB"), st.integers(-3_000_000, 6_000_000)),
        min_size=1,
        max_size=12,
        unique_by=(lambda v: v, lambda v: (v[0], -(-v[1] // 10**6))),  # one version per ms
    ),
    events=st.lists(st.tuples(st.sampled_from("ABC"), st.integers(-4, 8)), min_size=1, max_size=20),
    arrow=st.booleans(),
)
def test_prepare_s_join_equals_a_brute_force_on_exact_times(versions, events, arrow):
    """Random validity times with parts below the millisecond (nanoseconds, before and after
    t - D_ref), random event times: the batch join == the rule applied to the exact times."""
    base_ns = (T0_MS - D_MS) * 10**6
    rows = [
        {"origin": key, "ns": base_ns + offset, "temp": float(i)}
        for i, (key, offset) in enumerate(versions)
    ]
    at = [(key, T0_MS + dt_ms) for key, dt_ms in events]
    index = _index_of_raw(rows, arrow)
    assert _joined_temps(index, at) == [_brute_force_temp(rows, k, t) for k, t in at]


def test_two_versions_in_one_millisecond_are_a_duplicate_with_its_line():
    """The join compares validity times to the millisecond (rounded up): two versions of a key
    within one millisecond cannot be told apart, so the second is a dead letter saying so."""
    validator = reference_row_validator(OBSERVATIONS)
    raw = [
        {"origin": "JFK", "time_hour": "2013-01-01T11:00:00.0002Z", "temp": 1.0},
        {"origin": "JFK", "time_hour": "2013-01-01T11:00:00.0007Z", "temp": 2.0},
    ]
    typed = [
        TracedRecord(validator.validate(dict(r)), f"JFK,{r['time_hour']},{r['temp']}", {"file": "f.csv", "line": i + 2})
        for i, r in enumerate(raw)
    ]  # fmt: skip
    out = list(_BuildIndex(OBSERVATIONS).process(typed))
    (letter,) = [x.value for x in out if not isinstance(x, ReferenceIndex)]
    assert letter["reason"] == "duplicate row for origin='JFK' valid from 2013-01-01T11:00:00.001Z"
    assert letter["record"] == "JFK,2013-01-01T11:00:00.0007Z,2.0" and letter["line"] == 3
