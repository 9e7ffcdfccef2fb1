"""The independent reference of the feature contract: aggregates from their definitions.

It knows nothing of partials, buckets, blocks or tiles: for one window it filters the events
and computes each operation with Fractions, sorting and counting, and it finds the window end
of the as-of rule by searching the period grid, not by the project's arithmetic.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

from skewless.transforms.featureset import FeatureSet, WindowedAggregate
from skewless.transforms.operations import (
    Count,
    First,
    Histogram,
    Last,
    LastK,
    Max,
    Mean,
    Min,
    StdDev,
    Sum,
    UniqueCount,
    Variance,
)


def _variance(values: list, ddof: int):
    n = len(values)
    if n <= ddof:
        return None
    mean = sum(Fraction(v) for v in values) / n
    return float(sum((Fraction(v) - mean) ** 2 for v in values) / (n - ddof))


def _by_time(pairs: list, newest_first: bool) -> list:
    return sorted(pairs, reverse=newest_first)  # (t, value): ties in time by the value


def brute_value(agg: WindowedAggregate, inside: list[dict], event_time: str):
    """One aggregate over the events of one window, from its definition; None = empty."""
    op = agg.operation
    if isinstance(op, Count):
        return len(inside)
    pairs = [(e[event_time], e[agg.value]) for e in inside if e[agg.value] is not None]
    values = [v for _, v in pairs]
    if not values:
        return None
    if isinstance(op, Mean):
        return float(sum(Fraction(v) for v in values) / len(values))
    if isinstance(op, Sum):
        return float(sum(Fraction(v) for v in values))
    if isinstance(op, StdDev):
        variance = _variance(values, op.ddof)
        return None if variance is None else math.sqrt(variance)
    if isinstance(op, Variance):
        return _variance(values, op.ddof)
    if isinstance(op, Max):
        return float(max(values))
    if isinstance(op, Min):
        return float(min(values))
    typed = (lambda v: v) if isinstance(values[0], str) else float
    if isinstance(op, LastK):
        return [typed(v) for _, v in _by_time(pairs, True)[: op.k]]
    if isinstance(op, Last):
        return typed(_by_time(pairs, True)[0][1])
    if isinstance(op, First):
        return typed(_by_time(pairs, False)[0][1])
    if isinstance(op, UniqueCount):
        return len(set(values))
    if isinstance(op, Histogram):
        counted = sorted(Counter(values).items(), key=lambda kv: (-kv[1], kv[0]))
        return dict(counted[: op.k])
    raise AssertionError(f"no brute force for {op!r}")


def brute_cells(fs: FeatureSet, events: list[dict]) -> dict:
    """(key name, key value, W) -> {aggregate: value} for every W whose largest window of the
    key is non-empty; empty smaller windows give the declared default."""
    out = {}
    period = fs.period_ms
    for key in fs.aggregate_keys:
        aggs = fs.aggregates_for(key)
        largest = max(a.size_ms for a in aggs)
        by_value: dict = {}
        for e in events:
            if e[key] is not None:
                by_value.setdefault(str(e[key]), []).append(e)
        for value, mine in by_value.items():
            times = [e[fs.event_time] for e in mine]
            first_w = (min(times) // period + 1) * period
            for w in range(first_w, max(times) + largest + 1, period):
                if not any(w - largest <= t < w for t in times):
                    continue
                cell = {}
                for agg in aggs:
                    inside = [e for e in mine if w - agg.size_ms <= e[fs.event_time] < w]
                    result = brute_value(agg, inside, fs.event_time)
                    cell[agg.name] = agg.empty_value if result is None else result
                out[(key, value, w)] = cell
    return out


def as_of_end(t: int, period_ms: int, delay_ms: int) -> int:
    """The latest multiple of P at or before t - D, found by stepping down the grid."""
    w = (t // period_ms + 1) * period_ms
    while w > t - delay_ms:
        w -= period_ms
    return w


def brute_example(fs: FeatureSet, event: dict, events: list[dict]) -> dict:
    """`event` with the example columns of every aggregate as of its event time (D included),
    computed from `events` (every event of the input)."""
    w = as_of_end(event[fs.event_time], fs.period_ms, fs.serving_delay_ms)
    out = dict(event)
    for agg in fs.aggregates:
        key_value = event[agg.key]
        inside = [
            e
            for e in events
            if key_value is not None
            and e[agg.key] == key_value
            and w - agg.size_ms <= e[fs.event_time] < w
        ]
        value = brute_value(agg, inside, fs.event_time)
        value = agg.empty_value if value is None else value
        for (name, _, _), column in zip(agg.columns, agg.column_values(value), strict=True):
            out[name] = column
    return out
