"""The streaming jobs on the emulators, as the tests (and benchmarks) run them: the aggregate job
reading a topic, its Bigtable sink fed by TestStream, the streaming scorer, real flights shifted
to end before now, and a poll with a deadline."""

from __future__ import annotations

import time

import apache_beam as beam

from skewless.transforms.featureset import FeatureSet
from skewless.transforms.record_checks import RecordChecker, ms_to_datetime
from tests.support.flights_data import flights_raw_slice
from tests.support.pipelines import batch_cells, streaming_options

HOUR_MS = 3_600_000
# The lateness the end-to-end aggregate tests give the job: the replayed flights end two hours
# before now, and their delayed departures reach back further.
LATENESS_S = 6 * 3600


def wait_for(predicate, timeout_s: float, interval_s: float = 1.0):
    """Poll `predicate` until it returns something true or the timeout; return its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


def flights_shifted_to_end_before_now(fs: FeatureSet, start: str, end: str, before_ms: int):
    """Real flights of [start, end) (ISO instants) in event-time order, shifted by whole periods
    to end `before_ms` before now: (events as (event ms, raw), the shift, the batch cells)."""
    import json

    from skewless.beam_pipelines.commands.replay import ReplayStats, order_events, to_message
    from skewless.transforms.record_checks import to_epoch_ms

    lo, hi = to_epoch_ms(start), to_epoch_ms(end)
    raws = flights_raw_slice(  # scheduled up to 12 h earlier: delayed departures in [lo, hi)
        ms_to_datetime(lo - 12 * 3_600_000).strftime("%Y-%m-%d %H:%M:%S"),
        ms_to_datetime(hi).strftime("%Y-%m-%d %H:%M:%S"),
    )
    events = [e for e in order_events(fs, raws, ReplayStats()) if lo <= e[0] < hi]
    now_ms = int(time.time() * 1000)
    shift = ((now_ms - before_ms - events[-1][0]) // fs.period_ms) * fs.period_ms
    validator = RecordChecker(fs)
    typed = [validator.validate(json.loads(to_message(fs, raw, shift))) for _, raw in events]
    return events, shift, batch_cells(fs, typed)


def start_aggregate_job(
    ps, bt, table_id: str, lateness_s: int, *extra: str, events: tuple[str, str] | None = None
):
    """The aggregate job (its real make_pipeline) on the emulators, reading a new topic (or
    `events`: a topic and a subscription of it made before, e.g. one that has a backlog) and
    dead-lettering to another: (running result, events topic, dead-letter subscription)."""
    from skewless.beam_pipelines.jobs.aggregate import make_pipeline

    topic, subscription = events or (None, None)
    if topic is None:
        topic = ps.topic("events")
        subscription = ps.subscription(topic, "job")
    dead_topic = ps.topic("dead")
    dead_subscription = ps.subscription(dead_topic, "dead-reader")
    p, _ = make_pipeline(
        [
            f"--subscription={subscription}",
            f"--bigtable_project={bt.project}",
            f"--bigtable_instance={bt.instance}",
            f"--bigtable_table={table_id}",
            f"--dead_letter_topic={dead_topic}",
            f"--allowed_lateness_s={lateness_s}",
            f"--project={ps.project}",
            *extra,
        ]
    )
    return p.run(), topic, dead_subscription


def write_cells_with_the_aggregate_job(bt, table_id: str, fs: FeatureSet, raws: list[dict]) -> dict:
    """The aggregate job's real build_pipeline fed the raw records as Pub/Sub messages by
    TestStream (deterministic: a live replay through the emulator depends on timing), writing
    to the Bigtable emulator; returns the job's counters."""
    from apache_beam.io.gcp.pubsub import PubsubMessage
    from apache_beam.testing.test_stream import TestStream

    from skewless.beam_pipelines.commands.replay import ReplayStats, order_events, to_message
    from skewless.beam_pipelines.io.bigtable import WriteCells
    from skewless.beam_pipelines.jobs import aggregate
    from skewless.beam_pipelines.runtime.parsing import metric_counters

    events = order_events(fs, raws, ReplayStats())
    messages = [PubsubMessage(to_message(fs, raw), {"event_time": str(t)}) for t, raw in events]
    stream = (
        TestStream()
        .advance_watermark_to(events[0][0] / 1000.0 - 1)
        .add_elements(messages)
        .advance_watermark_to_infinity()
    )
    p = beam.Pipeline(options=streaming_options())
    aggregate.build_pipeline(
        p, fs, stream, WriteCells(bt.project, bt.instance, table_id, fs.name), beam.Map(print)
    )
    result = p.run()
    result.wait_until_finish()
    return metric_counters(result)


def score_streaming(ps, bt, table_id: str, model_dir, fs: FeatureSet, raws: list[dict], timeout_s: float):
    """The streaming scorer (its real make_pipeline, no --feature_set: the model's) on the
    emulators, fed `raws` as messages: (predictions as dicts, the job's counters, its info)."""
    import json

    from skewless.beam_pipelines.commands.replay import ReplayStats, order_events, publish_events
    from skewless.beam_pipelines.jobs import score_streaming
    from skewless.beam_pipelines.runtime.parsing import metric_counters

    inp, out, dead = ps.topic("events"), ps.topic("predictions"), ps.topic("dead")
    inp_sub, out_sub = ps.subscription(inp, "scorer"), ps.subscription(out, "reader")
    p, info = score_streaming.make_pipeline(
        [
            "--streaming", f"--subscription={inp_sub}", f"--output_topic={out}",
            f"--dead_letter_topic={dead}", f"--bigtable_project={bt.project}",
            f"--bigtable_instance={bt.instance}", f"--bigtable_table={table_id}",
            f"--model_dir={model_dir}", f"--project={ps.project}",
        ]
    )  # fmt: skip
    result = p.run()
    try:
        # As replay publishes them: the event time in the timestamp attribute.
        publish_events(ps.publisher(), inp, fs, order_events(fs, raws, ReplayStats()))
        streamed: list = []
        deadline = time.monotonic() + timeout_s
        while len(streamed) < len(raws) and time.monotonic() < deadline:
            streamed += [json.loads(m.data) for m in ps.pull_all(out_sub, expect=1, timeout_s=5)]
    finally:
        result.cancel()
    return streamed, metric_counters(result), info
