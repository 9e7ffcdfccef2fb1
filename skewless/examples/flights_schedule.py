"""A bundled feature set known at booking time: will a scheduled NYC flight of 2013 arrive late?

The same raw file and raw schema as `flights`, but the request is made when the flight is
booked, long before it departs: no `dep_delay`, no windowed aggregates, only the schedule.
Its model's input is a function of five fields, the prediction-cache key
(`CACHE_KEY_FIELDS`); `preprocessing_fn` reads no other raw input, so one cached prediction
per key is exactly the model's prediction for every request with that key (issue 22).
"""

from __future__ import annotations

import datetime as dt
import math
from bisect import bisect_right
from dataclasses import replace

from skewless import FeatureSet, Field, PredictionCache
from skewless.examples.flights import (
    LATE_ARRIVAL_MIN,
    MINUTE_MS,
    RAW_SCHEMA,
    _dense,
    bundled_flights_path,
)

# The prediction-cache key: every input of the model's transform graph, and nothing else.
CACHE_KEY_FIELDS = ("carrier", "origin", "dest", "hour", "distance_band")

# Great-circle miles from NYC: the upper edges of bands 0..7 (band 8 is 3,000 mi and more).
# Round numbers, fixed rather than quantiles of the data, so a band means the same thing in
# every model version and the cache key never changes meaning. The bundled flights' shares
# by band: 11.7, 12.1, 19.9, 12.6, 16.6, 5.5, 6.2, 15.1 and 0.2 % (band 7: the West coast,
# Las Vegas and Phoenix; band 8: Honolulu and Anchorage).
DISTANCE_BAND_EDGES_MI = (250.0, 500.0, 750.0, 1000.0, 1250.0, 1500.0, 2000.0, 3000.0)
DISTANCE_BANDS = len(DISTANCE_BAND_EDGES_MI) + 1

DERIVED = (
    Field("scheduled_departure", "timestamp", nullable=False),
    Field("event_time", "timestamp", nullable=False),
    Field("day_of_week", "int", nullable=False, min_value=0, max_value=6),
    Field("distance_band", "int", nullable=False, min_value=0, max_value=DISTANCE_BANDS - 1),
    Field("label", "int"),
)


def distance_band(distance_mi: float) -> int:
    """The band of a distance: 0 below the first edge, i for [edge i-1, edge i), 8 from 3,000."""
    return bisect_right(DISTANCE_BAND_EDGES_MI, distance_mi)


def derive_scheduled(record: dict) -> dict:
    """Typed flight -> booking request: every scheduled flight, cancelled ones included.

    The request is made at booking, so its event time is the scheduled departure (time_hour,
    the scheduled hour in UTC, + minute), never the actual one. A cancelled flight (no
    dep_delay) is still a valid request: it keeps label None, so it is scored but is not a
    training example (prepare keeps only events with a label). The day of week is that of the
    LOCAL scheduled date (year, month, day are New York's), Monday = 0.
    """
    scheduled = record["time_hour"] + record["minute"] * MINUTE_MS
    record["scheduled_departure"] = scheduled
    record["event_time"] = scheduled
    try:
        day = dt.date(record["year"], record["month"], record["day"])
    except ValueError as exc:
        raise ValueError(
            f"no such local date {record['year']}-{record['month']}-{record['day']}: {exc}"
        ) from None
    record["day_of_week"] = day.weekday()
    record["distance_band"] = distance_band(record["distance"])
    arr_delay = record["arr_delay"]
    record["label"] = None if arr_delay is None else int(arr_delay > LATE_ARRIVAL_MIN)
    return record


_by_name = {f.name: f for f in (*RAW_SCHEMA, *DERIVED)}
# The cache key, the example key's identifiers (flight, scheduled_departure) and the event
# time for the split; an example always has a label. The day of week is kept on the
# examples (validation and the report see it) though the model does not read it.
EXAMPLE_FIELDS = tuple(
    replace(_by_name[n], nullable=_by_name[n].nullable and n != "label")
    for n in (
        *CACHE_KEY_FIELDS,
        "day_of_week",
        "flight",
        "scheduled_departure",
        "event_time",
        "label",
    )
)

VOCABULARY_FEATURES = ("carrier", "origin", "dest")


