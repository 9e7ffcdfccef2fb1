"""The schedule model of the prediction cache's tests: two weeks of real October flights with
the bundled flights_schedule feature set, prepared (eval from Oct 12) and trained (2 epochs,
seed 7), once per test run (the session fixture `schedule_trained`, shared by the
pytest-xdist workers like `trained`), and the requests of November days to serve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.support.flights_data import real_flights, write_csv
from tests.support.training import _locked

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


def schedule_model_once(root: Path) -> dict:
    """schedule_model into `root` by the first process that asks; the others wait and read it."""
    root.mkdir(parents=True, exist_ok=True)
    work = root / "model"
    with _locked(root / "schedule.lock"):
        done = root / "schedule.json"
        if not done.exists():
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            done.write_text(json.dumps({"result": schedule_model(work)["result"]}))
        result = json.loads(done.read_text())["result"]
    return {"root": work, "prepared": work / "prepared", "model_dir": work / "models", "result": result}
