"""The schedule model of the prediction cache's tests: two weeks of real October flights with
the bundled flights_schedule feature set, prepared (eval from Oct 12) and trained (2 epochs,
seed 7), and the requests of a November week to serve."""

from __future__ import annotations

from pathlib import Path

from tests.support.flights_data import real_flights, write_csv

TRAIN = {"month": 10, "day": 1, "days": 14}
EVAL_START = "2013-10-12T00:00:00Z"
NOVEMBER_WEEK = {"month": 11, "day": 4, "days": 7}


def requests_of(days: dict) -> list[dict]:
    """Every scheduled flight of the days (cancelled ones too: they are requests)."""
    return real_flights(**days)


def schedule_model(root: Path) -> dict:
    from skewless.beam_pipelines.commands import train
    from skewless.beam_pipelines.jobs import prepare

    csv_path = write_csv(root / "flights.csv", real_flights(**TRAIN))
    prepared = root / "prepared"
    prepare.run(
        ["--feature_set", "flights_schedule", "--input", str(csv_path),
         "--output_dir", str(prepared), "--eval_start", EVAL_START]
    )  # fmt: skip
    model_dir = root / "models"
    result = train.run(
        ["--prepared_dir", str(prepared), "--model_dir", str(model_dir), "--epochs", "2", "--seed", "7"]
    )
    return {"root": root, "prepared": prepared, "model_dir": model_dir, "result": result}
