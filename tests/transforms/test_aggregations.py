"""The shared windowed aggregates and the as-of join against an independent brute force."""

import bisect
import math
from collections import defaultdict

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from skewless.examples.flights import FLIGHTS
from skewless.transforms.aggregations import (
    ComputeAggregates,
    explode_cells,
    parse_row_key,
    row_key,
)
from skewless.transforms.examples import BuildExamples
from skewless.transforms.featureset import as_of_window_end
from skewless.transforms.record_checks import RecordChecker
from tests.support.flights_data import real_flights

FS = FLIGHTS


@pytest.fixture(scope="module")
def events():
    """Three days of real departures (~2,800), typed and derived as every job sees them."""
    validator = RecordChecker(FS)
    out = [validator.validate(r) for r in real_flights(3, 8, days=3)]
    return [e for e in out if e is not None]


class BruteForce:
    """Aggregates straight from the definition: events of the key with W - S <= t < W."""

    def __init__(self, events):
        self.by_key = defaultdict(list)
        for e in events:
            for key in FS.keys:
                self.by_key[(key, str(e[key]))].append((e["event_time"], e["dep_delay"]))
        for rows in self.by_key.values():
            rows.sort()
        self.times = {k: [t for t, _ in rows] for k, rows in self.by_key.items()}

    def value(self, agg, key_value, w):
        rows = self.by_key.get((agg.key, key_value), [])
        times = self.times.get((agg.key, key_value), [])
        lo, hi = bisect.bisect_left(times, w - agg.size_ms), bisect.bisect_left(times, w)
        window = rows[lo:hi]
        if agg.combiner == "count":
            return len(window)
        if not window:
            return agg.default
        return sum(v for _, v in window) / len(window)

    def nonempty_cells(self):
        """Every (key name, key value, W) whose largest window holds at least one event."""
        cells = set()
        period = FS.period_ms
        for (key, value), times in self.times.items():
            size = max(a.size_ms for a in FS.aggregates_for(key))
            for t in times:
                first = (t // period + 1) * period
                for w in range(first, t + size + 1, period):
                    cells.add((key, value, w))
        return cells


def check_examples(batches, brute, expected_count):
    rows = pa.Table.from_batches(batches).to_pylist() if batches else []
    assert len(rows) == expected_count
    for row in rows:
        t = int(row["event_time"].timestamp() * 1000)
        w = as_of_window_end(t, FS.period_ms)
        for agg in FS.aggregates:
            expected = brute.value(agg, str(row[agg.key]), w)
            assert math.isclose(row[agg.name], expected, rel_tol=1e-9, abs_tol=1e-9), (
                agg.name, row[agg.key], t, row[agg.name], expected,
            )  # fmt: skip


def test_examples_equal_brute_force_on_real_flights(events):
    brute = BruteForce(events)
    n_examples = sum(1 for e in events if e["label"] is not None)
    assert n_examples > 2000
    with TestPipeline() as p:
        batches = p | beam.Create(events) | BuildExamples(FS)
        assert_that(batches, lambda got: check_examples(got, brute, n_examples))


def check_cells(cells, brute):
    got = {}
    for key, values in cells:
        assert (key.key_name, key.key_value, key.window_end_ms) not in got, "duplicate cell"
        got[(key.key_name, key.key_value, key.window_end_ms)] = values
    assert set(got) == brute.nonempty_cells()
    for (key_name, key_value, w), values in got.items():
        aggs = FS.aggregates_for(key_name)
        assert set(values) == {a.name for a in aggs}
        for agg in aggs:
            assert math.isclose(values[agg.name], brute.value(agg, key_value, w), abs_tol=1e-9)


@pytest.mark.parametrize("block_s", [None, 300, 3600])
def test_every_cell_equals_brute_force_whatever_the_block_size(events, block_s):
    """Day blocks (batch), one-period blocks (what streaming uses) and hour blocks agree."""
    brute = BruteForce(events)
    with TestPipeline() as p:
        cells = (
            p
            | beam.Create(events)
            | ComputeAggregates(FS, block_s=block_s)
            | beam.FlatMap(explode_cells)
        )
        assert_that(cells, lambda got: check_cells(got, brute))


def test_no_example_aggregates_an_event_at_or_after_its_own_time(events):
    """Change every event at or after a cut-off T: examples up to T must not move at all."""
    cut = sorted(e["event_time"] for e in events)[len(events) // 2]
    changed = [
        {**e, "dep_delay": e["dep_delay"] + 999.0} if e["event_time"] >= cut else e for e in events
    ]

    def before_cut(batch):
        for r in batch.to_pylist():
            if int(r["event_time"].timestamp() * 1000) <= cut:
                key = (r["carrier"], r["flight"], r["origin"], r["scheduled_departure"].isoformat())
                yield key, tuple(r[a.name] for a in FS.aggregates)

    def check(groups):
        assert len(groups) > 1000
        for key, sides in groups:
            assert list(sides["original"]) == list(sides["changed"]), key
            assert len(sides["original"]) == 1, key

    with TestPipeline() as p:
        sides = {
            name: p
            | f"Create{name}" >> beam.Create(data)
            | f"Build{name}" >> BuildExamples(FS)
            | f"BeforeCut{name}" >> beam.FlatMap(before_cut)
            for name, data in (("original", events), ("changed", changed))
        }
        assert_that(sides | beam.CoGroupByKey(), check)


def test_row_key_is_zero_padded_and_round_trips():
    key = row_key("origin", "JFK", 1_357_034_400_000)
    assert key == "origin#JFK#1357034400000"
    assert row_key("origin", "JFK", 5) == "origin#JFK#0000000000005"
    assert row_key("a", "x", 9) < row_key("a", "x", 10)  # lexicographic order = time order
    assert parse_row_key(key.encode()) == ("origin", "JFK", 1_357_034_400_000)
    assert parse_row_key("k#a#b#0000000000007") == ("k", "a#b", 7)
