"""Batch scoring on several local processes gives the same outputs as on one."""

import glob
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from skewless.beam_pipelines.jobs import score
from skewless.examples.flights import FLIGHTS
from tests.support.flights_data import write_jsonl
from tests.support.training import EVAL_START

KEY = list(FLIGHTS.example_key)
COUNTS = ("records_read", "records_valid", "records_rejected", "examples", "examples_scored", "inference_failures")


def dead_letters(out) -> list[tuple]:
    rows = [json.loads(line) for f in glob.glob(str(out / "dead_letters" / "*.jsonl")) for line in open(f)]
    return sorted((d["stage"], d["reason"], json.dumps(d["record"], sort_keys=True)) for d in rows)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_local_processes_score_the_same_as_one(trained, tmp_path):
    path = write_jsonl(tmp_path / "flights.jsonl", [dict(r) for r in trained["rows"]], ['{"year": 2013', "[1]"])
    base = ["--model_dir", str(trained["model_dir"]), "--input", str(path), "--start", EVAL_START]
    one = score.run([*base, "--output", str(tmp_path / "one")])
    two = score.run(
        [*base, "--output", str(tmp_path / "two"), "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    )
    for key in COUNTS:
        assert one[key] == two[key], key
    assert one["records_rejected"] == 2 and one["examples_scored"] > 0
    a = pq.read_table(tmp_path / "one" / "predictions").to_pandas().sort_values(KEY).reset_index(drop=True)
    b = pq.read_table(tmp_path / "two" / "predictions").to_pandas().sort_values(KEY).reset_index(drop=True)
    assert len(a) == one["examples_scored"]
    assert a[KEY + ["event_time", "model_version"]].equals(b[KEY + ["event_time", "model_version"]])
    np.testing.assert_allclose(a.probability, b.probability, rtol=0, atol=1e-6)
    assert dead_letters(tmp_path / "one") == dead_letters(tmp_path / "two")
