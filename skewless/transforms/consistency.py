"""Online/offline consistency: the serving log record of a scored event, its sample, and the
audit's comparison of served features and predictions with their batch recomputation.

Pure (no I/O, no Beam): streaming scoring builds log records with `serving_log_record`, keeps
the keys `is_sampled` selects, and `skewless audit` compares each logged event with the batch
path's example of the same key (`compare_example`) and sums the comparisons (`audit_report`).

A serving log record is one JSON object:
    {"example_key": {field: value}, "event_time": ms, "features": {column: value, ...},
     "model_version": int, "prediction": float, "source": "model" | "cache"}
`features` holds every example column of the feature set under the names of prepare's
features/ schema (raw example fields, aggregate columns, reference-table columns);
timestamps are epoch milliseconds, lists are JSON arrays, a null is null.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from skewless.transforms.example_schema import example_columns
from skewless.transforms.featureset import FeatureSet
from skewless.transforms.split import HASH_BUCKETS, key_bucket

# A numeric served value equals its batch value when |served - batch| <= TOLERANCE *
# max(1, |served|, |batch|): absolute 1e-6 for values up to 1, relative 1e-6 above.
TOLERANCE = 1e-6
MAX_EXAMPLES = 5  # mismatching events shown per feature in the report
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)
ABSENT = object()  # a column the served record does not carry at all


def plain(value: Any) -> Any:
    """A value as the log carries it: datetimes as epoch ms, tuples as lists, the rest as is."""
    if isinstance(value, dt.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return (moment - _EPOCH) // _MS
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def example_key(fs: FeatureSet, example: dict) -> tuple:
    """The example key of an example dict (streaming's or a batch row), timestamps as epoch ms,
    so both paths name one example alike."""
    return tuple(plain(example.get(name)) for name in fs.example_key)


def sample_threshold(fraction: float) -> int:
    """Hash buckets (of split.HASH_BUCKETS) a sample keeps: a fraction in [0, 1]."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--serving_log_sample must be in [0, 1], got {fraction}")
    return int(fraction * HASH_BUCKETS)


def is_sampled(key: tuple, fraction: float) -> bool:
    """True when the example key is in the sample: the split's stable hash of the key, so a
    re-run samples the same keys and the audit knows which examples should have been logged."""
    return key_bucket(key) < sample_threshold(fraction)


def serving_log_record(
    fs: FeatureSet, example: dict, prediction: float, model_version: int, source: str = "model"
) -> dict:
    """The log record of one scored example (the format in the module docstring)."""
    return {
        "example_key": dict(zip(fs.example_key, example_key(fs, example), strict=True)),
        "event_time": plain(example.get(fs.event_time)),
        "features": {c.name: plain(example.get(c.name)) for c in example_columns(fs)},
        "model_version": int(model_version),
        "prediction": float(prediction),
        "source": source,
    }


def logged_key(fs: FeatureSet, record: dict) -> tuple:
    """The example key of a serving log record, in `example_key`'s form."""
    key = record.get("example_key") or {}
    return tuple(plain(key.get(name)) for name in fs.example_key)


# --- the comparison --------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numbers_differ(served: float, batch: float) -> bool:
    """The tolerance rule (TOLERANCE); NaN equals NaN, an infinity only itself."""
    if math.isnan(served) or math.isnan(batch):
        return not (math.isnan(served) and math.isnan(batch))
    if math.isinf(served) or math.isinf(batch):
        return served != batch
    return abs(served - batch) > TOLERANCE * max(1.0, abs(served), abs(batch))


def compare_value(served: Any, batch: Any) -> tuple[str, float | None]:
    """(outcome, |served - batch| for two numbers else None); outcome is "equal", "mismatch",
    "missing" (served null or absent where batch has a value) or "extra" (the reverse)."""
    served = None if served is ABSENT else plain(served)
    batch = plain(batch)
    if served is None or batch is None:
        if served is None and batch is None:
            return "equal", None
        return ("missing" if served is None else "extra"), None
    if _is_number(served) and _is_number(batch):
        diff = abs(float(served) - float(batch))
        return ("mismatch" if numbers_differ(float(served), float(batch)) else "equal"), diff
    if isinstance(served, bool) != isinstance(batch, bool):  # True == 1 in Python: a type change
        return "mismatch", None
    return ("equal" if served == batch else "mismatch"), None


def compare_example(
    fs: FeatureSet, record: dict, batch: dict, batch_prediction: float | None = None
) -> dict:
    """One logged event against its batch example: {"features": {column: (outcome, diff)},
    "prediction": |served - batch| or None, "unknown": served columns the schema lacks}."""
    served = record.get("features") or {}
    features = {
        c.name: compare_value(served.get(c.name, ABSENT), batch.get(c.name))
        for c in example_columns(fs)
    }
    known = {c.name for c in example_columns(fs)}
    prediction = None
    if batch_prediction is not None and _is_number(record.get("prediction")):
        prediction = abs(float(record["prediction"]) - float(batch_prediction))
    return {
        "features": features,
        "prediction": prediction,
        "unknown": sorted(set(served) - known),
    }


def _rate(count: int, total: int) -> float:
    return count / total if total else 0.0


