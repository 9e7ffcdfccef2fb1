"""Streaming aggregates as tiles: one shuffle element per event and entity key, cells when the watermark passes W.

How it works:
1. `_ToTiles` turns each event into its *tile* per entity key: the per-bucket partials of its
   P-bucket (partials.py). Tiles of one key are pre-combined within a bundle, so the shuffle
   carries at most one element per event and key (`aggregate_contributions`), whatever the
   window sizes: S/P no longer multiplies the elements shuffled.
2. `_EmitCells`, a stateful DoFn keyed by (key name, key value), keeps the recent buckets of
   the key and one event-time timer. When the watermark passes a window end W it emits the
   cell of W (ON_TIME), computed by the shared `window_cell` from the buckets, so batch and streaming
   stay bit-identical. A tile that arrives after W was emitted, while W is still open, re-emits
   W at once with the accumulated value (LATE). W is *closed* once the watermark has passed
   W + allowed lateness: updates to a closed W are dropped and counted, and a bucket is freed
   as soon as every window that needs it is closed.

What the job knows of the watermark is what its timers tell it: a timer firing at T means the
input watermark has reached T. The key's own timers fire at each W (emission) and W + L
(closure); a process-wide floor (the latest timer fired in this process for this step) covers
keys that have no state yet. A tile is therefore dropped only when it is known to be too late;
one that arrives late but before the job has seen the watermark pass its windows' closure is
applied (the cells get closer to the batch backfill, never further from it).

Counters: `aggregate_events` (events tiled), `aggregate_contributions` (tiles into the shuffle),
`aggregate_events_without_key`,
`late_updates_dropped` (one event's update of one closed cell), `events_dropped_too_late`
(events all of whose windows were closed; counted once per event, on the first entity key with
the largest window), `cells_on_time`, `cells_late`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import NamedTuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms import userstate, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import PaneInfoTiming, WindowedValue

from skewless.transforms.featureset import FeatureSet
from skewless.transforms.partials import (
    NAMESPACE,
    CellKey,
    _KeySpec,
    add_to_slot,
    block_periods,
    block_start,
    copy_slot,
    entity_value,
    key_specs,
    merge_buckets,
    merge_slot,
    new_slot,
    window_cell,
)

NEVER = -(2**62)  # "no window end yet": before every real W
MAX_BUFFERED_EVENTS = 10_000

# The latest timer fired in this process, per _EmitCells instance (by its id): a lower bound of
# the step's input watermark, shared by every key of the step.
_WATERMARK_FLOOR: dict[str, int] = {}


class Cell(NamedTuple):
    """One emission of the cell (key, W): `timing` ON_TIME (first) or LATE (update), `index` its
    number among the emissions of that cell (0, 1, ...). key and values are what is written."""

    key: CellKey
    values: dict
    timing: int
    index: int


class _KeyState(NamedTuple):
    """Per entity key, besides its buckets: every W <= emitted has had its on-time emission,
    every W <= closed is closed, `wake` is the timer set, `panes` counts emissions of open W."""

    emitted: int
    closed: int
    wake: int | None
    panes: dict


def floor_to(t: int, period: int) -> int:
    return (t // period) * period


class _ToTiles(beam.DoFn):
    """Events (any window) -> ((key name, key value), {bucket: slot}) in the global window, one
    tile per key and bundle: the per-key state spans every window end, so it lives in one window."""

    def __init__(self, fs: FeatureSet):
        self.fs = fs

    def setup(self) -> None:
        self._specs = key_specs(self.fs)
        self._null_keys = Metrics.counter(NAMESPACE, "aggregate_events_without_key")
        self._contributions = Metrics.counter(NAMESPACE, "aggregate_contributions")
        self._events = Metrics.counter(NAMESPACE, "aggregate_events")

    def start_bundle(self) -> None:
        self._tiles: dict = {}
        self._first: dict = {}
        self._buffered = 0

    def process(self, event: dict, timestamp=beam.DoFn.TimestampParam) -> Iterator:
        t = event[self.fs.event_time]
        tiles, first = self._tiles, self._first
        for spec in self._specs:
            key_value = entity_value(event.get(spec.key_name))
            if key_value is None:
                self._null_keys.inc()
                continue
            key = (spec.key_name, key_value)
            buckets = tiles.get(key)
            if buckets is None:
                buckets = tiles[key] = {}
                first[key] = timestamp
            elif timestamp < first[key]:
                first[key] = timestamp
            bucket = (t // spec.period_ms) * spec.period_ms
            slot = buckets.get(bucket)
            if slot is None:
                slot = buckets[bucket] = new_slot(spec)
            add_to_slot(slot, [event.get(f) for f in spec.value_fields], t)
        self._buffered += 1
        if self._buffered >= MAX_BUFFERED_EVENTS:
            # Mid-bundle, an output takes the current input's timestamp (it may not be earlier).
            for key, tile, _ in self._flush():
                yield WindowedValue((key, tile), timestamp, [window.GlobalWindow()])

    def finish_bundle(self) -> Iterator:
        for key, tile, stamp in self._flush():
            yield WindowedValue((key, tile), stamp, [window.GlobalWindow()])

    def _flush(self):
        tiles, first = self._tiles, self._first
        if self._buffered:
            self._events.inc(self._buffered)
        self._tiles, self._first, self._buffered = {}, {}, 0
        self._contributions.inc(len(tiles))
        for key, tile in tiles.items():
            yield key, tile, first[key]


def to_partials(tile: dict, block_ms: int) -> tuple[dict, dict]:
    """A tile {bucket: slot} -> (buckets, blocks): the state's two levels (partials.window_cell)."""
    blocks: dict = {}
    for bucket, slot in tile.items():
        start = block_start(bucket, block_ms)
        mine = blocks.get(start)
        if mine is None:
            blocks[start] = copy_slot(slot)
        else:
            merge_slot(mine, slot)
    return dict(tile), blocks


