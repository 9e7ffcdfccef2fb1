"""Benchmark: the streaming aggregate job on the local runner vs a plain-Python floor (emulators).

Live traffic: real flights are published at a target rate with their event time set to the
publish time (payload and attribute agree; the real delays are kept). The feature set is the
bundled one with the time scale compressed 150x (period 2 s, windows 24 s and 6 s, so windows
close every 2 s and give many freshness samples). Measured, for the job and for the floor:
- events/s: events processed / the time from the first publish until they were all read;
- freshness lag: time a cell (origin JFK, every window end W) became visible in Bigtable minus
  W, p50 / p99.
The floor is one Python process: a synchronous Pub/Sub pull loop that parses and validates with
the same RecordValidator, keeps the same per-bucket partial aggregates in memory, and writes the
same cells with the Bigtable client when the wall clock passes W.

Usage: .venv/bin/python bench/aggregate.py [--rate 1000] [--seconds 40] [--profile out.prof]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import start_emulators, stop  # noqa: E402

PROJECT, INSTANCE = "skewless-bench", "bench"
SCALE = 150  # 5 min -> 2 s


def bench_feature_set():
    from transforms.featureset import WindowedAggregate
    from transforms.flights import FLIGHTS

    aggs = tuple(
        WindowedAggregate(a.name, a.key, a.combiner, a.size_s // SCALE, a.period_s // SCALE, a.value, a.default)
        for a in FLIGHTS.aggregates
    )
    return replace(FLIGHTS, name="flights", aggregates=aggs)


def live_payloads(fs, n: int) -> list[dict]:
    from beam_pipelines.replay import order_events, read_raw_records

    raws = read_raw_records(fs.extra["default_input"]())
    from beam_pipelines.replay import ReplayStats

    events = order_events(fs, raws, ReplayStats())
    return [raw for _, raw in events[:n]]


def publish_live(publisher, topic: str, fs, raws: list[dict], rate: float, heartbeat_until: list):
    """Publish at `rate`, stamping each flight at the publish time (payload and attribute)."""
    from beam_pipelines.io.pubsub import HEARTBEAT_ATTRIBUTE
    from transforms.validation import ms_to_datetime

    start = time.monotonic()
    futures = []
    jfk = []
    for i, raw in enumerate(raws):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now_ms = int(time.time() * 1000)
        offset = int(raw["minute"]) * 60_000 + int(round(float(raw["dep_delay"]) * 60_000))
        record = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in raw.items()}
        record["time_hour"] = ms_to_datetime(now_ms - offset).isoformat()
        futures.append(
            publisher.publish(topic, json.dumps(record).encode(), event_time=str(now_ms))
        )
        if raw["origin"] == "JFK":
            jfk.append(now_ms)
    for f in futures:
        f.result(timeout=120)
    published = time.monotonic() - start

    def beat():  # keeps the local runner's wall-clock watermark moving after the last event
        while time.monotonic() < heartbeat_until[0]:
            publisher.publish(topic, b"", **{HEARTBEAT_ATTRIBUTE: "1"})
            time.sleep(0.2)

    threading.Thread(target=beat, daemon=True).start()
    return published, jfk


class LagProbe(threading.Thread):
    """Polls the cell origin#JFK#W of every window end W that has passed, and keeps the times its
    `origin_departures_1h` value changed; `lags(expected)` is when it first showed the COMPLETE
    value (all published JFK events of its window) minus W."""

    def __init__(self, table, fs, t_start_ms: int, t_end_ms: int):
        super().__init__(daemon=True)
        self.table, self.fs = table, fs
        period = fs.period_ms
        self.windows = list(range((t_start_ms // period + 2) * period, t_end_ms, period))
        self.seen: dict[int, list[tuple[int, int]]] = {w: [] for w in self.windows}
        self.stop = threading.Event()

    def run(self):
        from beam_pipelines.io.bigtable import decode_value
        from transforms.aggregations import row_key

        column = b"origin_departures_1h"
        while not self.stop.is_set():
            now = int(time.time() * 1000)
            for w in self.windows:
                if w > now:
                    break
                row = self.table.read_row(row_key("origin", "JFK", w).encode())
                if row is None:
                    continue
                value = decode_value(row.cells[self.fs.name][column][0].value)
                history = self.seen[w]
                if not history or history[-1][1] != value:
                    history.append((int(time.time() * 1000), value))
            time.sleep(0.05)

    def lags(self, jfk_event_ms: list[int]) -> tuple[list[int], int]:
        size = max(a.size_ms for a in self.fs.aggregates if a.name == "origin_departures_1h")
        lags, incomplete = [], 0
        for w, history in self.seen.items():
            expected = sum(1 for t in jfk_event_ms if w - size <= t < w)
            times = [t for t, v in history if v == expected]
            if expected and times:
                lags.append(times[0] - w)
            elif expected:
                incomplete += 1
        return lags, incomplete


def pct(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def _fresh_stream(fs, table_id: str):
    """A Bigtable table for the run and a new topic + subscription on the emulators."""
    from google.cloud import pubsub_v1

    from beam_pipelines.bigtable_setup import ensure_table

    ensure_table(PROJECT, INSTANCE, table_id, fs, 60, 86_400)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.create_topic(name=f"projects/{PROJECT}/topics/t-{uuid.uuid4().hex[:8]}").name
    sub = subscriber.create_subscription(
        name=f"projects/{PROJECT}/subscriptions/s-{uuid.uuid4().hex[:8]}", topic=topic
    ).name
    return publisher, topic, sub


def run_job(fs, raws, rate, table_id, profile=None) -> dict:
    import apache_beam as beam

    from beam_pipelines.aggregate import build_pipeline, make_pipeline  # noqa: F401
    from beam_pipelines.common import metric_counters
    from beam_pipelines.io.bigtable import WriteCells, open_table
    from beam_pipelines.io.pubsub import WriteDeadLetters, read_messages
    from beam_pipelines.local_runner import fix_direct_runner_metrics

    publisher, topic, sub = _fresh_stream(fs, table_id)
    fix_direct_runner_metrics()
    options = beam.options.pipeline_options.PipelineOptions(
        runner="BundleBasedDirectRunner", streaming=True, project=PROJECT
    )
    p = beam.Pipeline(options=options)
    build_pipeline(
        p, fs, read_messages(sub, "event_time", False),
        WriteCells(PROJECT, INSTANCE, table_id, fs.name), WriteDeadLetters(None),
        allowed_lateness_s=60,
    )
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    result = p.run()
    return _drive(fs, raws, rate, table_id, publisher, topic, lambda: metric_counters(result).get("messages_read", 0),
                  stop=result.cancel, profiler=profiler, profile=profile, table=open_table(PROJECT, INSTANCE, table_id))


def _drive(fs, raws, rate, table_id, publisher, topic, read_count, stop, table, profiler=None, profile=None):
    t0 = time.time()
    duration = len(raws) / rate
    probe = LagProbe(table, fs, int(t0 * 1000), int((t0 + duration) * 1000))
    probe.start()
    heartbeat_until = [time.monotonic() + duration + 120]
    published_s, jfk = publish_live(publisher, topic, fs, raws, rate, heartbeat_until)
    deadline = time.monotonic() + 90
    while read_count() < len(raws) and time.monotonic() < deadline:
        time.sleep(0.1)
    all_read_s = time.time() - t0
    heartbeat_until[0] = time.monotonic() + 10
    time.sleep(fs.max_window_ms / 1000 + 5)  # the last windows close, late panes land
    probe.stop.set()
    probe.join(timeout=30)
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    n_read = read_count()
    stop()
    lags, incomplete = probe.lags(jfk)
    return {
        "target_rate": rate, "events": len(raws), "read": n_read,
        "publish_rate": round(len(raws) / published_s), "events_per_s": round(n_read / all_read_s),
        "seconds_to_read_all": round(all_read_s, 1),
        "lag_p50_s": round(pct(lags, 0.5) / 1000, 2), "lag_p99_s": round(pct(lags, 0.99) / 1000, 2),
        "windows_complete": len(lags), "windows_never_complete": incomplete,
    }


class Floor:
    """Plain Python: pull, parse + validate, per-bucket partials in memory, write cells at W."""

    def __init__(self, fs, subscription, table):
        from transforms.aggregations import BucketAccumulatorFn, key_specs
        from transforms.validation import RecordValidator

        self.fs, self.sub, self.table = fs, subscription, table
        self.validator = RecordValidator(fs)
        self.specs = key_specs(fs)
        self.acc = BucketAccumulatorFn()
        self.buckets: dict = {}  # (key name, key value) -> {bucket: slot}
        self.read = 0
        self.stop = threading.Event()

    def run(self):
        from google.cloud import pubsub_v1

        from beam_pipelines.io.bigtable import cell_row
        from beam_pipelines.io.pubsub import HEARTBEAT_ATTRIBUTE
        from transforms.aggregations import CellKey, _cell, entity_value

        sub = pubsub_v1.SubscriberClient()
        period = self.fs.period_ms
        next_w = (int(time.time() * 1000) // period + 1) * period
        while not self.stop.is_set():
            resp = sub.pull(subscription=self.sub, max_messages=1000, timeout=1)
            if resp.received_messages:
                sub.acknowledge(subscription=self.sub, ack_ids=[m.ack_id for m in resp.received_messages])
            for m in resp.received_messages:
                if HEARTBEAT_ATTRIBUTE in m.message.attributes:
                    continue
                self.read += 1
                event = self.validator.validate(json.loads(m.message.data))
                t = event[self.fs.event_time]
                for spec in self.specs:
                    key = (spec.key_name, entity_value(event[spec.key_name]))
                    bucket = (t // spec.period_ms) * spec.period_ms
                    self.acc.add_input(self.buckets.setdefault(key, {}), (bucket, tuple(event.get(f) for f in spec.value_fields)))
            now = int(time.time() * 1000)
            while next_w <= now:
                rows = []
                for (name, value), buckets in self.buckets.items():
                    spec = next(s for s in self.specs if s.key_name == name)
                    cell = _cell(spec, buckets, next_w)
                    if cell is not None:
                        rows.append(cell_row(self.table, self.fs.name, CellKey(name, value, next_w), cell))
                if rows:
                    self.table.mutate_rows(rows)
                next_w += period


def run_floor(fs, raws, rate, table_id) -> dict:

    from beam_pipelines.io.bigtable import open_table

    publisher, topic, sub = _fresh_stream(fs, table_id)
    table = open_table(PROJECT, INSTANCE, table_id)
    floor = Floor(fs, sub, table)
    thread = threading.Thread(target=floor.run, daemon=True)
    thread.start()
    return _drive(fs, raws, rate, table_id, publisher, topic, lambda: floor.read, stop=floor.stop.set, table=table)


def job_code_cost_us(fs, raws: list[dict]) -> dict:
    """Microseconds per event of the job's own code, called directly (no runner): parse +
    validate, block contributions, gate stamping, the combine's add_input, and the cells."""
    from transforms.aggregations import BucketAccumulatorFn, _ToBlockContributions, _ToBlocks
    from transforms.validation import ValidateRecordsFn

    payloads = [json.dumps({k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()}).encode() for r in raws]
    validate, contrib = ValidateRecordsFn(fs), _ToBlockContributions(fs, fs.period_ms, True)
    to_blocks = _ToBlocks(fs, fs.period_ms)
    for fn in (validate, contrib, to_blocks):
        fn.setup()
    acc_fn, accs = BucketAccumulatorFn(), {}
    t0 = time.perf_counter()
    events = [e for p in payloads for e in validate.process(p)]
    t1 = time.perf_counter()
    contributions = [c.value for e in events for c in contrib.process(e)]
    t2 = time.perf_counter()
    for key, value in contributions:
        acc_fn.add_input(accs.setdefault(key, {}), value)
    t3 = time.perf_counter()
    cells = sum(len(b.cells) for item in accs.items() for b in to_blocks.process(item))
    t4 = time.perf_counter()
    n = len(payloads)
    return {
        "events": n, "contributions_per_event": round(len(contributions) / n, 1), "cells": cells,
        "validate_us": round((t1 - t0) / n * 1e6, 1), "contributions_us": round((t2 - t1) / n * 1e6, 1),
        "combine_us": round((t3 - t2) / n * 1e6, 1), "cells_us": round((t4 - t3) / n * 1e6, 1),
        "total_us": round((t4 - t0) / n * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, nargs="+", default=[1000.0])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--profile", help="cProfile output of the job run (last rate)")
    args = parser.parse_args()
    procs, _ = start_emulators()
    try:
        fs = bench_feature_set()
        print(json.dumps({"job_code_per_event": job_code_cost_us(fs, live_payloads(fs, 20_000))}), flush=True)
        results = []
        for rate in args.rate:
            raws = live_payloads(fs, int(rate * args.seconds))
            floor = run_floor(fs, raws, rate, f"floor-{int(rate)}")
            job = run_job(fs, raws, rate, f"job-{int(rate)}", profile=args.profile)
            results.append({"rate": rate, "job": job, "floor": floor,
                            "job_vs_floor_events_per_s": round(job["events_per_s"] / floor["events_per_s"], 3)})
            print(json.dumps(results[-1]), flush=True)
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
