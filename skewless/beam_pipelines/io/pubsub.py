"""Pub/Sub at the edge of the streaming job: read events with their event-time attribute, dead letters.

Event time travels in a message attribute (`--timestamp_attribute`): epoch milliseconds or
RFC 3339 text, the two formats Beam and Dataflow accept. Where it is parsed is a choice:

- `source_timestamps=True`: ReadFromPubSub parses it itself, so Dataflow's watermark follows
  event time. But a garbled attribute then fails inside the source: the local runner raises
  (the job stops) and Dataflow retries the message for ever, so it is never dead-lettered.
- `source_timestamps=False` (the default except on Dataflow, see aggregate.py): the source
  stamps messages with their publish time and ParseMessages parses the attribute, dead-letters
  a missing or garbled one and re-stamps the rest with their event time. On Dataflow the
  watermark then follows publish time, which is later than event time: the allowed lateness
  must cover the publishing delay. (The local runner's patched source stamps event time and
  its watermark follows the attribute either way: local_runner.py.)

Either way ParseMessages checks the attribute, so a missing one is always dead-lettered, and
hands each payload on with the attribute's time (StampedPayload): validation dead-letters a
message whose payload's event time differs from its attribute (stage `timestamp`). Both
streaming jobs (aggregate, score --streaming) read messages this way, so they accept and
reject the same messages for the same reasons. The accepted times are the feature set's
`timestamp_range` from 1970 on: Bigtable, the online store, has no timestamp before 1970.
Messages carrying the heartbeat attribute (published by `skewless replay` to keep the local
runner's watermark moving) are counted and dropped.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import logging
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms import window

from skewless.transforms.featureset import DEFAULT_TIMESTAMP_RANGE, FeatureSet
from skewless.transforms.record_checks import dead_letter, to_epoch_ms
from skewless.transforms.records import StampedPayload

NAMESPACE = "skewless"
HEARTBEAT_ATTRIBUTE = "skewless_heartbeat"
DEFAULT_TIMESTAMP_ATTRIBUTE = "event_time"
MAX_ATTRIBUTE_BYTES = 1024  # Pub/Sub's limit for one attribute value
DEAD = "dead"
LOG = logging.getLogger("skewless.pubsub")
ONLINE_STORE_START = "1970-01-01T00:00:00+00:00"  # Bigtable holds no earlier timestamp


def streaming_time_range(fs: FeatureSet | None = None) -> tuple[str, str]:
    """The event times a streaming job accepts: the feature set's range (default
    DEFAULT_TIMESTAMP_RANGE), from 1970 on."""
    start, end = fs.timestamp_range if fs is not None else DEFAULT_TIMESTAMP_RANGE
    return max(str(start), ONLINE_STORE_START, key=to_epoch_ms), str(end)


_RANGE = streaming_time_range()


class EventTimeOptions(PipelineOptions):
    """The event-time attribute, shared by `aggregate` and `replay`."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--timestamp_attribute",
            default=DEFAULT_TIMESTAMP_ATTRIBUTE,
            help="Message attribute holding the event time (epoch ms or RFC 3339).",
        )


class BadTimestamp(ValueError):
    pass


