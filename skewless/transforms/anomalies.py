"""New data's statistics against a baseline's statistics and schema: the six questions' anomalies.

The six questions (issue 13), each anomaly names the one it answers:
1. is the new distribution similar enough to the old one (`distribution_drift`: L-infinity
   distance of categorical distributions, Jensen-Shannon divergence of the finite values of
   numeric ones; `unseen_categories`: values outside the schema's string domain;
   `non_finite_values`: NaN or infinities the schema's float domain disallows);
2. are all expected features present (`missing_column`);
3. are there unexpected features (`unexpected_column`);
4. does each feature have the expected type (`type_change`; `mixed_types`: a column read as
   numbers from one file and as text from another);
5. does the expected fraction of examples contain each feature (`presence`,
   `presence_count`; `no_examples`: the data has no rows at all);
6. does each feature have the expected number of values (`value_count`).

Thresholds come from the schema (users edit schema.pbtxt; later runs use the edit):
- drift: a feature is compared when its schema entry has a `drift_comparator`; the
  threshold is `infinity_norm.threshold` (string features) or
  `jensen_shannon_divergence.threshold` (numeric ones), DEFAULT_DRIFT_THRESHOLD when unset.
  The check is `distance > threshold`, so a threshold of 1 switches it off.
- unseen categories: a string feature with a domain may have at most
  1 - `distribution_constraints.min_domain_mass` of its values outside it (default
  DEFAULT_MIN_DOMAIN_MASS: up to 1 % is reported, not blocking, so a rare value a held-out
  month brings does not stop it; a new code in 5 % of the rows blocks).
- non-finite values: a numeric feature whose `float_domain` has `disallow_nan` /
  `disallow_inf` (inferred when the baseline had none) may have at most
  1 - `distribution_constraints.min_domain_mass` of its values NaN / infinite (default
  DEFAULT_MIN_FINITE_MASS: none); NaN counts in the histograms' `num_nan`, an infinity in a
  zero-width bucket at -inf or inf (statistics.py).
- presence: `presence.min_fraction` and `presence.min_count`; value counts:
  `value_count.min` / `max`.

A feature without any value (a column Arrow reads as type null: every cell empty) has no type
to compare: only its presence is checked.

Blocking: every anomaly blocks except an unexpected column (the data still has everything
the model reads) and unseen categories or non-finite values within the domain-mass tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2

from skewless.transforms.statistics import TYPES_SEEN, TYPES_SEEN_IN

DEFAULT_DRIFT_THRESHOLD = 0.1
DEFAULT_MIN_DOMAIN_MASS = 0.99
DEFAULT_MIN_FINITE_MASS = 1.0  # a float domain that disallows NaN or infinities: none
NO_FEATURE = ""  # the `feature` of an anomaly of the whole dataset (no_examples)

_STATS = statistics_pb2.FeatureNameStatistics
_NUMERIC_STATS = (_STATS.INT, _STATS.FLOAT)
_STRING_STATS = (_STATS.STRING, _STATS.BYTES)
# The statistics types a schema type accepts: an int is a float (a CSV of whole numbers reads
# as ints), a string is bytes.
_ACCEPTS = {
    schema_pb2.INT: {_STATS.INT},
    schema_pb2.FLOAT: {_STATS.FLOAT, _STATS.INT},
    schema_pb2.BYTES: {_STATS.STRING, _STATS.BYTES},
    schema_pb2.STRUCT: {_STATS.STRUCT},
}
_SCHEMA_TYPE_NAMES = {schema_pb2.INT: "INT", schema_pb2.FLOAT: "FLOAT", schema_pb2.BYTES: "STRING", schema_pb2.STRUCT: "STRUCT"}  # fmt: skip


@dataclass(frozen=True)
class Anomaly:
    """One finding: the question it answers, the feature, what was measured against what."""

    question: int
    feature: str
    kind: str
    value: float | str | None
    threshold: float | str | None
    blocking: bool
    description: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Anomaly:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


def find_anomalies(
    baseline: statistics_pb2.DatasetFeatureStatistics,
    schema: schema_pb2.Schema,
    new: statistics_pb2.DatasetFeatureStatistics,
    *,
    expected_columns: Iterable[str] | None = None,
    known_columns: Iterable[str] = (),
) -> list[Anomaly]:
    """Every anomaly of `new` against the baseline statistics and the schema, by question.

    `expected_columns` limits question 2 to the columns the source carries (raw files hold the
    raw fields, not the aggregates); `known_columns` are columns the source may carry that
    the schema does not describe (raw fields that are not example fields): not unexpected.
    """
    base = {_name(f): f for f in baseline.features}
    new_features = {_name(f): f for f in new.features}
    declared = {f.name: f for f in schema.feature}
    expected = set(declared) if expected_columns is None else set(expected_columns)
    found: list[Anomaly] = []
    if not new.num_examples:
        found.append(
            Anomaly(
                5, NO_FEATURE, "no_examples", 0, 1, True,
                "the new data has no examples (no rows): there is nothing to compare with the "
                "baseline",
            )
        )  # fmt: skip
        if not new_features:
            return found  # nothing is known about its columns either
    for name in sorted(expected - set(new_features)):
        found.append(
            Anomaly(
                2,
                name,
                "missing_column",
                None,
                None,
                True,
                f"expected column {name!r} is not in the new data",
            )
        )
    allowed = set(declared) | expected | set(known_columns)
    for name in sorted(set(new_features) - allowed):
        found.append(
            Anomaly(
                3,
                name,
                "unexpected_column",
                None,
                None,
                False,
                f"column {name!r} is not in the schema",
            )
        )
    for name in sorted(set(declared) & set(new_features)):
        feature, stats = declared[name], new_features[name]
        typed = _type(name, feature, stats)
        if typed:
            found += typed
            continue  # its other statistics compare values of another kind
        found += _presence(name, feature, stats, new.num_examples)
        found += _value_count(name, feature, stats)
        found += _unseen(name, feature, stats, schema)
        found += _non_finite(name, feature, stats)
        if feature.HasField("drift_comparator") and name in base:
            found += _drift(name, feature, base[name], stats)
    return sorted(found, key=lambda a: (a.question, a.feature, a.kind))


def blocking(anomalies: Iterable[Anomaly | dict]) -> list:
    """The anomalies that block (refuse the data)."""
    return [a for a in anomalies if (a["blocking"] if isinstance(a, dict) else a.blocking)]


# --- the checks of one feature --------------------------------------------------------------------


def _name(f: statistics_pb2.FeatureNameStatistics) -> str:
    return f.name or ".".join(f.path.step)


def common_stats(f: statistics_pb2.FeatureNameStatistics) -> statistics_pb2.CommonStatistics:
    for kind in ("num_stats", "string_stats", "bytes_stats", "struct_stats"):
        if f.HasField(kind):
            return getattr(f, kind).common_stats
    return statistics_pb2.CommonStatistics()


def types_seen(stats: statistics_pb2.FeatureNameStatistics) -> tuple[dict[str, float], str]:
    """({type: number of values} of a column read as more than one kind (numbers and text),
    where each type was seen, e.g. "INT in a.csv; STRING in b.csv"); ({}, "") otherwise."""
    types, where = {}, ""
    for custom in stats.custom_stats:
        if custom.name == TYPES_SEEN:
            types = {b.label: b.sample_count for b in custom.rank_histogram.buckets}
        elif custom.name == TYPES_SEEN_IN:
            where = custom.str
    return types, where


def _has_values(stats: statistics_pb2.FeatureNameStatistics) -> bool:
    common = common_stats(stats)
    return common.num_non_missing > 0 and common.max_num_values > 0


def _type(name, feature, stats) -> list[Anomaly]:
    """Question 4: a column of several types, or of another type than the schema's (a column
    without values has no type: its presence says what is wrong)."""
    wanted = _SCHEMA_TYPE_NAMES.get(feature.type)
    types, where = types_seen(stats)
    if types and wanted:
        read = " and as ".join(f"{t} ({n:,.0f} values)" for t, n in types.items())
        return [
            Anomaly(
                4, name, "mixed_types", ", ".join(types), wanted, True,
                f"{name!r} is read as {read}: {where or 'in different batches'}; the schema "
                f"says {wanted}, and one column holds values of one type",
            )
        ]  # fmt: skip
    accepted = _ACCEPTS.get(feature.type)
    if accepted is None or stats.type in accepted or not _has_values(stats):
        return []
    found = _STATS.Type.Name(stats.type)
    nan, neg, pos = non_finite_counts(stats) if stats.type in _NUMERIC_STATS else (0, 0, 0)
    odd = nan + neg + pos
    extra = f" ({odd / _num_values(stats):.2%} of its values NaN or infinite)" if odd else ""
    return [
        Anomaly(
            4, name, "type_change", found, wanted, True,
            f"{name!r} is {found}, the schema says {wanted}{extra}",
        )
    ]  # fmt: skip


def _presence(name, feature, stats, num_examples) -> list[Anomaly]:
    if not feature.HasField("presence"):
        return []
    present = common_stats(stats).num_non_missing
    out = []
    if num_examples and feature.presence.min_fraction > 0:
        fraction = present / num_examples
        if fraction < feature.presence.min_fraction:
            out.append(
                Anomaly(
                    5, name, "presence", round(fraction, 6), feature.presence.min_fraction, True,
                    f"{name!r} is present in {fraction:.2%} of the examples, the schema wants at "
                    f"least {feature.presence.min_fraction:.2%}",
                )
            )  # fmt: skip
    if num_examples and present < feature.presence.min_count:
        out.append(
            Anomaly(
                5, name, "presence_count", present, feature.presence.min_count, True,
                f"{name!r} is present in {present} examples, the schema wants at least "
                f"{feature.presence.min_count}",
            )
        )  # fmt: skip
    return out


def _value_count(name, feature, stats) -> list[Anomaly]:
    if not feature.HasField("value_count"):
        return []
    common = common_stats(stats)
    if not common.num_non_missing:
        return []
    wanted, out = feature.value_count, []
    if wanted.max and common.max_num_values > wanted.max:
        out.append(
            Anomaly(
                6, name, "value_count", common.max_num_values, wanted.max, True,
                f"{name!r} has up to {common.max_num_values} values in an example, the schema "
                f"allows at most {wanted.max}",
            )
        )  # fmt: skip
    if common.min_num_values < wanted.min:
        out.append(
            Anomaly(
                6, name, "value_count", common.min_num_values, wanted.min, True,
                f"{name!r} has as few as {common.min_num_values} values in an example, the "
                f"schema wants at least {wanted.min}",
            )
        )  # fmt: skip
    return out


def string_domain(feature: schema_pb2.Feature, schema: schema_pb2.Schema) -> set[str] | None:
    """The feature's string domain (inline, or a schema-level domain named by `domain`)."""
    if feature.HasField("string_domain"):
        return set(feature.string_domain.value)
    if feature.HasField("domain"):
        for domain in schema.string_domain:
            if domain.name == feature.domain:
                return set(domain.value)
    return None


