"""Feature-set declarations (raw schema, event time, keys, windowed aggregates) and the as-of rule."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

MS = 1000  # event times, window sizes and window ends are integer epoch milliseconds inside

FIELD_TYPES = ("string", "int", "float", "bool", "timestamp")
COMBINERS = ("count", "sum", "mean", "min", "max")
UNEXPECTED_FIELD_POLICIES = ("reject", "ignore")


class FeatureSetError(ValueError):
    """A feature-set declaration is inconsistent; raised when it is built."""


@dataclass(frozen=True)
class Field:
    """One field of the raw schema. Timestamps are parsed to integer epoch milliseconds."""

    name: str
    type: str
    nullable: bool = True
    min_value: float | None = None
    max_value: float | None = None

    def __post_init__(self) -> None:
        if self.type not in FIELD_TYPES:
            raise FeatureSetError(f"field {self.name!r}: type {self.type!r} not in {FIELD_TYPES}")
        if (self.min_value is not None or self.max_value is not None) and self.type not in (
            "int",
            "float",
        ):
            raise FeatureSetError(f"field {self.name!r}: a range needs an int or float field")


@dataclass(frozen=True)
class WindowedAggregate:
    """An aggregate of `value` over the events of one entity in the window [W - size, W).

    `value` is None for `count`. `default` is the value of an empty window (count: 0).
    """

    name: str
    key: str
    combiner: str
    size_s: int
    period_s: int
    value: str | None = None
    default: float = 0.0

    def __post_init__(self) -> None:
        if self.combiner not in COMBINERS:
            raise FeatureSetError(f"aggregate {self.name!r}: combiner must be one of {COMBINERS}")
        if self.period_s <= 0 or self.size_s <= 0:
            raise FeatureSetError(f"aggregate {self.name!r}: size and period must be positive")
        if self.size_s % self.period_s:
            raise FeatureSetError(
                f"aggregate {self.name!r}: window size {self.size_s}s is not a multiple of "
                f"the period {self.period_s}s"
            )
        if (self.value is None) != (self.combiner == "count"):
            raise FeatureSetError(
                f"aggregate {self.name!r}: `count` takes no value field, the others need one"
            )

    @property
    def size_ms(self) -> int:
        return self.size_s * MS

    @property
    def period_ms(self) -> int:
        return self.period_s * MS


Record = dict
PreprocessingFn = Callable[[Mapping], dict]


@dataclass(frozen=True)
class FeatureSet:
    """Everything every job needs to know about one set of features, declared once.

    - `schema`: the raw fields; a raw record is validated against it (see validation.py).
    - `derive`: typed raw record -> record with derived fields (at least `event_time`, epoch
      ms, and the label), or None when the record is valid but not an event (counted, not
      dead-lettered: e.g. a cancelled flight never departs).
    - `event_time`: the field of the derived record holding the event time.
    - `keys`: the entity keys aggregates are computed per.
    - `label`: the derived field holding the label; events with a null label are not examples.
    - `example_fields`: raw/derived fields kept on each example (the features/ output and the
      model input), besides the aggregates and the label.
    - `preprocessing_fn`: the tf.Transform function over example fields and aggregates.
    """

    name: str
    schema: tuple[Field, ...]
    event_time: str
    keys: tuple[str, ...]
    aggregates: tuple[WindowedAggregate, ...]
    label: str
    example_fields: tuple[Field, ...]
    preprocessing_fn: PreprocessingFn
    derive: Callable[[Record], Record | None] | None = None
    derived_fields: tuple[Field, ...] = ()
    serving_delay_s: int = 0
    unexpected_fields: str = "reject"
    description: str = ""
    extra: Mapping = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_unique("schema field", [f.name for f in self.schema])
        _check_unique("derived field", [f.name for f in self.derived_fields])
        clash = {f.name for f in self.schema} & {f.name for f in self.derived_fields}
        if clash:
            raise FeatureSetError(f"derived fields shadow raw fields: {sorted(clash)}")
        known = self.fields_by_name
        if self.event_time not in known or known[self.event_time].type != "timestamp":
            raise FeatureSetError(f"event_time {self.event_time!r} must be a timestamp field")
        if self.label not in known:
            raise FeatureSetError(f"label {self.label!r} is not a raw or derived field")
        for key in self.keys:
            if key not in known:
                raise FeatureSetError(f"entity key {key!r} is not a raw or derived field")
            if "#" in key:
                raise FeatureSetError(f"entity key {key!r} may not contain '#' (row-key separator)")
        _check_unique("aggregate", [a.name for a in self.aggregates])
        for agg in self.aggregates:
            if agg.key not in self.keys:
                raise FeatureSetError(
                    f"aggregate {agg.name!r}: key {agg.key!r} is not an entity key"
                )
            if agg.value is not None:
                if agg.value not in known:
                    raise FeatureSetError(
                        f"aggregate {agg.name!r}: unknown value field {agg.value!r}"
                    )
                if known[agg.value].type not in ("int", "float", "bool"):
                    raise FeatureSetError(
                        f"aggregate {agg.name!r}: value {agg.value!r} is not numeric"
                    )
            if agg.name in known:
                raise FeatureSetError(f"aggregate {agg.name!r} has the name of a field")
        for f in self.example_fields:
            if f.name not in known:
                raise FeatureSetError(f"example field {f.name!r} is not a raw or derived field")
        if self.unexpected_fields not in UNEXPECTED_FIELD_POLICIES:
            raise FeatureSetError(f"unexpected_fields must be one of {UNEXPECTED_FIELD_POLICIES}")
        if self.serving_delay_s < 0:
            raise FeatureSetError("serving_delay_s must be >= 0")
        periods = {a.period_s for a in self.aggregates}
        if len(periods) > 1:
            # One period means one grid of window ends W shared by every aggregate and by
            # the Bigtable row key `{key}#{value}#{W}`.
            raise FeatureSetError(f"all aggregates must share one period, got {sorted(periods)}")
        if not callable(self.preprocessing_fn):
            raise FeatureSetError("preprocessing_fn must be callable")

    @property
    def fields_by_name(self) -> dict[str, Field]:
        return {f.name: f for f in (*self.schema, *self.derived_fields)}

    @property
    def period_ms(self) -> int:
        return self.aggregates[0].period_ms if self.aggregates else MS

    @property
    def max_window_ms(self) -> int:
        return max((a.size_ms for a in self.aggregates), default=0)

    @property
    def serving_delay_ms(self) -> int:
        return self.serving_delay_s * MS

    def aggregates_for(self, key: str) -> tuple[WindowedAggregate, ...]:
        return tuple(a for a in self.aggregates if a.key == key)

    @property
    def aggregate_keys(self) -> tuple[str, ...]:
        """Entity keys that have at least one aggregate, in declaration order."""
        return tuple(k for k in self.keys if self.aggregates_for(k))

    def aggregate_defaults(self) -> dict[str, float]:
        return {a.name: (0 if a.combiner == "count" else a.default) for a in self.aggregates}


def _check_unique(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise FeatureSetError(f"duplicate {what} name {name!r}")
        seen.add(name)


def as_of_window_end(event_time_ms: int, period_ms: int, delay_ms: int = 0) -> int:
    """The as-of rule: the end W of the window whose aggregates an event at `t` may see.

    W = floor((t - D) / P) * P, the latest window end at or before t - D. The window is
    [W - S, W), so an event never sees itself (W <= t) nor anything after t - D. Batch
    backfill, the Bigtable lookup of streaming scoring and the tests all call this.
    """
    return ((event_time_ms - delay_ms) // period_ms) * period_ms


def window_ends_containing(event_time_ms: int, size_ms: int, period_ms: int) -> range:
    """Window ends W (multiples of P) whose window [W - S, W) contains the event time."""
    first = (event_time_ms // period_ms + 1) * period_ms
    return range(first, event_time_ms + size_ms + 1, period_ms)


def load_feature_set(spec: str) -> FeatureSet:
    """Resolve `package.module:NAME` (or a bare bundled name like `flights`) to a FeatureSet."""
    if ":" not in spec:
        spec = {"flights": "transforms.flights:FLIGHTS"}.get(spec, spec)
    if ":" not in spec:
        raise FeatureSetError(f"feature set {spec!r}: expected 'package.module:NAME' or 'flights'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FeatureSetError(
            f"feature set {spec!r}: cannot import {module_name!r}: {exc}"
        ) from exc
    fs = getattr(module, attr, None)
    if not isinstance(fs, FeatureSet):
        raise FeatureSetError(
            f"feature set {spec!r}: {attr!r} is not a FeatureSet in {module_name}"
        )
    return fs
