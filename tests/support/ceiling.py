"""The local runner's ceiling: how many Pub/Sub messages per second ReadFromPubSub -> count
drains on the BundleBasedDirectRunner, with a job's read settings (the local pull patch's
messages per pull, the event-time watermark) and none of its work. A job's throughput is read
against it."""

from __future__ import annotations

import time


def drain_rate(count, n: int, timeout_s: float = 300, poll_s: float = 0.05) -> float:
    """Events/s between the first counted event and the n-th (a backlog drained); `count()`
    reads the counter."""
    deadline = time.monotonic() + timeout_s
    first = None
    while time.monotonic() < deadline:
        c = count()
        if first is None and c > 0:
            first = (time.monotonic(), c)
        if c >= n:
            break
        time.sleep(poll_s)
    if first is None:
        return 0.0
    end = time.monotonic()
    return round((count() - first[1]) / max(end - first[0], 1e-9), 1)


def runner_ceiling(
    subscription: str,
    expect: int,
    project: str,
    pull: int,
    event_time_attribute: str | None = None,
    timeout_s: float = 300,
    poll_s: float = 0.05,
) -> dict:
    """ReadFromPubSub -> count on the local runner, `pull` messages per pull (the job's runner
    settings: prepare_local_runner), draining a backlog of `expect` messages already on
    `subscription`: {"read": messages counted, "events_per_s": drain rate}."""
    import apache_beam as beam
    from apache_beam.metrics import Metrics
    from apache_beam.options.pipeline_options import PipelineOptions

    from skewless.beam_pipelines.io.pubsub import read_messages
    from skewless.beam_pipelines.runtime.local_runner import prepare_local_runner
    from skewless.beam_pipelines.runtime.parsing import metric_counters

    prepare_local_runner(event_time_attribute, pull)

    class Count(beam.DoFn):
        def setup(self):
            self.read = Metrics.counter("skewless", "ceiling_read")

        def process(self, message):
            self.read.inc()

    p = beam.Pipeline(
        options=PipelineOptions(runner="BundleBasedDirectRunner", streaming=True, project=project)
    )
    _ = p | read_messages(subscription, "event_time", False) | beam.ParDo(Count())
    result = p.run()

    def count() -> int:
        return metric_counters(result).get("ceiling_read", 0)

    try:
        rate = drain_rate(count, expect, timeout_s, poll_s)
        return {"read": count(), "events_per_s": rate}
    finally:
        result.cancel()