def value_counts(
    stats: statistics_pb2.FeatureNameStatistics,
) -> tuple[dict[str, float], float, bool]:
    """(count per listed value, total number of values, whether every distinct value is listed)
    of a string feature, from its rank histogram (else its top values)."""
    s = stats.string_stats
    buckets = s.rank_histogram.buckets
    counts = (
        {b.label: b.sample_count for b in buckets}
        if buckets
        else {v.value: v.frequency for v in s.top_values}
    )
    total = s.common_stats.tot_num_values or sum(counts.values())
    complete = not s.unique or len(counts) >= s.unique
    return counts, float(total), complete


def _unseen(name, feature, stats, schema) -> list[Anomaly]:
    domain = string_domain(feature, schema)
    if domain is None or stats.type not in _STRING_STATS:
        return []
    counts, total, complete = value_counts(stats)
    if not total:
        return []
    outside = {v: c for v, c in counts.items() if v not in domain}
    if not outside:
        return []
    fraction = sum(outside.values()) / total
    mass = (
        feature.distribution_constraints.min_domain_mass
        if feature.HasField("distribution_constraints")
        else DEFAULT_MIN_DOMAIN_MASS
    )
    tolerance = round(1.0 - mass, 12)
    examples = ", ".join(repr(v) for v in sorted(outside, key=lambda v: -outside[v])[:5])
    bound = "" if complete else " (at least: the statistics list the most frequent values only)"
    return [
        Anomaly(
            1, name, "unseen_categories", round(fraction, 6), tolerance, fraction > tolerance,
            f"{fraction:.2%} of the values of {name!r}{bound} are outside its domain "
            f"(tolerated: {tolerance:.2%}), e.g. {examples}",
        )
    ]  # fmt: skip


