"""Dataset statistics of Arrow example batches in one pass (tfx_bsl sketches), and a schema
inferred from them; both as tensorflow_metadata protos (docs/architecture.md, "Statistics and
schema")."""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2
from tfx_bsl import sketches

INT, FLOAT, STRING, STRUCT = "int", "float", "string", "struct"
_STATS_TYPE = {
    INT: statistics_pb2.FeatureNameStatistics.INT,
    FLOAT: statistics_pb2.FeatureNameStatistics.FLOAT,
    STRING: statistics_pb2.FeatureNameStatistics.STRING,
    STRUCT: statistics_pb2.FeatureNameStatistics.STRUCT,
}
_SCHEMA_TYPE = {
    statistics_pb2.FeatureNameStatistics.INT: schema_pb2.INT,
    statistics_pb2.FeatureNameStatistics.FLOAT: schema_pb2.FLOAT,
    statistics_pb2.FeatureNameStatistics.STRING: schema_pb2.BYTES,
    statistics_pb2.FeatureNameStatistics.BYTES: schema_pb2.BYTES,
    statistics_pb2.FeatureNameStatistics.STRUCT: schema_pb2.STRUCT,
}

# Rank error of the quantiles: 0.1% of the values, so the deciles histogram the drift check
# compares (and the equal-width one viewers show) are close to exact at a few kB per feature.
QUANTILES_EPS = 0.001
_QUANTILES_MAX_ELEMENTS = 1 << 32
# Fine quantiles read off once (1001 points: the minimum, 999 inner ones, the maximum);
# deciles, the median and the equal-width histogram come from them.
_FINE_QUANTILES = 1000
HISTOGRAM_BUCKETS = 10
# A second, finer quantiles histogram (every fifth fine quantile: 200 equal-mass buckets) is
# what the drift check compares (anomalies.histogram): deciles cannot tell a shift of a sixth
# of the values by an hour from a season's normal change. Viewers show the deciles.
DRIFT_BUCKETS = 200
TOP_VALUES = 100
# Misra-Gries counts are exact while a feature has at most this many distinct values, so
# small domains (airports, carriers) get exact counts and the schema can list every value.
RANK_HISTOGRAM_BUCKETS = 1000
MAX_DOMAIN_SIZE = 1000
KMV_BUCKETS = 1024
_LARGE_STRING_BYTES = 1024
_LARGE_STRING = "__LARGE_STRING__"
_INVALID_UTF8 = "__BYTES_VALUE__"

# Drift / skew thresholds written into an inferred schema; `skewless validate` reads them there.
DEFAULT_CATEGORICAL_THRESHOLD = 0.1  # L-infinity distance of the value frequencies
DEFAULT_NUMERIC_THRESHOLD = 0.1  # Jensen-Shannon divergence of the quantiles histograms

# A batch's source (the file it was read from), in its schema's metadata: a column read as
# several kinds names where each kind was seen.
SOURCE_METADATA_KEY = b"skewless.source"
# Custom statistics of a column read as more than one kind (numbers in one file, text in
# another): a rank histogram of the types with their numbers of values, and where each was
# seen (up to MAX_SOURCES sources per type, the first in sorted order, so any merge order
# gives the same text).
TYPES_SEEN = "types_seen"
TYPES_SEEN_IN = "types_seen_in"
MAX_SOURCES = 3
# Kinds in widening order: int + float is float; a column of several kinds is described as
# the widest one it has values of (text holds any number; a list of lists, counts only).
_WIDENING = (INT, FLOAT, STRING, STRUCT)
_FAMILY = {INT: "number", FLOAT: "number", STRING: STRING, STRUCT: STRUCT}


