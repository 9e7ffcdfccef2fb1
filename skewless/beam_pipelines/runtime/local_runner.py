"""Workarounds for the local streaming runner (BundleBasedDirectRunner) of Beam 2.77.

Metrics: the runner gives every bundle a fresh MetricsContainer, but each worker thread's
StateSampler caches its ScopedState by step name with the FIRST bundle's container. User
counters of later bundles therefore land in a container that was already committed, and the
pipeline result reports only the first bundle of each step. `fix_direct_runner_metrics()`
rebuilds the cached state whenever a different container is passed. The SDK harness (portable
runners, Dataflow) passes the same container for a step, so the patch never acts there; it is
applied only in the process that runs the local runner.
"""

from __future__ import annotations

import logging

_LOG = logging.getLogger("skewless.local_runner")
LOCAL_STREAMING_RUNNER = "BundleBasedDirectRunner"  # the streaming jobs' default runner
LOCAL_STREAMING_RUNNERS = ("BundleBasedDirectRunner", "DirectRunner", "SwitchingDirectRunner")


def fix_direct_runner_metrics() -> None:
    """Idempotent: make the local runner commit every bundle's user metrics."""
    from apache_beam.runners.worker import statesampler

    cls = statesampler.StateSampler
    if getattr(cls, "_skewless_metrics_fix", False):
        return
    original = cls.scoped_state

    def scoped_state(self, name_context, state_name, io_target=None, metrics_container=None):
        state = original(self, name_context, state_name, io_target, metrics_container)
        if metrics_container is None or state.metrics_container is metrics_container:
            return state
        for name, cached in list(self._states_by_name.items()):
            if cached is state:
                del self._states_by_name[name]
        return original(self, name_context, state_name, io_target, metrics_container)

    cls.scoped_state = scoped_state
    cls._skewless_metrics_fix = True


DEFAULT_LOCAL_PULL = 1000
IDLE_PULL_PAUSE_S = 0.05


def prepare_local_runner(
    event_time_attribute: str | None = None, max_messages: int = DEFAULT_LOCAL_PULL
) -> None:
    """Every workaround a streaming job needs on the local runner, in the launching process:
    counters of every bundle, DoFn specs inspected once, and the Pub/Sub read patch (pull size;
    with `event_time_attribute`, a watermark that follows it). Idempotent."""
    fix_direct_runner_metrics()
    fix_direct_runner_bundle_overhead()
    patch_local_pubsub_read(max_messages, event_time_attribute)


def fix_direct_runner_bundle_overhead() -> None:
    """Idempotent: inspect each DoFn's state and timer specs once, not several times a bundle.

    The local runner starts every bundle by finding out whether the DoFn is stateful
    (`userstate.get_dofn_specs`: every method of the DoFn wrapped and its signature inspected),
    three to four times per bundle, and a stateful step runs one bundle per key and per timer
    firing. Profiled on the aggregate job draining a backlog, that inspection was about 40% of
    the process. The specs are declared on the DoFn's class (or the function a Map wraps), so
    they are memoised per class and function. The SDK harness inspects a DoFn once per
    instance; this patch acts only in the process that runs the local runner.
    """
    from apache_beam.runners.direct import transform_evaluator
    from apache_beam.transforms import userstate

    if getattr(userstate, "_skewless_memoised", False):
        return
    original = userstate.get_dofn_specs
    cache: dict = {}

    def get_dofn_specs(dofn):
        # The local runner unpickles the DoFn for every bundle, so the key must not be an
        # object of one bundle (that would miss every time and keep each copy alive): the
        # DoFn's class, and the class or the code of what a Map/ParDo wrapper wraps.
        wrapped = getattr(dofn, "_fn", None)
        key = (type(dofn), getattr(wrapped, "__code__", None) or type(wrapped))
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = original(dofn)
        state_specs, timer_specs = hit
        return set(state_specs), set(timer_specs)

    userstate.get_dofn_specs = get_dofn_specs
    transform_evaluator.get_dofn_specs = get_dofn_specs
    userstate._skewless_memoised = True


