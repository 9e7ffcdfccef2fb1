"""Faults on the emulators: Bigtable writes that cannot succeed are dead-lettered and the job goes
on; a 20 s outage of Bigtable or of Pub/Sub (the emulator frozen with SIGSTOP) loses nothing."""

from __future__ import annotations

import json
import time

import pytest

from skewless.beam_pipelines.commands.bigtable_setup import ensure_table
from skewless.beam_pipelines.commands.replay import Heartbeat, publish_events, to_message
from skewless.beam_pipelines.io.bigtable import open_table, read_all_cells
from skewless.beam_pipelines.runtime.parsing import metric_counters
from skewless.examples.flights import FLIGHTS
from tests.support.streaming_jobs import (
    flights_shifted_to_end_before_now,
    start_aggregate_job,
    wait_for,
)

pytestmark = [pytest.mark.emulator, pytest.mark.slow]
LATENESS_S = 6 * 3600
HOUR_MS = 3_600_000
PAUSE_S = 20


def _flights_two_hours_ago():
    """Real flights of 12:00-14:00 on 2013-01-02 moved to end 2 h ago, and their batch cells."""
    return flights_shifted_to_end_before_now(
        FLIGHTS, "2013-01-02T12:00:00Z", "2013-01-02T14:00:00Z", 2 * HOUR_MS
    )


@pytest.mark.timeout(300)
def test_cells_that_cannot_be_written_are_dead_lettered_and_the_job_goes_on(
    pubsub_emulator, bigtable_emulator
):
    ps, bt = pubsub_emulator, bigtable_emulator
    table_id = bt.table_name()  # a table without the feature set's column family
    open_table(bt.project, bt.instance, table_id, admin=True).create(
        column_families={"other": None}
    )
    events, shift, expected = _flights_two_hours_ago()
    result, topic, dead_subscription = start_aggregate_job(
        ps, bt, table_id, LATENESS_S, "--skip_table_check", "--write_retry_s=1"
    )
    publisher = ps.publisher()
    try:
        with Heartbeat(publisher, topic, 0.5):
            publish_events(publisher, topic, FLIGHTS, events[:50], shift_ms=shift)
            first = ps.pull_all(dead_subscription, expect=1, timeout_s=120)
            assert first, "no dead letter for the unwritable cells"
            # The job is still running: later events are read and their cells dead-lettered too.
            publish_events(publisher, topic, FLIGHTS, events[50:], shift_ms=shift)
            assert wait_for(
                lambda: metric_counters(result).get("messages_read", 0) == len(events), 120
            )
            wanted = {f"{k}#{v}#{w:013d}" for k, v, w in expected}
            letters, dead_keys = list(first), set()
            deadline = time.monotonic() + 120
            while not wanted <= dead_keys and time.monotonic() < deadline:
                letters += ps.pull_all(dead_subscription, expect=100, timeout_s=5)
                dead_keys = {json.loads(m.data)["row_key"] for m in letters}
        assert result.state == "RUNNING"
    finally:
        result.cancel()
    assert {m.attributes["stage"] for m in letters} == {"write"}
    reason = letters[0].attributes["reason"]
    assert reason.startswith("Bigtable write failed: still failing after 1 s of retries")
    assert "unknown family" in reason
    record = json.loads(letters[0].data)
    assert set(record) == {"row_key", "cells"} and record["row_key"].count("#") == 2
    # Every cell of the backfill reached the dead letters (at least once: updates re-send).
    assert wanted <= dead_keys, sorted(wanted - dead_keys)[:5]
    assert metric_counters(result)["cells_dead_lettered"] >= len(expected)


@pytest.mark.parametrize("frozen", ["bigtable", "pubsub"])
@pytest.mark.timeout(400)
def test_a_20_second_outage_loses_nothing(pubsub_emulator, bigtable_emulator, frozen):
    ps, bt = pubsub_emulator, bigtable_emulator
    table_id = bt.table_name()
    ensure_table(bt.project, bt.instance, table_id, FLIGHTS, LATENESS_S, 7 * 86_400)
    events, shift, expected = _flights_two_hours_ago()
    result, topic, dead_subscription = start_aggregate_job(ps, bt, table_id, LATENESS_S)
    publisher = ps.publisher()
    table = open_table(bt.project, bt.instance, table_id)
    half = len(events) // 2
    emulator = bt if frozen == "bigtable" else ps
    try:
        with Heartbeat(publisher, topic, 0.5):
            publish_events(publisher, topic, FLIGHTS, events[:half], shift_ms=shift)
            assert wait_for(lambda: metric_counters(result).get("cells_written", 0) > 0, 120)
            with emulator.paused(PAUSE_S):
                # Published during the outage: Pub/Sub frozen -> the publisher waits and the
                # job's pulls fail; Bigtable frozen -> the job's writes hang and are retried.
                sent = [publisher.publish(topic, to_message(FLIGHTS, raw, shift),
                                          event_time=str(t + shift)) for t, raw in events[half:]]  # fmt: skip
            for future in sent:
                future.result(timeout=120)
            assert wait_for(lambda: read_all_cells(table, FLIGHTS.name) == expected, 180), (
                "the cells never matched the backfill after the outage"
            )
        counters = metric_counters(result)
        assert result.state == "RUNNING"
    finally:
        result.cancel()
    assert counters["messages_read"] == len(events)  # each message once: no loss, no double
    assert counters.get("cells_dead_lettered", 0) == 0
    if frozen == "bigtable":  # writes timed out during the outage and were written again
        assert counters["cell_write_retries"] > 0
    assert ps.pull_all(dead_subscription, expect=1, timeout_s=3) == []
