"""The local runner's event-time watermark as a replay drives it (skewless/beam_pipelines/runtime/local_runner.py).

Each pull moves the watermark to the later of two bounds: the oldest event of the pull, and the
latest heartbeat of the pull (a promise that every event before it was published before it),
never backwards. Messages are fakes with the attributes the patched read looks at.
"""

from __future__ import annotations

from types import SimpleNamespace

from apache_beam.utils.timestamp import Timestamp

from skewless.beam_pipelines.io.pubsub import HEARTBEAT_ATTRIBUTE
from skewless.beam_pipelines.runtime.local_runner import _event_times, _local_watermark

NOW = Timestamp(micros=1_800_000_000_000_000)


def _event(ms: int | str | None):
    attributes = {} if ms is None else {"event_time": str(ms)}
    return SimpleNamespace(message=SimpleNamespace(attributes=attributes))


def _heartbeat(ms: int):
    return SimpleNamespace(
        message=SimpleNamespace(attributes={HEARTBEAT_ATTRIBUTE: "1", "event_time": str(ms)})
    )


def _after_pulls(*pulls, attribute: str | None = "event_time") -> list[Timestamp]:
    marks: dict = {}
    out = []
    for received in pulls:
        times = _event_times(received, attribute)
        out.append(_local_watermark(marks, "read", received, times, NOW))
    return out


def _ms(*values: int) -> list[Timestamp]:
    return [Timestamp(micros=v * 1000) for v in values]


def test_events_move_the_watermark_to_the_oldest_event_of_each_pull_never_backwards():
    marks = _after_pulls(
        [_event(300), _event(100), _event(200)],
        [_event(50), _event(400)],  # an older event: the watermark stays
        [],  # nothing arrived
        [_event(500), _event(None), _event("garbled")],  # no event time: ignored
    )
    assert marks == _ms(100, 100, 100, 500)


def test_a_heartbeat_moves_the_watermark_even_in_a_pull_with_older_events():
    """The replay's final heartbeat read in one pull with the last events (a job far behind):
    the events before it in the pull are older, yet every event before its time has come."""
    marks = _after_pulls(
        [_event(100), _event(200), _heartbeat(150)],
        [_event(300), _event(400), _heartbeat(10_000), _heartbeat(9_000)],
        [_event(10_500)],
    )
    assert marks == _ms(150, 10_000, 10_500)


def test_without_an_event_time_attribute_the_watermark_is_the_wall_clock():
    assert _after_pulls([_event(100), _heartbeat(10_000)], attribute=None) == [NOW]
