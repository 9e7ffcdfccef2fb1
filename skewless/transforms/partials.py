"""Per-bucket partial aggregates: the slot each P-bucket keeps, exact merges, and the one cell function.

Every aggregate of one entity key shares the period P, so an event at t falls in the bucket
b = floor(t / P) * P and the windows ending at W = b + P, ..., b + S need it. Batch (day
blocks, aggregations.py) and streaming (tiles, tiles.py) keep the same per-bucket *slot*:

    [event count, then one partial per distinct operation partial (operations.py)]

Aggregates whose operations keep the same partial over the same field (a 1 h and a 15 min
mean, a variance and a stddev) share it. Every partial is exact and merges in any order, and
`window_cell` reads each aggregate off the merged partials, so batch and streaming give bit-identical
cells for any input delivered in any order. A new operation is one class in operations.py:
nothing here or in either path changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from skewless.transforms.featureset import FeatureSet
from skewless.transforms.operations import (
    ADD,
    ADD_SUMS,
    COPY,
    MERGE,
    Count,
    Mean,
    Operation,
    Sum,
    integral_group_sums,
)

NAMESPACE = "skewless"


class CellKey(NamedTuple):
    key_name: str
    key_value: str
    window_end_ms: int


class _AggSpec(NamedTuple):
    name: str
    operation: Operation
    size_ms: int
    partial_index: int  # which slot entry it reads (0: the event count)
    default: Any
    columns: tuple[str, ...]  # the example columns of its value (operation.columns_of)


class _KeySpec(NamedTuple):
    """For one entity key: the partials its aggregates keep, the period, the largest window."""

    key_name: str
    value_fields: tuple[str | None, ...]  # the field each partial adds, slot[1:] aligned
    operations: tuple[Operation, ...]  # the operation that makes each partial
    period_ms: int
    max_size_ms: int
    aggregates: tuple[_AggSpec, ...]
    # (k, indexes of the aggregates whose window is k periods long), by increasing k.
    steps: tuple[tuple[int, tuple[int, ...]], ...]


_SPECS: dict[int, tuple[FeatureSet, tuple[_KeySpec, ...]]] = {}


def key_specs(fs: FeatureSet) -> tuple[_KeySpec, ...]:
    """Per entity key with aggregates, what the partials need (computed once per feature set)."""
    known = _SPECS.get(id(fs))
    if known is not None and known[0] is fs:
        return known[1]
    specs = _key_specs(fs)
    _SPECS[id(fs)] = (fs, specs)
    return specs


def _key_specs(fs: FeatureSet) -> tuple[_KeySpec, ...]:
    specs = []
    for key in fs.aggregate_keys:
        aggs = fs.aggregates_for(key)
        partials: dict[tuple, int] = {}  # partial key -> slot index
        operations = []
        agg_specs = []
        for a in aggs:
            op = a.operation
            index = 0
            if op.partial() is not None:
                index = partials.get(op.partial_key())
                if index is None:
                    index = partials[op.partial_key()] = len(operations) + 1
                    operations.append(op)
            agg_specs.append(
                _AggSpec(
                    a.name, op, a.size_ms, index, a.empty_value, tuple(c[0] for c in a.columns)
                )
            )
        period, max_size = aggs[0].period_ms, max(a.size_ms for a in aggs)
        sizes = sorted({a.size_ms // period for a in agg_specs})
        steps = tuple(
            (k, tuple(i for i, a in enumerate(agg_specs) if a.size_ms == k * period)) for k in sizes
        )
        specs.append(
            _KeySpec(
                key,
                tuple(op.value for op in operations),
                tuple(operations),
                period,
                max_size,
                tuple(agg_specs),
                steps,
            )
        )
    return tuple(specs)


def cell_columns(spec: _KeySpec, cell: dict | None) -> dict:
    """A cell {aggregate: value} (None: an empty window) -> {example column: value}, with the
    declared defaults for aggregates the cell lacks."""
    out = {}
    for agg in spec.aggregates:
        value = None if cell is None else cell.get(agg.name)
        if value is None:
            value = agg.default
        if len(agg.columns) == 1:
            out[agg.name] = value
        else:
            out.update(zip(agg.columns, agg.operation.columns_of(value), strict=True))
    return out


def entity_value(value: Any) -> str | None:
    """Entity keys are compared and stored as text (they end up in Bigtable row keys)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def new_slot(spec: _KeySpec) -> list:
    return [0, *(op.partial() for op in spec.operations)]


