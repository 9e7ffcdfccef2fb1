"""Every aggregate operation against an independent brute force on real data, batch == stream.

The brute force knows nothing of partials, buckets or blocks: for each entity and window end
it filters the events of the window and computes each operation with Fractions, sorting and
counting, straight from its definition. Real NYC weather (nulls in pressure and wind_gust, a
nullable entity key, observations exactly on the day boundaries, several airports observed at
the same hour for one wind sector: ties in event time) and real flights (many departures in
the same minute).
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import random
from collections import Counter
from dataclasses import replace

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that
from apache_beam.transforms.window import TimestampedValue

from skewless.beam_pipelines.runtime.parsing import metric_counters
from skewless.examples.flights import FLIGHTS
from skewless.examples.weather import WEATHER, weather_path
from skewless.transforms.aggregations import ComputeAggregates, attach_aggregates
from skewless.transforms.featureset import Aggregate, FeatureSetError
from skewless.transforms.operations import (
    OPERATIONS,
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
from skewless.transforms.partials import CellKey
from tests.support.brute_force import brute_cells, brute_example
from tests.support.flights_data import real_flights
from tests.support.pipelines import CollectPanes, batch_cells, streaming_options, typed_events

DAY_MS = 86_400_000


@functools.lru_cache(maxsize=1)
def _weather_rows() -> tuple[dict, ...]:
    with open(weather_path(), newline="") as f:
        return tuple(
            {k: (None if v == "NA" else v) for k, v in row.items()} for row in csv.DictReader(f)
        )


def weather_events(start: str, days: int, skip_day: str | None = None) -> list[dict]:
    """Typed weather observations of `days` days from `start` (ISO date), one day left out."""
    lo = dt.datetime.fromisoformat(start + "T00:00:00+00:00")
    hi = lo + dt.timedelta(days=days)
    rows = [
        r
        for r in _weather_rows()
        if lo <= dt.datetime.fromisoformat(r["time_hour"].replace("Z", "+00:00")) < hi
        and not (skip_day and r["time_hour"].startswith(skip_day))
    ]
    return typed_events(WEATHER, rows)


def _diff(expected: dict, actual: dict) -> list:
    keys = sorted(set(expected) | set(actual))
    return [(k, expected.get(k), actual.get(k)) for k in keys if expected.get(k) != actual.get(k)]


# --- tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weather():
    # Jan 3-12, 2013 without Jan 6: 1-day windows after the gap are empty inside non-empty
    # 7-day ones (declared defaults), and every day starts with an observation at exactly W.
    return weather_events("2013-01-03", 10, skip_day="2013-01-06")


def test_the_weather_sample_has_the_edges_the_brute_force_must_cover(weather):
    times = Counter((e["wind_sector"], e["observed"]) for e in weather)
    assert max(times.values()) > 1  # ties in event time within one entity
    assert any(e["observed"] % DAY_MS == 0 for e in weather)  # on a period boundary
    assert any(e["pressure"] is None for e in weather)  # nulls in value fields
    assert any(e["wind_gust"] is None for e in weather) and any(e["wind_gust"] for e in weather)
    assert any(e["wind_sector"] is None for e in weather)  # a null entity key
    expected = brute_cells(WEATHER, weather)
    jan7 = dt.datetime(2013, 1, 7, tzinfo=dt.UTC).timestamp() * 1000
    empty_day = expected[("origin", "JFK", int(jan7))]
    assert empty_day["origin_count_1d"] == 0 and empty_day["origin_last_k_temp_1d"] == []
    assert empty_day["origin_mean_temp_7d"] != 0.0
    ops = {type(a.operation) for a in WEATHER.aggregates}
    assert ops == set(OPERATIONS.values())  # every registered operation is exercised


def test_every_operation_equals_the_brute_force_on_real_weather(weather):
    expected = brute_cells(WEATHER, weather)
    assert _diff(expected, batch_cells(WEATHER, weather)) == []


def test_every_operation_equals_the_brute_force_on_real_flights_with_ties_in_time():
    fs = replace(
        FLIGHTS,
        aggregates=(
            Aggregate(key="origin", operation=Count(), windows=["15m", "1h"], period="5m"),
            Aggregate(
                key="origin", operation=Variance("dep_delay", ddof=1), windows=["1h"], period="5m"
            ),
            Aggregate(key="origin", operation=StdDev("dep_delay"), windows=["1h"], period="5m"),
            Aggregate(key="origin", operation=First("dep_delay"), windows=["15m"], period="5m"),
            Aggregate(key="origin", operation=Last("dest"), windows=["15m"], period="5m"),
            Aggregate(key="origin", operation=LastK("dep_delay", k=4), windows=["1h"], period="5m"),
            Aggregate(key="origin", operation=UniqueCount("dest"), windows=["1h"], period="5m"),
            Aggregate(key="carrier", operation=Histogram("dest", k=2), windows=["1h"], period="5m"),
            Aggregate(key="carrier", operation=Sum("dep_delay"), windows=["1h"], period="5m"),
            Aggregate(key="carrier", operation=Max("dep_delay"), windows=["15m"], period="5m"),
            Aggregate(key="carrier", operation=Min("dep_delay"), windows=["15m"], period="5m"),
        ),
    )
    events = typed_events(fs, real_flights(month=3, day=8, days=1))
    assert max(Counter((e["origin"], e["event_time"]) for e in events).values()) > 2
    assert _diff(brute_cells(fs, events), batch_cells(fs, events)) == []


def _stream_cells(fs, events: list[dict], seed: int, trail_ms: int, lateness_s: int):
    """Deliver shuffled, in bundles of 25, the watermark trailing the newest event by
    `trail_ms`: many events arrive behind the watermark (late) or out of order."""
    order = list(events)
    random.Random(seed).shuffle(order)
    stream = TestStream().advance_watermark_to(0)
    newest, watermark = 0, 0
    for start in range(0, len(order), 25):
        part = order[start : start + 25]
        stream = stream.add_elements([TimestampedValue(e, e[fs.event_time] / 1000.0) for e in part])
        newest = max(newest, *(e[fs.event_time] for e in part))
        if newest - trail_ms > watermark:
            watermark = newest - trail_ms
            stream = stream.advance_watermark_to(watermark / 1000.0)
    collect = CollectPanes()
    p = beam.Pipeline(options=streaming_options())
    _ = (
        p
        | stream.advance_watermark_to_infinity()
        | ComputeAggregates(fs, streaming=True, allowed_lateness_s=lateness_s)
        | collect
    )
    result = p.run()
    result.wait_until_finish()
    return collect.final_cells(), metric_counters(result)


@pytest.mark.timeout(600)
def test_streaming_cells_equal_the_brute_force_with_late_and_out_of_order_events(weather):
    expected = brute_cells(WEATHER, weather)
    cells, counters = _stream_cells(
        WEATHER, weather, seed=7, trail_ms=DAY_MS, lateness_s=30 * 86_400
    )
    assert counters.get("cells_late", 0) > 0  # late panes happened and were corrected
    assert counters.get("late_updates_dropped", 0) == 0
    assert _diff(expected, cells) == []


def test_the_as_of_lookup_with_a_serving_delay_equals_the_brute_force(weather):
    """D = 1 h, P = 1 d: an observation at 00:30 sees the window ending the day before."""
    cells = batch_cells(WEATHER, weather)
    assert WEATHER.serving_delay_s == 3600
    for event in weather:
        joined = attach_aggregates(WEATHER, event, lambda key: cells.get(tuple(key)))
        assert joined == brute_example(WEATHER, event, weather), event["observed"]


def test_the_batch_as_of_join_with_a_serving_delay_equals_the_brute_force(weather):
    from skewless.transforms.examples import BuildExamples

    columns = [c for a in WEATHER.aggregates for c, _, _ in a.columns]
    expected = {}
    for event in weather:
        example = brute_example(WEATHER, event, weather)
        expected[(event["origin"], event["observed"])] = {c: example[c] for c in columns}

    def check(rows):
        got = {}
        for row in rows:
            t = round(row["observed"].timestamp() * 1000)
            got[(row["origin"], t)] = {c: row[c] for c in columns}
        assert len(got) == len(rows) == len(expected)
        wrong = [k for k in expected if got.get(k) != expected[k]]
        assert not wrong, (len(wrong), [(got.get(k), expected[k]) for k in wrong[:1]])

    with TestPipeline(runner="FnApiRunner") as p:
        examples = (
            p
            | beam.Create(weather)
            | BuildExamples(WEATHER)
            | beam.FlatMap(lambda batch: batch.to_pylist())
        )
        assert_that(examples, check)


def test_list_and_map_values_become_aligned_columns():
    fs = WEATHER
    (hist,) = [a for a in fs.aggregates if a.combiner == "histogram"]
    assert [c[0] for c in hist.columns] == ["origin_wind_7d_keys", "origin_wind_7d_counts"]
    cell = {"origin_wind_7d": {"N": 5, "E": 2}}
    joined = attach_aggregates(
        fs,
        {"observed": 2 * DAY_MS, "origin": "JFK", "wind_sector": None},
        lambda key: cell if key == CellKey("origin", "JFK", DAY_MS) else None,
    )
    assert joined["origin_wind_7d_keys"] == ["N", "E"]
    assert joined["origin_wind_7d_counts"] == [5, 2]
    assert joined["origin_last_k_temp_1d"] == []  # absent from the cell: the default


@pytest.mark.parametrize(
    "declare, message",
    [
        (
            lambda: Aggregate(key="origin", operation=Mean("dest"), windows=["1h"], period="5m"),
            "mean needs a field of type int or float or bool",
        ),
        (
            lambda: Aggregate(
                key="origin", operation=Histogram("dep_delay"), windows=["1h"], period="5m"
            ),
            "histogram needs a field of type string",
        ),
        (
            lambda: Aggregate(key="origin", operation=Mean("nope"), windows=["1h"], period="5m"),
            "unknown value field",
        ),
        (
            lambda: Aggregate(key="origin", operation=Count(), windows=["1h"], period="7m"),
            "not a multiple of the period",
        ),
        (
            lambda: Aggregate(key="origin", operation=Count(), windows=["1 hour"], period="5m"),
            "not a duration",
        ),
        (
            lambda: Aggregate(key="origin", operation=Count(), windows=[], period="5m"),
            "windows must not be empty",
        ),
        (
            lambda: Aggregate(
                key="origin",
                operation=LastK("dep_delay", k=3),
                windows=["1h"],
                period="5m",
                default=0.0,
            ),
            "does not fit",
        ),
        (
            lambda: Aggregate(
                key="origin", operation=Count(), windows=["1h"], period="5m", default=3
            ),
            "does not fit",
        ),
        (
            lambda: Aggregate(
                key="origin", operation=Count(), windows=["1h", "60m"], period="5m", name="n"
            ),
            None,
        ),  # distinct names: fine
        (
            lambda: Aggregate(key="origin", operation=Count(), windows=["1h", 3600], period="5m"),
            "duplicate aggregate name",
        ),
        (
            lambda: Aggregate(
                key="origin", operation=Mean("dep_delay"), window=["1h"], period="5m"
            ),
            "did you mean 'windows'",
        ),
        (
            lambda: Aggregate(key="tailnum", operation=Count(), windows=["1h"], period="5m"),
            "not an entity key",
        ),
    ],
)
def test_each_wrong_declaration_fails_when_built_with_a_clear_error(declare, message):
    def build():
        return replace(FLIGHTS, aggregates=(declare(),))

    if message is None:
        assert [a.name for a in build().aggregates] == ["n_1h", "n_60m"]
        return
    with pytest.raises(FeatureSetError, match=message):
        build()


def test_operation_parameters_are_checked():
    for bad in (0, -1, "3", True, 2.0):
        for op in (LastK, Histogram):
            with pytest.raises(ValueError, match="k must be a positive integer"):
                op("x", k=bad)
    assert LastK("x", k=1).k == 1 and Histogram("x", k=1).k == 1
    with pytest.raises(ValueError, match="ddof must be 0 or 1"):
        Variance("x", ddof=2)
    with pytest.raises(FeatureSetError, match="allows NaN"):
        replace(
            FLIGHTS,
            allow_non_finite=("air_time",),
            aggregates=(
                Aggregate(key="origin", operation=Sum("air_time"), windows=["1h"], period="5m"),
            ),
        )


def test_generated_names_and_windows_as_a_list():
    fs = replace(
        FLIGHTS,
        aggregates=(
            Aggregate(
                key="origin", operation=Mean("dep_delay"), windows=["15m", "1h", "1d"], period="5m"
            ),
            Aggregate(key="carrier", operation="count", windows=[900], period=300, name="flights"),
        ),
    )
    assert [(a.name, a.size_s, a.period_s) for a in fs.aggregates] == [
        ("origin_mean_dep_delay_15m", 900, 300),
        ("origin_mean_dep_delay_1h", 3600, 300),
        ("origin_mean_dep_delay_1d", 86_400, 300),
        ("flights_15m", 900, 300),
    ]


def test_signed_zeros_give_the_same_value_in_every_order():
    from skewless.transforms.operations import ADD, MERGE

    for op in (Min("v"), Max("v"), First("v"), Last("v"), LastK("v", k=2)):
        results = set()
        for values in ([0.0, -0.0], [-0.0, 0.0]):
            one = op.partial()
            for v in values:
                ADD[one[0]](one, v, 5)
            halves = [op.partial(), op.partial()]
            for half, v in zip(halves, values, strict=True):
                ADD[half[0]](half, v, 5)
            MERGE[halves[0][0]](halves[0], halves[1])
            for p in (one, halves[0]):
                results.add(repr(op.finalize(p, 2)))
        assert len(results) == 1, (op, results)
