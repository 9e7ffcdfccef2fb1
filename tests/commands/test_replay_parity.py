"""Issue 20: a replay as fast as possible into the local aggregate job, with the default lateness.

`skewless replay --speedup 0 --heartbeat_s 1` (its CLI) publishes the events of
skewless/examples/weather.py (real hourly weather at three airports, a 1-day period, 1-day and
7-day windows, every operation) into the aggregate job (its real make_pipeline, local runner,
`--allowed_lateness_s` left at its default) on the Pub/Sub and Bigtable emulators. The cells
must equal the batch backfill, cell by cell, with nothing dropped: the replay keeps event-time
order and the local watermark never passes an event published and not read yet.
"""

from __future__ import annotations

import pytest

from skewless.beam_pipelines.commands import replay
from skewless.beam_pipelines.commands.bigtable_setup import ensure_table
from skewless.beam_pipelines.io.bigtable import open_table, read_all_cells
from skewless.beam_pipelines.runtime.options import DEFAULT_ALLOWED_LATENESS_S
from skewless.beam_pipelines.runtime.parsing import metric_counters
from skewless.examples.weather import WEATHER, weather_path
from skewless.transforms.record_checks import to_epoch_ms
from tests.support.pipelines import batch_cells, typed_events
from tests.support.streaming_jobs import start_aggregate_job, wait_for

pytestmark = [pytest.mark.emulator]
SPEC = "skewless.examples.weather:WEATHER"
RETENTION_S = 20 * 365 * 86_400  # the cells are stamped in 2013: keep them
DROPS = ("late_updates_dropped", "events_dropped_too_late")


def _weather(start: str | None = None, end: str | None = None) -> list[dict]:
    """The typed weather events with event time in [start, end) (default: the whole year)."""
    events = typed_events(WEATHER, replay.read_raw_records(weather_path()))
    lo = to_epoch_ms(start) if start else float("-inf")
    hi = to_epoch_ms(end) if end else float("inf")
    return [e for e in events if lo <= e[WEATHER.event_time] < hi]


def _job_until_cells_match(ps, bt, table_id: str, expected: dict, timeout_s: float, **kw):
    """Start the job, poll the table until it equals `expected` or the timeout, cancel the job:
    (the cells it wrote, its counters). `kw["replay"]`, if any, is called once the job runs."""
    result, topic, _ = start_aggregate_job(
        ps, bt, table_id, DEFAULT_ALLOWED_LATENESS_S, f"--feature_set={SPEC}",
        events=kw.get("events"),
    )  # fmt: skip
    table = open_table(bt.project, bt.instance, table_id)
    stored: dict = {}

    def cells_match() -> bool:
        stored.clear()
        stored.update(read_all_cells(table, WEATHER.name))
        return stored == expected

    try:
        if "replay" in kw:
            kw["replay"](topic)
        wait_for(cells_match, timeout_s, interval_s=2.0)
        counters = metric_counters(result)
    finally:
        result.cancel()
    return stored, counters


def _differences(stored: dict, expected: dict, counters: dict) -> str:
    missing = sorted(expected.keys() - stored.keys())
    wrong = sorted(k for k in expected.keys() & stored.keys() if stored[k] != expected[k])
    extra = sorted(stored.keys() - expected.keys())
    return (
        f"{len(missing)} cells missing (e.g. {missing[:3]}), {len(wrong)} wrong (e.g. "
        f"{[(k, stored[k], expected[k]) for k in wrong[:2]]}), {len(extra)} extra; drops: "
        f"{ {name: counters.get(name, 0) for name in DROPS} }"
    )


def _new_table(bt) -> str:
    table_id = bt.table_name()
    ensure_table(
        bt.project, bt.instance, table_id, WEATHER, DEFAULT_ALLOWED_LATENESS_S, RETENTION_S
    )
    return table_id


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_year_replayed_as_fast_as_possible_with_the_default_lateness_equals_the_backfill(
    pubsub_emulator, bigtable_emulator
):
    ps, bt = pubsub_emulator, bigtable_emulator
    table_id = _new_table(bt)
    events = _weather()
    expected = batch_cells(WEATHER, events)
    published = []

    def replay_the_year(topic: str) -> None:
        published.append(
            replay.run([f"--topic={topic}", f"--feature_set={SPEC}", "--speedup=0", "--heartbeat_s=1"])
        )

    stored, counters = _job_until_cells_match(
        ps, bt, table_id, expected, 240, replay=replay_the_year
    )

    (stats,) = published
    assert stats.published == len(events) == 26_115
    assert stored == expected, _differences(stored, expected, counters)
    assert counters["records_valid"] == len(events)
    assert {name: counters.get(name, 0) for name in DROPS} == dict.fromkeys(DROPS, 0)
    assert counters.get("cells_late", 0) == 0  # the watermark never passed an unread event


@pytest.mark.timeout(300)
def test_the_last_windows_are_written_when_the_job_reads_the_replay_after_it_ended(
    pubsub_emulator, bigtable_emulator
):
    """The job as far behind as it gets: it starts once the replay has ended (no linger), so
    the whole replay is its backlog and the final heartbeat comes in one pull with the last
    events. Every window up to the last 7-day window of the last event is written."""
    ps, bt = pubsub_emulator, bigtable_emulator
    table_id = _new_table(bt)
    start, end = "2013-03-01T00:00:00Z", "2013-03-15T00:00:00Z"
    topic = ps.topic("events")
    subscription = ps.subscription(topic, "job")
    stats = replay.run(
        [
            f"--topic={topic}", f"--feature_set={SPEC}", f"--start_time={start}",
            f"--end_time={end}", "--speedup=0", "--heartbeat_s=1", "--linger_s=0",
        ]
    )  # fmt: skip
    events = _weather(start, end)
    expected = batch_cells(WEATHER, events)

    stored, counters = _job_until_cells_match(
        ps, bt, table_id, expected, 150, events=(topic, subscription)
    )

    assert stored == expected, _differences(stored, expected, counters)
    last_window_end = max(w for _, _, w in expected)
    assert last_window_end > stats.last_event_ms + 6 * 86_400_000  # the 7-day windows
    assert stats.final_heartbeat_ms > last_window_end
    assert counters["records_valid"] == stats.published == len(events)
    assert counters["heartbeats"] >= 1
