"""Parity on the Bigtable emulator: streaming cells == batch backfill, value by value; setup; idempotency.

The streaming side is deterministic: TestStream delivers a full day of real flights (shuffled,
with late and out-of-order deliveries) through the real streaming composite and the real
Bigtable write into the emulator; the cells are read back with the Bigtable client.
"""

from __future__ import annotations

import random
from dataclasses import replace

import apache_beam as beam
import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.windowed_value import PaneInfoTiming

from skewless.beam_pipelines.commands.bigtable_setup import ensure_table, max_age_s
from skewless.beam_pipelines.io.bigtable import (
    WriteCells,
    cell_row,
    open_table,
    read_all_cells,
    read_cells_with_versions,
)
from skewless.beam_pipelines.jobs.aggregate import make_pipeline
from skewless.beam_pipelines.runtime.parsing import metric_counters
from skewless.examples.flights import FLIGHTS
from skewless.transforms.aggregations import CellKey, ComputeAggregates
from skewless.transforms.featureset import WindowedAggregate
from tests.support.flights_data import flights_raw_slice
from tests.support.pipelines import CollectPanes, batch_cells, streaming_options, typed_events

pytestmark = [pytest.mark.emulator]
LATENESS_S = 7200
RETENTION_S = 20 * 365 * 86_400  # the cells are stamped in 2013: keep them


@pytest.fixture(scope="module")
def day_of_flights() -> list[dict]:
    # 2013-01-02 UTC plus the hour before, so the first windows of the day are complete.
    return typed_events(FLIGHTS, flights_raw_slice("2013-01-01 23:00:00", "2013-01-03 00:00:00"))


def _new_table(bt, fs=FLIGHTS):
    table_id = bt.table_name()
    ensure_table(bt.project, bt.instance, table_id, fs, LATENESS_S, RETENTION_S)
    return table_id


def _delivery(events: list[dict], seed: int) -> TestStream:
    """Out of order (jitter up to 40 min), the watermark 10 min behind the newest event seen, and
    every 25th event held back 50 min more: many events arrive after some of their windows
    fired (late panes), none later than 80 min after a window end (< the 2 h lateness)."""
    rng = random.Random(seed)
    keyed = []
    for i, e in enumerate(events):
        delay = rng.uniform(0, 2_400_000) + (3_000_000 if i % 25 == 0 else 0)
        keyed.append((e["event_time"] + delay, e))
    keyed.sort(key=lambda kv: kv[0])
    stream = TestStream().advance_watermark_to(min(e["event_time"] for e in events) / 1000.0 - 1)
    watermark = float("-inf")
    newest = float("-inf")
    for start in range(0, len(keyed), 50):
        chunk = [e for _, e in keyed[start : start + 50]]
        stream = stream.add_elements([TimestampedValue(e, e["event_time"] / 1000.0) for e in chunk])
        newest = max(newest, *(e["event_time"] for e in chunk))
        if newest - 600_000 > watermark:
            watermark = newest - 600_000
            stream = stream.advance_watermark_to(watermark / 1000.0)
    return stream.advance_watermark_to_infinity()


def _stream_into_bigtable(bt, table_id: str, events: list[dict], seed: int):
    collect = CollectPanes()
    p = beam.Pipeline(options=streaming_options())
    blocks = (
        p
        | _delivery(events, seed)
        | ComputeAggregates(FLIGHTS, streaming=True, allowed_lateness_s=LATENESS_S)
    )
    _ = blocks | WriteCells(bt.project, bt.instance, table_id, FLIGHTS.name)
    _ = blocks | collect
    result = p.run()
    result.wait_until_finish()
    late_panes = sum(1 for *_, timing in collect.panes() if timing == PaneInfoTiming.LATE)
    return metric_counters(result), late_panes


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_streaming_cells_equal_the_batch_backfill_and_a_second_replay_changes_nothing(
    bigtable_emulator, day_of_flights
):
    bt = bigtable_emulator
    table_id = _new_table(bt)
    counters, late_panes = _stream_into_bigtable(bt, table_id, day_of_flights, seed=1)
    table = open_table(bt.project, bt.instance, table_id)
    streamed = read_all_cells(table, FLIGHTS.name)
    expected = batch_cells(FLIGHTS, day_of_flights)

    assert len(day_of_flights) > 800
    assert late_panes > 100, "the delivery should make many windows re-fire late"
    assert counters.get("late_updates_dropped", 0) == 0
    assert counters["cells_written"] >= len(expected)
    assert set(streamed) == set(expected), (
        f"missing {sorted(set(expected) - set(streamed))[:5]}, "
        f"extra {sorted(set(streamed) - set(expected))[:5]}"
    )
    mismatched = [k for k in expected if streamed[k] != expected[k]]
    assert not mismatched, [(k, streamed[k], expected[k]) for k in mismatched[:5]]

    # Replaying the same events (another delivery order) with a fresh job: identical table,
    # one version per cell.
    _stream_into_bigtable(bt, table_id, day_of_flights, seed=2)
    again = list(read_cells_with_versions(table, FLIGHTS.name))
    assert {k: v for k, v, _ in again} == streamed
    assert {n for *_, n in again} == {1}


