"""Issue 9, streaming: every kind of poison message reaches the dead-letter topic exactly once
while the running aggregate job keeps writing correct cells.

The set-up is test_aggregate_e2e's (real flights replayed into the job on the Pub/Sub and
Bigtable emulators, shifted to end two hours ago, six hours of allowed lateness), with a
corrupt message of every kind published in the middle of the replay.
"""

from __future__ import annotations

import json
import time

import pytest

from skewless.beam_pipelines.commands.bigtable_setup import ensure_table
from skewless.beam_pipelines.commands.replay import Heartbeat, publish_events, to_message
from skewless.beam_pipelines.io.bigtable import open_table, read_cells_with_versions
from skewless.beam_pipelines.runtime.parsing import metric_counters
from skewless.examples.flights import FLIGHTS
from skewless.transforms.record_checks import to_epoch_ms
from tests.support.poison_messages import timestamp_poison
from tests.support.streaming_jobs import (
    HOUR_MS,
    LATENESS_S,
    flights_shifted_to_end_before_now,
    start_aggregate_job,
    wait_for,
)

pytestmark = [pytest.mark.emulator, pytest.mark.slow]


def _poison(events: list, shift: int) -> list[tuple[str, bytes, dict, str, str]]:
    """(kind, payload, attributes, expected stage, expected reason) for every corruption kind.

    Each payload is unique, so each dead letter can be matched to its message."""
    ts = {"event_time": str(events[0][0] + shift)}

    def record(i: int, drop: str | None = None, **changes) -> bytes:
        base = json.loads(to_message(FLIGHTS, events[i][1], shift))
        base.update(changes)
        base["flight"] = changes.get("flight", 900_000 + i)  # unique payloads
        base.pop(drop, None)
        return json.dumps(base, allow_nan=True).encode()

    return [
        ("not JSON", b"{not json", ts, "parse", "not JSON"),
        ("not UTF-8", b'{"carrier": "\xff\xfe"}', ts, "parse", "not UTF-8: byte 0xff at offset 13"),
        ("not an object", b"[1, 2, 3]", ts, "validate", "expected a JSON object"),
        ("deep nesting", b"[" * 100_000 + b"]" * 100_000, ts, "parse", "RecursionError"),
        ("missing field", record(14, drop="origin"), ts, "validate", "missing required field 'origin'"),
        ("null required", record(1, origin=None), ts, "validate", "required field 'origin' is null"),
        ("int64 overflow", record(2, flight=10**20), ts, "validate", "outside the 64-bit integer range"),
        ("NaN", record(3, dep_delay=float("nan")), ts, "validate", "not a finite number"),
        ("infinity", record(4, air_time=float("inf")), ts, "validate", "not a finite number"),
        ("year 318,857", record(5, time_hour=1e13), ts, "validate", "outside the accepted time range"),
        ("lone surrogate", record(6, tailnum="N\ud800X"), ts, "validate", "lone surrogate"),
        ("long entity key", record(7, carrier="C" * 2000), ts, "derive", "longer than 1024 bytes"),
        ("unexpected field", record(8, seat="12A"), ts, "validate", "unexpected fields ['seat']"),
        ("wrong type", record(9, distance="far"), ts, "validate", "'far' is not a number"),
        ("no timestamp", record(10), {}, "timestamp", ": missing"),
        ("garbled timestamp", record(11), {"event_time": "yesterday-ish"}, "timestamp", "neither epoch"),
        ("timestamp overflow", record(12), {"event_time": "99999999999999999999"}, "timestamp", "outside the accepted time range"),
        ("timestamp far future", record(13), {"event_time": str(to_epoch_ms("2300-01-01T00:00:00Z"))}, "timestamp", "outside the accepted time range"),
        # The same messages the streaming scorer refuses (tests/test_score_streaming.py).
        *(
            (f"attribute {reason}", data, attributes, stage, reason)
            for data, (attributes, stage, reason) in timestamp_poison(
                events[15][1], events[15][0], shift
            ).items()
        ),
    ]  # fmt: skip


@pytest.mark.timeout(420)
def test_every_poison_message_is_dead_lettered_once_and_cells_stay_correct(
    pubsub_emulator, bigtable_emulator
):
    ps, bt = pubsub_emulator, bigtable_emulator
    table_id = bt.table_name()
    ensure_table(bt.project, bt.instance, table_id, FLIGHTS, LATENESS_S, 7 * 86_400)

    events, shift, expected_cells = flights_shifted_to_end_before_now(
        FLIGHTS, "2013-01-02T12:00:00Z", "2013-01-02T14:00:00Z", 2 * HOUR_MS
    )
    poison = _poison(events, shift)

    result, topic, dead_subscription = start_aggregate_job(ps, bt, table_id, LATENESS_S)
    publisher = ps.publisher()
    table = open_table(bt.project, bt.instance, table_id)
    half = len(events) // 2
    try:
        with Heartbeat(publisher, topic, 0.5):
            publish_events(publisher, topic, FLIGHTS, events[:half], shift_ms=shift)
            for _, data, attributes, _, _ in poison:
                publisher.publish(topic, data, **attributes).result(timeout=30)
            publish_events(publisher, topic, FLIGHTS, events[half:], shift_ms=shift)

            def table_matches():
                cells = {k: v for k, v, _ in read_cells_with_versions(table, FLIGHTS.name)}
                return cells == expected_cells

            assert wait_for(table_matches, 240), "Bigtable cells never matched the backfill"
            dead = ps.pull_all(dead_subscription, expect=len(poison), timeout_s=90)
            # Exactly once: nothing more arrives (a failing bundle would be retried and
            # dead-letter its messages again, or never finish).
            time.sleep(10)
            dead += ps.pull_all(dead_subscription, expect=1, timeout_s=10)
            counters = metric_counters(result)
    finally:
        result.cancel()

    by_payload = {}
    for message in dead:
        by_payload.setdefault(message.data, []).append(message)
    for kind, data, _, stage, reason in poison:
        letters = by_payload.get(data, [])  # the very bytes, also of a payload not UTF-8
        assert len(letters) == 1, (kind, len(letters))
        assert letters[0].attributes["stage"] == stage, (kind, letters[0].attributes)
        assert reason in letters[0].attributes["reason"], (kind, letters[0].attributes["reason"])
        assert letters[0].attributes["feature_set"] == "flights"
    assert len(dead) == len(poison)
    assert counters["messages_dead_lettered"] == len(poison)
    assert counters["records_valid"] == len(events)
    assert counters["messages_read"] == len(events) + len(poison)