def parse_timestamp_attribute(text: str | None, time_range: tuple[str, str] = _RANGE) -> int:
    """Attribute value -> epoch ms. Accepts integer epoch ms or RFC 3339 text (with a zone).

    Times outside `time_range` (`streaming_time_range(fs)`; default: the default timestamp
    range from 1970) are BadTimestamp: a garbled attribute must never become an element
    timestamp or a watermark Beam cannot encode (a bundle that fails is retried for ever on a
    streaming runner).
    """
    if text is None or not text.strip():
        raise BadTimestamp("missing")
    text = text.strip()
    if text.lstrip("-").isdigit() and text.isascii():
        ms = int(text)
    else:
        try:
            parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise BadTimestamp(f"{text[:80]!r} is neither epoch milliseconds nor RFC 3339") from None
        if parsed.tzinfo is None:
            raise BadTimestamp(f"{text[:80]!r} has no time zone (RFC 3339 needs one)")
        delta = parsed - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        ms = (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
    if not _range_ms(time_range)[0] <= ms < _range_ms(time_range)[1]:
        raise BadTimestamp(
            f"{text[:80]!r} is outside the accepted time range [{time_range[0]}, {time_range[1]})"
        )
    return ms


@functools.cache
def _range_ms(time_range: tuple[str, str]) -> tuple[int, int]:
    return to_epoch_ms(time_range[0]), to_epoch_ms(time_range[1])


class _ParseMessages(beam.DoFn):
    """PubsubMessage -> StampedPayload at its event time; bad timestamps -> dead letters.

    Nothing a message carries can fail the bundle (which a streaming runner would retry for
    ever): anything unexpected is the message's dead letter, written once.
    """

    def __init__(self, timestamp_attribute: str, fs: FeatureSet):
        self.timestamp_attribute = timestamp_attribute
        self.feature_set = fs.name
        self.time_range = streaming_time_range(fs)

    def setup(self) -> None:
        self._read = Metrics.counter(NAMESPACE, "messages_read")
        self._heartbeats = Metrics.counter(NAMESPACE, "heartbeats")
        self._bad = Metrics.counter(NAMESPACE, "messages_bad_timestamp")

    def process(self, message) -> Iterator:
        try:
            attributes = dict(message.attributes or {})
            data = message.data
        except Exception as exc:  # noqa: BLE001 - not a PubsubMessage at all
            yield TaggedOutput(
                DEAD, dead_letter("parse", f"not a Pub/Sub message: {exc}", repr(message)[:2000], self.feature_set)
            )
            return
        if HEARTBEAT_ATTRIBUTE in attributes:
            self._heartbeats.inc()
            return
        self._read.inc()
        try:
            event_ms = parse_timestamp_attribute(
                attributes.get(self.timestamp_attribute), self.time_range
            )
        except BadTimestamp as exc:
            self._bad.inc()
            reason = f"timestamp attribute {self.timestamp_attribute!r}: {exc}"
            yield TaggedOutput(DEAD, dead_letter("timestamp", reason, data, self.feature_set))
            return
        except Exception as exc:  # noqa: BLE001 - e.g. an attribute that is not text
            self._bad.inc()
            reason = f"timestamp attribute {self.timestamp_attribute!r}: {type(exc).__name__}: {exc}"
            yield TaggedOutput(DEAD, dead_letter("timestamp", reason, data, self.feature_set))
            return
        yield window.TimestampedValue(StampedPayload(data, event_ms), event_ms / 1000.0)


class ParseMessages(beam.PTransform):
    """PubsubMessages -> (StampedPayloads at their event time, dead letters)."""

    def __init__(self, timestamp_attribute: str, fs: FeatureSet):
        super().__init__()
        self.timestamp_attribute = timestamp_attribute
        self.fs = fs

    def expand(self, messages):
        results = messages | "StampEventTime" >> beam.ParDo(
            _ParseMessages(self.timestamp_attribute, self.fs)
        ).with_outputs(DEAD, main="payloads")
        return results.payloads, results[DEAD]


def read_messages(subscription: str, timestamp_attribute: str, source_timestamps: bool):
    from apache_beam.io.gcp.pubsub import ReadFromPubSub

    return ReadFromPubSub(
        subscription=subscription,
        with_attributes=True,
        timestamp_attribute=timestamp_attribute if source_timestamps else None,
    )


def _truncate(text: str, limit: int = MAX_ATTRIBUTE_BYTES) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", errors="ignore") + "..."


def to_dead_letter_message(letter: dict):
    """Dead-letter dict -> PubsubMessage: the original payload (its very bytes when they are
    not text), stage and reason as attributes."""
    from apache_beam.io.gcp.pubsub import PubsubMessage

    record = letter.get("record")
    if letter.get("record_encoding") == "base64":
        data = base64.b64decode(record)
    else:
        data = (record if isinstance(record, str) else json.dumps(record)).encode("utf-8")
    attributes = {
        "stage": _truncate(str(letter.get("stage", ""))),
        "reason": _truncate(str(letter.get("reason", ""))),
        "feature_set": _truncate(str(letter.get("feature_set", ""))),
    }
    return PubsubMessage(data=data, attributes=attributes)


class _CountDeadLetters(beam.DoFn):
    def __init__(self, log: bool):
        self.log = log

    def setup(self) -> None:
        self._dead = Metrics.counter(NAMESPACE, "messages_dead_lettered")

    def process(self, letter: dict) -> Iterator[dict]:
        self._dead.inc()
        if self.log:
            LOG.warning("dead letter (no --dead_letter_topic): %s", json.dumps(letter)[:2000])
        yield letter


class PublishDeadLetters(beam.PTransform):
    """Dead-letter dicts -> the dead-letter topic (or the log when no topic is given), counted."""

    def __init__(self, topic: str | None):
        super().__init__()
        self.topic = topic

    def expand(self, letters):
        counted = letters | "Count" >> beam.ParDo(_CountDeadLetters(log=self.topic is None))
        if self.topic is None:
            return counted
        from apache_beam.io.gcp.pubsub import WriteToPubSub

        return (
            counted
            | "ToMessage" >> beam.Map(to_dead_letter_message)
            | "Publish" >> WriteToPubSub(self.topic, with_attributes=True)
        )
