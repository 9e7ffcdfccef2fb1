"""Aggregate operations: one class each, the only place an operation's arithmetic lives.

An operation keeps a *partial* per entity and P-bucket (a plain list whose `PartialKind` adds
one value, merges another partial, copies) and reads its value off the partial merged over a window
(`Operation.finalize`); like a Beam CombineFn split into the per-bucket state and the read-off.
Every partial is exact and its merge order-independent (sums as exact binary fractions, ties
in event time broken by the value), so the batch day blocks and the streaming tiles, which
merge the same partials in different orders, give the same cells bit for bit.

An operation also says what its value looks like (`outputs`: the example columns, their type,
scalar or list) and what an empty window gives (`empty`). The example schema, the tf.Transform
input spec, the serving signature and the Bigtable encoding all follow from that. Adding an
operation is one class here, registered in OPERATIONS.

Nulls are skipped by every operation (`count` counts events, nulls included; the others see
the non-null values only); a window without a non-null value gives the declared default.
Operations that keep values (min, max, first, last, last_k) keep -0.0 as 0.0: the two are
equal, so which one survived would otherwise depend on arrival order.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import numpy as np

NUMERIC = ("int", "float", "bool")
SCALAR = ("int", "float", "bool", "string")


class Column(NamedTuple):
    """One example column an aggregate produces: name suffix, type, and whether it is a list."""

    suffix: str
    type: str
    repeated: bool = False


def exact(value) -> tuple[int, int]:
    """A finite int or float as the exact binary fraction mantissa * 2**exponent."""
    mantissa, denominator = value.as_integer_ratio()  # denominator: a power of two
    return mantissa, 1 - denominator.bit_length()


def add_exact(m1: int, e1: int, m2: int, e2: int) -> tuple[int, int]:
    """m1 * 2**e1 + m2 * 2**e2, exactly, as (mantissa, exponent)."""
    if e1 == e2:
        return m1 + m2, e1
    if e1 > e2:
        return (m1 << (e1 - e2)) + m2, e2
    return m1 + (m2 << (e2 - e1)), e1


def integral_group_sums(
    values: np.ndarray, valid: np.ndarray | None, starts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Per group of consecutive values (groups start at `starts`): the number of valid
    values, their sum, the sum of their squares and the sum of their magnitudes, exact, when
    every valid value is an integer small enough for int64 sums of squares; None otherwise
    (the values are then added one at a time). Adding integers one at a time with `exact`
    keeps the exponent 0, so (sum, 0) is the same partial."""
    if values.dtype.kind not in "iuf" or not len(values):
        return None
    present = values if valid is None else values[valid]
    if values.dtype.kind == "f" and not (present == np.trunc(present)).all():
        return None  # a fraction (NaN and infinities never reach an aggregate)
    largest = float(np.abs(present).max()) if len(present) else 0.0
    if largest * largest * len(values) >= 2.0**62:
        return None
    ints = values.astype(np.int64)
    counted = np.ones(len(values), np.int64)
    if valid is not None:
        ints = np.where(valid, ints, 0)
        counted = valid.astype(np.int64)
    return (
        np.add.reduceat(counted, starts),
        np.add.reduceat(ints, starts),
        np.add.reduceat(ints * ints, starts),
        np.add.reduceat(np.abs(ints), starts),
    )


def exact_to_float(mantissa: int, exponent: int, divisor: int = 1) -> float:
    """mantissa * 2**exponent / divisor, correctly rounded (Python's int / int rounds exactly)."""
    if exponent >= 0:
        return (mantissa << exponent) / divisor
    return mantissa / (divisor << -exponent)


# ---------------------------------------------------------------------------------------------
# Partials: the per-bucket state, each a plain list `[kind code, ...]`, so tiles, state and
# shuffles pickle at C speed (an object per partial made them several times slower). A kind
# is a class of static functions; `merge` never keeps a reference to the other partial's
# mutable parts and `copy` is deep, so a partial is never shared between two slots.


