"""Tiles: exact sums in any delivery order, one shuffle element per event and key, blocks == buckets."""

from __future__ import annotations

import random
from dataclasses import replace
from fractions import Fraction

import apache_beam as beam
import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from skewless.beam_pipelines.runtime.parsing import metric_counters
from skewless.transforms.aggregations import ComputeAggregates
from skewless.transforms.featureset import FeatureSet, WindowedAggregate
from skewless.transforms.partials import add_to_slot, key_specs, new_slot, window_cell
from skewless.transforms.tiles import to_partials
from tests.support.pipelines import TOY, CollectPanes, batch_cells, streaming_options, toy

LATENESS_S = 600

SUMS = replace(
    TOY,
    name="sums",
    aggregates=(
        WindowedAggregate("sum_v_3m", "k", "sum", 180, 60, "v"),
        WindowedAggregate("mean_v_3m", "k", "mean", 180, 60, "v", -1.0),
        WindowedAggregate("min_v_1m", "k", "min", 60, 60, "v", 0.0),
        WindowedAggregate("max_v_3m", "k", "max", 180, 60, "v", 0.0),
        WindowedAggregate("n_3m", "k", "count", 180, 60),
    ),
)


def _awkward_values(seed: int, n: int) -> list[dict]:
    """Non-integer floats whose float sums depend on the order: tiny, huge, negative, nulls."""
    rng = random.Random(seed)
    pool = [0.1, 0.2, 0.3, 1e16, -1e16, 1e-9, 3.3333333333333335, -2.5e-7, 123456.789]
    events = []
    for _ in range(n):
        v = None if rng.random() < 0.1 else rng.choice(pool) * rng.choice([1, 1, -1, 0.37])
        events.append(toy(rng.choice("AB"), v, rng.uniform(0, 600)))
    return events


def _exact_cells(fs: FeatureSet, events: list[dict]) -> dict:
    """Brute force with Fractions: the exact sum and mean, rounded once."""
    out = {}
    period = 60_000
    for key in {e["k"] for e in events}:
        mine = [e for e in events if e["k"] == key]
        first = min(e["t"] for e in mine) // period * period
        last = max(e["t"] for e in mine) // period * period + 180_000
        for w in range(first + period, last + 1, period):
            if not any(w - 180_000 <= e["t"] < w for e in mine):
                continue
            cell = {}
            for agg in fs.aggregates:
                inside = [e for e in mine if w - agg.size_ms <= e["t"] < w]
                values = [e["v"] for e in inside if e["v"] is not None]
                if agg.combiner == "count":
                    cell[agg.name] = len(inside)
                elif not values:
                    cell[agg.name] = agg.empty_value
                elif agg.combiner == "sum":
                    cell[agg.name] = float(sum(Fraction(v) for v in values))
                elif agg.combiner == "mean":
                    cell[agg.name] = float(sum(Fraction(v) for v in values) / len(values))
                elif agg.combiner == "min":
                    cell[agg.name] = min(values)
                else:
                    cell[agg.name] = max(values)
            out[("k", key, w)] = cell
    return out


def _stream(fs: FeatureSet, events: list[dict], seed: int, chunk: int = 7):
    """Deliver in a shuffled order, in small bundles, the watermark trailing the newest by 60 s."""
    order = list(events)
    random.Random(seed).shuffle(order)
    stream = TestStream().advance_watermark_to(0)
    newest, watermark = 0, 0
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        stream = stream.add_elements([TimestampedValue(e, e["t"] / 1000.0) for e in part])
        newest = max(newest, *(e["t"] for e in part))
        if newest - 60_000 > watermark:
            watermark = newest - 60_000
            stream = stream.advance_watermark_to(watermark / 1000.0)
    collect = CollectPanes()
    p = beam.Pipeline(options=streaming_options())
    _ = (
        p
        | stream.advance_watermark_to_infinity()
        | ComputeAggregates(fs, streaming=True, allowed_lateness_s=LATENESS_S)
        | collect
    )
    result = p.run()
    result.wait_until_finish()
    return collect.final_cells(), metric_counters(result)


@pytest.mark.timeout(300)
def test_sums_and_means_of_non_integer_values_are_exact_in_every_delivery_order():
    events = _awkward_values(seed=3, n=120)
    exact = _exact_cells(SUMS, events)

    # Plain float sums of some windows differ between two orders: the data is awkward.
    def float_sums(order):
        return [
            sum(e["v"] for e in order if e["k"] == k and w - 180_000 <= e["t"] < w and e["v"])
            for (_, k, w) in sorted(exact)
        ]

    assert float_sums(events) != float_sums(events[::-1])

    assert batch_cells(SUMS, events) == exact
    for seed in (1, 2, 3):
        cells, counters = _stream(SUMS, events, seed)
        assert counters.get("late_updates_dropped", 0) == 0
        assert cells == exact, seed