def add_to_slot(slot: list, values: Iterable, time_ms: int) -> None:
    """Add one event (its value per partial, None = null) at `time_ms` to a slot, in place."""
    slot[0] += 1
    i = 1
    for v in values:
        if v is not None:
            p = slot[i]
            ADD[p[0]](p, v, time_ms)
        i += 1


def add_batch(
    spec: _KeySpec, per_key: dict, keys: tuple, times: np.ndarray, columns: list
) -> None:
    """Add a batch of events to per-entity slots {key value: {bucket: slot}}, in place: the
    same slots as `add_to_slot` per event, with a slot looked up once per (entity, bucket)
    and the values of one group added by their exact sums where the partial keeps sums and
    the column holds integers (ADD_SUMS, one numpy pass per column), else one at a time. `keys`: (a code per event, the entity value of each code), as `entity_codes`
    gives them for events that all have one; `times`: event times (epoch ms); `columns`:
    the Arrow column of each value field of the slot (None for a partial without a field),
    all in the same row order."""
    key_codes, names = keys
    n = len(key_codes)
    if not n:
        return
    order, group_starts, codes_sorted, buckets_sorted = _groups(key_codes, times, spec.period_ms)
    starts = group_starts.tolist()
    ends = [*starts[1:], n]
    taken = pa.array(order)
    values = [None if c is None else c.take(taken) for c in columns]
    sums = []
    for column in values:
        found = None if column is None else _column_sums(column, group_starts)
        sums.append(None if found is None else [a.tolist() for a in found[:3]])
    pylists: list = [None] * len(columns)
    time_list = None
    codes_list, buckets_list = codes_sorted.tolist(), buckets_sorted.tolist()
    for g, (start, end) in enumerate(zip(starts, ends, strict=True)):
        key = names[codes_list[start]]
        slots = per_key.get(key)
        if slots is None:
            slots = per_key[key] = {}
        bucket = buckets_list[start]
        slot = slots.get(bucket)
        if slot is None:
            slot = slots[bucket] = new_slot(spec)
        slot[0] += end - start
        for i in range(len(columns)):
            if values[i] is None:
                continue
            partial = slot[i + 1]
            add_sums = ADD_SUMS[partial[0]]
            if add_sums is not None and sums[i] is not None:
                counts, totals, squares = sums[i]
                add_sums(partial, counts[g], totals[g], squares[g])
                continue
            if pylists[i] is None:
                pylists[i] = values[i].to_pylist()
            if time_list is None:
                time_list = times[order].tolist()
            add = ADD[partial[0]]
            for v, t in zip(pylists[i][start:end], time_list[start:end], strict=True):
                if v is not None:
                    add(partial, v, t)


def entity_codes(column: pa.Array) -> tuple[np.ndarray, list]:
    """`entity_value` of a column, encoded: (a code per value, -1 for null; the entity value
    of each code)."""
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind) or pa.types.is_large_string(kind):
        # Arrow's text of an integer or a boolean is Python's str() ("true", "false").
        column = column.cast(pa.string())
    elif not pa.types.is_string(kind):
        column = pa.array([entity_value(v) for v in column.to_pylist()], pa.string())
    encoded = column.dictionary_encode()
    codes = encoded.indices.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False)
    return codes, encoded.dictionary.to_pylist()