class PartialKind:
    code: ClassVar[int]

    @staticmethod
    def add(p: list, value, time_ms: int) -> None:
        raise NotImplementedError

    @staticmethod
    def merge(p: list, q: list) -> None:
        raise NotImplementedError

    @staticmethod
    def copy(p: list) -> list:
        return list(p)


class ExactSum(PartialKind):
    """[code, non-null count, sum mantissa, sum exponent]: the exact sum."""

    code = 1

    @staticmethod
    def new() -> list:
        return [1, 0, 0, 0]

    @staticmethod
    def add(p: list, value, time_ms: int) -> None:
        m, e = exact(value)
        p[1] += 1
        p[2], p[3] = add_exact(p[2], p[3], m, e)

    @staticmethod
    def merge(p: list, q: list) -> None:
        if q[1]:
            p[1] += q[1]
            p[2], p[3] = add_exact(p[2], p[3], q[2], q[3])

    @staticmethod
    def add_sums(p: list, count: int, total: int, squares: int) -> None:
        if count:
            p[1] += count
            p[2], p[3] = add_exact(p[2], p[3], total, 0)


class ExactMoments(PartialKind):
    """[code, n, sum mantissa, exponent, sum of squares mantissa, exponent]."""

    code = 2

    @staticmethod
    def new() -> list:
        return [2, 0, 0, 0, 0, 0]

    @staticmethod
    def add(p: list, value, time_ms: int) -> None:
        m, e = exact(value)
        p[1] += 1
        p[2], p[3] = add_exact(p[2], p[3], m, e)
        p[4], p[5] = add_exact(p[4], p[5], m * m, 2 * e)

    @staticmethod
    def merge(p: list, q: list) -> None:
        if q[1]:
            p[1] += q[1]
            p[2], p[3] = add_exact(p[2], p[3], q[2], q[3])
            p[4], p[5] = add_exact(p[4], p[5], q[4], q[5])

    @staticmethod
    def add_sums(p: list, count: int, total: int, squares: int) -> None:
        if count:
            p[1] += count
            p[2], p[3] = add_exact(p[2], p[3], total, 0)
            p[4], p[5] = add_exact(p[4], p[5], squares, 0)


class Smallest(PartialKind):
    """[code, the smallest value or None]."""

    code = 3

    @staticmethod
    def new() -> list:
        return [3, None]

    @staticmethod
    def add(p: list, value, time_ms: int) -> None:
        if value == 0 and type(value) is float:
            value = 0.0  # -0.0 == 0.0: which one were kept would depend on arrival order
        if p[1] is None or value < p[1]:
            p[1] = value

    @staticmethod
    def merge(p: list, q: list) -> None:
        if q[1] is not None and (p[1] is None or q[1] < p[1]):
            p[1] = q[1]


class Largest(PartialKind):
    """[code, the largest value or None]."""

    code = 4

    @staticmethod
    def new() -> list:
        return [4, None]

    @staticmethod
    def add(p: list, value, time_ms: int) -> None:
        if value == 0 and type(value) is float:
            value = 0.0  # as in Smallest
        if p[1] is None or value > p[1]:
            p[1] = value

    @staticmethod
    def merge(p: list, q: list) -> None:
        if q[1] is not None and (p[1] is None or q[1] > p[1]):
            p[1] = q[1]


class Latest(PartialKind):
    """[code, k, [(event time, value), ...]]: the k latest pairs, newest first; ties in time
    broken by the value, so the result does not depend on arrival order."""

    code = 5

    @staticmethod
    def new(k: int) -> list:
        return [5, k, []]

    @staticmethod
    def add(p: list, value, time_ms: int) -> None:
        if value == 0 and type(value) is float:
            value = 0.0  # as in Smallest: equal pairs must not keep their arrival order
        items = p[2]
        items.append((time_ms, value))
        if len(items) > 1:
            items.sort(reverse=True)
            del items[p[1] :]

    @staticmethod
    def merge(p: list, q: list) -> None:
        if q[2]:
            items = p[2] + q[2]
            items.sort(reverse=True)
            del items[p[1] :]
            p[2] = items

    @staticmethod
    def copy(p: list) -> list:
        return [p[0], p[1], list(p[2])]


