"""The label join (pure: no Beam, no I/O): a served example joined with the label that arrived
for it within the label window, and an account of what was not joined.

`skewless label-join` groups the serving log's records and the labels by example key and
hands each key's group to `join_key`. The rules, in one place:

- The serving time of a prediction is its record's `event_time`: the scorer serves an event
  when it happens (the log records no processing time, and a replay would shift one).
- A label is joined when it arrived at most `window_ms` after the serving time, the window's
  end included (arrival == served + L is on time, served + L + 1 ms is late). A label that
  arrived before the serving time is on time too (it was known; nothing of it is a feature).
- Two or more on-time labels for one example: the latest arriving is kept (equal arrivals: the
  greatest value, so every run keeps the same one); the others count as duplicate labels.
- A late label is never joined; an example whose only labels are late counts as labelled late,
  one with no label at all as not yet labelled; a label whose example is not in the log counts
  as a label without prediction.
- Two log records of one example key (a re-scored event): the one of the lowest model
  version, then the lowest prediction, is the served one; the others are counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from skewless.transforms.example_schema import example_columns
from skewless.transforms.featureset import FeatureSet, FeatureSetError, Field, duration_s
from skewless.transforms.record_checks import InvalidRecord

LABEL_TIME = "label_time"  # the label files' arrival-time column, unless --label_time_field
PREDICTION = "prediction"  # the extra columns of label-join's features/ (train ignores them)
MODEL_VERSION = "model_version"
EXTRA_COLUMNS = (PREDICTION, MODEL_VERSION)


def label_window_ms(value: str | int | None) -> int:
    """--label_window ("6h", "90m", "2d", or seconds) -> milliseconds; ValueError otherwise."""
    if value is None or str(value).strip() == "":
        raise ValueError("--label_window is required: how long after serving a label may arrive")
    text = str(value).strip()
    try:
        seconds = int(text) if text.isdigit() else duration_s(text, "--label_window")
    except FeatureSetError as exc:
        raise ValueError(str(exc)) from None
    if seconds <= 0:
        raise ValueError(f"--label_window must be positive, got {value!r}")
    return seconds * 1000


def labels_feature_set(fs: FeatureSet, time_field: str = LABEL_TIME) -> FeatureSet:
    """The schema of a label file or table: the example key fields of `fs` (as `fs` types
    them), the label and its arrival time, all required; other columns are ignored. A
    FeatureSet, so that the raw-record checks, file readers and BigQuery schema check of every
    job read labels too."""
    known = fs.fields_by_name
    names = (*fs.example_key, fs.label)
    if time_field in names:
        raise ValueError(
            f"--label_time_field {time_field!r} is an example key field or the label of "
            f"feature set {fs.name!r}: name the arrival-time column apart"
        )
    schema = (
        *(Field(n, known[n].type, nullable=False) for n in names),
        Field(time_field, "timestamp", nullable=False),
    )
    return FeatureSet(
        name=f"{fs.name}:labels",
        schema=schema,
        event_time=time_field,
        keys=(),
        aggregates=(),
        label=fs.label,
        example_fields=schema,
        preprocessing_fn=dict,
        unexpected_fields="ignore",
        example_key=tuple(fs.example_key),
        timestamp_range=fs.timestamp_range,
    )


def label_of(fs: FeatureSet, record: dict, time_field: str) -> tuple[tuple, tuple[int, Any]]:
    """A typed label record (labels_feature_set's) -> (example key, (arrival ms, label))."""
    key = tuple(record[name] for name in fs.example_key)
    return key, (record[time_field], record[fs.label])


def event_label(fs: FeatureSet, event: dict) -> tuple[tuple, tuple[int, Any]] | None:
    """A typed, derived raw event -> (example key, (arrival ms, label)) by the feature set's
    `label_time`, or None when the event has no label or it never becomes known."""
    label = event.get(fs.label)
    if label is None:
        return None
    arrival = fs.label_time(event)
    if arrival is None:
        return None
    return tuple(event[name] for name in fs.example_key), (int(arrival), label)


def _label_order(label: tuple[int, Any]) -> tuple:
    arrival, value = label
    return arrival, repr(value)


def _served_order(record: dict) -> tuple:
    return int(record.get("model_version") or 0), float(record.get("prediction") or 0.0)


def served_example(fs: FeatureSet, record: dict, label: Any) -> dict:
    """A log record's served features with the joined label and the prediction's columns;
    InvalidRecord when a required column is missing (the log is not this feature set's)."""
    features = record.get("features")
    if not isinstance(features, dict):
        raise InvalidRecord("serving log record has no 'features' object")
    example = {}
    for column in example_columns(fs):
        value = label if column.name == fs.label else features.get(column.name)
        if value is None and not column.nullable:
            raise InvalidRecord(
                f"served features lack the required column {column.name!r} of feature set "
                f"{fs.name!r}"
            )
        example[column.name] = value
    example[PREDICTION] = float(record["prediction"])
    example[MODEL_VERSION] = int(record["model_version"])
    return example


def join_key(
    fs: FeatureSet, served: Iterable[dict], labels: Iterable[tuple[int, Any]], window_ms: int
) -> tuple[dict | None, Counter]:
    """One example key's log records and labels ((arrival ms, value)) -> (the labelled example
    or None, the counts of this key). The rules: the module docstring."""
    served, labels = list(served), list(labels)
    counts: Counter = Counter()
    if not served:
        counts["labels_without_prediction"] += len(labels)
        return None, counts
    record = min(served, key=_served_order)
    counts["examples_served"] += 1
    counts["serving_log_duplicates"] += len(served) - 1
    deadline = int(record["event_time"]) + window_ms
    on_time = [label for label in labels if label[0] <= deadline]
    counts["labels_late"] += len(labels) - len(on_time)
    if not on_time:
        counts["examples_labelled_late" if labels else "examples_not_yet_labelled"] += 1
        return None, counts
    kept = max(on_time, key=_label_order)
    counts["labels_duplicate"] += len(on_time) - 1
    counts["examples_labelled"] += 1
    return served_example(fs, record, kept[1]), counts
