"""Drift thresholds from the data (issue 23): the training examples split into spans of the size
a retrain validates (a calendar month by default), each span's statistics measured against the
whole with the measure validation uses, and each feature's threshold set above that normal
range. No Beam and no I/O here: statistics_fn.SpanStatisticsFn computes the spans' statistics
in prepare's statistics pass, prepare writes the schema and the record.

A threshold is DRIFT_MARGIN times the largest divergence of a span, at least
MIN_DRIFT_THRESHOLD (below it, sampling noise of a month's histogram), at most 1 (a feature
that drifts that much between its own spans cannot be checked this way: the record says so).
Spans much smaller than the others (a partial month at either end of the period: fewer than
MIN_SPAN_SHARE of the median span's examples) are left out; fewer than MIN_SPANS spans leave
the schema's thresholds as they are.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2

from skewless.transforms.anomalies import L_INF, drift_distance
from skewless.transforms.featureset import FeatureSet, FeatureSetError, duration_s

MONTH = "month"  # calendar months of the event time (UTC)
DEFAULT_DRIFT_SPAN = MONTH
DRIFT_MARGIN = 1.5
MIN_DRIFT_THRESHOLD = 0.01
MIN_SPAN_SHARE = 0.5
MIN_SPANS = 3
_OFF = ("0", "none", "off")

Span = str | int  # MONTH, or a span of that many seconds (aligned to the Unix epoch)


def parse_span(value: str | None) -> Span | None:
    """--drift_span: "month" (the default when None), a duration ("30d", "2w", "12h", or
    seconds), or 0 / none / off (no calibration: None). ValueError naming the flag otherwise."""
    if value is None:
        return DEFAULT_DRIFT_SPAN
    text = str(value).strip().lower()
    if text in _OFF:
        return None
    if text in (MONTH, "months"):
        return MONTH
    try:
        seconds = int(text) if text.isdigit() else duration_s(text, "--drift_span")
    except FeatureSetError as e:
        raise ValueError(f"{e} (or 'month', or 0 / none to switch calibration off)") from None
    if seconds <= 0:
        return None
    return seconds


def describe_span(span: Span) -> str:
    """A span in words: "a calendar month", "30 days", "3600 s"."""
    if span == MONTH:
        return "a calendar month"
    days, rest = divmod(int(span), 86_400)
    return f"{days} days" if not rest else f"{int(span)} s"


def span_keys(fs: FeatureSet, batch: pa.RecordBatch, span: Span) -> np.ndarray:
    """The span of each example of `batch` by its event time: a month number (year * 12 +
    month - 1) or the index of its span of seconds since the epoch."""
    times = pc.cast(batch.column(fs.event_time), pa.timestamp("ms", tz="UTC"))
    if span == MONTH:
        keys = pc.add(pc.multiply(pc.year(times), 12), pc.subtract(pc.month(times), 1))
        return keys.to_numpy(zero_copy_only=False).astype(np.int64)
    ms = pc.cast(times, pa.int64()).to_numpy(zero_copy_only=False)
    return np.floor_divide(ms, int(span) * 1000)


def split_by_span(
    fs: FeatureSet, batch: pa.RecordBatch, span: Span
) -> list[tuple[int, pa.RecordBatch]]:
    """(span key, the examples of the batch in that span) for each span the batch touches."""
    if not batch.num_rows:
        return []
    keys = span_keys(fs, batch, span)
    distinct = np.unique(keys)
    if len(distinct) == 1:
        return [(int(distinct[0]), batch)]
    return [(int(k), batch.filter(pa.array(keys == k))) for k in distinct]


def span_label(key: int, span: Span) -> str:
    """A span's name in the record: "2013-07" for a month, its UTC start otherwise."""
    if span == MONTH:
        year, month = divmod(key, 12)
        return f"{year:04d}-{month + 1:02d}"
    start = dt.datetime.fromtimestamp(key * int(span), tz=dt.UTC)
    return start.strftime("%Y-%m-%dT%H:%M:%SZ")


def calibrate(
    train: statistics_pb2.DatasetFeatureStatistics,
    spans: Mapping[str, statistics_pb2.DatasetFeatureStatistics],
    schema: schema_pb2.Schema,
    span: Span,
    skip: Mapping[str, str] | None = None,
) -> tuple[schema_pb2.Schema, dict]:
    """(the schema with calibrated drift thresholds, the record of how each was derived).

    `spans` are the statistics of each span ({label: statistics}) and `train` those of all of
    them; `skip` the features validation does not compare ({name: why}: time columns and
    calendar fields, validation.baseline.not_compared): left as they are.
    """
    out = schema_pb2.Schema()
    out.CopyFrom(schema)
    counts = {label: int(s.num_examples) for label, s in sorted(spans.items())}
    median = float(np.median(list(counts.values()))) if counts else 0.0
    kept = [label for label, n in counts.items() if n >= MIN_SPAN_SHARE * median and n]
    record = {
        "span": span if span == MONTH else f"{int(span)}s",
        "span_described": describe_span(span),
        "margin": DRIFT_MARGIN,
        "min_threshold": MIN_DRIFT_THRESHOLD,
        "spans": counts,
        "left_out": {
            label: f"{n:,} examples, fewer than {MIN_SPAN_SHARE:.0%} of the median span's "
            f"{median:,.0f}"
            for label, n in counts.items()
            if label not in kept
        },
        "calibrated": len(kept) >= MIN_SPANS,
        "features": {},
    }
    reasons = dict(skip or {})
    base = {f.name: f for f in train.features}
    per_span = {label: {f.name: f for f in spans[label].features} for label in kept}
    for feature in out.feature:
        name = feature.name
        if name in reasons:
            record["features"][name] = {"not_calibrated": reasons[name]}
            continue
        if not feature.HasField("drift_comparator") or name not in base:
            continue
        if not record["calibrated"]:
            record["features"][name] = {
                "not_calibrated": f"{len(kept)} span(s) of {describe_span(span)}: at least "
                f"{MIN_SPANS} are needed"
            }
            continue
        measure, divergences = None, {}
        for label in kept:
            found = per_span[label].get(name)
            measured = None if found is None else drift_distance(base[name], found)
            if measured is not None:
                measure, divergences[label] = measured[0], round(measured[1], 6)
        if not divergences:
            record["features"][name] = {"not_calibrated": "no span has values to compare"}
            continue
        largest = max(divergences.values())
        threshold = min(1.0, max(MIN_DRIFT_THRESHOLD, _round_up(DRIFT_MARGIN * largest)))
        comparator = feature.drift_comparator
        if measure == L_INF:
            comparator.infinity_norm.threshold = threshold
        else:
            comparator.jensen_shannon_divergence.threshold = threshold
        record["features"][name] = {
            "measure": measure,
            "divergences": divergences,
            "max": round(largest, 6),
            "threshold": threshold,
            "derived": _derivation(largest, threshold, len(divergences), span),
        }
    return out, record


def _round_up(x: float) -> float:
    return math.ceil(x * 10_000) / 10_000


def _derivation(largest: float, threshold: float, n: int, span: Span) -> str:
    spans = f"{n} spans of {describe_span(span)}"
    if threshold >= 1.0:
        return f"{DRIFT_MARGIN:g} x max over {spans} ({largest:.4f}) exceeds 1: never blocks"
    if threshold == MIN_DRIFT_THRESHOLD and DRIFT_MARGIN * largest < MIN_DRIFT_THRESHOLD:
        return f"the minimum {MIN_DRIFT_THRESHOLD:g} (max over {spans}: {largest:.4f})"
    return f"{DRIFT_MARGIN:g} x max over {spans} ({largest:.4f})"