def merge_partials(into: tuple[dict, dict], other: tuple[dict, dict]) -> tuple[dict, dict]:
    merge_buckets(into[0], other[0])
    merge_buckets(into[1], other[1])
    return into


class _MergePartials(beam.CombineFn):
    """A key's state: (buckets, blocks); partials added to it are merged slot by slot."""

    def create_accumulator(self) -> tuple[dict, dict]:
        return {}, {}

    def add_input(self, acc, partials):
        return merge_partials(acc, partials)

    def merge_accumulators(self, accumulators):
        out = ({}, {})
        for acc in accumulators:
            merge_partials(out, acc)
        return out

    def extract_output(self, acc):
        return acc


class KeyTiles:
    """The per-key logic of `_EmitCells`, free of Beam state so it can be called directly.

    `admit` takes a tile and returns the partials to add to the state and the cells to re-emit
    now; `fire` takes a timer firing and returns the cells due, the partials to keep and the
    next timer. Both return the new _KeyState (None: the key has nothing left).
    """

    def __init__(self, spec: _KeySpec, lateness_ms: int, counting: bool, block_ms: int):
        self.spec = spec
        self.lateness_ms = lateness_ms
        self.counting = counting  # this key counts events_dropped_too_late (see module doc)
        self.block_ms = block_ms
        self.windows = spec.max_size_ms // spec.period_ms

    def new_state(self, floor: int | None) -> _KeyState:
        """A key with no state: every W the floor shows closed counts as emitted and closed."""
        if floor is None:
            return _KeyState(NEVER, NEVER, None, {})
        done = floor_to(floor - self.lateness_ms, self.spec.period_ms)
        return _KeyState(done, done, None, {})

    def closed_through(self, state: _KeyState, floor: int | None) -> int:
        """Every W at or before this is closed. A W not emitted yet is never closed: its
        on-time emission is still to come and will include what is admitted now."""
        if floor is None:
            return state.closed
        by_floor = floor_to(floor - self.lateness_ms, self.spec.period_ms)
        return max(state.closed, min(by_floor, state.emitted))

    def admit(self, tile: dict, read_partials, state: _KeyState, floor: int | None, fresh: bool):
        """-> (partials to add or None, cells to emit now, state, updates dropped, events
        dropped). `read_partials()` gives the key's state, read only for late re-emissions;
        `fresh`: the key had no state."""
        period, size = self.spec.period_ms, self.spec.max_size_ms
        closed = self.closed_through(state, floor)
        admitted, updates_dropped, events_dropped = {}, 0, 0
        for bucket, slot in tile.items():
            closed_windows = min(self.windows, max(0, (closed - bucket) // period))
            updates_dropped += slot[0] * closed_windows
            if closed_windows == self.windows:
                if self.counting:
                    events_dropped += slot[0]
                continue
            admitted[bucket] = slot
        if not admitted:
            return None, [], state, updates_dropped, events_dropped
        partials = to_partials(admitted, self.block_ms)
        emitted, panes = state.emitted, state.panes
        if fresh and emitted < min(admitted):
            emitted = min(admitted)  # nothing before the first bucket can have a cell
        late = set()
        for bucket in admitted:
            late.update(
                range(
                    max(bucket + period, closed + period), min(bucket + size, emitted) + 1, period
                )
            )
        cells = []
        if late:
            buckets, blocks = merge_partials(merge_partials(({}, {}), read_partials()), partials)
            panes = dict(panes)
            for w in sorted(late):
                values = window_cell(self.spec, buckets, w, blocks, self.block_ms)
                if values is not None:
                    index = panes.get(w, 0)
                    panes[w] = index + 1
                    cells.append((w, values, PaneInfoTiming.LATE, index))
        wake = state.wake
        due = emitted + period
        if due <= max(admitted) + size and (wake is None or due < wake):
            wake = due
        new_state = _KeyState(emitted, state.closed, wake, panes)
        return partials, cells, new_state, updates_dropped, events_dropped

    def fire(self, t: int, partials: tuple[dict, dict], state: _KeyState):
        """Timer at t -> (cells due, partials to keep or None if unchanged, state or None)."""
        period, size, lateness = self.spec.period_ms, self.spec.max_size_ms, self.lateness_ms
        buckets, blocks = partials
        if not buckets:
            return [], ({}, {}), None
        last_w = max(buckets) + size
        emitted, panes = state.emitted, dict(state.panes)
        cells = []
        through = min(floor_to(t, period), last_w)
        for w in range(emitted + period, through + 1, period):
            values = window_cell(self.spec, buckets, w, blocks, self.block_ms)
            if values is not None:
                index = panes.get(w, 0)
                panes[w] = index + 1
                cells.append((w, values, PaneInfoTiming.ON_TIME, index))
        emitted = max(emitted, floor_to(t, period))
        closed = max(state.closed, min(floor_to(t - lateness, period), emitted))
        kept = None
        if closed > state.closed:
            panes = {w: n for w, n in panes.items() if w > closed}
            kept_buckets = {b: s for b, s in buckets.items() if b + size > closed}
            if not kept_buckets:
                return cells, ({}, {}), None
            if len(kept_buckets) < len(buckets):
                # A block goes with its last bucket; one that lost older buckets is never
                # read whole again (its start is outside every open window).
                last_in_block = self.block_ms - period + size
                kept = (
                    kept_buckets,
                    {k: v for k, v in blocks.items() if k + last_in_block > closed},
                )
        remaining = buckets if kept is None else kept[0]
        wakes = []
        if emitted + period <= max(remaining) + size:
            wakes.append(emitted + period)
        if closed < emitted:
            wakes.append(closed + period + lateness)
        wake = min(wakes) if wakes else None
        return cells, kept, _KeyState(emitted, closed, wake, panes)


_PARTIALS = userstate.CombiningValueStateSpec("partials", PickleCoder(), _MergePartials())
_STATE = userstate.ReadModifyWriteStateSpec("state", PickleCoder())
_WAKE = userstate.TimerSpec("wake", TimeDomain.WATERMARK)
_PARTIALS_PARAM = beam.DoFn.StateParam(_PARTIALS)
_STATE_PARAM = beam.DoFn.StateParam(_STATE)
_WAKE_PARAM = beam.DoFn.TimerParam(_WAKE)


class _EmitCells(beam.DoFn):
    """Keyed tiles -> Cells: per key, the recent buckets and one event-time timer (module doc)."""

    def __init__(self, fs: FeatureSet, allowed_lateness_s: int):
        self.fs = fs
        self.lateness_ms = allowed_lateness_s * 1000
        self.uid = uuid.uuid4().hex

    def setup(self) -> None:
        specs = key_specs(self.fs)
        counting = next(s.key_name for s in specs if s.max_size_ms == self.fs.max_window_ms)
        block_ms = block_periods(self.fs) * self.fs.period_ms
        self._keys = {
            s.key_name: KeyTiles(s, self.lateness_ms, s.key_name == counting, block_ms)
            for s in specs
        }
        self._updates_dropped = Metrics.counter(NAMESPACE, "late_updates_dropped")
        self._events_dropped = Metrics.counter(NAMESPACE, "events_dropped_too_late")
        self._on_time = Metrics.counter(NAMESPACE, "cells_on_time")
        self._late = Metrics.counter(NAMESPACE, "cells_late")

    def process(
        self,
        element: tuple,
        partials_state=_PARTIALS_PARAM,
        key_state=_STATE_PARAM,
        wake=_WAKE_PARAM,
    ) -> Iterator[Cell]:
        (key_name, key_value), tile = element
        logic = self._keys[key_name]
        floor = _WATERMARK_FLOOR.get(self.uid)
        state = key_state.read()
        fresh = state is None
        if fresh:
            state = logic.new_state(floor)
        admitted, cells, new_state, updates, events = logic.admit(
            tile, partials_state.read, state, floor, fresh
        )
        if updates:
            self._updates_dropped.inc(updates)
        if events:
            self._events_dropped.inc(events)
        if admitted is None:
            return
        partials_state.add(admitted)
        if new_state.wake is not None and new_state.wake != state.wake:
            wake.set(Timestamp(micros=new_state.wake * 1000))
        key_state.write(new_state)
        yield from _cells(key_name, key_value, cells, self._late)

    @userstate.on_timer(_WAKE)
    def on_wake(
        self,
        key=beam.DoFn.KeyParam,
        fired=beam.DoFn.TimestampParam,
        partials_state=_PARTIALS_PARAM,
        key_state=_STATE_PARAM,
        wake=_WAKE_PARAM,
    ) -> Iterator[Cell]:
        key_name, key_value = key
        t = fired.micros // 1000
        if t > _WATERMARK_FLOOR.get(self.uid, NEVER):
            _WATERMARK_FLOOR[self.uid] = t
        state = key_state.read()
        if state is None:
            return
        cells, kept, new_state = self._keys[key_name].fire(t, partials_state.read(), state)
        if new_state is None:
            partials_state.clear()
            key_state.clear()
        else:
            if kept is not None:
                partials_state.clear()
                partials_state.add(kept)
            if new_state.wake is not None:
                wake.set(Timestamp(micros=new_state.wake * 1000))
            key_state.write(new_state)
        yield from _cells(key_name, key_value, cells, self._on_time)


def _cells(key_name: str, key_value: str, cells: list, counter) -> Iterator[Cell]:
    if cells:
        counter.inc(len(cells))
    for w, values, timing, index in cells:
        yield Cell(CellKey(key_name, key_value, w), values, timing, index)


class TiledAggregates(beam.PTransform):
    """Typed events (streaming) -> Cells: the shared aggregates of every (entity, W), as the
    watermark passes W, re-emitted for updates within the allowed lateness (module doc)."""

    def __init__(self, fs: FeatureSet, allowed_lateness_s: int = 0):
        super().__init__()
        if allowed_lateness_s < 0:
            raise ValueError("allowed lateness must be >= 0")
        self.fs = fs
        self.allowed_lateness_s = allowed_lateness_s

    def expand(self, events):
        return (
            events
            | "ToTiles"
            >> beam.ParDo(_ToTiles(self.fs)).with_output_types(tuple[tuple[str, str], dict])
            | "EmitCells" >> beam.ParDo(_EmitCells(self.fs, self.allowed_lateness_s))
        )
