"""The lateness gate of streaming aggregates: drops and counts updates later than the allowed lateness.

Why a gate: Beam's Python trigger driver skips the elements of an expired window without a
trace (`input_watermark > window.end + allowed_lateness: continue`), and a plain DoFn cannot
see the watermark. The watermark is observable in one place: the pane timing of a GroupByKey.
So every block contribution `((key name, key value, block end), (bucket, values))` first goes
through a GroupByKey whose window ENDS at `block end + allowed lateness`:

- a pane fired before the watermark reached `block end + L` (EARLY, every element, or the
  ON_TIME pane) holds contributions that arrived in time: they go on to the combine;
- a LATE pane holds contributions that arrived after the watermark passed `block end + L`:
  they are counted and dropped here.

What the counters count, exactly:
- `late_updates_dropped`: contributions (one event's update of one (key, W) cell) that reached
  the gate after the gate's watermark passed W + L. Cells never change after W + L.
- `events_dropped_too_late`: events none of whose windows could be updated any more — their
  contribution to their LAST window (bucket + the feature set's largest window) was dropped.
  Counted once per event, on its first entity key with the largest window (an event whose
  value for that key is null is not counted here, only in late_updates_dropped).

The gate's own windows allow `grace_s` of lateness (default one day) so that late arrivals are
seen and counted; a contribution that arrives more than L + grace after its window end is
beyond what any pane can report and is dropped by the runner without a count. The combine
after the gate allows L + grace too: it must never drop what the gate admitted (an admitted
contribution may reach it after the watermark moved on), and it gets nothing later than L.
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window
from apache_beam.utils.windowed_value import PaneInfoTiming

from transforms.featureset import FeatureSet

NAMESPACE = "skewless"
DEFAULT_GRACE_S = 86_400


def last_block_end(bucket_ms: int, max_size_ms: int, block_ms: int) -> int:
    """The block end of the last window a bucket feeds (window end bucket + S, rounded up)."""
    return -(-(bucket_ms + max_size_ms) // block_ms) * block_ms


class _ToGateWindow(beam.DoFn):
    """Re-stamp a contribution just before block end + L, so its gate window ends at W + L."""

    def __init__(self, lateness_ms: int):
        self.lateness_ms = lateness_ms

    def process(self, element: tuple) -> Iterator:
        (_, _, block_end), _ = element
        yield window.TimestampedValue(element, (block_end + self.lateness_ms - 1) / 1000.0)


class _AdmitOrDrop(beam.DoFn):
    """Gate pane -> its contributions, back on their block's timestamp; LATE panes are counted."""

    def __init__(self, fs: FeatureSet, block_ms: int):
        self.fs = fs
        self.block_ms = block_ms

    def setup(self) -> None:
        fs = self.fs
        self._max_size = {
            k: max(a.size_ms for a in fs.aggregates_for(k)) for k in fs.aggregate_keys
        }
        self._counting_key = next(
            k for k in fs.aggregate_keys if self._max_size[k] == fs.max_window_ms
        )
        self._dropped_updates = Metrics.counter(NAMESPACE, "late_updates_dropped")
        self._dropped_events = Metrics.counter(NAMESPACE, "events_dropped_too_late")

    def process(self, element: tuple, pane_info=beam.DoFn.PaneInfoParam) -> Iterator:
        key, contributions = element
        key_name, _, block_end = key
        if pane_info.timing != PaneInfoTiming.LATE:
            stamp = (block_end - 1) / 1000.0
            for contribution in contributions:
                yield window.TimestampedValue((key, contribution), stamp)
            return
        contributions = list(contributions)
        self._dropped_updates.inc(len(contributions))
        if key_name == self._counting_key:
            max_size = self._max_size[key_name]
            last = sum(
                1
                for bucket, _ in contributions
                if last_block_end(bucket, max_size, self.block_ms) == block_end
            )
            self._dropped_events.inc(last)


class LatenessGate(beam.PTransform):
    """Block contributions -> those that arrived before the watermark passed W + L (see module doc).

    Input and output elements are `((key name, key value, block end), (bucket, values))`
    timestamped `block end - 1 ms`; the output is still in the gate's windows: re-window it.
    """

    def __init__(
        self,
        fs: FeatureSet,
        block_ms: int,
        allowed_lateness_s: int,
        grace_s: int = DEFAULT_GRACE_S,
    ):
        super().__init__()
        if allowed_lateness_s < 0 or grace_s <= 0:
            raise ValueError("allowed lateness must be >= 0 and the gate's grace > 0")
        self.fs = fs
        self.block_ms = block_ms
        self.lateness_ms = allowed_lateness_s * 1000
        self.grace_s = grace_s

    def expand(self, contributions):
        block_s = self.block_ms / 1000.0
        offset_s = (self.lateness_ms % self.block_ms) / 1000.0
        return (
            contributions
            | "StampAtExpiry" >> beam.ParDo(_ToGateWindow(self.lateness_ms))
            | "WindowByExpiry"
            >> beam.WindowInto(
                window.FixedWindows(block_s, offset=offset_s),
                trigger=trigger.AfterWatermark(
                    early=trigger.AfterCount(1), late=trigger.AfterCount(1)
                ),
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
                allowed_lateness=self.grace_s,
            )
            | "GroupByCell" >> beam.GroupByKey()
            | "AdmitOrDrop" >> beam.ParDo(_AdmitOrDrop(self.fs, self.block_ms))
        )
