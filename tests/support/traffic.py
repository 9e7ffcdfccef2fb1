"""Pub/Sub traffic for benchmarks and tests on the emulator: publishers paced at a rate (live
flights stamped at their publish time, or any payloads), a backlog published at once, and a
streaming-pull receiver that stamps when each message arrived."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator


def paced(items: Iterable, rate: float, clock: Callable[[], float] = time.perf_counter) -> Iterator:
    """Yield the items `rate` per second: the i-th no earlier than i / rate after the first."""
    started = clock()
    for i, item in enumerate(items):
        delay = started + i / rate - clock()
        if delay > 0:
            time.sleep(delay)
        yield item


def publish_paced(publisher, topic: str, items: list[tuple], rate: float, payload_of) -> dict:
    """Publish each (key, ...) item at `rate`/s, `payload_of(item)` giving (data, attributes);
    returns key -> perf_counter just before its publish call."""
    sent = {}
    futures = []
    for item in paced(items, rate):
        data, attributes = payload_of(item)
        sent[item[0]] = time.perf_counter()
        futures.append(publisher.publish(topic, data, **attributes))
    for f in futures:
        f.result(timeout=60)
    return sent


def restamped(raw: dict, now_ms: int) -> dict:
    """The flight as if it departed at now_ms: time_hour moved, minute and delay kept."""
    from skewless.transforms.record_checks import ms_to_datetime

    offset = int(raw["minute"]) * 60_000 + int(round(float(raw["dep_delay"]) * 60_000))
    record = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in raw.items()}
    record["time_hour"] = ms_to_datetime(now_ms - offset).isoformat()
    return record


def publish_live(publisher, topic: str, raws: list[dict], rate: float, heartbeat_until: list):
    """Publish flights at `rate`, each stamped at its publish time (payload and attribute), then
    heartbeats every 0.2 s (the event-time watermark moves on with the wall clock) until the
    monotonic time in `heartbeat_until[0]`: (seconds publishing took, event ms of the JFK
    departures)."""
    from skewless.beam_pipelines.commands.replay import Heartbeat

    start = time.monotonic()
    futures = []
    jfk = []
    for raw in paced(raws, rate, time.monotonic):
        now_ms = int(time.time() * 1000)
        record = restamped(raw, now_ms)
        futures.append(
            publisher.publish(topic, json.dumps(record).encode(), event_time=str(now_ms))
        )
        if raw["origin"] == "JFK":
            jfk.append(now_ms)
    for f in futures:
        f.result(timeout=120)
    published = time.monotonic() - start

    def beat():
        with Heartbeat(publisher, topic, 0.2):
            while time.monotonic() < heartbeat_until[0]:
                time.sleep(0.2)

    threading.Thread(target=beat, daemon=True).start()
    return published, jfk


def publish_backlog(publisher, topic: str, raws: list[dict]) -> None:
    """Publish every flight at once (stamped now), so a job started afterwards drains a backlog."""
    now_ms = int(time.time() * 1000)
    futures = [
        publisher.publish(
            topic, json.dumps(restamped(raw, now_ms)).encode(), event_time=str(now_ms)
        )
        for raw in raws
    ]
    for f in futures:
        f.result(timeout=300)


class Receiver:
    """Streaming-pull subscriber that stamps the arrival time (perf_counter) of every message
    by its key, `key_of(message)` giving (key, version)."""

    def __init__(self, subscription: str, key_of):
        from google.cloud import pubsub_v1

        self.arrived: dict = {}
        self.versions: dict = {}
        self.duplicates = 0
        self._key_of = key_of
        self._lock = threading.Lock()
        self._client = pubsub_v1.SubscriberClient()
        flow = pubsub_v1.types.FlowControl(max_messages=10_000)
        self._future = self._client.subscribe(subscription, callback=self._on_message, flow_control=flow)

    def _on_message(self, message) -> None:
        now = time.perf_counter()
        message.ack()
        key, version = self._key_of(message)
        with self._lock:
            if key in self.arrived:
                self.duplicates += 1
            self.arrived.setdefault(key, now)
            self.versions[key] = version

    def wait_for(self, keys, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if all(k in self.arrived for k in keys):
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._future.cancel()
        self._client.close()
