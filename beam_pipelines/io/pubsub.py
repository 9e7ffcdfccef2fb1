"""Pub/Sub at the edge of the streaming job: read events with their event-time attribute, dead letters.

Event time travels in a message attribute (`--timestamp_attribute`): epoch milliseconds or
RFC 3339 text, the two formats Beam and Dataflow accept. Where it is parsed is a choice:

- `source_timestamps=True`: ReadFromPubSub parses it itself, so Dataflow's watermark follows
  event time. But a garbled attribute then fails inside the source: the local runner raises
  (the job stops) and Dataflow retries the message for ever, so it is never dead-lettered.
- `source_timestamps=False` (the default except on Dataflow, see aggregate.py): the source
  stamps messages with their publish time and ParseMessages parses the attribute, dead-letters
  a missing or garbled one and re-stamps the rest with their event time. The watermark then
  follows publish time (local runner: wall clock), which is later than event time: the
  allowed lateness must cover the publishing delay.

Either way ParseMessages checks the attribute, so a missing one is always dead-lettered.
Messages carrying the heartbeat attribute (published by `skewless replay` to keep the local
runner's watermark moving) are counted and dropped.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms import window

from transforms.featureset import DEFAULT_TIMESTAMP_RANGE
from transforms.validation import dead_letter, to_epoch_ms

NAMESPACE = "skewless"
HEARTBEAT_ATTRIBUTE = "skewless_heartbeat"
DEFAULT_TIMESTAMP_ATTRIBUTE = "event_time"
MAX_ATTRIBUTE_BYTES = 1024  # Pub/Sub's limit for one attribute value
DEAD = "dead"
LOG = logging.getLogger("skewless.pubsub")
_RANGE_MS = tuple(to_epoch_ms(t) for t in DEFAULT_TIMESTAMP_RANGE)


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


def parse_timestamp_attribute(text: str | None) -> int:
    """Attribute value -> epoch ms. Accepts integer epoch ms or RFC 3339 text (with a zone).

    Times outside the accepted range (featureset.DEFAULT_TIMESTAMP_RANGE) are BadTimestamp:
    a garbled attribute must never become an element timestamp or a watermark Beam cannot
    encode (a bundle that fails is retried for ever on a streaming runner).
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
    if not _RANGE_MS[0] <= ms < _RANGE_MS[1]:
        raise BadTimestamp(
            f"{text[:80]!r} is outside the accepted time range "
            f"[{DEFAULT_TIMESTAMP_RANGE[0]}, {DEFAULT_TIMESTAMP_RANGE[1]})"
        )
    return ms


class _ParseMessages(beam.DoFn):
    """PubsubMessage -> payload stamped with its event time; bad timestamps -> dead letters.

    Nothing a message carries can fail the bundle (which a streaming runner would retry for
    ever): anything unexpected is the message's dead letter, written once.
    """

    def __init__(self, timestamp_attribute: str, feature_set: str):
        self.timestamp_attribute = timestamp_attribute
        self.feature_set = feature_set

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
            event_ms = parse_timestamp_attribute(attributes.get(self.timestamp_attribute))
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
        yield window.TimestampedValue(data, event_ms / 1000.0)


class ParseMessages(beam.PTransform):
    """PubsubMessages -> (payloads stamped with event time, dead letters)."""

    def __init__(self, timestamp_attribute: str, feature_set: str):
        super().__init__()
        self.timestamp_attribute = timestamp_attribute
        self.feature_set = feature_set

    def expand(self, messages):
        results = messages | "StampEventTime" >> beam.ParDo(
            _ParseMessages(self.timestamp_attribute, self.feature_set)
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
    """Dead-letter dict -> PubsubMessage: the original payload, stage and reason as attributes."""
    from apache_beam.io.gcp.pubsub import PubsubMessage

    record = letter.get("record")
    data = record if isinstance(record, str) else json.dumps(record)
    attributes = {
        "stage": _truncate(str(letter.get("stage", ""))),
        "reason": _truncate(str(letter.get("reason", ""))),
        "feature_set": _truncate(str(letter.get("feature_set", ""))),
    }
    return PubsubMessage(data=data.encode("utf-8"), attributes=attributes)


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


class WriteDeadLetters(beam.PTransform):
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