def _distribution(diffs: list[float]) -> dict:
    if not diffs:
        return {"max": None, "mean": None, "p50": None, "p99": None}
    values = np.asarray(diffs, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not values.size:
        return {"max": None, "mean": None, "p50": None, "p99": None}
    return {
        "max": float(values.max()),
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
    }


class _FeatureTally:
    """One example column's comparisons: mismatches, missing and extra values, the absolute
    differences of a number, and a few examples of each way it differed."""

    def __init__(self, numeric: bool):
        self.numeric = numeric
        self.counts = {"mismatch": 0, "missing": 0, "extra": 0}
        self.diffs: list[float] = []
        self.examples: list[dict] = []

    def add(self, outcome: str, diff: float | None, key, served, batch) -> None:
        """One comparison: its outcome, the absolute difference (numbers), and the example
        key with the served and batch values (kept for the first few differences)."""
        if diff is not None and self.numeric:
            self.diffs.append(diff)
        if outcome == "equal":
            return
        self.counts[outcome] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(
                {"example_key": key, "served": plain(served), "batch": plain(batch)}
            )

    def entry(self, compared: int) -> dict:
        wrong = sum(self.counts.values())
        out = {
            "compared": compared,
            "mismatches": wrong,
            "mismatch_rate": _rate(wrong, compared),
            "missing": self.counts["missing"],
            "missing_rate": _rate(self.counts["missing"], compared),
            "extra": self.counts["extra"],
            "extra_rate": _rate(self.counts["extra"], compared),
        }
        if self.numeric:
            out["abs_diff"] = _distribution(self.diffs)
        if self.examples:
            out["examples"] = self.examples
        return out


def _prediction_summary(diffs: list[float]) -> dict:
    return {
        "count": len(diffs),
        "mismatches": sum(d > TOLERANCE for d in diffs),
        "max_abs_diff": max(diffs) if diffs else None,
        "mean_abs_diff": float(np.mean(diffs)) if diffs else None,
    }


def audit_report(
    fs: FeatureSet,
    pairs: Iterable[tuple[dict | None, dict | None]],
    model_version: int | None,
    *,
    batch_not_logged: Iterable[tuple] = (),
) -> dict:
    """The audit of the logged events: `pairs` is (log record or None, batch example or None)
    per example key; a batch example is {"features": {column: value}, "prediction": float}.

    Features are compared for every logged event that has a batch example; predictions only
    for events logged under `model_version` (the version the batch path scored with).
    `batch_not_logged`: keys of batch examples the sample selects, inside the log's time span,
    that are not in the log. Any mismatch, missing or extra value, or prediction difference
    over the tolerance makes the report unclean (`clean` False)."""
    columns = example_columns(fs)
    tallies = {
        c.name: _FeatureTally(c.type in ("int", "float") and not c.repeated) for c in columns
    }
    compared = logged = other_version = 0
    logged_only: list[tuple] = []
    prediction_diffs: list[float] = []
    by_source: dict[str, list[float]] = {}  # a prediction from the model, or the cache
    unknown: set[str] = set()
    for record, batch in pairs:
        if record is None:  # the audit scores only logged keys: nothing to compare
            continue
        logged += 1
        if batch is None:
            logged_only.append(logged_key(fs, record))
            continue
        compared += 1
        same_version = model_version is None or record.get("model_version") == model_version
        other_version += not same_version
        result = compare_example(
            fs, record, batch["features"], batch.get("prediction") if same_version else None
        )
        unknown.update(result["unknown"])
        if result["prediction"] is not None:
            prediction_diffs.append(result["prediction"])
            by_source.setdefault(record.get("source", "model"), []).append(result["prediction"])
        served = record.get("features") or {}
        for name, (outcome, diff) in result["features"].items():
            tallies[name].add(
                outcome,
                diff,
                record.get("example_key"),
                served.get(name),
                batch["features"].get(name),
            )
    features = {name: tally.entry(compared) for name, tally in tallies.items()}
    prediction = _prediction_summary(prediction_diffs)
    not_logged = sorted(batch_not_logged, key=repr)
    feature_mismatches = sum(f["mismatches"] for f in features.values())
    return {
        "feature_set": fs.name,
        "model_version": model_version,
        "tolerance": {"absolute": TOLERANCE, "relative": TOLERANCE},
        "logged_events": logged,
        "compared": compared,
        "logged_without_batch_example": len(logged_only),
        "logged_without_batch_example_keys": [
            list(k) for k in sorted(logged_only, key=repr)[:MAX_EXAMPLES]
        ],
        "batch_examples_not_logged": len(not_logged),
        "batch_examples_not_logged_keys": [list(k) for k in not_logged[:MAX_EXAMPLES]],
        "logged_under_other_model_version": other_version,
        "unknown_served_columns": sorted(unknown),
        "feature_mismatches": feature_mismatches,
        "features": features,
        "prediction": prediction,
        # The same comparison per `source` of the served prediction: a cached prediction must
        # be the model's too.
        "prediction_by_source": {
            source: _prediction_summary(diffs) for source, diffs in sorted(by_source.items())
        },
        "clean": feature_mismatches == 0
        and prediction["mismatches"] == 0
        and not logged_only
        and not not_logged,
    }
