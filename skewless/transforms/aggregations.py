"""The windowed aggregate PTransform (batch backfill and streaming) and the batch as-of join.

Every aggregate of one entity key shares the period P, so window ends W lie on one grid. An
event at t falls in the P-wide bucket b = floor(t / P) * P, which feeds the windows ending at
W = b + P, ..., b + S. Both paths keep the same per-bucket partials and compute a cell with the
same function (`partials.window_cell`, exact sums), so batch and streaming are bit-identical:

- Batch groups window ends into day *blocks*: each event is sent, keyed by (key name, key
  value, block end), to the one or two blocks whose windows need its bucket; a CombineFn keeps
  the per-bucket partials of a block and an AggregateBlock computes any W of it on demand. Each
  event is handled about once, in the global window, and the work stays linear (event-time
  SlidingWindows + CombinePerKey is quadratic in windows per key on the local runner).
- Streaming uses tiles (tiles.py): one shuffle element per event and entity key, per-key state
  of the recent buckets, a cell per W when the watermark passes it, late updates within the
  allowed lateness re-emitted, later ones dropped and counted.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton
from apache_beam.transforms import window
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from skewless.transforms.example_schema import (
    arrow_schema,
    event_arrow_schema,
    features_arrow_schema,
    with_aggregate_columns,
)
from skewless.transforms.featureset import FeatureSet, as_of_window_end
from skewless.transforms.partials import (
    NAMESPACE,
    CellKey,
    SummedBuckets,
    add_batch,
    cell_columns,
    cells_to_columns,
    copy_slot,
    entity_codes,
    entity_value,
    key_specs,
    merge_buckets,
    merge_summed,
    summed_batch,
    to_slots,
    window_cell,
    window_columns,
)
from skewless.transforms.record_checks import EVENT_BATCH_ROWS
from skewless.transforms.reference import join_reference_columns, reference_keys
from skewless.transforms.tiles import Cell, TiledAggregates

BATCH_BLOCK_S = 86_400


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
        # bucket start (ms) -> slot (BucketAccumulatorFn), or the same as SummedBuckets
        self.buckets = buckets
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
            f"{len(self.slots())} buckets)"
        )

    def window_ends(self) -> range:
        period = self.spec.period_ms
        return range(self.block_end_ms - self.block_ms + period, self.block_end_ms + 1, period)

    def cell(self, w: int) -> dict | None:
        """{aggregate: value} for the window ending at w, or None if its largest window is empty.

        (Merging the buckets in groups of about sqrt(S/P) first, as the streaming state does,
        was measured slower here: the join needs only some of a block's cells.)"""
        memo = self._memo
        if w in memo:
            return memo[w]
        out = memo[w] = window_cell(self.spec, self.slots(), w)
        return out

    def slots(self) -> dict:
        """{bucket start: slot} (converted once from SummedBuckets)."""
        if isinstance(self.buckets, SummedBuckets):
            self.buckets = to_slots(self.spec, self.buckets)
        return self.buckets

    def columns_at(self, ws: list[int]) -> dict:
        """{example column: values, one per window end of `ws`}, the declared defaults for
        empty windows: read off prefix sums where the key's aggregates allow it
        (partials.window_columns), else cell by cell."""
        fast = window_columns(self.spec, self.buckets, ws)
        if fast is not None:
            return fast
        return cells_to_columns(self.spec, [self.cell(w) for w in ws])

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


class EventBatches(beam.DoFn):
    """Typed events as RecordBatches of `event_arrow_schema`: batches (CheckRecords with
    `batches=True`, what the jobs send) pass as they are; event dicts (tests, a user's own
    source) are gathered per bundle into batches of up to `batch_rows`."""

    def __init__(self, fs: FeatureSet, batch_rows: int = EVENT_BATCH_ROWS):
        self.fs = fs
        self.batch_rows = batch_rows
        self.schema = event_arrow_schema(fs)

    def start_bundle(self) -> None:
        self._rows: list[dict] = []

    def process(self, element) -> Iterator[pa.RecordBatch]:
        if isinstance(element, pa.RecordBatch):
            if element.num_rows:
                yield element
            return
        self._rows.append(element)
        if len(self._rows) >= self.batch_rows:
            yield self._batch()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if self._rows:
            yield WindowedValue(self._batch(), MIN_TIMESTAMP, [window.GlobalWindow()])

    def _batch(self) -> pa.RecordBatch:
        rows, self._rows = self._rows, []
        return pa.RecordBatch.from_pylist(rows, schema=self.schema)


class _BlockPartials(beam.DoFn):
    """Event RecordBatches -> ((key name, key value, block end), {bucket: slot}) per bundle.

    The events of a bundle are added to per-(entity, bucket) slots here, columnar in, one
    Python step per event and key: the shuffle then carries one element per (entity, block)
    and bundle instead of one per event, key and block (a combiner lifted before the shuffle
    did that work per element, and copied every slot once more). A bucket feeds the windows ending in
    [bucket + P, bucket + S]: its slot goes to the one or two blocks holding them (a copy to
    the second, so no slot is shared). `max_buffered`: events per flush within a bundle.
    """

    def __init__(self, fs: FeatureSet, block_ms: int, max_buffered: int = 200_000):
        self.fs = fs
        self.block_ms = block_ms
        self.max_buffered = max_buffered

    def setup(self) -> None:
        self._specs = key_specs(self.fs)
        self._null_keys = Metrics.counter(NAMESPACE, "aggregate_events_without_key")

    def start_bundle(self) -> None:
        self._buckets: list[dict] = [{} for _ in self._specs]  # per spec: key -> {bucket: slot}
        self._summed: list[dict] = [{} for _ in self._specs]  # per spec: key -> [SummedBuckets]
        self._buffered = 0

    def process(self, batch: pa.RecordBatch) -> Iterator:
        times = batch.column(self.fs.event_time).cast(pa.int64()).to_numpy()
        for spec, per_key, summed in zip(self._specs, self._buckets, self._summed, strict=True):
            codes, names = entity_codes(batch.column(spec.key_name))
            columns = [batch.column(f) if f is not None else None for f in spec.value_fields]
            keyed = codes >= 0
            spec_times = times
            if not keyed.all():  # events without this entity key feed none of its aggregates
                self._null_keys.inc(int((~keyed).sum()))
                mask = pa.array(keyed)
                columns = [c.filter(mask) if c is not None else None for c in columns]
                codes, spec_times = codes[keyed], times[keyed]
            arrays = summed_batch(spec, (codes, names), spec_times, columns)
            if arrays is None:
                add_batch(spec, per_key, (codes, names), spec_times, columns)
                continue
            for key, part in arrays.items():
                summed.setdefault(key, []).append(part)
        self._buffered += batch.num_rows
        if self._buffered >= self.max_buffered:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for element in self._flush():
            yield WindowedValue(element, MIN_TIMESTAMP, [window.GlobalWindow()])

    def _flush(self) -> Iterator[tuple]:
        per_spec, self._buckets = self._buckets, [{} for _ in self._specs]
        summed_spec, self._summed = self._summed, [{} for _ in self._specs]
        self._buffered = 0
        block = self.block_ms
        for spec, per_key, summed in zip(self._specs, per_spec, summed_spec, strict=True):
            period, max_size = spec.period_ms, spec.max_size_ms
            for key, parts in summed.items():
                merged = merge_summed(parts)
                if merged is None:  # beyond exact int64 sums: as slots
                    for part in parts:
                        merge_buckets(per_key.setdefault(key, {}), to_slots(spec, part))
                    continue
                first = -(-(merged.starts + period) // block) * block
                last = -(-(merged.starts + max_size) // block) * block
                for block_end in range(int(first.min()), int(last.max()) + 1, block):
                    rows = (first <= block_end) & (block_end <= last)
                    if rows.any():
                        part = SummedBuckets(merged.starts[rows], merged.grid[rows])
                        yield (spec.key_name, key, block_end), part
            for key, slots in per_key.items():
                blocks: dict[int, dict] = {}
                for bucket, slot in slots.items():
                    first_block = -(-(bucket + period) // block) * block
                    last_block = -(-(bucket + max_size) // block) * block
                    for block_end in range(first_block, last_block + 1, block):
                        into = blocks.get(block_end)
                        if into is None:
                            into = blocks[block_end] = {}
                        into[bucket] = slot if block_end == first_block else copy_slot(slot)
                for block_end, buckets in blocks.items():
                    yield (spec.key_name, key, block_end), buckets


class BucketAccumulatorFn(beam.CombineFn):
    """Per (key, block): bucket start -> slot of per-bucket partials (partials.py). Inputs are
    {bucket: slot} dicts, merged exactly in any split and order. The batch path groups the
    per-bundle parts of _BlockPartials by key and merges them with `merge_accumulators`
    (_ToBlocks): the parts are already combined per bundle, so lifting a combiner before the
    shuffle would only copy them again."""

    def create_accumulator(self) -> dict:
        return {}

    def add_input(self, acc: dict, element: dict) -> dict:
        return merge_buckets(acc, element)

    def merge_accumulators(self, accumulators: Iterable[dict]) -> dict:
        accumulators = iter(accumulators)
        out = next(accumulators)
        for acc in accumulators:
            merge_buckets(out, acc)
        return out

    def extract_output(self, acc: dict) -> dict:
        return acc


class _ToBlocks(beam.DoFn):
    def __init__(self, fs: FeatureSet, block_ms: int):
        self.fs = fs
        self.block_ms = block_ms

    def setup(self) -> None:
        self._specs = {spec.key_name: spec for spec in key_specs(self.fs)}
        self._blocks = Metrics.counter(NAMESPACE, "aggregate_blocks")

    def process(self, element: tuple) -> Iterator[AggregateBlock]:
        (key_name, key_value, block_end), parts = element
        spec = self._specs[key_name]
        parts = list(parts)
        buckets = None
        if all(isinstance(p, SummedBuckets) for p in parts):
            buckets = merge_summed(parts)
        if buckets is None:
            # The parts come fresh off the shuffle: the first is adopted, the others merged in.
            slots = [to_slots(spec, p) if isinstance(p, SummedBuckets) else p for p in parts]
            buckets = BucketAccumulatorFn().merge_accumulators(iter(slots))
        self._blocks.inc()
        yield AggregateBlock(key_name, key_value, block_end, self.block_ms, buckets, spec)


class ComputeAggregates(beam.PTransform):
    """Typed events -> the shared windowed aggregates of every (entity key, key value, W).

    Batch (default): AggregateBlocks per (entity, block end); `block_s` (a multiple of the
    period, default one day) only trades element count against memory. Streaming
    (`streaming=True`): Cells, each emitted when the watermark passes its W and re-emitted
    for updates within `allowed_lateness_s`; later updates are dropped and counted (tiles.py).
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
        if not fs.aggregates and streaming:
            raise ValueError(f"feature set {fs.name!r} declares no aggregates to stream")
        # Without aggregates (batch): no blocks at all, and the examples' day blocks of the
        # as-of join are still whole days (fs.period_ms is then one second).
        period_s = fs.period_ms // 1000
        if block_s is None:
            block_s = max(period_s, (BATCH_BLOCK_S // period_s) * period_s)
        if block_s % period_s:
            raise ValueError(f"block size {block_s}s must be a multiple of the period {period_s}s")
        if streaming and allowed_lateness_s < 0:
            raise ValueError("allowed lateness must be >= 0")
        self.fs = fs
        self.block_ms = block_s * 1000
        self.streaming = streaming
        self.allowed_lateness_s = allowed_lateness_s

    def expand(self, events):
        if self.streaming:
            return events | "Tiles" >> TiledAggregates(self.fs, self.allowed_lateness_s)
        # The block end is in the key and every element is in the global window: grouping by
        # key alone is exact, and the per-element window bookkeeping is skipped.
        return (
            events
            | "EventBatches" >> beam.ParDo(EventBatches(self.fs))
            | "BlockPartials" >> beam.ParDo(_BlockPartials(self.fs, self.block_ms))
            | "GroupBuckets" >> beam.GroupByKey()
            | "ToBlocks" >> beam.ParDo(_ToBlocks(self.fs, self.block_ms))
        )


def explode_cells(element: AggregateBlock | Cell) -> Iterator[tuple[CellKey, dict]]:
    """AggregateBlock (batch) or Cell (streaming) -> (CellKey, {aggregate: value}) per window
    end: the Bigtable cells."""
    if isinstance(element, Cell):
        yield element.key, element.values
        return
    for w, values in sorted(element.cells.items()):
        yield CellKey(element.key_name, element.key_value, w), values


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
        out.update(cell_columns(spec, cell))
    return out


class _ExamplesToBlockBatches(beam.DoFn):
    """Event RecordBatches -> (block end, RecordBatch of the block's fields), one per block
    and bundle (or per `max_buffered` examples): each example goes to the block of its
    as-of window end, columnar."""

    def __init__(self, fs: FeatureSet, block_ms: int, max_buffered: int = 200_000):
        self.fs = fs
        self.block_ms = block_ms
        self.max_buffered = max_buffered
        self.schema = arrow_schema(block_fields(fs))

    def start_bundle(self) -> None:
        self._buffer: dict[int, list[pa.RecordBatch]] = {}
        self._buffered = 0

    def process(self, batch: pa.RecordBatch) -> Iterator:
        fs = self.fs
        times = batch.column(fs.event_time).cast(pa.int64()).to_numpy()
        # The as-of rule, vectorised: the same arithmetic as as_of_window_end.
        w = (times - fs.serving_delay_ms) // fs.period_ms * fs.period_ms
        block_ends = -(-w // self.block_ms) * self.block_ms
        fields = pa.RecordBatch.from_arrays(
            [batch.column(f.name) for f in self.schema], schema=self.schema
        )
        order = np.argsort(block_ends, kind="stable")
        ends = block_ends[order]
        starts = np.flatnonzero(np.r_[True, ends[1:] != ends[:-1]]) if len(ends) else []
        bounds = [*np.asarray(starts).tolist(), len(ends)]
        for start, stop in itertools.pairwise(bounds):
            rows = fields.take(pa.array(order[start:stop]))
            self._buffer.setdefault(int(ends[start]), []).append(rows)
        self._buffered += batch.num_rows
        if self._buffered >= self.max_buffered:
            yield from self._flush()

    def finish_bundle(self) -> Iterator:
        for key_and_batch in self._flush():
            yield WindowedValue(key_and_batch, MIN_TIMESTAMP, [window.GlobalWindow()])

    def _flush(self) -> Iterator[tuple[int, pa.RecordBatch]]:
        buffer, self._buffer, self._buffered = self._buffer, {}, 0
        for block_end, batches in buffer.items():
            table = pa.Table.from_batches(batches, schema=self.schema).combine_chunks()
            yield block_end, table.to_batches()[0]


def block_fields(fs: FeatureSet) -> tuple:
    """The fields an example carries to its block: its example fields but the reference
    columns (joined in the block, after the shuffle), plus the reference tables' keys."""
    joined = {c.name for t in fs.references for c in t.columns}
    fields = [f for f in fs.example_fields if f.name not in joined]
    have = {f.name for f in fields}
    by_name = fs.fields_by_name
    return (*fields, *(by_name[k] for k in reference_keys(fs) if k not in have))


class _JoinBlock(beam.DoFn):
    """One block: its examples (RecordBatches) + every entity's AggregateBlock (+ the reference
    tables' indexes, side inputs) -> a flat batch."""

    def __init__(self, fs: FeatureSet):
        self.fs = fs

    def setup(self) -> None:
        self._examples = Metrics.counter(NAMESPACE, "examples_joined")
        self._specs = key_specs(self.fs)
        self._types = {f.name: f.type for f in features_arrow_schema(self.fs)}
        self._missing = {
            t.name: Metrics.counter(NAMESPACE, f"reference_{t.name}_missing")
            for t in self.fs.references
        }

    def process(self, element: tuple, *indexes) -> Iterator:
        _, grouped = element
        batches = [b for b in grouped["examples"] if b.num_rows]
        if not batches:
            return
        fs = self.fs
        table = pa.Table.from_batches(batches)
        if fs.references:
            table = join_reference_columns(fs, table, indexes, self._missing)
        blocks = {(b.key_name, b.key_value): b for b in grouped["aggregates"]}
        times = table.column(fs.event_time).cast(pa.int64()).to_numpy()
        # The as-of rule, vectorised: the same arithmetic as as_of_window_end.
        window_ends = (times - fs.serving_delay_ms) // fs.period_ms * fs.period_ms
        w_values, w_codes = np.unique(window_ends, return_inverse=True)
        n_w = len(w_values)
        types = self._types
        columns = {}
        for spec in self._specs:
            # The distinct (entity, W) of the block's examples, by entity: each entity's
            # columns at its W at once, then taken per example.
            codes, names = entity_codes(table.column(spec.key_name).combine_chunks())
            pairs, inverse = np.unique((codes + 1) * n_w + w_codes, return_inverse=True)
            pair_codes, pair_ws = pairs // n_w - 1, w_values[pairs % n_w]
            bounds = np.flatnonzero(np.r_[True, pair_codes[1:] != pair_codes[:-1]]).tolist()
            chunks: dict[str, list] = {}
            for start, end in itertools.pairwise([*bounds, len(pairs)]):
                code = int(pair_codes[start])
                block = blocks.get((spec.key_name, names[code])) if code >= 0 else None
                ws = pair_ws[start:end].tolist()
                values = (
                    block.columns_at(ws)
                    if block is not None
                    else cells_to_columns(spec, [None] * len(ws))
                )
                for column, part in values.items():
                    chunks.setdefault(column, []).append(pa.array(part, type=types[column]))
            take = pa.array(inverse.reshape(-1))
            for column, parts in chunks.items():
                columns[column] = pa.concat_arrays(parts).take(take)
        joined = with_aggregate_columns(fs, table, columns)
        self._examples.inc(joined.num_rows)
        yield from joined.to_batches()


class AsOfJoin(beam.PTransform):
    """Batch point-in-time join: examples -> flat RecordBatches with the aggregates of W(t).

    Examples and aggregate blocks meet by block end, so one group holds a day of examples
    and the cells they can need; no example ever sees a window ending after W <= t - D.
    """

    def __init__(
        self, fs: FeatureSet, *, block_s: int | None = None, references: dict | None = None
    ):
        super().__init__()
        period_s = fs.period_ms // 1000  # one second without aggregates (ComputeAggregates)
        self.fs = fs
        self.references = references or {}
        block_s = block_s or max(period_s, (BATCH_BLOCK_S // period_s) * period_s)
        self.block_ms = block_s * 1000

    def expand(self, inputs):
        examples, blocks = inputs
        sides = [AsSingleton(self.references[t.name]) for t in self.fs.references]
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
            | "Attach" >> beam.ParDo(_JoinBlock(self.fs), *sides)
        )
