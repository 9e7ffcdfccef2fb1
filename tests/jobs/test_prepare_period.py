"""prepare --start/--end: the examples of a period, with the aggregates they would have had in a
run over everything (the events before --start still feed them)."""

from __future__ import annotations

import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from skewless.beam_pipelines.jobs import prepare
from tests.support.flights_data import real_flights, write_csv

START, END = "2013-01-02T12:00:00Z", "2013-01-03T12:00:00Z"


def _features(directory):
    table = pq.read_table(directory / "features")
    return table.sort_by(
        [("event_time", "ascending"), ("carrier", "ascending"), ("flight", "ascending")]
    )


@pytest.mark.timeout(300)
def test_a_period_keeps_its_examples_with_the_aggregates_of_the_whole_run(tmp_path):
    csv_path = write_csv(tmp_path / "flights.csv", real_flights(month=1, day=1, days=3))
    split = ["--eval_start", "2013-01-03T00:00:00Z"]
    whole = prepare.run(["--input", str(csv_path), "--output_dir", str(tmp_path / "whole"), *split])
    period = prepare.run(["--input", str(csv_path), "--output_dir", str(tmp_path / "period"),
                          "--start", START, "--end", END, *split])  # fmt: skip

    everything, kept = _features(tmp_path / "whole"), _features(tmp_path / "period")
    times = everything.column("event_time").cast("int64")
    inside = pc.and_(pc.greater_equal(times, 1357128000000), pc.less(times, 1357214400000))
    expected = everything.filter(inside)
    assert 0 < kept.num_rows == expected.num_rows < everything.num_rows
    # Every column equal, the aggregates included: the first examples kept still count the
    # departures of the morning of Jan 2, which are outside the period.
    assert kept.equals(expected)
    assert period["examples_outside_period"] == everything.num_rows - kept.num_rows
    assert period["examples_train"] + period["examples_eval"] == kept.num_rows
    assert period["period"] == {
        "start": "2013-01-02T12:00:00+00:00",
        "end": "2013-01-03T12:00:00+00:00",
    }
    assert whole["period"] == {"start": None, "end": None} and whole["examples_outside_period"] == 0
    assert (
        json.loads((tmp_path / "period" / "summary.json").read_text())["period"] == period["period"]
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--start", "2013-13-01"], "--start '2013-13-01' is not an ISO-8601 instant"),
        (["--start", END, "--end", START], f"--start {END} must be before --end {START}"),
    ],
)
def test_a_bad_period_is_a_usage_error_before_the_pipeline(tmp_path, flags, message):
    csv_path = write_csv(tmp_path / "flights.csv", real_flights(month=1, day=1, days=1))
    with pytest.raises(ValueError, match=message):
        prepare.run(["--input", str(csv_path), "--output_dir", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()
