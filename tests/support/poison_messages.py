"""Pub/Sub messages both streaming jobs (aggregate, score --streaming) must dead-letter for
the same reason: the one rule of io/pubsub.ParseMessages and the payload check of validation."""

from __future__ import annotations

from skewless.beam_pipelines.commands.replay import to_message
from skewless.beam_pipelines.io.pubsub import streaming_time_range
from skewless.examples.flights import FLIGHTS


def timestamp_poison(raw: dict, t: int, shift_ms: int = 0) -> dict[bytes, tuple[dict, str, str]]:
    """{payload: (attributes, stage, reason)} of five copies of the flight `raw` (event time
    `t`, payload times moved by `shift_ms`) whose timestamp attribute is missing, garbled, in
    the year 3000, before 1970, or a minute off the payload's own event time."""

    def payload(flight: int) -> bytes:
        return to_message(FLIGHTS, dict(raw, flight=flight), shift_ms)

    return {
        payload(999_101): ({}, "timestamp", ": missing"),
        payload(999_102): ({"event_time": "yesterday-ish"}, "timestamp", "neither epoch"),
        payload(999_103): (
            {"event_time": "3000-01-01T00:00:00Z"}, "timestamp", "outside the accepted time range"
        ),
        payload(999_104): (
            {"event_time": "1969-12-31T23:00:00Z"},
            "timestamp",
            f"outside the accepted time range [{streaming_time_range(FLIGHTS)[0]}",
        ),
        payload(999_105): ({"event_time": str(t + shift_ms + 60_000)}, "timestamp", "the timestamp attribute says"),
    }  # fmt: skip
