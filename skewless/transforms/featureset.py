"""Feature-set declarations (raw schema, event time, keys, windowed aggregates) and the as-of rule."""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from skewless.transforms.operations import OPERATIONS, Operation

MS = 1000  # event times, window sizes and window ends are integer epoch milliseconds inside

# Timestamps outside this range are data errors (a year 318,857 or 1066 is not an event time).
DEFAULT_TIMESTAMP_RANGE = ("1900-01-01T00:00:00+00:00", "2201-01-01T00:00:00+00:00")
FIELD_TYPES = ("string", "int", "float", "bool", "timestamp")
UNEXPECTED_FIELD_POLICIES = ("reject", "ignore")
# Bigtable families of a feature set's reference tables and prediction cache: `{name}_ref`,
# `{name}_static`, `{name}_predictions` (no feature set may be named like one).
RESERVED_NAME_ENDINGS = ("_ref", "_static", "_predictions")
CACHE_KEY_TYPES = ("string", "int", "bool")


class FeatureSetError(ValueError):
    """A feature-set declaration is inconsistent; raised when it is built."""


def checked_settings(cls):
    """Make an unknown or misspelt keyword of a declaration class a FeatureSetError that names
    the known settings (and the closest one), instead of the dataclass's bare TypeError."""
    init = cls.__init__
    known = tuple(f.name for f in fields(cls) if f.init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, known, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise FeatureSetError(
                f"{cls.__name__}: unknown setting(s) {', '.join(hints)}; known: {', '.join(known)}"
            )
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@checked_settings
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


@checked_settings
@dataclass(frozen=True)
class WindowedAggregate:
    """One aggregate over the events of one entity in the window [W - size, W).

    `combiner` is an operation (operations.py: `Mean("price")`, `LastK("page", k=3)`) or
    its registered name with the value field in `value` (`"mean", value="price"`).
    `default` is the value of an empty window (default: the operation's, e.g. 0 for counts,
    0.0 for numbers, [] for lists). Most declarations use `Aggregate`, which yields one of
    these per window size.
    """

    name: str
    key: str
    combiner: str | Operation
    size_s: int
    period_s: int
    value: str | None = None
    default: Any = None
    operation: Operation = field(init=False, compare=False, repr=False)
    # The value field's type, set by the FeatureSet that holds the aggregate.
    value_type: str | None = field(init=False, default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        op = self.combiner
        if isinstance(op, str):
            cls = OPERATIONS.get(op)
            if cls is None:
                raise FeatureSetError(
                    f"aggregate {self.name!r}: combiner {op!r} is not an operation; known: "
                    f"{', '.join(OPERATIONS)}"
                )
            op = cls(self.value) if cls.takes_value else cls()
            if not cls.takes_value and self.value is not None:
                raise FeatureSetError(f"aggregate {self.name!r}: {op.name} takes no value field")
        elif isinstance(op, Operation):
            if self.value is not None and self.value != op.value:
                raise FeatureSetError(
                    f"aggregate {self.name!r}: value {self.value!r} differs from the operation's "
                    f"{op.value!r}"
                )
        else:
            raise FeatureSetError(
                f"aggregate {self.name!r}: combiner must be an Operation or one of "
                f"{', '.join(OPERATIONS)}, got {op!r}"
            )
        object.__setattr__(self, "operation", op)
        object.__setattr__(self, "combiner", op.name)
        object.__setattr__(self, "value", op.value)
        if op.takes_value and op.value is None:
            raise FeatureSetError(f"aggregate {self.name!r}: {op.name} needs a value field")
        for what in ("size_s", "period_s"):
            number = getattr(self, what)
            if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
                raise FeatureSetError(
                    f"aggregate {self.name!r}: {what} must be a positive whole number of "
                    f"seconds, got {number!r}"
                )
        if self.size_s % self.period_s:
            raise FeatureSetError(
                f"aggregate {self.name!r}: window size {self.size_s}s is not a multiple of "
                f"the period {self.period_s}s"
            )

    @property
    def size_ms(self) -> int:
        return self.size_s * MS

    @property
    def period_ms(self) -> int:
        return self.period_s * MS

    @property
    def empty_value(self) -> Any:
        """The value of an empty window: the declared default, else the operation's."""
        if self.default is not None:
            return self.default
        return self.operation.empty(self.value_type)

    @property
    def columns(self) -> tuple[tuple[str, str, bool], ...]:
        """The example columns of this aggregate: (name, type, repeated) each."""
        return tuple(
            (self.name + c.suffix, c.type, c.repeated)
            for c in self.operation.outputs(self.value_type)
        )

    def column_values(self, value: Any) -> tuple:
        """A cell value (or the empty value) -> one entry per column."""
        return self.operation.columns_of(value)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def duration_s(value: int | str, what: str = "duration") -> int:
    """Seconds, or a duration like "90s", "15m", "1h", "1d", "7d", "2w" -> seconds."""
    if isinstance(value, bool):
        raise FeatureSetError(f"{what}: {value!r} is not a duration")
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    number, unit = text[:-1], text[-1:]
    if unit not in _UNITS or not number.isdigit() or int(number) <= 0:
        raise FeatureSetError(
            f"{what}: {value!r} is not a duration (seconds, or a whole number with s, m, h, d "
            f"or w: '15m', '1h', '7d')"
        )
    return int(number) * _UNITS[unit]


def duration_label(value: int | str) -> str:
    """The label of a window in generated names: a duration as written ("7d"), or seconds as
    the largest exact unit (900 -> "15m", 86400 -> "1d", 90 -> "90s")."""
    if isinstance(value, str):
        return value.strip().lower()
    seconds = value
    for unit in ("d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


@checked_settings
@dataclass(frozen=True)
class Aggregate:
    """A declaration of windowed aggregates: one operation per entity key over several windows.

        Aggregate(key="user", operation=Mean("price"), windows=["15m", "1h"], period="5m")

    yields `user_mean_price_15m` and `user_mean_price_1h`. `name` replaces the
    generated stem (`{key}_{operation}[_{value}]`); the window label is always appended.
    Windows and the period are seconds or durations ("90s", "15m", "1h", "1d", "7d").
    """

    key: str
    operation: Operation | str
    windows: tuple[int | str, ...]
    period: int | str
    name: str = ""
    default: Any = None

    def __post_init__(self) -> None:
        windows = self.windows
        if isinstance(windows, (str, int)):
            windows = (windows,)
        if not windows:
            raise FeatureSetError(f"aggregate over {self.key!r}: windows must not be empty")
        object.__setattr__(self, "windows", tuple(windows))
        self.expand()  # every check, now

    def expand(self) -> tuple[WindowedAggregate, ...]:
        op = self.operation
        if isinstance(op, str):
            cls = OPERATIONS.get(op)
            if cls is None or cls.takes_value:
                raise FeatureSetError(
                    f"aggregate over {self.key!r}: operation {op!r}: give an Operation instance "
                    f"(e.g. Mean('field')); only operations without a value field may be named"
                )
            op = cls()
        if not isinstance(op, Operation):
            raise FeatureSetError(f"aggregate over {self.key!r}: {op!r} is not an Operation")
        stem = self.name or "_".join(p for p in (self.key, op.name, op.value) if p)
        period = duration_s(self.period, f"aggregate {stem!r}: period")
        out = []
        for window in self.windows:
            size = duration_s(window, f"aggregate {stem!r}: window")
            out.append(
                WindowedAggregate(
                    name=f"{stem}_{duration_label(window)}",
                    key=self.key,
                    combiner=op,
                    size_s=size,
                    period_s=period,
                    default=self.default,
                )
            )
        return tuple(out)


@checked_settings
@dataclass(frozen=True)
class ReferenceTable:
    """A table of entity attributes joined onto every example as of its event time.

    - `name`: the table's name (the Bigtable row-key prefix, the joined columns' default
      prefix `{name}_`, the `--reference NAME=PATH` option).
    - `key`: the event field looked up (e.g. `origin`); `table_key`: the table's column holding
      it (default: the same name).
    - `fields`: the table's fields joined onto examples, each as a nullable example column
      `{prefix}{field}` (null when no row applies: counted).
    - `valid_from`: the table's timestamp column from which a row holds (slowly changing), or
      None (static: one row per key, always valid).
    - `availability_delay_s` (D_ref): a row valid from v is usable from v + D_ref on, so the
      row joined to an event at t is the latest with valid_from <= t - D_ref; a row that became
      valid later is never seen.
    - `default_input`: the table's file (or a function returning its path) when no
      `--reference` option names one.
    """

    name: str
    key: str
    fields: tuple[Field, ...]
    table_key: str = ""
    valid_from: str | None = None
    availability_delay_s: int | str = 0
    default_input: str | Callable[[], str] | None = None
    prefix: str | None = None

    def __post_init__(self) -> None:
        if not self.name or "#" in self.name:
            raise FeatureSetError(f"reference table {self.name!r}: a name without '#' is needed")
        object.__setattr__(self, "fields", tuple(self.fields))
        object.__setattr__(self, "table_key", self.table_key or self.key)
        object.__setattr__(
            self,
            "availability_delay_s",
            duration_s(self.availability_delay_s, f"reference table {self.name!r}: delay"),
        )
        if self.prefix is None:
            object.__setattr__(self, "prefix", f"{self.name}_")
        names = [f.name for f in self.fields]
        _check_unique(f"reference table {self.name!r} field", names)
        if not self.fields:
            raise FeatureSetError(f"reference table {self.name!r}: no fields to join")
        for special in (self.table_key, self.valid_from):
            if special in names:
                raise FeatureSetError(
                    f"reference table {self.name!r}: {special!r} is the key or validity "
                    f"column, not a field to join"
                )

    @property
    def availability_delay_ms(self) -> int:
        return self.availability_delay_s * MS

    @functools.cached_property
    def columns(self) -> tuple[Field, ...]:
        """The example columns this table adds: every field, nullable, with the prefix (built
        once: the per-event join of streaming scoring reads it for every event)."""
        return tuple(replace(f, name=f"{self.prefix}{f.name}", nullable=True) for f in self.fields)

    @property
    def schema(self) -> tuple[Field, ...]:
        """The table's own columns: the key, the validity time if any, the fields."""
        out = [Field(self.table_key, "string", nullable=False)]
        if self.valid_from is not None:
            out.append(Field(self.valid_from, "timestamp", nullable=False))
        return (*out, *self.fields)

    def resolve_default_input(self) -> str | None:
        default = self.default_input
        return default() if callable(default) else default


Record = dict
PreprocessingFn = Callable[[Mapping], dict]


@checked_settings
@dataclass(frozen=True)
class Baseline:
    """A one-field rule the model must beat: positive when `field` > `threshold`.

    train reports it next to the majority class (AUC of the raw field as a score, accuracy of
    the rule, log loss of a one-field logistic regression); `name` labels it in metrics.json
    and the report (default: "<field> > <threshold>").
    """

    field: str
    threshold: float
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or f"{self.field} > {self.threshold:g}"


@checked_settings
@dataclass(frozen=True)
class PredictionCache:
    """Precomputed predictions served by key (hybrid serving): `skewless precompute` scores the
    `top_n` most frequent keys of a period once per model version and writes them to Bigtable;
    the streaming scorer answers a request whose key is there from the cache and sends the
    rest to the model.

    - `key`: example fields, in this order, whose values make the key: entity ids, or
      categorical / bucketized request fields computed in `derive` (so training and serving
      compute them the same way). Strings, ints or bools: a continuous value must be
      bucketized first, or every request would be its own key.
    - The cache is exact by construction: precompute refuses a model whose transform graph
      reads any input outside the key (the dependency map of the graph, recorded with the
      model), so a cached prediction is what the model returns for any request with that key.
    - `top_n`: how many keys precompute writes by default (--top_n overrides).
    - `retention`: the family's GC rule: a version's entries (cell time = the version's
      training time) are collected this long after it was trained; the scorer then asks the
      model, as it does for any miss.
    - `hash_chars`: hexadecimal characters of the key's SHA-256 in the row key (64 bits by
      default). The key's own text is stored with each entry and compared on every hit, so a
      collision is a miss, never another key's prediction.
    """

    key: tuple[str, ...]
    top_n: int = 10_000
    retention: int | str = "90d"
    hash_chars: int = 16

    def __post_init__(self) -> None:
        key = self.key
        if isinstance(key, str) or not isinstance(key, (tuple, list)) or not key:
            raise FeatureSetError(f"prediction cache: key must be a tuple of field names, got {key!r}")
        object.__setattr__(self, "key", tuple(key))
        _check_unique("prediction cache key field", list(self.key))
        for what in ("top_n", "hash_chars"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FeatureSetError(f"prediction cache: {what} must be a positive whole number, got {value!r}")
        if self.hash_chars > 64:
            raise FeatureSetError(f"prediction cache: hash_chars is at most 64 (SHA-256), got {self.hash_chars}")
        object.__setattr__(self, "retention", duration_s(self.retention, "prediction cache: retention"))


@checked_settings
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
    - `example_key`: the example fields that identify one example (the hashed split, joining
      predictions with labels in the report, the model's metadata). Default: those of the
      entity keys and the event time, `(*keys, event_time)`, that are example fields (if none
      is, every example field but the label). A declared key must be example fields.
    - `default_input`: the input of prepare/score/replay when no source is given (a path, or
      a function returning one), or None.
    - `eval_start` / `eval_fraction`: the default train/eval split of prepare: a time split at
      the ISO-8601 instant `eval_start` when given, else a hashed split (by example key)
      sending `eval_fraction` of the examples to eval.
    - `baseline`: the rule baseline train reports and the model must beat, or None (then only
      the majority class is reported).
    - `allow_non_finite`: raw float fields in which NaN and infinities are valid values.
    - `timestamp_range`: (start, end) ISO-8601 instants, end excluded, outside which a raw
      timestamp is a data error (default 1900-01-01 to 2201-01-01).
    - `references`: reference tables joined as of each event (ReferenceTable); their columns
      are appended to `example_fields` when the feature set is built.
    - `prediction_cache`: a PredictionCache (hybrid serving: precomputed predictions for
      the most frequent keys), or None.
    - `calendar_fields`: raw or derived fields that follow the calendar of the event time
      (year, month, day, hour of the event): a span of time has its own values of them, so
      validation never compares their distributions (as the timestamps'); their other checks
      (type, presence) still run.
    - `label_time`: typed, derived record -> the epoch ms at which its label becomes known
      (a flight's arrival), or None when it never does; `skewless label-join` reads labels
      from the raw events with it when no label files or table are given. Default None.
    - `derive_batch`: the columnar form of `derive`, for the batch jobs (prepare, score,
      audit, label-join, precompute), which check and derive whole Arrow batches: typed
      records (a pyarrow.Table of the raw fields, timestamps as int64 epoch ms) -> (the
      derived fields {name: array, one value per record}, a boolean array of the records
      that are events, or None when all are). It must give what `derive` gives record by
      record (the streaming jobs and serving still derive one record at a time); without
      it, the batch jobs run `derive` over the rows of each batch: checking and deriving the
      bundled year then costs 6.9 us per record instead of 0.9 (docs/architecture.md).
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
    serving_delay_s: int | str = 0
    unexpected_fields: str = "reject"
    description: str = ""
    example_key: tuple[str, ...] = ()
    default_input: str | Callable[[], str] | None = None
    eval_start: str | None = None
    eval_fraction: float = 0.2
    baseline: Baseline | None = None
    allow_non_finite: tuple[str, ...] = ()
    timestamp_range: tuple[str, str] = DEFAULT_TIMESTAMP_RANGE
    references: tuple[ReferenceTable, ...] = ()
    calendar_fields: tuple[str, ...] = ()
    prediction_cache: PredictionCache | None = None
    label_time: Callable[[Record], int | None] | None = None
    derive_batch: Callable | None = None

    def __post_init__(self) -> None:
        if self.name.endswith(RESERVED_NAME_ENDINGS) and ":" not in self.name:
            # `{name}_ref` / `{name}_static` are the Bigtable families of another feature
            # set's reference tables (reference.py): the two could not share a table.
            raise FeatureSetError(
                f"feature set name {self.name!r}: names ending in {RESERVED_NAME_ENDINGS} are "
                f"reserved for the Bigtable families of reference tables and prediction caches"
            )
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
        self._expand_aggregates()
        joined = self._check_references()
        for f in self.example_fields:
            if f.name not in known and f.name not in joined:
                raise FeatureSetError(f"example field {f.name!r} is not a raw or derived field")
        declared = [f for f in self.example_fields if f.name not in joined]
        object.__setattr__(self, "example_fields", (*declared, *joined.values()))
        if self.unexpected_fields not in UNEXPECTED_FIELD_POLICIES:
            raise FeatureSetError(f"unexpected_fields must be one of {UNEXPECTED_FIELD_POLICIES}")
        object.__setattr__(
            self, "serving_delay_s", duration_s(self.serving_delay_s, "serving_delay_s")
        )
        if self.serving_delay_s < 0:
            raise FeatureSetError("serving_delay_s must be >= 0")
        periods = {a.period_s for a in self.aggregates}
        if len(periods) > 1:
            # One period means one grid of window ends W shared by every aggregate and by
            # the Bigtable row key `{key}#{value}#{W}`.
            raise FeatureSetError(f"all aggregates must share one period, got {sorted(periods)}")
        if not callable(self.preprocessing_fn):
            raise FeatureSetError("preprocessing_fn must be callable")
        if self.label_time is not None and not callable(self.label_time):
            raise FeatureSetError("label_time must be a function of a derived record, or None")
        if self.derive_batch is not None and (self.derive is None or not callable(self.derive_batch)):
            raise FeatureSetError(
                "derive_batch is the columnar form of derive: give both (the streaming jobs "
                "derive one record at a time)"
            )
        self._check_job_settings()

    def _check_references(self) -> dict[str, Field]:
        """The reference tables' example columns by name, after checking the declarations."""
        known = self.fields_by_name
        object.__setattr__(self, "references", tuple(self.references))
        _check_unique("reference table", [t.name for t in self.references])
        joined: dict[str, Field] = {}
        aggregate_columns = {c[0] for a in self.aggregates for c in a.columns}
        for table in self.references:
            if not isinstance(table, ReferenceTable):
                raise FeatureSetError(f"references: {table!r} is not a ReferenceTable")
            if table.key not in known:
                raise FeatureSetError(
                    f"reference table {table.name!r}: key {table.key!r} is not a raw or "
                    f"derived field"
                )
            for column in table.columns:
                if column.name in known or column.name in aggregate_columns:
                    raise FeatureSetError(
                        f"reference table {table.name!r}: column {column.name!r} is already "
                        f"a field or an aggregate (set prefix=...)"
                    )
                if column.name in joined:
                    raise FeatureSetError(
                        f"reference tables make column {column.name!r} twice (set prefix=...)"
                    )
                joined[column.name] = column
        return joined

    def _expand_aggregates(self) -> None:
        """Aggregate declarations -> WindowedAggregates, each checked against the fields."""
        if isinstance(self.aggregates, (Aggregate, WindowedAggregate)):
            raise FeatureSetError("aggregates must be a list of Aggregate / WindowedAggregate")
        expanded: list[WindowedAggregate] = []
        for agg in self.aggregates:
            if isinstance(agg, Aggregate):
                expanded.extend(agg.expand())
            elif isinstance(agg, WindowedAggregate):
                # A copy: the value type set below belongs to this feature set's schema.
                expanded.append(replace(agg, combiner=agg.operation))
            else:
                raise FeatureSetError(f"aggregates: {agg!r} is not an Aggregate")
        object.__setattr__(self, "aggregates", tuple(expanded))
        known = self.fields_by_name
        _check_unique("aggregate", [a.name for a in expanded])
        columns: dict[str, str] = {}
        for agg in expanded:
            if agg.key not in self.keys:
                raise FeatureSetError(
                    f"aggregate {agg.name!r}: key {agg.key!r} is not an entity key"
                )
            value_type = None
            if agg.value is not None:
                if agg.value not in known:
                    raise FeatureSetError(
                        f"aggregate {agg.name!r}: unknown value field {agg.value!r}"
                    )
                value_type = known[agg.value].type
                if agg.value in self.allow_non_finite:
                    raise FeatureSetError(
                        f"aggregate {agg.name!r}: {agg.value!r} allows NaN and infinities, "
                        f"which no aggregate can sum or order exactly"
                    )
            agg.operation.check(agg.name, value_type, FeatureSetError)
            object.__setattr__(agg, "value_type", value_type)
            _check_default(agg)
            for name, _, _ in agg.columns:
                if name in known:
                    raise FeatureSetError(f"aggregate {agg.name!r}: column {name!r} is a field")
                if name in columns:
                    raise FeatureSetError(
                        f"aggregates {columns[name]!r} and {agg.name!r} both make column {name!r}"
                    )
                columns[name] = agg.name

    def _check_job_settings(self) -> None:
        """The typed settings the jobs read: example key, split, baseline, validation."""
        for name in (
            "keys",
            "example_key",
            "allow_non_finite",
            "timestamp_range",
            "calendar_fields",
        ):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise FeatureSetError(f"{name} must be a tuple of names, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        examples = {f.name: f for f in self.example_fields}
        if self.example_fields and self.event_time not in examples:
            # The split, the as-of join of reference tables, statistics and scoring read the
            # event time off the examples.
            raise FeatureSetError(
                f"event_time {self.event_time!r} must be one of the example_fields (add "
                f"the field {self.event_time!r} to example_fields)"
            )
        if not self.example_key:
            default = tuple(k for k in (*self.keys, self.event_time) if k in examples)
            object.__setattr__(
                self,
                "example_key",
                default or tuple(n for n in examples if n != self.label),
            )
        _check_unique("example key field", list(self.example_key))
        for name in self.example_key:
            if name not in examples:
                raise FeatureSetError(
                    f"example_key field {name!r} is not an example field (declare example_key "
                    f"as example fields that identify one example)"
                )
        if self.eval_start is not None:
            _parse_instant("eval_start", self.eval_start)
        if not 0.0 < self.eval_fraction < 1.0:
            raise FeatureSetError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.default_input is not None and not (
            isinstance(self.default_input, str) or callable(self.default_input)
        ):
            raise FeatureSetError("default_input must be a path or a function returning one")
        known = self.fields_by_name
        if self.baseline is not None:
            if not isinstance(self.baseline, Baseline):
                raise FeatureSetError("baseline must be a Baseline(field=..., threshold=...)")
            found = known.get(self.baseline.field)
            if found is None or found.type not in ("int", "float", "bool"):
                raise FeatureSetError(
                    f"baseline field {self.baseline.field!r} is not a numeric raw or derived field"
                )
            if self.baseline.field not in examples:
                raise FeatureSetError(
                    f"baseline field {self.baseline.field!r} is not an example field"
                )
        _check_unique("calendar field", list(self.calendar_fields))
        for name in self.calendar_fields:
            if name not in known:
                raise FeatureSetError(
                    f"calendar_fields: {name!r} is not a raw or derived field (declare the fields "
                    "that follow the event time's calendar, e.g. its month or hour)"
                )
            if name == self.label:
                raise FeatureSetError(f"calendar_fields: {name!r} is the label")
        for name in self.allow_non_finite:
            if name not in known or known[name].type != "float":
                raise FeatureSetError(f"allow_non_finite: {name!r} is not a float field")
        self._check_prediction_cache(examples)
        if len(self.timestamp_range) != 2:
            raise FeatureSetError("timestamp_range must be (start, end)")
        start, end = (_parse_instant("timestamp_range", t) for t in self.timestamp_range)
        if start >= end:
            raise FeatureSetError(f"timestamp_range {self.timestamp_range}: start must be < end")

    def _check_prediction_cache(self, examples: dict[str, Field]) -> None:
        cache = self.prediction_cache
        if cache is None:
            return
        if not isinstance(cache, PredictionCache):
            raise FeatureSetError("prediction_cache must be a PredictionCache(key=...)")
        for name in cache.key:
            found = examples.get(name)
            if found is None:
                raise FeatureSetError(
                    f"prediction cache key field {name!r} is not an example field (the scorer "
                    f"computes the key from the example it serves)"
                )
            if name == self.label:
                raise FeatureSetError(f"prediction cache key field {name!r} is the label")
            if found.type not in CACHE_KEY_TYPES:
                raise FeatureSetError(
                    f"prediction cache key field {name!r} is a {found.type}: a key takes "
                    f"{', '.join(CACHE_KEY_TYPES)} fields (bucketize a continuous value in derive)"
                )

    def resolve_default_input(self) -> str | None:
        """The default input path (calling `default_input` if it is a function), or None."""
        default = self.default_input
        return default() if callable(default) else default

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

    def aggregate_defaults(self) -> dict[str, Any]:
        return {a.name: a.empty_value for a in self.aggregates}


def _check_default(agg: WindowedAggregate) -> None:
    """A declared default must look like the aggregate's value (a count's is always 0)."""
    default = agg.default
    if default is None:
        return
    columns = agg.columns
    kind, repeated = columns[0][1], columns[0][2]
    if len(columns) > 1 or repeated:
        ok = isinstance(default, dict if len(columns) > 1 else list)
    elif kind == "string":
        ok = isinstance(default, str)
    elif kind == "int":
        ok = default == 0 and not isinstance(default, bool)
    else:
        ok = isinstance(default, (int, float)) and not isinstance(default, bool)
    if not ok:
        raise FeatureSetError(
            f"aggregate {agg.name!r}: default {default!r} does not fit a {agg.combiner} "
            f"(counts: 0; lists: a list; histograms: a dict)"
        )


def _parse_instant(what: str, text: str) -> dt.datetime:
    try:
        instant = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError as exc:
        raise FeatureSetError(f"{what}: {text!r} is not an ISO-8601 instant") from exc
    if instant.tzinfo is None:
        raise FeatureSetError(f"{what}: {text!r} needs a time zone (e.g. +00:00)")
    return instant


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


def load_feature_set(spec: str) -> FeatureSet:
    """Resolve `package.module:NAME` (or a bare bundled name like `flights`) to a FeatureSet."""
    if not spec or not spec.strip():
        raise FeatureSetError("feature set '': expected 'package.module:NAME' or 'flights'")
    if ":" not in spec:
        spec = {
            "flights": "skewless.examples.flights:FLIGHTS",
            "flights_plus": "skewless.examples.flights:FLIGHTS_PLUS",
            "flights_schedule": "skewless.examples.flights_schedule:FLIGHTS_SCHEDULE",
            "weather": "skewless.examples.weather:WEATHER",
        }.get(spec, spec)
    if ":" not in spec:
        raise FeatureSetError(f"feature set {spec!r}: expected 'package.module:NAME' or 'flights'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except FeatureSetError:
        raise  # the module's own declaration is wrong: its message says how
    except ImportError as exc:
        raise FeatureSetError(
            f"feature set {spec!r}: cannot import {module_name!r}: {exc}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a user's module that fails to load (SyntaxError, ...)
        where = f" ({exc.filename}, line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise FeatureSetError(
            f"feature set {spec!r}: module {module_name!r} fails to load: "
            f"{type(exc).__name__}: {getattr(exc, 'msg', None) or exc}{where}"
        ) from exc
    fs = getattr(module, attr, None)
    if not isinstance(fs, FeatureSet):
        raise FeatureSetError(
            f"feature set {spec!r}: {attr!r} is not a FeatureSet in {module_name}"
        )
    return fs
