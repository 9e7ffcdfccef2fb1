"""prepare on several local processes gives the same outputs as one; it builds for Dataflow."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow_transform as tft

from skewless.beam_pipelines.jobs import prepare
from tests.support.flights_data import real_flights, write_csv
from tests.support.outputs import read_tfrecords

SORT = [("carrier", "ascending"), ("flight", "ascending"), ("scheduled_departure", "ascending")]


@pytest.fixture(scope="module")
def slice_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("in") / "f.csv", real_flights(4, 1, days=2))


def transformed_rows(out):
    spec = tft.TFTransformOutput(str(out / "transform")).transformed_feature_spec()
    rows = []
    for split in ("train", "eval"):
        for r in read_tfrecords(out / split, spec):
            rows.append(tuple(float(r[k].numpy()) for k in sorted(spec)))
    # Analyzers (means, variances) combine partial sums in another order on two processes:
    # equal up to float rounding. TFRecords carry no key, so compare each feature's sorted
    # values with a tolerance (the features Parquet is compared row by row, exactly).
    return np.sort(np.array(rows), axis=0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_local_processes_give_the_same_outputs_as_one(slice_csv, tmp_path):
    one = prepare.run(["--input", str(slice_csv), "--output_dir", str(tmp_path / "one"), "--eval_fraction", "0.3"])
    two = prepare.run(
        [
            "--input", str(slice_csv), "--output_dir", str(tmp_path / "two"), "--eval_fraction", "0.3",
            "--direct_num_workers=2", "--direct_running_mode=multi_processing",
        ]
    )  # fmt: skip
    for key in ("records_read", "records_valid", "examples", "examples_train", "examples_eval"):
        assert one[key] == two[key], key
    a = pq.read_table(tmp_path / "one" / "features").sort_by(SORT)
    b = pq.read_table(tmp_path / "two" / "features").sort_by(SORT)
    assert a.equals(b)
    np.testing.assert_allclose(transformed_rows(tmp_path / "one"), transformed_rows(tmp_path / "two"), atol=1e-4)


@pytest.mark.timeout(300)
def test_the_job_graph_builds_for_dataflow(slice_csv, tmp_path):
    result = prepare.run(
        [
            "--input", str(slice_csv), "--output_dir", str(tmp_path / "out"),
            "--runner", "DataflowRunner", "--project", "fake-project", "--region", "us-central1",
            "--temp_location", "gs://fake-bucket/tmp", "--dry_run=True",
        ]
    )  # fmt: skip
    assert result is None  # built, not run
    assert not (tmp_path / "out" / "summary.json").exists()