class Earliest(Latest):
    """[code, k, pairs]: the k earliest (event time, value) pairs, oldest first."""

    code = 6

    @staticmethod
    def new(k: int) -> list:
        return [6, k, []]

    @staticmethod
    def add(p: list, value, time_ms: int) -> None:
        if value == 0 and type(value) is float:
            value = 0.0
        items = p[2]
        items.append((time_ms, value))
        if len(items) > 1:
            items.sort()
            del items[p[1] :]

    @staticmethod
    def merge(p: list, q: list) -> None:
        if q[2]:
            items = p[2] + q[2]
            items.sort()
            del items[p[1] :]
            p[2] = items


class Distinct(PartialKind):
    """[code, set of values]."""

    code = 7

    @staticmethod
    def new() -> list:
        return [7, set()]

    @staticmethod
    def add(p: list, value, time_ms: int) -> None:
        p[1].add(value)

    @staticmethod
    def merge(p: list, q: list) -> None:
        p[1] |= q[1]

    @staticmethod
    def copy(p: list) -> list:
        return [7, set(p[1])]


class Counts(PartialKind):
    """[code, {value: count}]."""

    code = 8

    @staticmethod
    def new() -> list:
        return [8, {}]

    @staticmethod
    def add(p: list, value, time_ms: int) -> None:
        counts = p[1]
        counts[value] = counts.get(value, 0) + 1

    @staticmethod
    def merge(p: list, q: list) -> None:
        counts = p[1]
        for value, n in q[1].items():
            counts[value] = counts.get(value, 0) + n

    @staticmethod
    def copy(p: list) -> list:
        return [8, dict(p[1])]


_KINDS = (ExactSum, ExactMoments, Smallest, Largest, Latest, Earliest, Distinct, Counts)
# Dispatch by the code in p[0]: list indexing is the cheapest lookup on the per-event path.
ADD = [None] * (max(k.code for k in _KINDS) + 1)
MERGE = list(ADD)
COPY = list(ADD)
# `add_sums(p, count, sum, sum of squares)`: integer values added at once by their exact sums
# (integral_group_sums), the same partial as adding them one by one. None for the kinds that
# keep more than sums.
ADD_SUMS = list(ADD)
for _kind in _KINDS:
    ADD[_kind.code], MERGE[_kind.code], COPY[_kind.code] = _kind.add, _kind.merge, _kind.copy
    ADD_SUMS[_kind.code] = getattr(_kind, "add_sums", None)


# ---------------------------------------------------------------------------------------------
# Operations


