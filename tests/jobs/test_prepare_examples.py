"""prepare --examples: examples already built (earlier prepare or label-join outputs) read back,
each example key taken from the first directory that holds it, then the same tf.Transform pass,
statistics and period selection as over raw events; against a brute force over the Parquet."""

from __future__ import annotations

import json
import math
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from skewless.beam_pipelines.jobs import prepare
from skewless.beam_pipelines.runtime.launch import run_job
from skewless.examples.flights import FLIGHTS
from skewless.transforms.consistency import example_key
from skewless.transforms.example_schema import features_arrow_schema
from tests.support.flights_data import real_flights, write_csv

JAN_2, JAN_3 = "2013-01-02T00:00:00Z", "2013-01-03T00:00:00Z"
JAN_2_MS, JAN_3_MS = 1357084800000, 1357171200000
SPLIT = ["--eval_start", "2013-01-03T12:00:00Z"]


def _rows(directory) -> dict[tuple, dict]:
    """features/ of a directory, the example columns only, by example key."""
    table = pq.read_table(directory / "features", schema=None)
    names = features_arrow_schema(FLIGHTS).names
    rows = table.select(names).cast(features_arrow_schema(FLIGHTS)).to_pylist()
    by_key = {example_key(FLIGHTS, row): row for row in rows}
    assert len(by_key) == len(rows)  # the fixture's directories have unique keys
    return by_key


def _same(a: dict, b: dict) -> bool:
    def equal(x, y):
        return x == y or (
            isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)
        )

    return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict:
    """A: prepare of Jan 1-2; B: prepare of Jan 2-4 from the same events, then rewritten as
    label-join lays it out (prediction and model_version columns) with Jan 2's departure
    delays one minute later, so B's Jan 2 examples differ from A's."""
    root = tmp_path_factory.mktemp("examples")
    csv_path = write_csv(root / "flights.csv", real_flights(month=1, day=1, days=4))
    a, b = root / "a", root / "b"
    prepare.run(["--input", str(csv_path), "--output_dir", str(a), "--end", JAN_3, *SPLIT])
    prepare.run(["--input", str(csv_path), "--output_dir", str(b), "--start", JAN_2, *SPLIT])
    table = pq.read_table(b / "features")
    times = table.column("event_time").cast(pa.int64())
    jan_2 = pc.less(times, JAN_3_MS)
    shifted = pc.if_else(jan_2, pc.add(table.column("dep_delay"), 1.0), table.column("dep_delay"))
    table = table.set_column(table.schema.get_field_index("dep_delay"), "dep_delay", shifted)
    table = table.append_column("prediction", pa.array([0.25] * table.num_rows, pa.float64()))
    table = table.append_column("model_version", pa.array([3] * table.num_rows, pa.int64()))
    shutil.rmtree(b / "features")
    (b / "features").mkdir()
    pq.write_table(table, b / "features" / "part-00000.parquet")
    return {"root": root, "a": a, "b": b}


@pytest.mark.timeout(300)
def test_the_first_directory_holding_a_key_wins_and_the_others_are_counted(dirs):
    a, b = _rows(dirs["a"]), _rows(dirs["b"])
    shared = set(a) & set(b)
    assert shared and set(a) - set(b) and set(b) - set(a)
    out = dirs["root"] / "b_then_a"
    summary = prepare.run(
        ["--examples", f"{dirs['b']},{dirs['a']}", "--output_dir", str(out), *SPLIT]
    )
    got = _rows(out)
    expected = {**a, **b}  # B first: B's example for every key it holds
    assert got.keys() == expected.keys()
    assert all(_same(got[k], expected[k]) for k in expected)
    assert sum(got[k]["dep_delay"] == a[k]["dep_delay"] + 1 for k in shared) == len(shared)
    assert pq.read_schema(next((out / "features").glob("*.parquet"))).names == list(
        features_arrow_schema(FLIGHTS).names
    )  # label-join's extra columns are not examples
    differing = sum(not _same(a[k], b[k]) for k in shared)
    assert summary["examples_read"] == len(a) + len(b)
    assert summary["examples_superseded"] == len(shared)
    assert summary["examples_superseded_differing"] == differing > 0
    assert (
        summary["examples"] == summary["examples_train"] + summary["examples_eval"] == len(expected)
    )
    assert summary["duplicate_example_keys"] == 0 and summary["examples"] > 1000
    assert summary["examples_from"] == [str(dirs["b"]), str(dirs["a"])]
    assert json.loads((out / "summary.json").read_text())["examples_superseded"] == len(shared)
    # The tf.Transform pass ran on them: its graph and both splits are there.
    assert (out / "transform" / "transform_fn").is_dir()
    assert list((out / "train").glob("*.tfrecord.gz")) and list(
        (out / "eval").glob("*.tfrecord.gz")
    )


@pytest.mark.timeout(300)
def test_the_other_order_and_a_period_select_before_the_keys_are_compared(dirs):
    a, b = _rows(dirs["a"]), _rows(dirs["b"])
    out = dirs["root"] / "a_then_b_jan_2"
    summary = prepare.run(
        ["--examples", f"{dirs['a']},{dirs['b']}", "--output_dir", str(out),
         "--start", JAN_2, "--end", JAN_3, *SPLIT]
    )  # fmt: skip
    got = _rows(out)

    def on_jan_2(row) -> bool:
        return JAN_2_MS <= int(row["event_time"].timestamp() * 1000) < JAN_3_MS

    expected = {k: r for k, r in {**b, **a}.items() if on_jan_2(r)}  # A first
    assert got.keys() == expected.keys() and expected
    assert all(_same(got[k], a[k]) for k in expected)  # every Jan 2 key is A's, unshifted
    in_period = sum(on_jan_2(r) for r in a.values()) + sum(on_jan_2(r) for r in b.values())
    assert summary["examples_outside_period"] == len(a) + len(b) - in_period
    assert summary["examples_superseded"] == in_period - len(expected)
    assert summary["examples_superseded_differing"] == summary["examples_superseded"]


def test_bad_example_directories_are_one_line_errors_before_the_pipeline(dirs, tmp_path, capsys):
    refused = tmp_path / "refused"
    shutil.copytree(dirs["a"], refused)
    summary = json.loads((refused / "summary.json").read_text())
    summary["validation"] = {"refused": True, "report": "validation/report.html"}
    (refused / "summary.json").write_text(json.dumps(summary))
    other = tmp_path / "other"
    shutil.copytree(dirs["a"], other)
    (other / "summary.json").write_text(json.dumps({**summary, "feature_set": "weather"}))
    cases = [
        ([str(tmp_path / "none")], "has no summary.json"),
        ([str(refused)], "was refused by its validation"),
        ([str(other)], "holds examples of feature set 'weather', not 'flights'"),
        ([str(tmp_path / "nothing*")], "matches no directory with a summary.json"),
        ([f"{dirs['a']},{dirs['a']}"], "twice"),
        ([str(dirs["a"]), "--input", "x.csv"], "--input does not apply"),
    ]
    for (examples, *more), message in cases:
        argv = ["--examples", examples, *more, "--output_dir", str(tmp_path / "out")]
        assert run_job("prepare", argv) == 2
        assert message in capsys.readouterr().err
