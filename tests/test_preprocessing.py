"""The flights preprocessing_fn through real tf.Transform (analyze + transform)."""

import datetime as dt
import math
import tempfile

import numpy as np
import tensorflow_transform.beam as tft_beam
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from transforms.example_schema import tft_feature_spec
from transforms.flights import FLIGHTS

MS = 1000


def example(i, **over):
    base = dt.datetime(2013, 1, 1, 10, tzinfo=dt.UTC) + dt.timedelta(minutes=7 * i)
    row = {
        "carrier": ["UA", "AA", "DL", "B6"][i % 4],
        "flight": 100 + i,
        "origin": ["JFK", "LGA", "EWR"][i % 3],
        "dest": ["IAH", "MIA", "ORD", "ATL", "LAX"][i % 5],
        "scheduled_departure": int(base.timestamp() * MS),
        "event_time": int(base.timestamp() * MS) + (i % 30) * 60 * MS,
        "year": 2013,
        "month": 1 + (i % 12),
        "day": 1 + (i % 28),
        "hour": (5 + i) % 24,
        "minute": (i * 5) % 60,
        "dep_delay": float((i * 13) % 200 - 20),
        "distance": float(200 + (i * 97) % 2500),
        "label": int((i * 13) % 200 - 20 > 15),
        "origin_departures_1h": i % 40,
        "origin_mean_dep_delay_1h": float(i % 25),
        "carrier_mean_dep_delay_1h": float(i % 35) - 5.0,
        "origin_departures_15m": i % 9,
    }
    row.update(over)
    return row


def test_preprocessing_outputs_from_a_real_tf_transform_run():
    rows = [example(i) for i in range(400)]
    extra = [
        example(400, year=2013, month=1, day=1, hour=0, minute=0, dep_delay=5000.0),
        example(401, year=2013, month=3, day=10, hour=12, minute=0, carrier="ZZ"),
        example(402, year=2012, month=2, day=29, hour=18, minute=0),
    ]
    metadata = dataset_metadata.DatasetMetadata(
        schema_utils.schema_from_feature_spec(tft_feature_spec(FLIGHTS))
    )
    with tempfile.TemporaryDirectory() as tmp:
        with tft_beam.Context(temp_dir=tmp):
            (train_out, _), transform_fn = (rows, metadata) | tft_beam.AnalyzeAndTransformDataset(
                FLIGHTS.preprocessing_fn
            )
            extra_out, _ = ((extra, metadata), transform_fn) | tft_beam.TransformDataset()

    z = np.array([r["dep_delay_z"] for r in train_out])
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3
    for name in ("log_distance_z", "origin_departures_1h_z", "carrier_mean_dep_delay_1h_z"):
        values = np.array([r[name] for r in train_out])
        assert abs(values.mean()) < 1e-4, name
    assert {r["carrier_id"] for r in train_out} == {0, 1, 2, 3}
    assert {r["origin_id"] for r in train_out} == {0, 1, 2}
    assert set(np.unique([r["dep_delay_bucket"] for r in train_out])) <= set(range(10))
    assert len(np.unique([r["dep_delay_bucket"] for r in train_out])) >= 8
    assert [r["label"] for r in train_out] == [row["label"] for row in rows]

    midnight, sunday, leap = extra_out
    assert midnight["day_of_week"] == 1  # Tuesday
    assert sunday["day_of_week"] == 6
    assert leap["day_of_week"] == 2  # Wednesday
    assert math.isclose(midnight["time_of_day_sin"], 0.0, abs_tol=1e-6)
    assert math.isclose(midnight["time_of_day_cos"], 1.0, abs_tol=1e-6)
    assert math.isclose(sunday["time_of_day_cos"], -1.0, abs_tol=1e-6)  # noon
    assert sunday["carrier_id"] == 4  # unseen carrier -> the OOV bucket
    # dep_delay is clipped before the z-score: an absurd 5000 min delay equals a 360 min one.
    capped = max(z[i] for i, r in enumerate(rows) if r["dep_delay"] >= 179)
    assert midnight["dep_delay_z"] > capped
    assert midnight["dep_delay_bucket"] == 9


def test_the_reference_vocabularies_equal_exact_ones_on_the_bundled_tables(tmp_path):
    """flights_plus computes its reference vocabularies with approximate_vocabulary (one combine
    pass instead of a vocabulary's shuffles): exact while a column has at most top_k distinct
    values. On the bundled tables' own values, ties included, the files equal tft.vocabulary's."""
    from itertools import zip_longest

    import tensorflow as tf
    import tensorflow_transform as tft

    from tests.test_reference import table_rows
    from transforms.flights import (
        DEST_AIRPORTS,
        PLANES,
        REFERENCE_VOCABULARIES,
        REFERENCE_VOCABULARY_TOP_K,
    )

    columns = {c.name: (table, c.name[len(table.prefix) :]) for table in (PLANES, DEST_AIRPORTS) for c in table.columns}  # fmt: skip
    values = {name: [r[field] or "" for r in table_rows(table)] for name, (table, field) in columns.items() if name in REFERENCE_VOCABULARIES}  # fmt: skip
    rows = [
        dict(zip(values, row, strict=True)) for row in zip_longest(*values.values(), fillvalue="")
    ]
    spec = {name: tf.io.FixedLenFeature([], tf.string) for name in values}
    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(spec))

    def both(inputs):
        for name, x in inputs.items():
            tft.vocabulary(x, vocab_filename=f"exact_{name}")
            tft.experimental.approximate_vocabulary(
                x, top_k=REFERENCE_VOCABULARY_TOP_K, vocab_filename=f"approx_{name}"
            )
        return dict(inputs)

    with tft_beam.Context(temp_dir=str(tmp_path / "tmp")):
        transform_fn = (rows, metadata) | tft_beam.AnalyzeDataset(both)
        _ = transform_fn | tft_beam.WriteTransformFn(str(tmp_path / "transform"))
    output = tft.TFTransformOutput(str(tmp_path / "transform"))
    for name in values:
        exact = output.vocabulary_by_name(f"exact_{name}")
        assert 3 <= len(exact) < REFERENCE_VOCABULARY_TOP_K, name
        assert output.vocabulary_by_name(f"approx_{name}") == exact, name
