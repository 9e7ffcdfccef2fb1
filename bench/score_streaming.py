"""Benchmark: per-message latency of streaming scoring on the emulators (publish -> prediction received).

Setup: a Pub/Sub and a Bigtable emulator; the Bigtable cells of the flights' days written by the
batch backfill through the aggregate job's Bigtable sink (so lookups hit real rows); the scorer
started as a child process through the real CLI (`skewless score --streaming`, local runner).
Measured: real flights published one by one at `--rate` messages/s for `--seconds`; each
message's latency is the time its prediction (matched by the flight key) reached a streaming-pull
subscriber of the output topic minus the time just before its publish call. Reported: p50, p90,
p99, max and the throughput. The floor is the same publish -> streaming-pull path through one
topic with no job in between (the emulator's own round trip).

Usage: .venv/bin/python bench/score_streaming.py [--model_dir out/demo/models] [--rate 20] [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import start_emulators, stop  # noqa: E402

PROJECT, INSTANCE = "skewless-bench", "bench"
DAYS = ("2013-01-06", "2013-01-08")  # [start, end) of the scheduled days published


def flights() -> list[tuple[int, dict]]:
    """(event time, raw record) of the departures scheduled on DAYS, in event-time order."""
    import pyarrow.compute as pc

    from beam_pipelines.io.files import _read_bytes, read_csv_table
    from beam_pipelines.replay import ReplayStats, order_events
    from transforms.flights import FLIGHTS, bundled_flights_path

    table, _ = read_csv_table(_read_bytes(bundled_flights_path()))
    hours = pc.cast(table.column("time_hour"), "string")
    table = table.filter(pc.and_(pc.greater_equal(hours, DAYS[0]), pc.less(hours, DAYS[1])))
    return order_events(FLIGHTS, table.to_pylist(), ReplayStats())


def write_cells(table_id: str, events: list[tuple[int, dict]]) -> None:
    """The batch backfill of these flights through the aggregate job's Bigtable sink."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_pipelines.bigtable_setup import ensure_table
    from beam_pipelines.io.bigtable import WriteCells
    from transforms.aggregations import ComputeAggregates
    from transforms.flights import FLIGHTS
    from transforms.validation import RecordValidator

    ensure_table(PROJECT, INSTANCE, table_id, FLIGHTS, 600, 20 * 365 * 86_400)
    validator = RecordValidator(FLIGHTS)
    typed = [validator.validate(dict(raw)) for _, raw in events]
    with beam.Pipeline(options=PipelineOptions([], runner="FnApiRunner")) as p:
        _ = (
            p
            | beam.Create(typed)
            | ComputeAggregates(FLIGHTS)
            | WriteCells(PROJECT, INSTANCE, table_id, FLIGHTS.name)
        )


def flight_key(record: dict) -> tuple:
    from transforms.flights import FLIGHTS
    from transforms.validation import RecordValidator, ms_to_datetime

    if "probability" in record:  # a prediction: timestamps are ISO text already
        return (record["carrier"], int(record["flight"]), record["origin"], record["scheduled_departure"])
    event = RecordValidator(FLIGHTS).validate(dict(record))
    return (event["carrier"], event["flight"], event["origin"], ms_to_datetime(event["scheduled_departure"]).isoformat())


class Receiver:
    """Streaming-pull subscriber that stamps the arrival time of every message by its key."""

    def __init__(self, subscription: str, key_of):
        from google.cloud import pubsub_v1

        self.arrived: dict = {}
        self.versions: dict = {}
        self._key_of = key_of
        self._lock = threading.Lock()
        self._client = pubsub_v1.SubscriberClient()
        self._future = self._client.subscribe(subscription, callback=self._on_message)

    def _on_message(self, message) -> None:
        now = time.perf_counter()
        message.ack()
        key, version = self._key_of(message)
        with self._lock:
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


def _prediction_key(message):
    prediction = json.loads(message.data)
    return flight_key(prediction), prediction["model_version"]


def _echo_key(message):
    return message.attributes["key"], None


def publish_paced(publisher, topic: str, items: list[tuple], rate: float, payload_of) -> dict:
    """Publish each (key, ...) item at `rate`/s; returns key -> perf_counter just before publish."""
    sent = {}
    futures = []
    started = time.perf_counter()
    for i, item in enumerate(items):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        data, attributes = payload_of(item)
        sent[item[0]] = time.perf_counter()
        futures.append(publisher.publish(topic, data, **attributes))
    for f in futures:
        f.result(timeout=60)
    return sent


