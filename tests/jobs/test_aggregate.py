"""End to end on the Pub/Sub and Bigtable emulators: replay real flights into the running job.

The replayed flights are shifted (by whole periods) to end two hours ago and replayed as fast
as possible (`replay.replay_events`, what `skewless replay` runs: the events in event-time
order on one ordering key, heartbeats that carry the replay's event clock, then a final
heartbeat past the last window end). The job runs with the default allowed lateness: the local
watermark follows the replay and never passes an event that is still in the subscription, so
every cell is emitted on time, with nothing dropped.
"""

from __future__ import annotations

import json

import pytest

from skewless.beam_pipelines.commands.bigtable_setup import ensure_table
from skewless.beam_pipelines.commands.replay import ordered_publisher, replay_events, to_message
from skewless.beam_pipelines.io.bigtable import open_table, read_cells_with_versions
from skewless.beam_pipelines.runtime.options import DEFAULT_ALLOWED_LATENESS_S
from skewless.beam_pipelines.runtime.parsing import metric_counters
from skewless.examples.flights import FLIGHTS
from tests.support.streaming_jobs import (
    HOUR_MS,
    flights_shifted_to_end_before_now,
    start_aggregate_job,
    wait_for,
)

pytestmark = [pytest.mark.emulator, pytest.mark.slow]
# test_streaming_poison's lateness: it publishes wall-clock heartbeats beside replayed events,
# and a heartbeat's time is then no promise about the events after it.


@pytest.mark.timeout(300)
def test_replayed_flights_reach_bigtable_and_bad_messages_the_dead_letter_topic(
    pubsub_emulator, bigtable_emulator
):
    ps, bt = pubsub_emulator, bigtable_emulator
    table_id = bt.table_name()
    ensure_table(bt.project, bt.instance, table_id, FLIGHTS, DEFAULT_ALLOWED_LATENESS_S, 7 * 86_400)

    events, shift, expected = flights_shifted_to_end_before_now(
        FLIGHTS, "2013-01-02T12:00:00Z", "2013-01-02T14:00:00Z", 2 * HOUR_MS
    )

    result, topic, dead_subscription = start_aggregate_job(
        ps, bt, table_id, DEFAULT_ALLOWED_LATENESS_S
    )
    publisher = ordered_publisher()
    table = open_table(bt.project, bt.instance, table_id)
    try:
        stats = replay_events(publisher, topic, FLIGHTS, events, shift_ms=shift, heartbeat_s=0.5)
        good_ts = str(events[0][0] + shift)
        bad = [  # dead letters whatever the watermark: published after the replay's end
            (b"{not json", {"event_time": good_ts}),
            (json.dumps({"carrier": "UA"}).encode(), {"event_time": good_ts}),
            (to_message(FLIGHTS, events[0][1], shift), {}),
            (to_message(FLIGHTS, events[1][1], shift), {"event_time": "yesterday-ish"}),
        ]
        for data, attributes in bad:
            publisher.publish(topic, data, **attributes).result(timeout=30)

        def table_matches():
            cells = {k: v for k, v, _ in read_cells_with_versions(table, FLIGHTS.name)}
            return cells == expected

        assert wait_for(table_matches, 180), "Bigtable cells never matched the backfill"
        dead = ps.pull_all(dead_subscription, expect=4, timeout_s=60)
    finally:
        result.cancel()

    versions = {n for *_, n in read_cells_with_versions(table, FLIGHTS.name)}
    assert versions == {1}
    by_stage = {m.attributes["stage"]: m for m in dead}
    assert set(by_stage) == {"parse", "validate", "timestamp"} and len(dead) == 4
    assert by_stage["parse"].data == b"{not json"
    assert "not JSON" in by_stage["parse"].attributes["reason"]
    assert "missing required field" in by_stage["validate"].attributes["reason"]
    reasons = sorted(m.attributes["reason"] for m in dead if m.attributes["stage"] == "timestamp")
    assert len(reasons) == 2
    assert any(r.endswith(": missing") for r in reasons)
    assert any("'yesterday-ish' is neither epoch milliseconds nor RFC 3339" in r for r in reasons)
    assert all(m.attributes["feature_set"] == "flights" for m in dead)

    counters = metric_counters(result)
    assert counters["messages_read"] == len(events) + 4
    assert counters["records_valid"] == len(events)
    assert counters["messages_dead_lettered"] == 4
    assert counters["cells_written"] >= len(expected)
    assert counters.get("late_updates_dropped", 0) == 0
    assert counters.get("events_dropped_too_late", 0) == 0
    assert counters.get("cells_late", 0) == 0  # no event came after the watermark passed it
    assert counters["heartbeats"] > 0 and stats.final_heartbeat_ms is not None
