"""Per-bucket partial aggregates: the slot each P-bucket keeps, exact merges, and the one cell function.

Every aggregate of one entity key shares the period P, so an event at t falls in the bucket
b = floor(t / P) * P and the windows ending at W = b + P, ..., b + S need it. Batch (day
blocks, aggregations.py) and streaming (tiles, tiles.py) keep the same per-bucket *slot*:

    [count, then per value field: n, sum mantissa, sum exponent, min, max]

Sums are exact: each value is added as the binary fraction it is (mantissa * 2**exponent, Python
integers), so a sum or mean does not depend on the order in which events were added or merged,
and `_cell` rounds once, correctly, at the end. Batch and streaming therefore give bit-identical
cells for any float input delivered in any order. A new operation keeps its partial in the slot
and reads it off in `_cell`: nothing else in either path changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

from transforms.featureset import FeatureSet

NAMESPACE = "skewless"
STRIDE = 5  # slot entries per value field: n, sum mantissa, sum exponent, min, max


class CellKey(NamedTuple):
    key_name: str
    key_value: str
    window_end_ms: int


class _AggSpec(NamedTuple):
    name: str
    combiner: str
    size_ms: int
    field_index: int  # which value field of the slot
    default: float


class _KeySpec(NamedTuple):
    """For one entity key: the value fields its aggregates read, the period, the largest window."""

    key_name: str
    value_fields: tuple[str, ...]
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
        sizes = sorted({a.size_ms // period for a in agg_specs})
        steps = tuple(
            (k, tuple(i for i, a in enumerate(agg_specs) if a.size_ms == k * period)) for k in sizes
        )
        specs.append(_KeySpec(key, fields, period, max_size, agg_specs, steps))
    return tuple(specs)


def entity_value(value: Any) -> str | None:
    """Entity keys are compared and stored as text (they end up in Bigtable row keys)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def new_slot(nfields: int) -> list:
    return [0] + [0, 0, 0, None, None] * nfields


def add_to_slot(slot: list, values: Iterable) -> None:
    """Add one event (its value per field, None = null) to a slot, in place."""
    slot[0] += 1
    i = 1
    for v in values:
        if v is not None:
            slot[i] += 1
            mantissa, denominator = v.as_integer_ratio()  # denominator: a power of two
            exponent = 1 - denominator.bit_length()
            _add_exact(slot, i + 1, mantissa, exponent)
            if slot[i + 3] is None or v < slot[i + 3]:
                slot[i + 3] = v
            if slot[i + 4] is None or v > slot[i + 4]:
                slot[i + 4] = v
        i += STRIDE


def _add_exact(acc: list, at: int, mantissa: int, exponent: int) -> None:
    """acc[at] * 2**acc[at + 1] += mantissa * 2**exponent, exactly."""
    mine, mine_exp = acc[at], acc[at + 1]
    if exponent == mine_exp:
        acc[at] = mine + mantissa
    elif exponent > mine_exp:
        acc[at] = mine + (mantissa << (exponent - mine_exp))
    else:
        acc[at] = (mine << (mine_exp - exponent)) + mantissa
        acc[at + 1] = exponent


def merge_slot(into: list, other: list) -> None:
    """Merge slot `other` into slot `into`, in place (order-independent)."""
    into[0] += other[0]
    for i in range(1, len(other), STRIDE):
        if not other[i]:
            continue
        into[i] += other[i]
        _add_exact(into, i + 1, other[i + 1], other[i + 2])
        if into[i + 3] is None or other[i + 3] < into[i + 3]:
            into[i + 3] = other[i + 3]
        if into[i + 4] is None or other[i + 4] > into[i + 4]:
            into[i + 4] = other[i + 4]


def merge_buckets(into: dict, other: dict) -> dict:
    """Merge {bucket: slot} `other` into `into` (slots of `other` are copied, never shared)."""
    for bucket, slot in other.items():
        mine = into.get(bucket)
        if mine is None:
            into[bucket] = list(slot)
        else:
            merge_slot(mine, slot)
    return into


def exact_to_float(mantissa: int, exponent: int, divisor: int = 1) -> float:
    """mantissa * 2**exponent / divisor, correctly rounded (Python's int / int rounds exactly)."""
    if exponent >= 0:
        return (mantissa << exponent) / divisor
    return mantissa / (divisor << -exponent)


def block_periods(fs: FeatureSet) -> int:
    """Buckets per block of the streaming state: about the square root of the largest window
    in periods, so a cell merges O(sqrt(S/P)) slots instead of S/P."""
    periods = fs.max_window_ms // fs.period_ms
    return max(1, math.isqrt(periods))


def block_start(bucket: int, block_ms: int) -> int:
    return (bucket // block_ms) * block_ms


def _cell(
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
    nfields = len(spec.value_fields)
    running = new_slot(nfields)
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
        for index in ending:
            agg = spec.aggregates[index]
            if agg.combiner == "count":
                results[index] = running[0]
                continue
            i = 1 + STRIDE * agg.field_index
            n = running[i]
            if n == 0:
                results[index] = agg.default
            elif agg.combiner == "mean":
                results[index] = exact_to_float(running[i + 1], running[i + 2], n)
            elif agg.combiner == "sum":
                results[index] = exact_to_float(running[i + 1], running[i + 2])
            elif agg.combiner == "min":
                results[index] = float(running[i + 3])
            else:
                results[index] = float(running[i + 4])
    if not found:
        return None
    return {agg.name: value for agg, value in zip(spec.aggregates, results, strict=True)}