def patch_local_pubsub_read(
    max_messages: int = DEFAULT_LOCAL_PULL, event_time_attribute: str | None = None
) -> None:
    """Make the local runner's Pub/Sub read pull bigger bundles and, optionally, keep event time.

    Beam 2.77's evaluator (`_PubSubReadEvaluator`) pulls at most 10 messages per bundle, so the
    runner's per-bundle work caps a local job at a few hundred messages/s, and it sets the
    source watermark to the wall clock on every pull, so replayed history is late on arrival.
    After this patch a pull takes up to `max_messages`, and with `event_time_attribute` the
    watermark follows the event time carried in that attribute (epoch ms or RFC 3339), as
    Dataflow's does with a timestamp attribute (`_local_watermark`: the oldest event of each
    pull, or a heartbeat's promise, never backwards) and stays put while nothing arrives, so an
    idle local replay needs heartbeats that carry the attribute (`skewless replay
    --heartbeat_s`). Messages whose attribute is missing or garbled do not move it. Each
    message leaves the source stamped with that event time (when it parses), so a message not
    yet parsed holds back the watermark of the steps after it. The SDK harness and Dataflow
    never run this evaluator; the patch acts only in the process that runs the local runner.
    Calling it again replaces the settings.

    Outages: a pull that fails (the emulator or the network paused) returns nothing and the
    next bundle pulls again, where Beam's evaluator would fail the pipeline; an ack that fails
    is retried, and messages redelivered all the same (same message id) are dropped, as
    Dataflow deduplicates Pub/Sub deliveries by id.
    """
    import time
    import weakref

    from apache_beam.runners.direct import transform_evaluator as te
    from apache_beam.utils.timestamp import Timestamp

    cls = te._PubSubReadEvaluator
    if not hasattr(cls, "_skewless_watermarks"):
        cls._skewless_watermarks = weakref.WeakKeyDictionary()
        cls._skewless_seen = weakref.WeakKeyDictionary()
    cls._skewless_settings = (max_messages, event_time_attribute)

    def finish_bundle(self):
        pull, attribute = cls._skewless_settings
        transform = self._applied_ptransform
        sub_client = self._get_subscriber_client(transform)
        received = _pull(sub_client, self._sub_name, pull)
        seen = cls._skewless_seen.setdefault(transform, _RecentIds())
        received = [rm for rm in received if seen.first_time(rm.message.message_id)]
        times = _event_times(received, attribute)
        watermark = _local_watermark(
            cls._skewless_watermarks, transform, received, times, Timestamp.of(time.time())
        )
        return _read_result(self, received, watermark, times)

    cls.finish_bundle = finish_bundle


def _pull(sub_client, subscription: str, max_messages: int) -> list:
    """One pull, acked: raw ReceivedMessage protobufs; [] when the service does not answer (the
    next bundle pulls again)."""
    import time

    from google.api_core import exceptions

    try:
        response = sub_client.pull(subscription=subscription, max_messages=max_messages, timeout=30)
    except (exceptions.GoogleAPIError, exceptions.RetryError) as exc:
        _LOG.warning("local Pub/Sub pull failed, pulling again: %s", exc)
        time.sleep(1.0)
        return []
    if not response.received_messages:
        time.sleep(IDLE_PULL_PAUSE_S)  # an idle topic: do not spin on empty pulls
        return []
    # The raw protobufs: proto-plus attribute access costs more than the rest of the read.
    received = [type(rm).pb(rm) for rm in response.received_messages]
    for attempt in range(10):
        if not received:
            break
        try:
            sub_client.acknowledge(
                subscription=subscription, ack_ids=[rm.ack_id for rm in received]
            )
            break
        except (exceptions.GoogleAPIError, exceptions.RetryError) as exc:
            # Emitted anyway: if the ack is lost the messages come back and are dropped as
            # already seen (_RecentIds), so nothing is lost and nothing is counted twice.
            _LOG.warning("local Pub/Sub ack failed (attempt %d): %s", attempt + 1, exc)
            time.sleep(1.0)
    return received


class _RecentIds:
    """The message ids of the last `size` messages read: redeliveries are recognised."""

    def __init__(self, size: int = 200_000):
        from collections import OrderedDict

        self.size = size
        self._ids = OrderedDict()

    def first_time(self, message_id: str) -> bool:
        if not message_id:
            return True
        if message_id in self._ids:
            return False
        self._ids[message_id] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return True


def _event_time_ms(attributes, name: str) -> int | None:
    from skewless.beam_pipelines.io.pubsub import BadTimestamp, parse_timestamp_attribute

    try:
        return parse_timestamp_attribute(attributes.get(name))
    except BadTimestamp:
        return None


