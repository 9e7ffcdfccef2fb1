"""The windowed aggregate PTransform, shared by batch backfill and streaming, and the as-of join.

How it works, and why it is fast in batch and exact in streaming:

Every aggregate of one entity key shares the period P, so window ends W lie on one grid. An
event at t falls in the P-wide bucket b = floor(t / P) * P, and a bucket feeds the windows
ending at W = b + P, ..., b + S. Window ends are grouped into *blocks* of B (a multiple of P);
each event is sent, keyed by (key name, key value, block end), to the one or two blocks whose
windows need its bucket, timestamped just before the block end and placed in the fixed window
[block end - B, block end). A CombineFn keeps, per key and block, the per-bucket partial sums;
its output computes every aggregate for every window end W of the block.

- Streaming uses B = P: each block holds exactly one window end W, so a pane fires when the
  watermark passes W (fresh cells), and late events within the allowed lateness re-fire it with
  the accumulated value.
- Batch uses B = one day: each event goes to ~1 block instead of S/P windows, and the per-key
  windowing work stays linear (event-time SlidingWindows + CombinePerKey is quadratic in windows
  per key on the local runner). The values are the same; tests check both against brute force.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window

from transforms.featureset import FeatureSet, WindowedAggregate, as_of_window_end

NAMESPACE = "skewless"
BATCH_BLOCK_S = 86_400


class CellKey(NamedTuple):
    key_name: str
    key_value: str
    window_end_ms: int


class AggregateBlock(NamedTuple):
    """The aggregates of one entity for every non-empty window end W in one block."""

    key_name: str
    key_value: str
    block_end_ms: int
    cells: dict  # W (epoch ms) -> {aggregate name: value}


def row_key(key_name: str, key_value: Any, window_end_ms: int) -> str:
    """Bigtable row key of the contract: `{key name}#{key value}#{W zero-padded epoch ms}`."""
    return f"{key_name}#{key_value}#{window_end_ms:013d}"


def parse_row_key(key: str | bytes) -> CellKey:
    if isinstance(key, bytes):
        key = key.decode("utf-8")
    name, rest = key.split("#", 1)
    value, _, end = rest.rpartition("#")
    return CellKey(name, value, int(end))


@dataclass(frozen=True)
class _KeyPlan:
    """For one entity key: which value fields its aggregates read, and the largest window."""

    key_name: str
    aggregates: tuple[WindowedAggregate, ...]
    value_fields: tuple[str, ...]
    max_size_ms: int
    period_ms: int


def _key_plans(fs: FeatureSet) -> tuple[_KeyPlan, ...]:
    plans = []
    for key in fs.aggregate_keys:
        aggs = fs.aggregates_for(key)
        fields = tuple(dict.fromkeys(a.value for a in aggs if a.value is not None))
        plans.append(
            _KeyPlan(key, aggs, fields, max(a.size_ms for a in aggs), aggs[0].period_ms)
        )
    return tuple(plans)


def entity_value(value: Any) -> str | None:
    """Entity keys are compared and stored as text (they end up in Bigtable row keys)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _ToBlockContributions(beam.DoFn):
    """Event -> ((key name, key value, block end), (bucket, values)) for each block it feeds."""

    def __init__(self, fs: FeatureSet, block_ms: int):
        self.fs = fs
        self.block_ms = block_ms

    def setup(self) -> None:
        self._plans = _key_plans(self.fs)
        self._null_keys = Metrics.counter(NAMESPACE, "aggregate_events_without_key")

    def process(self, event: dict) -> Iterator:
        t = event[self.fs.event_time]
        block = self.block_ms
        for plan in self._plans:
            key_value = entity_value(event.get(plan.key_name))
            if key_value is None:
                self._null_keys.inc()
                continue
            period = plan.period_ms
            bucket = (t // period) * period
            values = tuple(event.get(f) for f in plan.value_fields)
            # This bucket feeds windows ending in [bucket + P, bucket + S]: those blocks.
            first_block = -(-(bucket + period) // block) * block
            last_block = -(-(bucket + plan.max_size_ms) // block) * block
            for block_end in range(first_block, last_block + 1, block):
                yield window.TimestampedValue(
                    ((plan.key_name, key_value, block_end), (bucket, values)),
                    (block_end - 1) / 1000.0,
                )


class BucketAccumulatorFn(beam.CombineFn):
    """Per (key, block): bucket start -> [count, then (n, sum, min, max) per value field]."""

    def create_accumulator(self) -> dict:
        return {}

    def add_input(self, acc: dict, element: tuple) -> dict:
        bucket, values = element
        slot = acc.get(bucket)
        if slot is None:
            slot = acc[bucket] = [0] + [0, 0.0, None, None] * len(values)
        slot[0] += 1
        i = 1
        for v in values:
            if v is not None:
                slot[i] += 1
                slot[i + 1] += v
                if slot[i + 2] is None or v < slot[i + 2]:
                    slot[i + 2] = v
                if slot[i + 3] is None or v > slot[i + 3]:
                    slot[i + 3] = v
            i += 4
        return acc

    def merge_accumulators(self, accumulators: Iterable[dict]) -> dict:
        accumulators = iter(accumulators)
        out = next(accumulators)
        for acc in accumulators:
            for bucket, slot in acc.items():
                mine = out.get(bucket)
                if mine is None:
                    out[bucket] = list(slot)
                    continue
                mine[0] += slot[0]
                for i in range(1, len(slot), 4):
                    mine[i] += slot[i]
                    mine[i + 1] += slot[i + 1]
                    if slot[i + 2] is not None and (mine[i + 2] is None or slot[i + 2] < mine[i + 2]):
                        mine[i + 2] = slot[i + 2]
                    if slot[i + 3] is not None and (mine[i + 3] is None or slot[i + 3] > mine[i + 3]):
                        mine[i + 3] = slot[i + 3]
        return out

    def extract_output(self, acc: dict) -> dict:
        return acc


def aggregate_value(agg: WindowedAggregate, slots: list[list], field_index: int) -> float:
    """One aggregate over the bucket slots of one window; the declared default if empty."""
    if agg.combiner == "count":
        return sum(s[0] for s in slots)
    i = 1 + 4 * field_index
    n = sum(s[i] for s in slots)
    if n == 0:
        return agg.default
    if agg.combiner == "sum":
        return float(sum(s[i + 1] for s in slots))
    if agg.combiner == "mean":
        return float(sum(s[i + 1] for s in slots)) / n
    if agg.combiner == "min":
        return float(min(s[i + 2] for s in slots if s[i + 2] is not None))
    return float(max(s[i + 3] for s in slots if s[i + 3] is not None))


def cells_of_block(plan: _KeyPlan, block_end: int, block_ms: int, buckets: dict) -> dict:
    """{W: {aggregate: value}} for every W of the block whose largest window is non-empty."""
    period = plan.period_ms
    field_index = {f: i for i, f in enumerate(plan.value_fields)}
    cells = {}
    for w in range(block_end - block_ms + period, block_end + 1, period):
        if not any(b in buckets for b in range(w - plan.max_size_ms, w, period)):
            continue
        values = {}
        for agg in plan.aggregates:
            slots = [buckets[b] for b in range(w - agg.size_ms, w, period) if b in buckets]
            values[agg.name] = aggregate_value(agg, slots, field_index.get(agg.value, 0))
        cells[w] = values
    return cells


class _ToBlocks(beam.DoFn):
    def __init__(self, fs: FeatureSet, block_ms: int):
        self.fs = fs
        self.block_ms = block_ms

    def setup(self) -> None:
        self._plans = {p.key_name: p for p in _key_plans(self.fs)}
        self._cells = Metrics.counter(NAMESPACE, "aggregate_cells")

    def process(self, element: tuple) -> Iterator[AggregateBlock]:
        (key_name, key_value, block_end), buckets = element
        cells = cells_of_block(self._plans[key_name], block_end, self.block_ms, buckets)
        if cells:
            self._cells.inc(len(cells))
            yield AggregateBlock(key_name, key_value, block_end, cells)


class ComputeAggregates(beam.PTransform):
    """Typed events -> AggregateBlock per (entity key, key value, block end).

    The same transform serves batch and streaming; `block_s` only trades element count
    against latency (see the module docstring). In streaming, each pane fires when the
    watermark passes the block end, late events re-fire it with accumulated values until
    `allowed_lateness_s`, and events later than that are dropped by the window.
    """

    def __init__(
        self,
        fs: FeatureSet,
        *,
        block_s: int | None = None,
        streaming: bool = False,
        allowed_lateness_s: int = 0,
    ):
        super().__init__()
        if not fs.aggregates:
            raise ValueError(f"feature set {fs.name!r} declares no aggregates")
        period_s = fs.aggregates[0].period_s
        if block_s is None:
            block_s = period_s if streaming else max(period_s, (BATCH_BLOCK_S // period_s) * period_s)
        if block_s % period_s:
            raise ValueError(f"block size {block_s}s must be a multiple of the period {period_s}s")
        self.fs = fs
        self.block_ms = block_s * 1000
        self.streaming = streaming
        self.allowed_lateness_s = allowed_lateness_s

    def expand(self, events):
        if self.streaming:
            windowing = beam.WindowInto(
                window.FixedWindows(self.block_ms / 1000.0),
                trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
                allowed_lateness=self.allowed_lateness_s,
            )
        else:
            windowing = beam.WindowInto(window.FixedWindows(self.block_ms / 1000.0))
        return (
            events
            | "ToBlockContributions" >> beam.ParDo(_ToBlockContributions(self.fs, self.block_ms))
            | "WindowByBlock" >> windowing
            | "CombineBuckets" >> beam.CombinePerKey(BucketAccumulatorFn())
            | "ToCells" >> beam.ParDo(_ToBlocks(self.fs, self.block_ms))
        )


def explode_cells(block: AggregateBlock) -> Iterator[tuple[CellKey, dict]]:
    """AggregateBlock -> (CellKey, {aggregate: value}) per window end: the Bigtable cells."""
    for w, values in sorted(block.cells.items()):
        yield CellKey(block.key_name, block.key_value, w), values


def attach_aggregates(fs: FeatureSet, event: dict, lookup) -> dict:
    """Copy `event` with every aggregate as of its event time, by the as-of rule.

    `lookup(CellKey) -> {aggregate: value} | None` is the store: the batch join's dict or the
    Bigtable read of streaming scoring. A missing cell is an empty window (declared defaults).
    """
    w = as_of_window_end(event[fs.event_time], fs.period_ms, fs.serving_delay_ms)
    out = dict(event)
    for key_name in fs.aggregate_keys:
        key_value = entity_value(event.get(key_name))
        cell = lookup(CellKey(key_name, key_value, w)) if key_value is not None else None
        for agg in fs.aggregates_for(key_name):
            if cell is not None and agg.name in cell:
                out[agg.name] = cell[agg.name]
            else:
                out[agg.name] = 0 if agg.combiner == "count" else agg.default
    return out


class _JoinBlock(beam.DoFn):
    def __init__(self, fs: FeatureSet):
        self.fs = fs

    def setup(self) -> None:
        self._examples = Metrics.counter(NAMESPACE, "examples_joined")

    def process(self, element: tuple) -> Iterator[dict]:
        _, grouped = element
        cells = {}
        for block in grouped["aggregates"]:
            for w, values in block.cells.items():
                cells[(block.key_name, block.key_value, w)] = values
        n = 0
        for event in grouped["examples"]:
            n += 1
            yield attach_aggregates(self.fs, event, cells.get)
        self._examples.inc(n)


class AsOfJoin(beam.PTransform):
    """Batch point-in-time join: each example gets the aggregates of its window end W.

    Examples and aggregate blocks meet by block end, so one group holds a day of examples
    and the cells they can need; no example ever sees a window ending after W <= t - D.
    """

    def __init__(self, fs: FeatureSet, *, block_s: int | None = None):
        super().__init__()
        period_s = fs.aggregates[0].period_s
        self.fs = fs
        block_s = block_s or max(period_s, (BATCH_BLOCK_S // period_s) * period_s)
        self.block_ms = block_s * 1000

    def expand(self, inputs):
        examples, blocks = inputs
        fs, block_ms = self.fs, self.block_ms

        def example_block(event: dict) -> tuple[int, dict]:
            w = as_of_window_end(event[fs.event_time], fs.period_ms, fs.serving_delay_ms)
            return -(-w // block_ms) * block_ms, event

        keyed_examples = examples | "KeyExamplesByBlock" >> beam.Map(example_block)
        keyed_blocks = (
            blocks
            | "GlobalWindow" >> beam.WindowInto(window.GlobalWindows())
            | "KeyAggregatesByBlock" >> beam.Map(lambda b: (b.block_end_ms, b))
        )
        return (
            {"examples": keyed_examples, "aggregates": keyed_blocks}
            | "GroupByBlock" >> beam.CoGroupByKey()
            | "Attach" >> beam.ParDo(_JoinBlock(fs))
        )
