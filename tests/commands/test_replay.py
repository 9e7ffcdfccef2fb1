"""`skewless replay` on the Pub/Sub emulator: event-time order, timestamp attribute, shift, skips,
heartbeats that keep their promise, the final heartbeat."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future

import pytest

from skewless.beam_pipelines.commands import replay
from skewless.beam_pipelines.io.pubsub import HEARTBEAT_ATTRIBUTE, parse_timestamp_attribute
from skewless.examples.flights import FLIGHTS
from skewless.examples.weather import WEATHER
from skewless.transforms.record_checks import RecordChecker
from tests.support.flights_data import flights_raw_slice


def _jsonable(row: dict) -> dict:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}


@pytest.fixture(scope="module")
def flights_file(tmp_path_factory) -> tuple[str, int]:
    """A JSON-lines file of real flights, out of event-time order, with a cancelled flight and
    two bad lines; returns the path and the number of valid events."""
    rows = flights_raw_slice("2013-01-03 12:00:00", "2013-01-03 13:00:00")
    cancelled = [r for r in flights_raw_slice("2013-01-03 00:00:00", "2013-01-04 00:00:00") if r["dep_delay"] is None][:1]
    assert cancelled
    lines = [json.dumps(_jsonable(r)) for r in reversed(rows)]
    lines += [json.dumps(_jsonable(cancelled[0])), "{broken", json.dumps({"carrier": "UA"})]
    path = tmp_path_factory.mktemp("replay") / "flights.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path), len(rows)


@pytest.mark.emulator
@pytest.mark.timeout(120)
def test_replay_publishes_valid_events_in_event_time_order_with_the_attribute(
    pubsub_emulator, flights_file
):
    path, n_valid = flights_file
    topic = pubsub_emulator.topic("replay")
    subscription = pubsub_emulator.subscription(topic)
    before_ms = int(time.time() * 1000)
    stats = replay.run([f"--topic={topic}", f"--input={path}", "--shift_to_now"])

    assert stats.published == n_valid
    assert stats.skipped_not_events == 1
    assert stats.skipped_invalid == 2
    assert stats.shift_ms % FLIGHTS.period_ms == 0
    assert before_ms - FLIGHTS.period_ms <= stats.first_event_ms <= before_ms + 60_000

    messages = pubsub_emulator.pull_all(subscription, expect=n_valid, timeout_s=60)
    assert len(messages) == n_valid
    validator = RecordChecker(FLIGHTS)
    stamps = []
    for message in messages:
        stamp = parse_timestamp_attribute(message.attributes["event_time"])
        event = validator.validate(json.loads(message.data))
        assert event["event_time"] == stamp  # the payload, shifted, agrees with the attribute
        stamps.append(stamp)
    assert min(stamps) == stats.first_event_ms and max(stamps) == stats.last_event_ms
    assert stamps == sorted(stamps)  # the file was in reverse order
    assert stats.heartbeats == 0 and stats.final_heartbeat_ms is None  # no --heartbeat_s


def _broken_promises(published: list[tuple[bool, int | None]]) -> list[tuple[int, int]]:
    """(heartbeat time, event time) for every event published after a heartbeat of a later
    time: `published` is (is a heartbeat, event-time attribute) in publishing order."""
    broken, promised = [], None
    for is_heartbeat, stamp in published:
        if is_heartbeat and stamp is not None:
            promised = stamp if promised is None else max(promised, stamp)
        elif not is_heartbeat and promised is not None and stamp < promised:
            broken.append((promised, stamp))
    return broken


@pytest.mark.emulator
@pytest.mark.timeout(180)
def test_a_replay_as_fast_as_possible_reaches_the_topic_in_event_time_order(pubsub_emulator):
    """A year of weather (26,115 events) at --speedup 0: pulled back, the events are in event-time
    order (the default client's concurrent batches gave 13-18 inversions here), every event
    after a heartbeat is at or after its time, and the final heartbeat comes last."""
    topic = pubsub_emulator.topic("replay")
    subscription = pubsub_emulator.subscription(topic)
    stats = replay.run(
        [
            f"--topic={topic}", "--feature_set=skewless.examples.weather:WEATHER",
            "--speedup=0", "--heartbeat_s=0.2",
        ]
    )  # fmt: skip
    expected = stats.published + stats.heartbeats
    messages = pubsub_emulator.pull_all(subscription, expect=expected, timeout_s=120)
    assert len(messages) == expected
    published = [(HEARTBEAT_ATTRIBUTE in m.attributes, _stamp(m.attributes)) for m in messages]
    events = [t for is_heartbeat, t in published if not is_heartbeat]
    inversions = sum(1 for a, b in zip(events, events[1:], strict=False) if b < a)
    assert len(events) == stats.published == 26_115
    assert inversions == 0, f"{inversions} events delivered before an earlier one"
    assert _broken_promises(published) == []
    end_ms = stats.last_event_ms + WEATHER.max_window_ms + WEATHER.period_ms
    assert published[-1] == (True, end_ms) == (True, stats.final_heartbeat_ms)


def _stamp(attributes) -> int | None:
    text = attributes.get("event_time")
    return None if text is None else int(text)


class _FakePublisherClient:
    """Stands in for pubsub_v1.PublisherClient: keeps its options and every publish call, and
    takes `event_publish_s` to publish an event (a publisher slower than the pacing)."""

    event_publish_s = 0.01
    made: list[_FakePublisherClient] = []

    def __init__(self, batch_settings=(), publisher_options=()):
        self.publisher_options = publisher_options
        self.calls: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        _FakePublisherClient.made.append(self)

    def publish(self, topic, data, ordering_key="", **attributes):
        if HEARTBEAT_ATTRIBUTE not in attributes:
            time.sleep(self.event_publish_s)
        with self._lock:
            self.calls.append((ordering_key, attributes))
        future = Future()
        future.set_result("message-id")
        return future


def test_events_and_heartbeats_go_out_in_order_on_one_ordering_key_and_keep_their_promise(
    flights_file, monkeypatch
):
    """What the replay publishes: every message (events, heartbeats, the final one) on one
    ordering key of a publisher with message ordering on, the events in event-time order, no
    heartbeat ahead of an event published after it (the paced clock waits for a publisher
    that falls behind), and last the final heartbeat past every window end."""
    from google.cloud import pubsub_v1

    path, n_valid = flights_file
    monkeypatch.setattr(pubsub_v1, "PublisherClient", _FakePublisherClient)
    _FakePublisherClient.made.clear()
    raws = flights_raw_slice("2013-01-03 12:00:00", "2013-01-03 13:00:00")  # the file's events
    events = replay.order_events(FLIGHTS, raws, replay.ReplayStats())
    span_s = (events[-1][0] - events[0][0]) / 1000.0
    stats = replay.run(
        [
            "--topic=projects/p/topics/t", f"--input={path}", "--heartbeat_s=0.02",
            f"--speedup={span_s / 0.2}",  # the hour in 0.2 s; publishing takes about 1 s
        ]
    )  # fmt: skip

    (client,) = _FakePublisherClient.made
    assert client.publisher_options and client.publisher_options.enable_message_ordering
    keys = {key for key, _ in client.calls}
    assert keys == {replay.ORDERING_KEY}, f"published on ordering keys {keys}"
    published = [(HEARTBEAT_ATTRIBUTE in a, _stamp(a)) for _, a in client.calls]
    stamps = [t for is_heartbeat, t in published if not is_heartbeat]
    assert len(stamps) == stats.published == n_valid
    assert stamps == sorted(stamps)
    assert stats.heartbeats > 10
    assert _broken_promises(published) == []
    end_ms = stats.last_event_ms + FLIGHTS.max_window_ms + FLIGHTS.period_ms
    assert published[-1] == (True, end_ms) == (True, stats.final_heartbeat_ms)


def test_order_and_shift_keep_window_alignment():
    raws = flights_raw_slice("2013-01-03 12:00:00", "2013-01-03 13:00:00")
    stats = replay.ReplayStats()
    events = replay.order_events(FLIGHTS, list(reversed(raws)), stats)
    times = [t for t, _ in events]
    assert times == sorted(times)
    shift = replay.shift_for_now(FLIGHTS, times[0], times[0] + 7 * FLIGHTS.period_ms + 123)
    assert shift == 7 * FLIGHTS.period_ms
    moved = RecordChecker(FLIGHTS).validate(json.loads(replay.to_message(FLIGHTS, events[0][1], shift)))
    assert moved["event_time"] == times[0] + shift


class _RecordingPublisher:
    def __init__(self):
        self.calls = []

    def publish(self, topic, data, **attributes):
        from concurrent.futures import Future

        self.calls.append((time.monotonic(), topic, data, attributes))
        future = Future()
        future.set_result("id")
        return future


def test_publish_events_goes_in_event_time_order_paced_by_speedup():
    raws = flights_raw_slice("2013-01-03 12:00:00", "2013-01-03 13:00:00")
    events = replay.order_events(FLIGHTS, list(reversed(raws)), replay.ReplayStats())[:40]
    span_s = (events[-1][0] - events[0][0]) / 1000.0
    publisher = _RecordingPublisher()
    speedup = span_s / 0.5  # the whole span in half a second
    replay.publish_events(publisher, "projects/p/topics/t", FLIGHTS, events, speedup=speedup)
    stamps = [int(a["event_time"]) for *_, a in publisher.calls]
    assert stamps == [t for t, _ in events] and stamps == sorted(stamps)
    elapsed = publisher.calls[-1][0] - publisher.calls[0][0]
    assert 0.4 <= elapsed <= 1.5


def test_a_line_separator_inside_a_json_string_is_one_replayed_record(tmp_path):
    """JSON lines are split on newlines only: U+2028 inside a string is part of the record."""
    raw = flights_raw_slice("2013-01-03 12:00:00", "2013-01-03 13:00:00")[0]
    record = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in raw.items()}
    record["tailnum"] = "N1\u2028X"
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n{broken\n", encoding="utf-8")
    stats = replay.ReplayStats()
    rows = replay.read_raw_records(str(path), "jsonl", stats)
    assert [r["tailnum"] for r in rows] == ["N1\u2028X"]
    assert stats.skipped_invalid == 1