def non_finite_counts(stats: statistics_pb2.FeatureNameStatistics) -> tuple[int, int, int]:
    """(NaN, -inf, +inf) values of a numeric feature: its histograms' `num_nan` and their
    zero-width buckets at -inf and inf."""
    histograms = list(stats.num_stats.histograms)
    nan = max((h.num_nan for h in histograms), default=0)
    with_buckets = next((h for h in histograms if h.buckets), None)
    if with_buckets is None:
        return nan, 0, 0
    neg = sum(b.sample_count for b in with_buckets.buckets if b.high_value == -math.inf)
    pos = sum(b.sample_count for b in with_buckets.buckets if b.low_value == math.inf)
    return nan, int(neg), int(pos)


def _num_values(stats) -> float:
    common = common_stats(stats)
    return float(common.tot_num_values or common.num_non_missing) or 1.0


def _non_finite(name, feature, stats) -> list[Anomaly]:
    if stats.type not in _NUMERIC_STATS or not feature.HasField("float_domain"):
        return []
    domain = feature.float_domain
    nan, neg, pos = non_finite_counts(stats)
    counts = {
        "NaN": nan if domain.disallow_nan else 0,
        "-inf": neg if domain.disallow_inf else 0,
        "inf": pos if domain.disallow_inf else 0,
    }
    total = _num_values(stats)
    share = sum(counts.values()) / total
    if not share:
        return []
    mass = (
        feature.distribution_constraints.min_domain_mass
        if feature.HasField("distribution_constraints")
        else DEFAULT_MIN_FINITE_MASS
    )
    tolerance = round(1.0 - mass, 12)
    parts = ", ".join(f"{c / total:.2%} {what}" for what, c in counts.items() if c)
    return [
        Anomaly(
            1, name, "non_finite_values", round(share, 6), tolerance, share > tolerance,
            f"{share:.2%} of the values of {name!r} are not finite ({parts}); its float_domain "
            f"disallows them (tolerated: {tolerance:.2%})",
        )
    ]  # fmt: skip


