"""prepare counts the examples that share an example key and refuses them unless allowed."""

import datetime as dt
import json
import os

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from skewless.beam_pipelines.jobs import prepare
from skewless.beam_pipelines.runtime.launch import run_job
from skewless.examples.flights import FLIGHTS
from skewless.transforms.examples import CountDuplicateKeys
from tests.support import REPO_ROOT
from tests.support.flights_data import real_flights, write_csv

MS = 1000
JAN_1 = int(dt.datetime(2013, 1, 1, 10, tzinfo=dt.UTC).timestamp() * MS)


def batch(*keys):
    """Examples with only the example key columns of FLIGHTS (the check reads no other)."""
    carrier, flight, origin, scheduled = list(zip(*keys, strict=True)) or [()] * 4
    return pa.RecordBatch.from_pydict(
        {
            "carrier": pa.array(carrier, pa.string()),
            "flight": pa.array(flight, pa.int64()),
            "origin": pa.array(origin, pa.string()),
            "scheduled_departure": pa.array(scheduled, pa.timestamp("ms", tz="UTC")),
        }
    )


@pytest.mark.parametrize("max_buffered", [1, 1000])
def test_shared_keys_are_counted_within_and_across_batches_with_the_smallest_as_sample(
    max_buffered,
):
    """Counted in one table per bundle, or flushed after each batch (max_buffered=1: the
    shards' tables meet in the combine)."""
    a, b, c = ("UA", 1, "EWR", JAN_1), ("AA", 2, "JFK", JAN_1), ("UA", 1, "EWR", JAN_1 + 60_000)
    nullable = ("B6", None, "LGA", JAN_1)
    with TestPipeline(runner="FnApiRunner") as p:
        found = (
            p
            | beam.Create([batch(a, b, a, nullable), batch(c, b, nullable), batch(b)])
            | CountDuplicateKeys(FLIGHTS, sample=2, max_buffered=max_buffered)
        )
        # a twice, b three times, the key with a null twice; c (one minute later) once.
        expected = {"examples": 7, "keys": 3, "sample": [[list(b), 3], [list(nullable), 2]]}
        assert_that(found, equal_to([expected]))


def test_no_examples_no_duplicates():
    with TestPipeline(runner="FnApiRunner") as p:
        found = p | beam.Create([batch()]) | CountDuplicateKeys(FLIGHTS)
        assert_that(found, equal_to([{"examples": 0, "keys": 0, "sample": []}]))


@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    """A day of real flights with one departure listed twice, the second time later (another
    event time, the same scheduled departure: the same example key)."""
    rows = real_flights(1, 2)
    flown = [r for r in rows if r["dep_delay"] is not None and r["arr_delay"] is not None]
    again = dict(flown[10], dep_delay=flown[10]["dep_delay"] + 7)
    path = write_csv(tmp_path_factory.mktemp("twice") / "flights.csv", [*rows, again])
    return path, flown[10]


@pytest.mark.timeout(300)
def test_examples_sharing_a_key_fail_prepare_with_one_line_naming_the_key(twice, tmp_path, capsys):
    path, flight = twice
    out = tmp_path / "out"
    assert run_job("prepare", ["--input", str(path), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    scheduled = dt.datetime.fromisoformat(flight["time_hour"]) + dt.timedelta(
        minutes=flight["minute"]
    )
    assert err.startswith("skewless prepare: 2 examples share their example key"), err
    for text in (
        "(carrier, flight, origin, scheduled_departure)",
        f"carrier={flight['carrier']!r}",
        f"flight={flight['flight']}",
        f"origin={flight['origin']!r}",
        f"scheduled_departure={scheduled.isoformat()!r}",
        "declare an example_key",
        "--allow_duplicate_example_keys",
    ):
        assert text in err, (text, err)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["duplicate_example_keys"] == 2 and summary["shared_example_keys"] == 1
    assert summary["duplicate_example_keys_refused"] is True
    assert summary["duplicate_example_key_sample"] == [
        {
            "carrier": flight["carrier"],
            "flight": flight["flight"],
            "origin": flight["origin"],
            "scheduled_departure": scheduled.isoformat(),
            "examples": 2,
        }
    ]
    # The outputs exist (written before the refusal): train refuses them too.
    assert run_job("train", ["--prepared_dir", str(out), "--model_dir", str(tmp_path / "m")]) == 3
    err = capsys.readouterr().err.strip()
    assert err == (
        f"skewless train: prepare refused the data in {str(out)!r}: 2 examples share their "
        f"example key with another; declare an example_key that identifies one event, or "
        f"re-run prepare with --allow_duplicate_example_keys"
    ), err
    assert not (tmp_path / "m").exists()


@pytest.mark.timeout(300)
def test_allowed_duplicate_keys_are_counted_and_the_run_finishes(twice, tmp_path):
    path, _ = twice
    summary = prepare.run(
        ["--input", str(path), "--output_dir", str(tmp_path / "out"),
         "--allow_duplicate_example_keys"]
    )  # fmt: skip
    assert summary["duplicate_example_keys"] == 2 and summary["shared_example_keys"] == 1
    assert summary["duplicate_example_keys_refused"] is False
    assert not (tmp_path / "out" / "tmp").exists()


def test_a_key_gets_the_same_shard_in_every_process():
    """Shards come from crc32 and the values' bits, not Python's per-process string hash: a
    key counted in two processes (or on two Dataflow workers) meets itself in one shard."""
    import subprocess
    import sys

    from skewless.transforms.examples import _key_table, _shards

    keys = batch(("UA", 1, "EWR", JAN_1), ("AA", None, "JFK", JAN_1 + 1), (None, 3, "LGA", 0))
    here = _shards(_key_table(FLIGHTS, keys), FLIGHTS.example_key).tolist()
    code = (
        "import sys; from tests.jobs.test_prepare_duplicate_keys import batch, JAN_1; "
        "from skewless.transforms.examples import _key_table, _shards; from skewless.examples.flights import "
        "FLIGHTS; keys = batch(('UA', 1, 'EWR', JAN_1), ('AA', None, 'JFK', JAN_1 + 1), "
        "(None, 3, 'LGA', 0)); print(_shards(_key_table(FLIGHTS, keys), FLIGHTS.example_key)"
        ".tolist())"
    )
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONHASHSEED": seed}, cwd=REPO_ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip().splitlines()[-1] == str(here), done.stdout