class Operation:
    """What an aggregate computes over its window. Subclasses set `name` and implement
    `partial` (a fresh per-bucket partial), `finalize` (partial merged over the window ->
    value, None if the window had no value) and `outputs` (the example columns)."""

    name: ClassVar[str]
    takes_value: ClassVar[bool] = True
    value_types: ClassVar[tuple[str, ...]] = NUMERIC

    def __init__(self, value: str | None = None):
        self.value = value

    def params(self) -> tuple:
        """Parameters beyond the value field (e.g. k), part of the identity of the partial."""
        return ()

    def partial_key(self) -> tuple:
        """Aggregates whose operations give equal keys share one partial per bucket."""
        return (type(self).partial_kind, self.value, *self.params())

    partial_kind: ClassVar[str] = ""

    def partial(self) -> list | None:
        """A fresh partial, or None for an operation that reads only the event count."""
        raise NotImplementedError

    def finalize(self, partial: list | None, events: int) -> Any:
        raise NotImplementedError

    def outputs(self, value_type: str | None) -> tuple[Column, ...]:
        """The example columns of this operation over a field of `value_type`."""
        return (Column("", "float"),)

    def empty(self, value_type: str | None) -> Any:
        """The value of an empty window when the declaration gives no default."""
        return 0.0

    def columns_of(self, value) -> tuple:
        """The value read off a cell -> one entry per output column."""
        return (value,)

    def check(self, agg_name: str, value_type: str | None, error) -> None:
        """Raise `error(message)` if this operation cannot run over `value_type`."""
        if not self.takes_value:
            if self.value is not None:
                raise error(f"aggregate {agg_name!r}: {self.name} takes no value field")
            return
        if self.value is None:
            raise error(f"aggregate {agg_name!r}: {self.name} needs a value field")
        if value_type not in self.value_types:
            raise error(
                f"aggregate {agg_name!r}: {self.name} needs a field of type "
                f"{' or '.join(self.value_types)}, {self.value!r} is {value_type}"
            )

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and (self.value, self.params()) == (
            other.value,
            other.params(),
        )

    def __hash__(self) -> int:
        return hash((type(self), self.value, self.params()))

    def __repr__(self) -> str:
        args = [repr(self.value)] if self.value is not None else []
        args += [f"{k}={v!r}" for k, v in self._named_params()]
        return f"{type(self).__name__}({', '.join(args)})"

    def _named_params(self) -> list[tuple[str, Any]]:
        return []


class Count(Operation):
    """Number of events in the window (nulls included)."""

    name = "count"
    takes_value = False
    partial_kind = "count"

    def partial(self) -> None:
        return None

    def finalize(self, partial, events: int) -> int:
        return events

    def outputs(self, value_type):
        return (Column("", "int"),)

    def empty(self, value_type):
        return 0


class Sum(Operation):
    """Exact sum of the non-null values (rounded once)."""

    name = "sum"
    partial_kind = "sum"

    def partial(self) -> list:
        return ExactSum.new()

    def finalize(self, partial: list, events: int):
        _, n, m, e = partial
        return exact_to_float(m, e) if n else None


class Mean(Sum):
    """Mean of the non-null values: exact sum / non-null count, rounded once."""

    name = "mean"

    def finalize(self, partial: list, events: int):
        _, n, m, e = partial
        return exact_to_float(m, e, n) if n else None


class Variance(Operation):
    """Variance of the non-null values, from exact sums: (n * S2 - S1**2) / (n * (n - ddof)),
    rounded once. ddof=0 (default) is the population variance, ddof=1 the sample variance; a
    window with n <= ddof values gives the default."""

    name = "variance"
    partial_kind = "moments"

    def __init__(self, value: str | None = None, *, ddof: int = 0):
        super().__init__(value)
        if ddof not in (0, 1):
            raise ValueError(f"{self.name}: ddof must be 0 or 1, got {ddof!r}")
        self.ddof = ddof

    def params(self) -> tuple:
        return ()  # ddof only changes the read-off: the moments partial is shared

    def __eq__(self, other) -> bool:
        return super().__eq__(other) and self.ddof == other.ddof

    def __hash__(self) -> int:
        return hash((super().__hash__(), self.ddof))

    def _named_params(self):
        return [("ddof", self.ddof)] if self.ddof else []

    def partial(self) -> list:
        return ExactMoments.new()

    def finalize(self, partial: list, events: int):
        _, n, m, e, m2, e2 = partial
        if n <= self.ddof:
            return None
        # n * m2 * 2**e2 - m**2 * 2**(2e), on the common exponent
        numerator, exponent = add_exact(n * m2, e2, -(m**2), 2 * e)
        return exact_to_float(numerator, exponent, n * (n - self.ddof))


class StdDev(Variance):
    """Square root of the variance (the correctly rounded variance, then math.sqrt)."""

    name = "stddev"

    def finalize(self, partial: list, events: int):
        variance = super().finalize(partial, events)
        return None if variance is None else math.sqrt(variance)