@dataclass(frozen=True)
class DriftMeasure:
    """The drift of one feature from the baseline: the distance, what it is, the threshold
    the schema sets for it, and a detail (the value that changed most, for strings)."""

    feature: str
    measure: str
    distance: float
    threshold: float
    detail: str = ""

    @property
    def drifted(self) -> bool:
        return self.distance > self.threshold


JS, L_INF = "Jensen-Shannon divergence", "L-infinity distance"


def drift_distance(base, new) -> tuple[str, float, str] | None:
    """(measure, distance, detail) of a feature's new statistics from its baseline ones:
    L-infinity distance of the value frequencies of strings, Jensen-Shannon divergence of the
    finite values of numbers; None when the two cannot be compared (other types, no values).
    prepare's drift calibration measures its spans with this same function."""
    if base.type in _STRING_STATS and new.type in _STRING_STATS:
        labels, p, q = categorical_distributions(base, new)
        if not labels:
            return None
        gaps = np.abs(p - q)
        worst = int(gaps.argmax())
        detail = f" (largest change: {labels[worst]!r}, {p[worst]:.2%} -> {q[worst]:.2%})"
        return L_INF, float(gaps.max()), detail
    if base.type in _NUMERIC_STATS and new.type in _NUMERIC_STATS:
        grid = numeric_distributions(base, new)
        if grid is None:
            return None
        return JS, jensen_shannon_divergence(grid[1], grid[2]), ""
    return None