def _kind(t: pa.DataType) -> str | None:
    """The statistics type of an Arrow value type; None for the null type (no value seen)."""
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_null(t):
        return None
    if pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_temporal(t):
        return INT
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return FLOAT
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
        return STRING
    if pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return STRING
    return STRUCT


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _numeric_values(values: pa.Array) -> np.ndarray:
    t = values.type
    if pa.types.is_dictionary(t):
        values = values.dictionary_decode()
        t = values.type
    if pa.types.is_boolean(t):
        values = values.cast(pa.int8())
    elif pa.types.is_temporal(t):
        values = values.cast(pa.int64() if t.bit_width == 64 else pa.int32())
    elif pa.types.is_decimal(t):
        values = values.cast(pa.float64())
    return values.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _quantiles_sketch() -> sketches.QuantilesSketch:
    return sketches.QuantilesSketch(QUANTILES_EPS, _QUANTILES_MAX_ELEMENTS, 1)


class _Feature:
    """What one pass keeps of one column: counts, exact moments, and sketches.

    Every field merges in any order: counts add, moments combine by Chan's formula, the
    sketches merge. Missing values are not counted here: a column's missing count is the
    dataset's examples minus its non-missing ones, which also covers batches without it.
    A column read as numbers from one source and as text from another keeps both parts and
    `seen` says which kinds came from where; it is described as the widest kind.
    """

    def __init__(self, is_list: bool):
        self.kind: str | None = None  # the widest kind of any batch, values or not
        self.is_list = is_list
        self.num_non_missing = 0
        self.tot_num_values = 0
        self.min_num_values: int | None = None
        self.max_num_values: int | None = None
        self.lengths = _quantiles_sketch() if is_list else None
        # kind -> [its number of values, up to MAX_SOURCES sources (sorted)]
        self.seen: dict[str, list] = {}
        # numeric
        self.count = 0  # finite values in the moments and the quantiles
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.num_zeros = 0
        self.num_nan = 0
        self.num_neg_inf = 0
        self.num_pos_inf = 0
        self.quantiles = None
        # string
        self.top = None
        self.distinct = None
        self.total_length = 0
        self.num_strings = 0

    def accept(self, kind: str | None, is_list: bool) -> None:
        """Widen to another batch's type of the same column (int + float -> float)."""
        if kind is not None:
            self.kind = _widest(self.kind, kind)
            if kind in (INT, FLOAT):
                self._numbers()
            elif kind == STRING:
                self._strings_part()
        if is_list and not self.is_list:
            self._to_list()

    def _numbers(self) -> None:
        if self.quantiles is None:
            self.quantiles = _quantiles_sketch()

    def _strings_part(self) -> None:
        if self.top is None:
            self.top = sketches.MisraGriesSketch(
                RANK_HISTOGRAM_BUCKETS, _INVALID_UTF8, _LARGE_STRING_BYTES, _LARGE_STRING
            )
            self.distinct = sketches.KmvSketch(KMV_BUCKETS)

    def _to_list(self) -> None:
        # Scalars so far were lists of one value each.
        self.is_list = True
        self.lengths = _quantiles_sketch()
        if self.num_non_missing:
            self.lengths.AddValues(pa.array([1.0]), pa.array([float(self.num_non_missing)]))

    def _saw(self, kind: str, values: int, sources: Iterable[str]) -> None:
        count, known = self.seen.setdefault(kind, [0, []])
        self.seen[kind] = [count + values, sorted({*known, *sources})[:MAX_SOURCES]]

    def add(self, column: pa.Array, kind: str | None, source: str | None = None) -> None:
        """One batch's column, read as `kind` (None: no value in it has a type)."""
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        present = len(column) - column.null_count
        self.num_non_missing += present
        if self.is_list and _is_list(column.type):
            lengths = pc.list_value_length(column).drop_null()
            counts = lengths.to_numpy(zero_copy_only=False)
            self.tot_num_values += int(counts.sum())
            if len(counts):
                self._count_range(int(counts.min()), int(counts.max()))
                self.lengths.AddValues(lengths)
            values = pc.list_flatten(column).drop_null()
        else:
            self.tot_num_values += present
            if present:
                self._count_range(1, 1)
                if self.is_list:
                    self.lengths.AddValues(pa.array([1.0]), pa.array([float(present)]))
            values = column.drop_null() if column.null_count else column
        if not len(values) or kind is None:
            return
        self._saw(kind, len(values), [source] if source else [])
        if kind in (INT, FLOAT):
            self._add_numbers(_numeric_values(values))
        elif kind == STRING:
            self.top.AddValues(values)
            self.distinct.AddValues(values)
            self.total_length += int(pc.sum(pc.binary_length(values)).as_py() or 0)
            self.num_strings += len(values)

    def _count_range(self, low: int, high: int) -> None:
        self.min_num_values = low if self.min_num_values is None else min(self.min_num_values, low)
        self.max_num_values = (
            high if self.max_num_values is None else max(self.max_num_values, high)
        )

    def _add_numbers(self, x: np.ndarray) -> None:
        finite = np.isfinite(x)
        if finite.all():
            seen = x
        else:
            # NaN and the infinities are counted apart; infinities count in min and max too.
            nan = np.isnan(x)
            self.num_nan += int(nan.sum())
            infinite = x[~finite & ~nan]
            self.num_pos_inf += int(np.count_nonzero(infinite > 0))
            self.num_neg_inf += int(np.count_nonzero(infinite < 0))
            seen = x[~nan]
            x = x[finite]
        if not len(seen):
            return
        self.min = min(self.min, float(seen.min()))
        self.max = max(self.max, float(seen.max()))
        self.num_zeros += int(np.count_nonzero(seen == 0))
        if len(x):
            mean = float(x.mean())
            m2 = float(np.square(x - mean).sum())
            self._combine_moments(len(x), mean, m2)
            self.quantiles.AddValues(pa.array(x))

    def _combine_moments(self, n: int, mean: float, m2: float) -> None:
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def merge(self, other: _Feature) -> None:
        self.accept(other.kind, other.is_list)
        if other.is_list is False and self.is_list and other.num_non_missing:
            self.lengths.AddValues(pa.array([1.0]), pa.array([float(other.num_non_missing)]))
        elif other.lengths is not None:
            self.lengths.Merge(other.lengths)
        self.num_non_missing += other.num_non_missing
        self.tot_num_values += other.tot_num_values
        if other.min_num_values is not None:
            self._count_range(other.min_num_values, other.max_num_values)
        for kind, (values, sources) in other.seen.items():
            self._saw(kind, values, sources)
        if other.quantiles is not None:
            self._numbers()
            self.min = min(self.min, other.min)
            self.max = max(self.max, other.max)
            self.num_zeros += other.num_zeros
            self.num_nan += other.num_nan
            self.num_neg_inf += other.num_neg_inf
            self.num_pos_inf += other.num_pos_inf
            if other.count:
                self._combine_moments(other.count, other.mean, other.m2)
            self.quantiles.Merge(other.quantiles)
        if other.top is not None:
            self._strings_part()
            self.top.Merge(other.top)
            self.distinct.Merge(other.distinct)
            self.total_length += other.total_length
            self.num_strings += other.num_strings

    def compact(self) -> None:
        for sketch in (self.lengths, self.quantiles):
            if sketch is not None:
                sketch.Compact()

    def described_kind(self) -> str | None:
        """The kind the statistics describe: the widest one with values, else the widest of
        any batch (a typed column without values), None when no batch had a type."""
        with_values = [k for k, (n, _) in self.seen.items() if n]
        return _widest(*with_values) if with_values else self.kind

    def to_proto(self, name: str, num_examples: int) -> statistics_pb2.FeatureNameStatistics:
        kind = self.described_kind() or STRING  # never seen with a value: described by counts
        out = statistics_pb2.FeatureNameStatistics(name=name, type=_STATS_TYPE[kind])
        if kind in (INT, FLOAT):
            common = out.num_stats.common_stats
            self._numeric(out.num_stats, kind == INT)
        elif kind == STRING:
            common = out.string_stats.common_stats
            self._strings(out.string_stats)
        else:
            common = out.struct_stats.common_stats
        common.num_non_missing = self.num_non_missing
        common.num_missing = num_examples - self.num_non_missing
        common.tot_num_values = self.tot_num_values
        if self.num_non_missing:
            common.min_num_values = self.min_num_values
            common.max_num_values = self.max_num_values
            common.avg_num_values = self.tot_num_values / self.num_non_missing
            common.num_values_histogram.CopyFrom(self._num_values_histogram())
        self._types_seen(out)
        return out

    def _types_seen(self, out: statistics_pb2.FeatureNameStatistics) -> None:
        """The custom statistics of a column with values of more than one family of kinds."""
        kinds = sorted((k for k, (n, _) in self.seen.items() if n), key=_WIDENING.index)
        if len({_FAMILY[k] for k in kinds}) < 2:
            return
        ranked = out.custom_stats.add(name=TYPES_SEEN).rank_histogram
        for i, k in enumerate(kinds):
            ranked.buckets.add(
                low_rank=i, high_rank=i, label=type_name(k), sample_count=self.seen[k][0]
            )
        where = [
            f"{type_name(k)} in {', '.join(self.seen[k][1])}" for k in kinds if self.seen[k][1]
        ]
        if where:
            out.custom_stats.add(name=TYPES_SEEN_IN, str="; ".join(where))

    def _num_values_histogram(self) -> statistics_pb2.Histogram:
        if self.lengths is None:
            points = np.ones(HISTOGRAM_BUCKETS + 1)
        else:
            points = _fine_quantiles(self.lengths)[0][:: _FINE_QUANTILES // HISTOGRAM_BUCKETS]
        return _quantiles_histogram(points, float(self.num_non_missing))

    def _numeric(self, stats: statistics_pb2.NumericStatistics, integers: bool) -> None:
        """Moments, median and histograms of the finite values (equal-width, deciles and
        DRIFT_BUCKETS equal-mass buckets); min and max of all but NaN. Each histogram counts
        NaN in num_nan and an infinity in a zero-width bucket at its end ([-inf, -inf] first,
        [inf, inf] last), so what is not finite is counted where the format has room for it;
        with no finite value, the first two hold only those."""
        if self.count:
            stats.mean = self.mean
            stats.std_dev = math.sqrt(max(self.m2, 0.0) / self.count)
        if self.min <= self.max:
            stats.min = self.min
            stats.max = self.max
        stats.num_zeros = self.num_zeros
        histograms = [
            statistics_pb2.Histogram(type=statistics_pb2.Histogram.STANDARD),
            statistics_pb2.Histogram(type=statistics_pb2.Histogram.QUANTILES),
        ]
        if self.count:
            values, ranks = _fine_quantiles(self.quantiles)
            stats.median = float(values[_FINE_QUANTILES // 2])
            count = float(self.count)
            histograms = [
                _standard_histogram(values, ranks, count, integers),
                _quantiles_histogram(values[:: _FINE_QUANTILES // HISTOGRAM_BUCKETS], count),
                _quantiles_histogram(values[:: _FINE_QUANTILES // DRIFT_BUCKETS], count),
            ]
        elif not (self.num_nan or self.num_neg_inf or self.num_pos_inf):
            return
        for histogram in histograms:
            histogram.num_nan = self.num_nan
            stats.histograms.append(_with_infinities(histogram, self.num_neg_inf, self.num_pos_inf))

    def _strings(self, stats: statistics_pb2.StringStatistics) -> None:
        if self.top is None:
            return
        stats.unique = self.distinct.Estimate()
        if self.num_strings:
            stats.avg_length = self.total_length / self.num_strings
        ranked = self.top.Estimate().to_pylist()
        for i, item in enumerate(ranked):
            label = item["values"].decode("utf-8", errors="replace")
            if i < TOP_VALUES:
                stats.top_values.add(value=label, frequency=item["counts"])
            stats.rank_histogram.buckets.add(
                low_rank=i, high_rank=i, label=label, sample_count=item["counts"]
            )


def _widest(*kinds: str | None) -> str | None:
    known = [k for k in kinds if k is not None]
    return max(known, key=_WIDENING.index) if known else None


def type_name(kind: str) -> str:
    """The statistics' name of a kind: INT, FLOAT, STRING, STRUCT."""
    return statistics_pb2.FeatureNameStatistics.Type.Name(_STATS_TYPE[kind])


def _with_infinities(h: statistics_pb2.Histogram, neg: int, pos: int) -> statistics_pb2.Histogram:
    if not (neg or pos):
        return h
    out = statistics_pb2.Histogram(type=h.type, num_nan=h.num_nan)
    if neg:
        out.buckets.add(low_value=-math.inf, high_value=-math.inf, sample_count=neg)
    out.buckets.extend(h.buckets)
    if pos:
        out.buckets.add(low_value=math.inf, high_value=math.inf, sample_count=pos)
    return out


def _fine_quantiles(sketch: sketches.QuantilesSketch) -> tuple[np.ndarray, np.ndarray]:
    """Values at 1001 evenly spaced ranks (min to max) and the count of values <= each, read
    from a copy (reading a sketch finalizes it)."""
    copy = pickle.loads(pickle.dumps(sketch))
    values, ranks = copy.GetQuantilesAndCumulativeWeights(_FINE_QUANTILES)
    return (
        values.flatten().to_numpy(zero_copy_only=False),
        ranks.flatten().to_numpy(zero_copy_only=False),
    )


def _quantiles_histogram(points: np.ndarray, count: float) -> statistics_pb2.Histogram:
    out = statistics_pb2.Histogram(type=statistics_pb2.Histogram.QUANTILES)
    share = count / (len(points) - 1)
    for low, high in zip(points[:-1], points[1:], strict=True):
        out.buckets.add(low_value=float(low), high_value=float(high), sample_count=share)
    return out


def _standard_histogram(
    values: np.ndarray, ranks: np.ndarray, count: float, integers: bool
) -> statistics_pb2.Histogram:
    """Equal-width buckets between min and max ([low, high), the last one closed, as numpy's),
    counts read off the sketch's distribution function: exact at the sketch's points, linear
    between them; for integers, read at integers (no value lies between two adjacent ones)."""
    out = statistics_pb2.Histogram(type=statistics_pb2.Histogram.STANDARD)
    low, high = float(values[0]), float(values[-1])
    if low == high:
        out.buckets.add(low_value=low, high_value=high, sample_count=count)
        return out
    # One point per distinct value, with the count of values at or below it.
    distinct, last = np.unique(values[::-1], return_index=True)
    at_or_below = ranks[::-1][last]
    edges = np.linspace(low, high, HISTOGRAM_BUCKETS + 1)
    # Values below each edge: at or below the integer before it, or (reals) at or below it.
    below = np.interp(np.ceil(edges) - 1 if integers else edges, distinct, at_or_below, left=0.0)
    below[0], below[-1] = 0.0, count
    for i in range(HISTOGRAM_BUCKETS):
        out.buckets.add(
            low_value=float(edges[i]),
            high_value=float(edges[i + 1]),
            sample_count=float(max(below[i + 1] - below[i], 0.0)),
        )
    return out


class StatisticsAccumulator:
    """The examples seen and one _Feature per column, in the order the columns first came:
    add batches, merge accumulators in any order, read off a DatasetFeatureStatistics. The
    Beam CombineFn (statistics_fn.py) and the in-process path share it."""

    def __init__(self):
        self.num_examples = 0
        self.features: dict[str, _Feature] = {}

    def add(self, batch: pa.RecordBatch) -> StatisticsAccumulator:
        """One batch; its schema's SOURCE_METADATA_KEY, if any, names where it was read."""
        self.num_examples += batch.num_rows
        source = (batch.schema.metadata or {}).get(SOURCE_METADATA_KEY)
        source = source.decode("utf-8", errors="replace") if source else None
        for field, column in zip(batch.schema, batch.columns, strict=True):
            is_list = _is_list(field.type)
            kind = _kind(field.type.value_type if is_list else field.type)
            if is_list and _is_list(field.type.value_type):
                kind = STRUCT  # a list of lists: described by its counts only
            feature = self.features.get(field.name)
            if feature is None:
                feature = self.features[field.name] = _Feature(is_list)
            feature.accept(kind, is_list)
            feature.add(column, kind, source)
        return self

    def merge(self, other: StatisticsAccumulator) -> StatisticsAccumulator:
        self.num_examples += other.num_examples
        for name, feature in other.features.items():
            mine = self.features.get(name)
            if mine is None:
                self.features[name] = mine = _Feature(feature.is_list)
            mine.merge(feature)
        return self

    def compact(self) -> StatisticsAccumulator:
        for feature in self.features.values():
            feature.compact()
        return self

    def to_proto(self, name: str) -> statistics_pb2.DatasetFeatureStatistics:
        out = statistics_pb2.DatasetFeatureStatistics(name=name, num_examples=self.num_examples)
        for column, feature in self.features.items():
            out.features.append(feature.to_proto(column, self.num_examples))
        return out


def statistics_of_batches(
    batches: Iterable[pa.RecordBatch], name: str
) -> statistics_pb2.DatasetFeatureStatistics:
    """The statistics of batches in this process (one accumulator, as one Beam worker would)."""
    acc = StatisticsAccumulator()
    for batch in batches:
        acc.add(batch)
    return acc.to_proto(name)


def common_stats(feature: statistics_pb2.FeatureNameStatistics) -> statistics_pb2.CommonStatistics:
    """The common statistics of a feature, whichever kind of statistics holds them."""
    kind = feature.WhichOneof("stats")
    return getattr(feature, kind).common_stats if kind else statistics_pb2.CommonStatistics()


def infer_schema(statistics: statistics_pb2.DatasetFeatureStatistics) -> schema_pb2.Schema:
    """A schema of the features the (training) statistics describe: type, presence, value
    counts, a domain of every value for small string domains, the non-finite values a float
    feature may not have (none it did not have), and drift / skew thresholds.

    Numeric features get no range: a value outside the training range is drift (measured by
    the histograms), not a broken contract.
    """
    schema = schema_pb2.Schema()
    n = statistics.num_examples
    for stats in statistics.features:
        common = common_stats(stats)
        feature = schema.feature.add(name=stats.name, type=_SCHEMA_TYPE[stats.type])
        present = common.num_non_missing
        if present == n and n:
            feature.presence.min_fraction = 1.0
        else:
            # A little below what was seen, so a sample of the same data still passes.
            feature.presence.min_fraction = math.floor(100 * present / n) / 100 if n else 0.0
        feature.presence.min_count = 1 if present else 0
        if stats.type != statistics_pb2.FeatureNameStatistics.STRUCT and present:
            feature.value_count.min = common.min_num_values
            feature.value_count.max = common.max_num_values
        if stats.type == statistics_pb2.FeatureNameStatistics.STRING:
            buckets = stats.string_stats.rank_histogram.buckets
            if (
                0 < stats.string_stats.unique <= MAX_DOMAIN_SIZE
                and len(buckets) >= stats.string_stats.unique
            ):
                schema.string_domain.add(name=stats.name, value=sorted(b.label for b in buckets))
                feature.domain = stats.name
            feature.drift_comparator.infinity_norm.threshold = DEFAULT_CATEGORICAL_THRESHOLD
            feature.skew_comparator.infinity_norm.threshold = DEFAULT_CATEGORICAL_THRESHOLD
        elif stats.type in (
            statistics_pb2.FeatureNameStatistics.INT,
            statistics_pb2.FeatureNameStatistics.FLOAT,
        ):
            feature.drift_comparator.jensen_shannon_divergence.threshold = DEFAULT_NUMERIC_THRESHOLD
            feature.skew_comparator.jensen_shannon_divergence.threshold = DEFAULT_NUMERIC_THRESHOLD
        if stats.type == statistics_pb2.FeatureNameStatistics.FLOAT:
            _disallow_what_was_not_seen(feature, stats.num_stats)
    return schema


def _disallow_what_was_not_seen(
    feature: schema_pb2.Feature, stats: statistics_pb2.NumericStatistics
) -> None:
    """A float feature's `float_domain` disallows NaN when the statistics count none, and
    infinities when min and max are finite (TFDV's FLOAT_TYPE_HAS_NAN / HAS_INF fields). An
    int feature needs none: a NaN or an infinity makes its column read as floats."""
    if not any(h.num_nan for h in stats.histograms):
        feature.float_domain.disallow_nan = True
    if math.isfinite(stats.min) and math.isfinite(stats.max):
        feature.float_domain.disallow_inf = True