def _event_times(received, attribute: str | None) -> list[int | None] | None:
    """The event time (epoch ms) of each message, None where it is missing or garbled; None
    without an attribute (the watermark then follows the wall clock)."""
    if attribute is None:
        return None
    return [_event_time_ms(rm.message.attributes, attribute) for rm in received]


def _local_watermark(marks, transform, received, times, now):
    """The source watermark after one pull: the wall clock, or (with an event-time attribute) a
    lower bound of the event times still to come, never moving backwards.

    Two bounds, and the watermark takes the later (docs/architecture.md, "The local streaming
    runner"); both rest on the emulator delivering a subscription's messages in the order the
    topic received them (measured: no inversion in 100,000 messages pulled 100 at a time):
    - events: the oldest event time of the pull. Every message still in the subscription was
      published after this pull's, so this holds when the publisher keeps event-time order, as
      `skewless replay` does (one ordering key);
    - heartbeats (`skewless replay --heartbeat_s`): the latest time a heartbeat of the pull
      carries. A heartbeat is its publisher's promise that every event before its time was
      published before it, so those events came in this pull or an earlier one, even when the
      pull holds events older than it (a job far behind reads the replay's final heartbeat in
      the same pull as the last events).
    """
    from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp

    from skewless.beam_pipelines.io.pubsub import HEARTBEAT_ATTRIBUTE

    if times is None:
        return now
    oldest_event = latest_promise = None
    for rm, t in zip(received, times, strict=True):
        if t is None:
            continue
        if HEARTBEAT_ATTRIBUTE in rm.message.attributes:
            latest_promise = t if latest_promise is None else max(latest_promise, t)
        else:
            oldest_event = t if oldest_event is None else min(oldest_event, t)
    bounds = [t for t in (oldest_event, latest_promise) if t is not None]
    mark = marks.get(transform, MIN_TIMESTAMP)
    if bounds:
        mark = max(mark, Timestamp(micros=max(bounds) * 1000))
        marks[transform] = mark
    return mark


def _read_result(evaluator, received, watermark, times=None):
    """The evaluator's TransformResult for the pulled messages (as Beam's own finish_bundle).

    A message is stamped with its event time when the source reads the timestamp attribute
    (a garbled one fails the bundle, as in Beam) and, without it, when the watermark follows
    event time (`times`, from `_event_times`) and it parses; otherwise with its publish time. The runner holds
    each step's watermark below the timestamps of the elements still waiting for it: stamped
    with the publish time (later than any replayed event), a message the job has not parsed
    yet would not hold the watermark, which already follows event time, and its event could
    be late by the time the job re-stamps it."""
    import datetime as dt

    from apache_beam import pvalue
    from apache_beam.io.gcp.pubsub import PubsubMessage
    from apache_beam.runners.direct.transform_evaluator import TransformResult
    from apache_beam.transforms.window import GlobalWindows
    from apache_beam.utils.timestamp import Timestamp

    source = evaluator.source
    bundles = []
    if received:
        bundle = evaluator._evaluation_context.create_bundle(list(evaluator._outputs)[0])
        for i, rm in enumerate(received):
            pb = rm.message
            published = pb.publish_time
            message = PubsubMessage(
                pb.data,
                dict(pb.attributes),
                pb.message_id or None,
                published.ToDatetime(tzinfo=dt.UTC),
                pb.ordering_key,
            )
            stamp = Timestamp(micros=published.seconds * 1_000_000 + published.nanos // 1000)
            if source.timestamp_attribute:
                ms = _event_time_ms(message.attributes, source.timestamp_attribute)
                if ms is None:
                    raise ValueError(
                        f"message without a valid {source.timestamp_attribute!r} attribute"
                    )
                stamp = Timestamp(micros=ms * 1000)
            elif times is not None and times[i] is not None:
                stamp = Timestamp(micros=times[i] * 1000)
            element = message if source.with_attributes else message.data
            bundle.output(GlobalWindows.windowed_value(element, timestamp=stamp))
        bundles.append(bundle)
    transform = evaluator._applied_ptransform
    input_pvalue = (
        transform.inputs[0] if transform.inputs else pvalue.PBegin(transform.transform.pipeline)
    )
    unprocessed = evaluator._evaluation_context.create_bundle(input_pvalue)
    return TransformResult(evaluator, bundles, [unprocessed], None, {None: watermark})
