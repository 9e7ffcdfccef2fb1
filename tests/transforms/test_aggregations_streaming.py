"""TestStream: the streaming ComputeAggregates fires on time, re-fires late, drops and counts too late."""

from __future__ import annotations

import random

import apache_beam as beam
import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.windowed_value import PaneInfoTiming

from skewless.beam_pipelines.runtime.parsing import metric_counters
from skewless.transforms.aggregations import ComputeAggregates
from tests.support.pipelines import TOY, CollectPanes, batch_cells, streaming_options, toy

LATENESS_S = 120


def run_stream(stream: TestStream, lateness_s: int = LATENESS_S):
    collect = CollectPanes()
    p = beam.Pipeline(options=streaming_options())
    _ = p | stream | ComputeAggregates(TOY, streaming=True, allowed_lateness_s=lateness_s) | collect
    result = p.run()
    result.wait_until_finish()
    return collect, metric_counters(result)


def at(event: dict) -> TimestampedValue:
    return TimestampedValue(event, event["t"] / 1000.0)


def cell(n_2m, mean, n_1m) -> dict:
    return {"n_2m": n_2m, "mean_v_2m": mean, "n_1m": n_1m}


@pytest.mark.timeout(120)
def test_on_time_panes_fire_at_the_window_end():
    stream = (
        TestStream()
        .advance_watermark_to(0)
        .add_elements([at(toy("A", 10.0, 30)), at(toy("A", 20.0, 70))])
        .advance_watermark_to_infinity()
    )
    collect, counters = run_stream(stream)
    assert collect.final_cells() == {
        ("k", "A", 60_000): cell(1, 10.0, 1),
        ("k", "A", 120_000): cell(2, 15.0, 1),
        ("k", "A", 180_000): cell(1, 20.0, 0),
    }
    assert {timing for *_, timing in collect.panes()} == {PaneInfoTiming.ON_TIME}
    assert counters.get("late_updates_dropped", 0) == 0


@pytest.mark.timeout(120)
def test_late_event_within_lateness_updates_its_window_to_the_full_value():
    stream = (
        TestStream()
        .advance_watermark_to(0)
        .add_elements([at(toy("A", 10.0, 30))])
        .advance_watermark_to(70)  # W=60 fires on time with one event
        .add_elements([at(toy("A", 50.0, 40))])  # late for W=60 by 10 s < 120 s
        .advance_watermark_to_infinity()
    )
    collect, counters = run_stream(stream)
    w60 = sorted((i, t, v) for k, v, i, t in collect.panes() if k == ("k", "A", 60_000))
    assert w60[0] == (0, PaneInfoTiming.ON_TIME, cell(1, 10.0, 1))
    assert w60[-1][1] == PaneInfoTiming.LATE
    assert w60[-1][2] == cell(2, 30.0, 2)  # accumulated: both events, not only the late one
    assert collect.final_cells()[("k", "A", 120_000)] == cell(2, 30.0, 0)
    assert counters.get("late_updates_dropped", 0) == 0
    assert counters.get("events_dropped_too_late", 0) == 0


@pytest.mark.timeout(120)
def test_updates_beyond_the_lateness_are_dropped_and_counted():
    stream = (
        TestStream()
        .advance_watermark_to(0)
        .add_elements([at(toy("A", 10.0, 30))])
        .advance_watermark_to(200)  # W=60 expired (60 + 120 < 200), W=120 still open
        .add_elements([at(toy("A", 50.0, 40))])  # W=60 update dropped, W=120 update applied
        .advance_watermark_to(400)  # both windows of bucket 0 expired
        .add_elements([at(toy("A", 90.0, 50))])  # every update too late: the event is dropped
        .add_elements([at(toy("B", 1.0, 20))])  # a never-seen key, too late all the same
        .advance_watermark_to_infinity()
    )
    collect, counters = run_stream(stream)
    assert collect.final_cells() == {
        ("k", "A", 60_000): cell(1, 10.0, 1),
        ("k", "A", 120_000): cell(2, 30.0, 0),
    }
    assert counters["late_updates_dropped"] == 1 + 2 + 2
    assert counters["events_dropped_too_late"] == 2


def _interleaved_events(seed: int) -> list[dict]:
    rng = random.Random(seed)
    events = []
    for _ in range(300):
        k = rng.choice("ABCDE")
        # Whole numbers: float sums of them are exact in any order, so values compare exactly.
        v = None if rng.random() < 0.1 else float(rng.randint(-20, 100))
        events.append(toy(k, v, rng.uniform(0, 1800)))
    return events


@pytest.mark.timeout(180)
def test_out_of_order_keys_and_windows_interleaved_match_the_batch_backfill():
    events = _interleaved_events(seed=7)
    # Deliver in shuffled order (up to 90 s), the watermark 20 s behind the newest event: many
    # events are out of order and late for some windows, none beyond the 120 s lateness.
    rng = random.Random(11)
    order = sorted(events, key=lambda e: e["t"] + rng.uniform(0, 90_000))
    stream = TestStream().advance_watermark_to(0)
    newest, watermark = 0, 0
    for start in range(0, len(order), 10):
        chunk = order[start : start + 10]
        stream = stream.add_elements([at(e) for e in chunk])
        newest = max(newest, *(e["t"] for e in chunk))
        if newest - 20_000 > watermark:
            watermark = newest - 20_000
            stream = stream.advance_watermark_to(watermark / 1000.0)
    stream = stream.advance_watermark_to_infinity()
    collect, counters = run_stream(stream)
    late_panes = [p for p in collect.panes() if p[3] == PaneInfoTiming.LATE]
    assert late_panes, "the delivery order should produce late panes"
    assert counters.get("late_updates_dropped", 0) == 0
    assert collect.final_cells() == batch_cells(TOY, events)