class Min(Operation):
    name = "min"
    partial_kind = "min"
    largest = False

    def partial(self) -> list:
        return Largest.new() if self.largest else Smallest.new()

    def finalize(self, partial: list, events: int):
        return None if partial[1] is None else float(partial[1])


class Max(Min):
    name = "max"
    partial_kind = "max"
    largest = True


class _ByTime(Operation):
    """Base of the operations that order values by event time (ties: by the value)."""

    value_types = SCALAR

    def outputs(self, value_type):
        return (Column("", "string" if value_type == "string" else "float"),)

    def empty(self, value_type):
        return "" if value_type == "string" else 0.0

    @staticmethod
    def _typed(value):
        return value if isinstance(value, str) else float(value)


class First(_ByTime):
    """The value of the earliest event in the window (ties in time: the smallest value)."""

    name = "first"
    partial_kind = "first"

    def partial(self) -> list:
        return Earliest.new(1)

    def finalize(self, partial: list, events: int):
        return self._typed(partial[2][0][1]) if partial[2] else None


class Last(_ByTime):
    """The value of the latest event in the window (ties in time: the largest value)."""

    name = "last"
    partial_kind = "last"

    def partial(self) -> list:
        return Latest.new(1)

    def finalize(self, partial: list, events: int):
        return self._typed(partial[2][0][1]) if partial[2] else None


class LastK(_ByTime):
    """A list of the k latest values, newest first (ties in time: the larger value first)."""

    name = "last_k"
    partial_kind = "last"

    def __init__(self, value: str | None = None, *, k: int = 5):
        super().__init__(value)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"{self.name}: k must be a positive integer, got {k!r}")
        self.k = k

    def params(self) -> tuple:
        return (self.k,)

    def _named_params(self):
        return [("k", self.k)]

    def partial(self) -> list:
        return Latest.new(self.k)

    def finalize(self, partial: list, events: int):
        return [self._typed(v) for _, v in partial[2]] if partial[2] else None

    def outputs(self, value_type):
        return (Column("", "string" if value_type == "string" else "float", repeated=True),)

    def empty(self, value_type):
        return []


class UniqueCount(Operation):
    """Exact number of distinct non-null values."""

    name = "unique_count"
    partial_kind = "distinct"
    value_types = SCALAR

    def partial(self) -> list:
        return Distinct.new()

    def finalize(self, partial: list, events: int):
        return len(partial[1]) if partial[1] else None

    def outputs(self, value_type):
        return (Column("", "int"),)

    def empty(self, value_type):
        return 0


class Histogram(Operation):
    """Counts per category of a string field, the k most frequent (ties: by category), as two
    aligned list columns `<name>_keys` and `<name>_counts`, most frequent first."""

    name = "histogram"
    partial_kind = "counts"
    value_types = ("string",)

    def __init__(self, value: str | None = None, *, k: int = 10):
        super().__init__(value)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"{self.name}: k must be a positive integer, got {k!r}")
        self.k = k

    def params(self) -> tuple:
        return ()  # k only changes the read-off: the counts partial is shared

    def __eq__(self, other) -> bool:
        return super().__eq__(other) and self.k == other.k

    def __hash__(self) -> int:
        return hash((super().__hash__(), self.k))

    def _named_params(self):
        return [("k", self.k)]

    def partial(self) -> list:
        return Counts.new()

    def finalize(self, partial: list, events: int):
        if not partial[1]:
            return None
        top = sorted(partial[1].items(), key=lambda kv: (-kv[1], kv[0]))[: self.k]
        return dict(top)

    def outputs(self, value_type):
        return (Column("_keys", "string", repeated=True), Column("_counts", "int", repeated=True))

    def empty(self, value_type):
        return {}

    def columns_of(self, value) -> tuple:
        return list(value), list(value.values())


OPERATIONS: dict[str, type[Operation]] = {
    op.name: op
    for op in (
        Count,
        Sum,
        Mean,
        Variance,
        StdDev,
        Min,
        Max,
        First,
        Last,
        LastK,
        UniqueCount,
        Histogram,
    )
}