def drift_threshold(feature: schema_pb2.Feature, measure: str) -> float:
    """The schema's drift threshold of a feature for `measure` (DEFAULT_DRIFT_THRESHOLD when
    unset)."""
    comparator = feature.drift_comparator
    if measure == L_INF:
        return comparator.infinity_norm.threshold or DEFAULT_DRIFT_THRESHOLD
    return comparator.jensen_shannon_divergence.threshold or DEFAULT_DRIFT_THRESHOLD


def measure_drift(name, feature, base, new) -> DriftMeasure | None:
    """The drift of one feature with a drift comparator, or None when not comparable."""
    found = drift_distance(base, new)
    if found is None:
        return None
    measure, distance, detail = found
    return DriftMeasure(name, measure, distance, drift_threshold(feature, measure), detail)


def drift_measures(
    baseline: statistics_pb2.DatasetFeatureStatistics,
    schema: schema_pb2.Schema,
    new: statistics_pb2.DatasetFeatureStatistics,
) -> list[DriftMeasure]:
    """The drift of every feature the schema compares (a drift comparator) that both
    statistics describe, blocking or not: what the report lists next to the thresholds."""
    base = {_name(f): f for f in baseline.features}
    fresh = {_name(f): f for f in new.features}
    out = []
    for feature in schema.feature:
        name = feature.name
        if feature.HasField("drift_comparator") and name in base and name in fresh:
            found = measure_drift(name, feature, base[name], fresh[name])
            if found is not None:
                out.append(found)
    return out


def _drift(name, feature, base, new) -> list[Anomaly]:
    found = measure_drift(name, feature, base, new)
    if found is None or not found.drifted:
        return []
    distance, threshold = found.distance, found.threshold
    return [
        Anomaly(
            1, name, "distribution_drift", round(distance, 6), threshold, True,
            f"{found.measure} of {name!r} from the baseline is {distance:.4f} > {threshold:g}"
            f"{found.detail}",
        )
    ]  # fmt: skip


# --- distances ------------------------------------------------------------------------------------

OTHER = "(other values)"