def _with_domain(ids, size: int):
    """int64 ids in [0, size) with that domain recorded in the transformed schema, so the
    trainer sizes their embedding from the declaration, not from the ids seen in training."""
    import tensorflow as tf
    from tensorflow_transform import schema_inference

    ids = tf.clip_by_value(tf.cast(ids, tf.int64), 0, size - 1)
    schema_inference.set_tensor_schema_override(
        ids, tf.constant(0, tf.int64), tf.constant(size - 1, tf.int64)
    )
    return ids


def preprocessing_fn(inputs: dict) -> dict:
    """tf.Transform preprocessing of a booking request: the five cache-key fields -> model input.

    Reads ONLY `CACHE_KEY_FIELDS` (and the label): the prediction cache relies on it (the test
    checks the graph's dependency map). Choices, and why:
    - carrier, origin and dest: vocabularies from the training split with one OOV bucket, so a
      new airport or airline at serving time maps to a known id instead of failing.
    - the scheduled local hour twice: as a category (24 ids; lateness is not smooth in the
      hour: 10 % late at 5:00, 37 % at 21:00 as delays propagate, 30 % for the last bank at
      23:00) and as sin/cos (23:00 is next to 00:00, for the rare night hours).
    - distance band: a category with its fixed domain (9 ids).
    - no day of week: measured on Nov-Dec, the graph without it does slightly better (AUC
      0.6263 against 0.6245, mean of three seeds; log loss 0.547 against 0.550): the holiday
      season's weekdays are not Jan-Oct's. And a key without it is five times smaller (1,943
      keys in Nov-Dec instead of 9,875), so the 1,000 most frequent keys of Sep-Oct answer
      72 % of Nov-Dec's requests instead of 14 % (bench/README.md).
    - no crossed features (vocabularies of joined values, with an OOV bucket): carrier x
      origin, origin x hour and carrier x dest gave held-out AUC 0.6248 against 0.6245
      without (mean of three seeds, which spread 0.003); adding dest x hour, carrier x hour,
      origin x dest or carrier x origin x dest x hour, 0.6233 to 0.6245 (one seed). The
      embeddings and dense layers already find the pairs.
    - no month: the model trains on Jan-Oct and serves Nov-Dec; a key with the month would
      never repeat from a past period, and the cache would never hit.
    - the label passes through as int64 when present (it is absent at serving time).
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    raw = {name: _dense(inputs[name], b"") for name in ("carrier", "origin", "dest")}
    raw["hour"] = tf.cast(_dense(inputs["hour"], 0), tf.int64)
    out = {}
    for name in VOCABULARY_FEATURES:
        out[f"{name}_id"] = tft.compute_and_apply_vocabulary(
            raw[name], num_oov_buckets=1, vocab_filename=name
        )
    out["hour_id"] = _with_domain(raw["hour"], 24)
    angle = 2.0 * math.pi * tf.cast(raw["hour"], tf.float32) / 24.0
    out["hour_sin"] = tf.sin(angle)
    out["hour_cos"] = tf.cos(angle)
    out["distance_band_id"] = _with_domain(_dense(inputs["distance_band"], 0), DISTANCE_BANDS)
    if "label" in inputs:
        out["label"] = tf.cast(_dense(inputs["label"], 0), tf.int64)
    return out


FLIGHTS_SCHEDULE = FeatureSet(
    name="flights_schedule",
    description=(
        "NYC flights of 2013 as booked (schedule fields only, cancelled flights included); "
        "label: arrival more than 15 minutes late"
    ),
    schema=RAW_SCHEMA,
    derived_fields=DERIVED,
    derive=derive_scheduled,
    event_time="event_time",
    keys=("origin", "carrier"),
    aggregates=(),
    label="label",
    example_fields=EXAMPLE_FIELDS,
    preprocessing_fn=preprocessing_fn,
    unexpected_fields="reject",
    example_key=("carrier", "flight", "origin", "scheduled_departure"),
    default_input=bundled_flights_path,
    eval_start="2013-11-01T00:00:00+00:00",
    # No schedule-only rule is worth stating: train compares with the majority class.
    baseline=None,
    # The scheduled date, hour and weekday: a span of departures has its own.
    calendar_fields=("year", "month", "day", "hour", "day_of_week"),
    # Hybrid serving: the most frequent keys' predictions, precomputed per model version by
    # `skewless precompute`, answer those requests in the streaming scorer.
    prediction_cache=PredictionCache(key=CACHE_KEY_FIELDS, top_n=10_000),
)