def merge_slot(into: list, other: list) -> None:
    """Merge slot `other` into slot `into`, in place (order-independent; `other` unchanged)."""
    into[0] += other[0]
    for i in range(1, len(other)):
        q = other[i]
        MERGE[q[0]](into[i], q)


def copy_slot(slot: list) -> list:
    """A deep copy: no partial is ever shared between two slots."""
    out = [slot[0]]
    out.extend(COPY[p[0]](p) for p in slot[1:])
    return out


def merge_buckets(into: dict, other: dict) -> dict:
    """Merge {bucket: slot} `other` into `into` (slots of `other` are copied, never shared)."""
    for bucket, slot in other.items():
        mine = into.get(bucket)
        if mine is None:
            into[bucket] = copy_slot(slot)
        else:
            merge_slot(mine, slot)
    return into


def block_periods(fs: FeatureSet) -> int:
    """Buckets per block of the streaming state: about the square root of the largest window
    in periods, so a cell merges O(sqrt(S/P)) slots instead of S/P."""
    periods = fs.max_window_ms // fs.period_ms
    return max(1, math.isqrt(periods))


def block_start(bucket: int, block_ms: int) -> int:
    return (bucket // block_ms) * block_ms


def window_cell(
    spec: _KeySpec, buckets: dict, w: int, blocks: dict | None = None, block_ms: int = 0
) -> dict | None:
    """The aggregates of the window ending at w from per-bucket slots; None if all empty.

    One pass over the buckets of the largest window, newest first: every smaller window is a
    prefix, so its aggregate is read off the running totals when the pass reaches its size.
    With `blocks` (block start -> the merged slot of its buckets, blocks of `block_ms`), a
    whole block inside the span still to read is merged at once. Sums are exact and min/max
    associative, so the result does not depend on how the slots were built or merged: with
    or without blocks, batch or streaming, the cell is the same, bit for bit.
    """
    period = spec.period_ms
    get = buckets.get
    running = new_slot(spec)
    found = False
    results = [None] * len(spec.aggregates)
    position = w - period  # the bucket read next
    read = 0  # buckets read so far
    per_block = block_ms // period if blocks is not None else 0
    for size, ending in spec.steps:
        while read < size:
            end = position + period
            if per_block > 1 and end % block_ms == 0 and read + per_block <= size:
                slot = blocks.get(end - block_ms)
                position -= block_ms
                read += per_block
            else:
                slot = get(position)
                position -= period
                read += 1
            if slot is not None:
                found = True
                merge_slot(running, slot)
        events = running[0]
        for index in ending:
            agg = spec.aggregates[index]
            i = agg.partial_index
            value = agg.operation.finalize(running[i] if i else None, events)
            results[index] = agg.default if value is None else value
    if not found:
        return None
    return {agg.name: value for agg, value in zip(spec.aggregates, results, strict=True)}


# --- summed buckets: the batch path's columnar form of slots of exact integer sums ------------
#
# A key whose aggregates are all counts, sums and means keeps, per bucket, only an event count
# and (non-null count, exact sum) per partial. When every value is an integer, those fit int64
# columns: the batch path then carries a key's buckets as two arrays (SummedBuckets) instead
# of a dict of slots, sums them with numpy and reads its cells off prefix sums.

# Operations a summed key may have (exactly these classes: their read-off is count, sum, mean).
_SUMMED = (Count, Sum, Mean)
# The sum of |value| over all of a SummedBuckets stays below this: every int64 sum of it is
# exact, and so is its conversion to float64.
EXACT_BOUND = 2**53


class SummedBuckets(NamedTuple):
    """Per-bucket partials of one entity as arrays: the bucket starts (sorted, distinct) and
    an int64 grid, per bucket: the event count, then (non-null values, their sum) per partial,
    then the sum of |value| over all partials (below EXACT_BOUND in all). `to_slots` gives
    the very slots that add_to_slot builds from the same events."""

    starts: np.ndarray
    grid: np.ndarray


def summable(spec: _KeySpec) -> bool:
    """A key whose cells are counts, sums and means of exact sums (SummedBuckets)."""
    return all(type(a.operation) in _SUMMED and len(a.columns) == 1 for a in spec.aggregates)


def _groups(key_codes: np.ndarray, times: np.ndarray, period: int):
    """Events sorted by (entity code, bucket) -> (order, group starts, sorted codes, sorted
    buckets)."""
    buckets = times // period * period
    order = np.lexsort((buckets, key_codes))
    codes_sorted, buckets_sorted = key_codes[order], buckets[order]
    change = (codes_sorted[1:] != codes_sorted[:-1]) | (buckets_sorted[1:] != buckets_sorted[:-1])
    return order, np.flatnonzero(np.r_[True, change]), codes_sorted, buckets_sorted


def _column_sums(column: pa.Array, starts: np.ndarray) -> tuple | None:
    """integral_group_sums of a column sorted by group (None unless a number column)."""
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        return None
    values = column.fill_null(0).to_numpy(zero_copy_only=False)
    valid = column.is_valid().to_numpy(zero_copy_only=False) if column.null_count else None
    return integral_group_sums(values, valid, starts)


def summed_batch(spec: _KeySpec, keys: tuple, times: np.ndarray, columns: list) -> dict | None:
    """A batch of events of a summable key -> {entity value: SummedBuckets}: the same
    partials as add_batch, as arrays; None when a value is not an integer or the sums could
    leave EXACT_BOUND (then add_batch). Arguments as add_batch's."""
    key_codes, names = keys
    n = len(key_codes)
    if not n or not summable(spec):
        return None
    order, starts, codes_sorted, buckets_sorted = _groups(key_codes, times, spec.period_ms)
    grid = np.empty((len(starts), 2 * len(columns) + 2), dtype=np.int64)
    grid[:, 0] = np.diff(np.r_[starts, n])
    magnitude = np.zeros(len(starts), dtype=np.int64)
    taken = pa.array(order)
    for i, column in enumerate(columns, start=1):
        found = _column_sums(column.take(taken), starts)
        if found is None:
            return None  # a fraction: exact sums need the binary fractions (add_batch)
        counts, totals, _, magnitudes = found
        magnitude += magnitudes
        if int(magnitude.sum()) >= EXACT_BOUND:
            return None
        grid[:, 2 * i - 1], grid[:, 2 * i] = counts, totals
    grid[:, -1] = magnitude
    codes = codes_sorted[starts]
    bounds = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]).tolist()
    out = {}
    for start, end in zip(bounds, [*bounds[1:], len(codes)], strict=True):
        out[names[int(codes[start])]] = SummedBuckets(
            buckets_sorted[starts[start:end]], grid[start:end]
        )
    return out