def categorical_distributions(base, new) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(labels, baseline fractions, new fractions) of two string features' values.

    Each value's count is divided by the feature's total number of values, so values the
    statistics do not list (beyond the top k) form OTHER. A value that one side does not list
    while that side's list is truncated has an unknown fraction there: it is left out rather
    than compared with 0.
    """
    (pc, pt, pfull), (qc, qt, qfull) = value_counts(base), value_counts(new)
    if not pt or not qt:
        return [], np.zeros(0), np.zeros(0)
    labels = [v for v in sorted(set(pc) | set(qc)) if (v in pc or pfull) and (v in qc or qfull)]
    p = np.array([pc.get(v, 0.0) / pt for v in labels])
    q = np.array([qc.get(v, 0.0) / qt for v in labels])
    p_other, q_other = 1.0 - sum(pc.values()) / pt, 1.0 - sum(qc.values()) / qt
    if not (pfull and qfull) and max(p_other, q_other) > 1e-12:
        labels.append(OTHER)
        p, q = np.append(p, max(p_other, 0.0)), np.append(q, max(q_other, 0.0))
    return labels, p, q


def histogram(stats: statistics_pb2.FeatureNameStatistics) -> statistics_pb2.Histogram | None:
    """The finite buckets of the numeric feature's finest quantiles histogram (statistics.py
    writes deciles and DRIFT_BUCKETS equal-mass buckets; else its standard one): equal-mass
    buckets resolve a heavy-tailed feature where most values are, equal-width ones do not.
    Infinities (zero-width buckets at -inf and inf) are left out: the drift is that of the
    finite values, and non_finite_counts counts the others. None without any."""
    found: dict = {}
    for h in stats.num_stats.histograms:
        finite = [b for b in h.buckets if math.isfinite(b.low_value) and math.isfinite(b.high_value)]  # fmt: skip
        if finite and len(finite) > len(found.get(h.type, ())):
            found[h.type] = finite
    buckets = found.get(statistics_pb2.Histogram.QUANTILES) or found.get(
        statistics_pb2.Histogram.STANDARD
    )
    return None if buckets is None else statistics_pb2.Histogram(buckets=buckets)


def _mass_below(h: statistics_pb2.Histogram, points: np.ndarray, discrete: bool) -> np.ndarray:
    """Mass of the histogram strictly below each point, as a fraction of its total. A bucket's
    mass is spread evenly over it: over the interval (continuous), or over the integers from
    its low to its high value (discrete: whole-number values); a zero-width bucket is a point
    mass."""
    total = sum(b.sample_count for b in h.buckets)
    out = np.zeros(len(points))
    for b in h.buckets:
        lo, hi, n = b.low_value, b.high_value, b.sample_count
        if hi <= lo:
            out += np.where(points > lo, n, 0.0)
        elif discrete:
            out += n * np.clip(np.ceil(points) - lo, 0.0, hi - lo + 1) / (hi - lo + 1)
        else:
            out += n * np.clip((points - lo) / (hi - lo), 0.0, 1.0)
    return out / total if total else out


def numeric_distributions(base, new) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(boundaries, baseline masses, new masses) of two numeric features on common buckets.

    Rebinning: both histograms are read as cumulative distributions and evaluated at the union
    of both histograms' bucket boundaries; the mass between consecutive boundaries is a common
    bucket (a point mass at a boundary falls in the bucket that starts there, and the last
    bucket is closed). Nothing is lost where the ranges do not overlap: each side's range is
    covered. When every boundary is a whole number (counts, minutes of delay: values tied on
    integers), a bucket's mass is spread over the integers it spans, not over the interval:
    the interval reading puts part of a tied value's mass into its neighbour's common bucket,
    by an amount that depends on where the quantiles fell, which made two samples of the same
    integer feature look different (the issue 23 measurements: docs/jobs/validate.md).
    """
    hp, hq = histogram(base), histogram(new)
    if hp is None or hq is None:
        return None
    edges = np.unique([v for h in (hp, hq) for b in h.buckets for v in (b.low_value, b.high_value)])
    edges = edges[np.isfinite(edges)]
    if len(edges) == 1:
        return edges, np.ones(1), np.ones(1)
    discrete = bool(np.all(edges == np.round(edges)))
    cells = []
    for h in (hp, hq):
        below = _mass_below(h, edges, discrete)
        cum = np.append(below[1:], 1.0)  # below the next boundary; the last one closed
        cells.append(np.diff(np.concatenate([[0.0], cum])))
    p, q = (np.clip(c, 0.0, None) for c in cells)
    return edges, p / p.sum(), q / q.sum()


def jensen_shannon_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """JS divergence in bits (0 = same distribution, 1 = disjoint)."""
    m = (p + q) / 2

    def kl(a):
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    value = (kl(p) + kl(q)) / 2
    return min(max(value, 0.0), 1.0) if math.isfinite(value) else 1.0