@pytest.mark.timeout(300)
def test_one_shuffle_element_per_event_and_key_whatever_the_window_sizes():
    events = [toy(k, float(i % 7), i * 0.9) for i, k in enumerate("ABCAB" * 40)]
    long = replace(
        TOY,
        name="long",
        aggregates=(
            WindowedAggregate("n_1d", "k", "count", 86_400, 600),
            WindowedAggregate("mean_v_1d", "k", "mean", 86_400, 600, "v", -1.0),
            WindowedAggregate("n_7d", "k", "count", 7 * 86_400, 600),
        ),
    )
    counted = {}
    for fs in (TOY, long):
        stream = TestStream().advance_watermark_to(0)
        for start in range(0, len(events), 10):  # bundles of 10 events
            stream = stream.add_elements(
                [TimestampedValue(e, e["t"] / 1000.0) for e in events[start : start + 10]]
            )
        p = beam.Pipeline(options=streaming_options())
        # Past the last event the watermark stops: this test counts the shuffle, not cells.
        _ = p | stream | ComputeAggregates(fs, streaming=True, allowed_lateness_s=60)
        result = p.run()
        result.wait_until_finish()
        counted[fs.name] = metric_counters(result)
    toy_counters, long_counters = counted["toy"], counted["long"]
    assert toy_counters["aggregate_events"] == long_counters["aggregate_events"] == len(events)
    # At most one element per event and key (one key here), fewer with per-bundle pre-combining,
    # and the same for a 1-day and 7-day window set as for 1-2 minute windows (S/P 2 vs 1,008).
    assert toy_counters["aggregate_contributions"] <= len(events)
    assert toy_counters["aggregate_contributions"] < len(events) / 2  # pre-combined per bundle
    assert long_counters["aggregate_contributions"] == toy_counters["aggregate_contributions"]


def test_a_cell_from_blocks_equals_the_cell_from_buckets():
    fs = replace(
        TOY,
        name="blocks",
        aggregates=(
            WindowedAggregate("n_30m", "k", "count", 1800, 60),
            WindowedAggregate("sum_v_17m", "k", "sum", 1020, 60, "v"),
            WindowedAggregate("min_v_30m", "k", "min", 1800, 60, "v", 0.0),
            WindowedAggregate("max_v_5m", "k", "max", 300, 60, "v", 0.0),
        ),
    )
    (spec,) = key_specs(fs)
    rng = random.Random(5)
    tile: dict = {}
    for _ in range(400):
        bucket = rng.randrange(0, 60) * 60_000
        slot = tile.setdefault(bucket, new_slot(spec))
        add_to_slot(slot, [None if rng.random() < 0.2 else rng.uniform(-5, 5)] * 3, bucket)
    for block_periods in (2, 3, 5, 7):
        buckets, blocks = to_partials(tile, block_periods * 60_000)
        for w in range(0, 100 * 60_000, 60_000):
            assert window_cell(spec, buckets, w, blocks, block_periods * 60_000) == window_cell(
                spec, buckets, w
            ), (block_periods, w)


class _CountingDict(dict):
    """A dict that counts the lookups window_cell makes through .get."""

    def __init__(self, *args):
        super().__init__(*args)
        self.gets = 0

    def get(self, key, default=None):
        self.gets += 1
        return super().get(key, default)


@pytest.mark.parametrize(
    "block_periods, offset_periods, expected_blocks, expected_buckets",
    [
        (5, 0, 6, 0),  # W on a block boundary: the 30 periods are 6 whole blocks
        (5, 2, 5, 5),  # 2 buckets up to a boundary, 5 blocks, then the 3 left
        (2, 0, 15, 0),  # the smallest block that merges anything
        (2, 1, 14, 2),
    ],
)
def test_a_cell_merges_whole_blocks_where_they_fit_and_buckets_elsewhere(
    block_periods, offset_periods, expected_blocks, expected_buckets
):
    """The blocks are what keeps a long window's cell O(sqrt(S/P)) slots: a block is read
    exactly where it lies whole inside the span still to read (the cell is the same either
    way, test_a_cell_from_blocks_equals_the_cell_from_buckets)."""
    fs = replace(TOY, name="blocks", aggregates=(WindowedAggregate("n_30m", "k", "count", 1800, 60),))
    (spec,) = key_specs(fs)
    period, block_ms = 60_000, block_periods * 60_000
    tile: dict = {}
    for bucket in range(0, 120 * period, period):
        add_to_slot(tile.setdefault(bucket, new_slot(spec)), [], bucket)
    buckets, blocks = to_partials(tile, block_ms)
    buckets, blocks = _CountingDict(buckets), _CountingDict(blocks)
    w = 60 * period + offset_periods * period
    assert w % block_ms != 0 or offset_periods == 0
    cell = window_cell(spec, buckets, w, blocks, block_ms)
    assert cell == {"n_30m": 30}
    assert (blocks.gets, buckets.gets) == (expected_blocks, expected_buckets)