def merge_summed(parts: Sequence[SummedBuckets]) -> SummedBuckets | None:
    """SummedBuckets of one entity -> one, bucket by bucket (exact, in any order); None when
    the sum would leave EXACT_BOUND (then merge their slots)."""
    if len(parts) == 1:
        return parts[0]
    if sum(int(p.grid[:, -1].sum()) for p in parts) >= EXACT_BOUND:
        return None
    starts = np.concatenate([p.starts for p in parts])
    grid = np.concatenate([p.grid for p in parts])
    order = np.argsort(starts, kind="stable")
    starts, grid = starts[order], grid[order]
    first = np.flatnonzero(np.r_[True, starts[1:] != starts[:-1]])
    return SummedBuckets(starts[first], np.add.reduceat(grid, first, axis=0))


def to_slots(spec: _KeySpec, summed: SummedBuckets) -> dict:
    """SummedBuckets -> {bucket: slot}, the slots add_to_slot builds from the same events."""
    out = {}
    k = len(spec.operations)
    for bucket, row in zip(summed.starts.tolist(), summed.grid.tolist(), strict=True):
        out[bucket] = [row[0], *([1, row[2 * i - 1], row[2 * i], 0] for i in range(1, k + 1))]
    return out


def window_columns(spec: _KeySpec, buckets: dict | SummedBuckets, ws: Sequence[int]) -> dict | None:
    """The aggregates of many window ends at once: {aggregate: values, one per W of `ws`},
    the declared default where `window_cell` gives none (an empty window), or None when this
    shortcut does not apply (then call window_cell per W).

    It applies to a summable key (counts, sums and means) whose sums are integers below
    EXACT_BOUND in all: each window's count and sum are then differences of int64 prefix sums
    over the bucket grid, exact, and a sum or mean as float64 is the same correctly rounded
    float as window_cell's `int / int`."""
    if not summable(spec):
        return None
    if not isinstance(buckets, SummedBuckets):
        buckets = _summed_slots(spec, buckets)
        if buckets is None:
            return None
    bucket_starts, grid = buckets
    prefix = np.vstack([np.zeros((1, grid.shape[1]), np.int64), np.cumsum(grid, axis=0)])
    ws = np.asarray(ws, dtype=np.int64)
    hi = np.searchsorted(bucket_starts, ws, side="left")  # buckets before W
    sums = {}
    for size, _ in spec.steps:
        lo = np.searchsorted(bucket_starts, ws - size * spec.period_ms, side="left")
        sums[size] = prefix[hi] - prefix[lo]  # per W: the window's count, (n, sum) per partial
    largest = sums[spec.steps[-1][0]][:, 0] > 0  # window_cell: None when all of it is empty
    out = {}
    for agg in spec.aggregates:
        window = sums[agg.size_ms // spec.period_ms]
        kind = type(agg.operation)
        if kind is Count:
            value, present = window[:, 0], largest
        else:
            i = agg.partial_index
            n, total = window[:, 2 * i - 1], window[:, 2 * i]
            with np.errstate(invalid="ignore", divide="ignore"):
                value = total / n if kind is Mean else total.astype(np.float64)
            present = largest & (n > 0)
        if agg.default is None:
            out[agg.name] = [v if ok else None for v, ok in zip(value.tolist(), present.tolist(), strict=True)]
        else:
            out[agg.name] = np.where(present, value, agg.default)
    return out


def _summed_slots(spec: _KeySpec, buckets: dict) -> SummedBuckets | None:
    """Slots of a summable key -> SummedBuckets, or None if a sum is not an integer or they
    leave EXACT_BOUND."""
    starts = sorted(buckets)
    k = len(spec.operations)
    grid = np.zeros((len(starts), 2 * k + 2), dtype=np.int64)
    bound = 0
    for row, bucket in enumerate(starts):
        slot = buckets[bucket]
        grid[row, 0] = slot[0]
        magnitude = 0
        for i in range(1, k + 1):
            _, n, m, e = slot[i]
            if e:
                return None
            magnitude += abs(m)
            grid[row, 2 * i - 1] = n
            grid[row, 2 * i] = m
        bound += magnitude
        if bound >= EXACT_BOUND:
            return None
        grid[row, -1] = magnitude
    return SummedBuckets(np.asarray(starts, dtype=np.int64), grid)


def cells_to_columns(spec: _KeySpec, cells: Sequence[dict | None]) -> dict:
    """Cells (window_cell's, None for an empty window) -> {example column: values}, with the
    declared defaults."""
    out = {}
    for agg in spec.aggregates:
        default, name = agg.default, agg.name
        values = [default if c is None else c[name] for c in cells]
        if len(agg.columns) == 1:
            out[name] = values
            continue
        split = [agg.operation.columns_of(v) for v in values]
        for j, column in enumerate(agg.columns):
            out[column] = [parts[j] for parts in split]
    return out