def summarize(name: str, sent: dict, arrived: dict) -> dict:
    import numpy as np

    latencies = np.array([arrived[k] - t for k, t in sent.items() if k in arrived]) * 1000.0
    span = max(arrived[k] for k in sent if k in arrived) - min(sent.values())
    return {
        "name": name,
        "messages": len(sent),
        "received": int(latencies.size),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p90_ms": round(float(np.percentile(latencies, 90)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "max_ms": round(float(latencies.max()), 1),
        "throughput_per_s": round(len(latencies) / span, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=str(ROOT / "out" / "demo" / "models"))
    parser.add_argument("--rate", type=float, default=20.0, help="Messages per second.")
    parser.add_argument("--seconds", type=float, default=30.0, help="How long to publish.")
    parser.add_argument("--log", default="/tmp/skewless-bench-score-streaming.log")
    args = parser.parse_args()

    from models.versions import ModelDirError, resolve

    try:
        resolve(args.model_dir)
    except ModelDirError as exc:
        raise SystemExit(f"{exc}: run `make demo` first or pass --model_dir") from None

    from google.cloud import pubsub_v1

    from beam_pipelines.replay import to_message
    from transforms.flights import FLIGHTS

    procs, env = start_emulators()
    scorer = None
    try:
        events = flights()
        n = int(args.rate * args.seconds)
        if n + 20 > len(events):
            raise SystemExit(f"only {len(events)} flights on {DAYS}: lower --rate or --seconds")
        table_id = f"features-{uuid.uuid4().hex[:8]}"
        write_cells(table_id, events)

        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()

        def topic_and_subscription(name: str) -> tuple[str, str]:
            topic = f"projects/{PROJECT}/topics/{name}"
            sub = f"projects/{PROJECT}/subscriptions/{name}-sub"
            publisher.create_topic(name=topic)
            subscriber.create_subscription(name=sub, topic=topic, ack_deadline_seconds=60)
            return topic, sub

        events_topic, events_sub = topic_and_subscription("events")
        out_topic, out_sub = topic_and_subscription("predictions")
        dead_topic, _ = topic_and_subscription("dead")
        echo_topic, echo_sub = topic_and_subscription("echo")

        # Floor: the emulator's own publish -> streaming-pull round trip, no job in between.
        echo = Receiver(echo_sub, _echo_key)
        echo_items = [(f"k{i}",) for i in range(n)]
        sent = publish_paced(publisher, echo_topic, echo_items, args.rate, lambda it: (b"x", {"key": it[0]}))
        echo.wait_for(list(sent), 60)
        floor = summarize("floor: Pub/Sub emulator round trip", sent, echo.arrived)
        echo.close()

        receiver = Receiver(out_sub, _prediction_key)
        command = [
            sys.executable, "-m", "beam_pipelines.cli", "score", "--streaming",
            f"--subscription={events_sub}", f"--output_topic={out_topic}", f"--dead_letter_topic={dead_topic}",
            f"--bigtable_project={PROJECT}", f"--bigtable_instance={INSTANCE}", f"--bigtable_table={table_id}",
            f"--model_dir={args.model_dir}", f"--project={PROJECT}",
        ]  # fmt: skip
        with open(args.log, "wb") as log:
            scorer = subprocess.Popen(
                command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        # Warm-up: the job is ready when a prediction comes back (imports, model load).
        started = time.perf_counter()
        warm = [(flight_key(raw), raw) for _, raw in events[:20]]
        for key, raw in warm:
            publisher.publish(events_topic, to_message(FLIGHTS, raw)).result(timeout=30)
            if receiver.wait_for([key], 0.5):
                break
        if not receiver.wait_for([warm[0][0]], 180):
            raise SystemExit(f"the scorer never answered; see {args.log}")
        startup_s = time.perf_counter() - started
        receiver.wait_for([k for k, _ in warm], 30)

        items = [(flight_key(raw), raw) for _, raw in events[20 : 20 + n]]
        sent = publish_paced(
            publisher, events_topic, items, args.rate, lambda it: (to_message(FLIGHTS, it[1]), {})
        )
        receiver.wait_for(list(sent), 120)
        result = summarize("streaming scorer (BundleBasedDirectRunner)", sent, receiver.arrived)
        result["startup_to_first_prediction_s"] = round(startup_s, 1)
        result["model_versions"] = sorted({receiver.versions[k] for k in sent if k in receiver.versions})
        receiver.close()
        report = {"rate_per_s": args.rate, "seconds": args.seconds, "floor": floor, "scorer": result}
        print(json.dumps(report, indent=2))
    finally:
        if scorer is not None:
            os.killpg(scorer.pid, signal.SIGTERM)
            try:
                scorer.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(scorer.pid, signal.SIGKILL)
        stop(procs)


if __name__ == "__main__":
    main()
