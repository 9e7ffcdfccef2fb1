"""The windowed aggregate PTransform, shared by batch backfill and streaming, and the as-of join.

How it works, and why it is fast in batch and exact in streaming:

Every aggregate of one entity key shares the period P, so window ends W lie on one grid. An
event at t falls in the P-wide bucket b = floor(t / P) * P, and a bucket feeds the windows
ending at W = b + P, ..., b + S. Window ends are grouped into *blocks* of B (a multiple of P);
each event is sent, keyed by (key name, key value, block end), to the one or two blocks whose
windows need its bucket. A CombineFn keeps, per key and block, the per-bucket partial sums; an
AggregateBlock then computes the aggregates of any window end W of the block from them.

- Streaming uses B = P: each contribution is stamped just before its block end and placed in
  the fixed window [W - P, W), so each pane is exactly one window end W and fires when the
  watermark passes W (fresh cells); late events within the allowed lateness re-fire it with the
  accumulated value, later ones are dropped and counted by the lateness gate (lateness.py).
- Batch uses B = one day and the global window (the block end is in the key): each event goes
  to about one block instead of S/P windows, and the work stays linear (event-time
  SlidingWindows + CombinePerKey is quadratic in windows per key on the local runner).
The DoFns and the CombineFn are the same in both; the tests check both block sizes against a
brute force over real flights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from transforms.example_schema import example_fields_record_batch, with_aggregate_columns
from transforms.featureset import FeatureSet, as_of_window_end
from transforms.lateness import DEFAULT_GRACE_S, LatenessGate

NAMESPACE = "skewless"
BATCH_BLOCK_S = 86_400


class CellKey(NamedTuple):
    key_name: str
    key_value: str
    window_end_ms: int


class AggregateBlock:
    """One entity's per-bucket partial aggregates for the window ends W of one block.

    `cell(W)` computes the aggregates of one window end on demand (the batch join needs only
    the W its examples ask for); `cells` computes every non-empty W of the block (the Bigtable
    cells of the streaming job and the backfill of the parity tests).
    """

    __slots__ = ("key_name", "key_value", "block_end_ms", "block_ms", "buckets", "spec", "_memo")

    def __init__(self, key_name, key_value, block_end_ms, block_ms, buckets, spec):
        self.key_name = key_name
        self.key_value = key_value
        self.block_end_ms = block_end_ms
        self.block_ms = block_ms
        self.buckets = buckets  # bucket start (ms) -> slot, see BucketAccumulatorFn
        self.spec = spec  # _KeySpec of the entity key
        self._memo = {}

    def __reduce__(self):
        return (
            AggregateBlock,
            (
                self.key_name,
                self.key_value,
                self.block_end_ms,
                self.block_ms,
                self.buckets,
                self.spec,
            ),
        )

    def __repr__(self) -> str:
        return (
            f"AggregateBlock({self.key_name}={self.key_value!r}, block_end={self.block_end_ms}, "
            f"{len(self.buckets)} buckets)"
        )

    def window_ends(self) -> range:
        period = self.spec.period_ms
        return range(self.block_end_ms - self.block_ms + period, self.block_end_ms + 1, period)

    def cell(self, w: int) -> dict | None:
        """{aggregate: value} for the window ending at w, or None if its largest window is empty."""
        memo = self._memo
        if w in memo:
            return memo[w]
        out = memo[w] = _cell(self.spec, self.buckets, w)
        return out

    @property
    def cells(self) -> dict:
        """{W: {aggregate: value}} for every W of the block whose largest window is non-empty."""
        out = {}
        for w in self.window_ends():
            values = self.cell(w)
            if values is not None:
                out[w] = values
        return out


def row_key(key_name: str, key_value: Any, window_end_ms: int) -> str:
    """Bigtable row key of the contract: `{key name}#{key value}#{W zero-padded epoch ms}`."""
    return f"{key_name}#{key_value}#{window_end_ms:013d}"


def parse_row_key(key: str | bytes) -> CellKey:
    if isinstance(key, bytes):
        key = key.decode("utf-8")
    name, rest = key.split("#", 1)
    value, _, end = rest.rpartition("#")
    return CellKey(name, value, int(end))


class _AggSpec(NamedTuple):
    name: str
    combiner: str
    size_ms: int
    field_index: int  # which value field of the slot (see BucketAccumulatorFn)
    default: float


class _KeySpec(NamedTuple):
    """For one entity key: the value fields its aggregates read, the period, the largest window."""

    key_name: str
    value_fields: tuple[str, ...]
    period_ms: int
    max_size_ms: int
    aggregates: tuple[_AggSpec, ...]
    # ends_at[k]: indexes of the aggregates whose window is k + 1 periods long.
    ends_at: tuple[tuple[int, ...], ...]


def key_specs(fs: FeatureSet) -> tuple[_KeySpec, ...]:
    specs = []
    for key in fs.aggregate_keys:
        aggs = fs.aggregates_for(key)
        fields = tuple(dict.fromkeys(a.value for a in aggs if a.value is not None))
        agg_specs = tuple(
            _AggSpec(
                a.name,
                a.combiner,
                a.size_ms,
                fields.index(a.value) if a.value is not None else 0,
                0 if a.combiner == "count" else a.default,
            )
            for a in aggs
        )
        period, max_size = aggs[0].period_ms, max(a.size_ms for a in aggs)
        ends_at = tuple(
            tuple(i for i, a in enumerate(agg_specs) if a.size_ms == (k + 1) * period)
            for k in range(max_size // period)
        )
        specs.append(_KeySpec(key, fields, period, max_size, agg_specs, ends_at))
    return tuple(specs)


def entity_value(value: Any) -> str | None:
    """Entity keys are compared and stored as text (they end up in Bigtable row keys)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _ToBlockContributions(beam.DoFn):
    """Event -> ((key name, key value, block end), (bucket, values)) for each block it feeds.

    In streaming the element is stamped just before its block end, so that the fixed window
    [block end - B, block end) fires when the watermark passes the block's last window end.
    """

    def __init__(self, fs: FeatureSet, block_ms: int, timestamped: bool):
        self.fs = fs
        self.block_ms = block_ms
        self.timestamped = timestamped

    def setup(self) -> None:
        self._specs = key_specs(self.fs)
        self._null_keys = Metrics.counter(NAMESPACE, "aggregate_events_without_key")

    def process(self, event: dict) -> Iterator:
        t = event[self.fs.event_time]
        block = self.block_ms
        for spec in self._specs:
            key_value = entity_value(event.get(spec.key_name))
            if key_value is None:
                self._null_keys.inc()
                continue
            period = spec.period_ms
            bucket = (t // period) * period
            values = tuple(event.get(f) for f in spec.value_fields)
            # This bucket feeds windows ending in [bucket + P, bucket + S]: those blocks.
            first_block = -(-(bucket + period) // block) * block
            last_block = -(-(bucket + spec.max_size_ms) // block) * block
            for block_end in range(first_block, last_block + 1, block):
                element = ((spec.key_name, key_value, block_end), (bucket, values))
                if self.timestamped:
                    yield window.TimestampedValue(element, (block_end - 1) / 1000.0)
                else:
                    yield element


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
                    if slot[i + 2] is not None and (
                        mine[i + 2] is None or slot[i + 2] < mine[i + 2]
                    ):
                        mine[i + 2] = slot[i + 2]
                    if slot[i + 3] is not None and (
                        mine[i + 3] is None or slot[i + 3] > mine[i + 3]
                    ):
                        mine[i + 3] = slot[i + 3]
        return out

    def extract_output(self, acc: dict) -> dict:
        return acc


def _cell(spec: _KeySpec, buckets: dict, w: int) -> dict | None:
    """The aggregates of the window ending at w from per-bucket slots; None if all empty.

    One pass over the buckets of the largest window, newest first: every smaller window is a
    prefix, so its aggregate is read off the running totals when the pass reaches its size.
    The additions happen in the same order whatever the block size, so batch and streaming
    compute bit-identical values.
    """
    period = spec.period_ms
    get = buckets.get
    nfields = len(spec.value_fields)
    count = 0
    n = [0] * nfields
    total = [0] * nfields
    lo = [None] * nfields
    hi = [None] * nfields
    found = False
    results = [None] * len(spec.aggregates)
    bucket = w - period
    for ending in spec.ends_at:
        slot = get(bucket)
        if slot is not None:
            found = True
            count += slot[0]
            for f in range(nfields):
                i = 1 + 4 * f
                if slot[i]:
                    n[f] += slot[i]
                    total[f] += slot[i + 1]
                    if lo[f] is None or slot[i + 2] < lo[f]:
                        lo[f] = slot[i + 2]
                    if hi[f] is None or slot[i + 3] > hi[f]:
                        hi[f] = slot[i + 3]
        for index in ending:
            agg = spec.aggregates[index]
            f = agg.field_index
            if agg.combiner == "count":
                results[index] = count
            elif n[f] == 0:
                results[index] = agg.default
            elif agg.combiner == "mean":
                results[index] = float(total[f]) / n[f]
            elif agg.combiner == "sum":
                results[index] = float(total[f])
            elif agg.combiner == "min":
                results[index] = float(lo[f])
            else:
                results[index] = float(hi[f])
        bucket -= period
    if not found:
        return None
    return {agg.name: value for agg, value in zip(spec.aggregates, results, strict=True)}


class _ToBlocks(beam.DoFn):
    def __init__(self, fs: FeatureSet, block_ms: int):
        self.fs = fs
        self.block_ms = block_ms

    def setup(self) -> None:
        self._specs = {spec.key_name: spec for spec in key_specs(self.fs)}
        self._blocks = Metrics.counter(NAMESPACE, "aggregate_blocks")

    def process(self, element: tuple) -> Iterator[AggregateBlock]:
        (key_name, key_value, block_end), buckets = element
        self._blocks.inc()
        yield AggregateBlock(
            key_name, key_value, block_end, self.block_ms, buckets, self._specs[key_name]
        )


class ComputeAggregates(beam.PTransform):
    """Typed events -> AggregateBlock per (entity key, key value, block end).

    The same transform serves batch and streaming; `block_s` only trades element count
    against latency (see the module docstring). In streaming, each pane fires when the
    watermark passes the block end, late events re-fire it with accumulated values until
    `allowed_lateness_s`, and updates later than that are dropped and counted by the
    lateness gate (transforms/lateness.py).
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
            block_s = (
                period_s if streaming else max(period_s, (BATCH_BLOCK_S // period_s) * period_s)
            )
        if block_s % period_s:
            raise ValueError(f"block size {block_s}s must be a multiple of the period {period_s}s")
        self.fs = fs
        self.block_ms = block_s * 1000
        self.streaming = streaming
        self.allowed_lateness_s = allowed_lateness_s

    def expand(self, events):
        contributions = events | "ToBlockContributions" >> beam.ParDo(
            _ToBlockContributions(self.fs, self.block_ms, timestamped=self.streaming)
        )
        if self.streaming:
            contributions = self._streaming_windows(contributions)
        # In batch the block end is in the key and every element is in the global window:
        # grouping by key alone is exact, and the per-element window bookkeeping is skipped.
        return (
            contributions
            | "CombineBuckets" >> beam.CombinePerKey(BucketAccumulatorFn())
            | "ToBlocks" >> beam.ParDo(_ToBlocks(self.fs, self.block_ms))
        )

    def _streaming_windows(self, contributions):
        """Gate out (and count) updates later than the allowed lateness, then window by block.

        The combine's windows allow L + the gate's grace: the gate alone decides what is too
        late (see transforms/lateness.py), so the combine must never drop what it admitted.
        """
        return (
            contributions
            | "LatenessGate"
            >> LatenessGate(self.fs, self.block_ms, self.allowed_lateness_s, DEFAULT_GRACE_S)
            | "WindowByBlock"
            >> beam.WindowInto(
                window.FixedWindows(self.block_ms / 1000.0),
                trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
                allowed_lateness=self.allowed_lateness_s + DEFAULT_GRACE_S,
            )
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
    for spec in key_specs(fs):
        key_value = entity_value(event.get(spec.key_name))
        cell = lookup(CellKey(spec.key_name, key_value, w)) if key_value is not None else None
        for agg in spec.aggregates:
            out[agg.name] = agg.default if cell is None or agg.name not in cell else cell[agg.name]
    return out


class _ExamplesToBlockBatches(beam.DoFn):
    """Example dicts -> (block end, RecordBatch of example fields), buffered per bundle.

    Columnar batches cross the shuffle far cheaper than one pickled dict per example.
    """

    def __init__(self, fs: FeatureSet, block_ms: int, max_buffered: int = 50_000):
        self.fs = fs
        self.block_ms = block_ms
        self.max_buffered = max_buffered

    def start_bundle(self) -> None:
        self._buffer: dict[int, list[dict]] = {}
        self._buffered = 0

    def process(self, event: dict) -> Iterator:
        fs = self.fs
        w = as_of_window_end(event[fs.event_time], fs.period_ms, fs.serving_delay_ms)
        block_end = -(-w // self.block_ms) * self.block_ms
        self._buffer.setdefault(block_end, []).append(event)
        self._buffered += 1
        if self._buffered >= self.max_buffered:
            yield from self._flush()

    def finish_bundle(self) -> Iterator:
        for key_and_batch in self._flush():
            yield WindowedValue(key_and_batch, MIN_TIMESTAMP, [window.GlobalWindow()])

    def _flush(self) -> Iterator[tuple[int, object]]:
        buffer, self._buffer, self._buffered = self._buffer, {}, 0
        for block_end, rows in buffer.items():
            yield block_end, example_fields_record_batch(self.fs, rows)


class _JoinBlock(beam.DoFn):
    """One block: its examples (RecordBatches) + every entity's AggregateBlock -> a flat batch."""

    def __init__(self, fs: FeatureSet):
        self.fs = fs

    def setup(self) -> None:
        self._examples = Metrics.counter(NAMESPACE, "examples_joined")
        self._specs = key_specs(self.fs)

    def process(self, element: tuple) -> Iterator:
        _, grouped = element
        batches = [b for b in grouped["examples"] if b.num_rows]
        if not batches:
            return
        fs = self.fs
        table = pa.Table.from_batches(batches)
        blocks = {(b.key_name, b.key_value): b for b in grouped["aggregates"]}
        times = table.column(fs.event_time).cast(pa.int64()).to_numpy()
        window_ends = (
            (times - fs.serving_delay_ms) // fs.period_ms * fs.period_ms
        ).tolist()  # the as-of rule, vectorised: same arithmetic as as_of_window_end
        columns = {}
        for spec in self._specs:
            keys = table.column(spec.key_name).to_pylist()
            cells = []
            for key, w in zip(keys, window_ends, strict=True):
                block = blocks.get((spec.key_name, entity_value(key)))
                cells.append(block.cell(w) if block is not None else None)
            for agg in spec.aggregates:
                columns[agg.name] = [agg.default if c is None else c[agg.name] for c in cells]
        joined = with_aggregate_columns(fs, table, columns)
        self._examples.inc(joined.num_rows)
        yield from joined.to_batches()


class AsOfJoin(beam.PTransform):
    """Batch point-in-time join: examples -> flat RecordBatches with the aggregates of W(t).

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
        keyed_examples = examples | "ExamplesByBlock" >> beam.ParDo(
            _ExamplesToBlockBatches(self.fs, self.block_ms)
        )
        keyed_blocks = (
            blocks
            | "GlobalWindow" >> beam.WindowInto(window.GlobalWindows())
            | "KeyAggregatesByBlock" >> beam.Map(lambda b: (b.block_end_ms, b))
        )
        return (
            {"examples": keyed_examples, "aggregates": keyed_blocks}
            | "GroupByBlock" >> beam.CoGroupByKey()
            | "Attach" >> beam.ParDo(_JoinBlock(self.fs))
        )