@pytest.mark.timeout(120)
def test_rewriting_a_cell_leaves_exactly_one_version(bigtable_emulator):
    bt = bigtable_emulator
    table_id = _new_table(bt)
    table = open_table(bt.project, bt.instance, table_id)
    key = CellKey("origin", "JFK", 1_357_000_000_000)
    for value in (1, 2, 3):  # on-time pane, late pane, replay
        statuses = table.mutate_rows([cell_row(table, FLIGHTS.name, key, {"origin_departures_1h": value})])
        assert [s.code for s in statuses] == [0]
    cells = list(read_cells_with_versions(table, FLIGHTS.name))
    assert cells == [(key, {"origin_departures_1h": 3}, 1)]
    row = table.read_row(b"origin#JFK#1357000000000")
    (cell,) = row.cells[FLIGHTS.name][b"origin_departures_1h"]
    assert int(cell.timestamp.timestamp() * 1000) == key.window_end_ms


@pytest.mark.timeout(120)
def test_bigtable_setup_is_rerunnable_and_the_job_checks_the_table(bigtable_emulator):
    bt = bigtable_emulator
    table_id = bt.table_name()
    first = ensure_table(bt.project, bt.instance, table_id, FLIGHTS, 600, 86_400)
    again = ensure_table(bt.project, bt.instance, table_id, FLIGHTS, 600, 2 * 86_400)
    assert first["created_table"] and not again["created_table"]
    assert again["max_age_s"] == 3600 + 600 + 2 * 86_400 == max_age_s(FLIGHTS, 600, 2 * 86_400)
    table = open_table(bt.project, bt.instance, table_id, admin=True)
    rule = table.list_column_families()[FLIGHTS.name].gc_rule.to_pb()
    assert rule.union.rules[0].max_age.total_seconds() == again["max_age_s"]
    assert rule.union.rules[1].max_num_versions == 1

    base = [
        "--subscription=projects/skewless-test/subscriptions/sub",
        f"--bigtable_project={bt.project}",
        f"--bigtable_instance={bt.instance}",
    ]
    with pytest.raises(SystemExit, match="does not exist.*skewless bigtable-setup"):
        make_pipeline([*base, "--bigtable_table=missing-table"])
    other = bt.table_name()
    open_table(bt.project, bt.instance, other, admin=True).create(column_families={"other": None})
    with pytest.raises(SystemExit, match="no column family 'flights'"):
        make_pipeline([*base, f"--bigtable_table={other}"])
    make_pipeline([*base, f"--bigtable_table={table_id}"])  # builds


LONG_WINDOWS = replace(
    FLIGHTS,
    aggregates=(
        WindowedAggregate("origin_departures_1d", "origin", "count", 86_400, 300),
        WindowedAggregate("origin_mean_dep_delay_1d", "origin", "mean", 86_400, 300, "dep_delay", 0.0),
        WindowedAggregate("carrier_max_dep_delay_1d", "carrier", "max", 86_400, 300, "dep_delay", 0.0),
        WindowedAggregate("origin_departures_7d", "origin", "count", 7 * 86_400, 300),
    ),
)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_long_windows_one_day_and_seven_days_equal_the_batch_backfill(bigtable_emulator):
    """1 day / 5 min (S/P = 288) and a 7-day count (S/P = 2,016) over two days of real flights,
    delivered out of order: every streamed cell, up to the last 7-day window, == the backfill."""
    bt = bigtable_emulator
    events = typed_events(
        LONG_WINDOWS, flights_raw_slice("2013-03-04 00:00:00", "2013-03-06 00:00:00")
    )
    table_id = _new_table(bt, LONG_WINDOWS)
    collect = CollectPanes()
    p = beam.Pipeline(options=streaming_options())
    cells = (
        p
        | _delivery(events, seed=4)
        | ComputeAggregates(LONG_WINDOWS, streaming=True, allowed_lateness_s=LATENESS_S)
    )
    _ = cells | WriteCells(bt.project, bt.instance, table_id, LONG_WINDOWS.name)
    _ = cells | collect
    result = p.run()
    result.wait_until_finish()
    counters = metric_counters(result)
    streamed = read_all_cells(open_table(bt.project, bt.instance, table_id), LONG_WINDOWS.name)
    expected = batch_cells(LONG_WINDOWS, events)

    assert len(events) > 1500
    assert counters.get("late_updates_dropped", 0) == 0
    assert counters["aggregate_contributions"] <= 2 * len(events)  # two entity keys
    last_w = max(w for _, _, w in expected)
    assert last_w - max(e["event_time"] for e in events) > 6 * 86_400  # the 7-day tail is there
    assert set(streamed) == set(expected)
    mismatched = [k for k in expected if streamed[k] != expected[k]]
    assert not mismatched, [(k, streamed[k], expected[k]) for k in mismatched[:5]]
