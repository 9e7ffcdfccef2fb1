"""One prepared and trained model of real flights, as the session fixture `trained` makes it:
once per test run, shared by the pytest-xdist workers through a lock file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from tests.support.flights_data import real_flights, write_csv

# prepare's split: the week's last two days are the eval examples.
EVAL_START = "2013-01-06T00:00:00Z"
EVAL_START_MS = 1357430400000
WEEK = {"month": 1, "day": 1, "days": 7}
_DONE = "trained.json"


def prepare_and_train(root: Path) -> dict:
    """A week of real flights (Jan 1-7, 2013) prepared (eval from Jan 6) and trained (2 epochs,
    seed 7): {root, rows, csv, prepared, model_dir, result}."""
    from skewless.beam_pipelines.commands import train
    from skewless.beam_pipelines.jobs import prepare

    rows = real_flights(**WEEK)
    csv_path = write_csv(root / "flights.csv", rows)
    prepared = root / "prepared"
    prepare.run(["--input", str(csv_path), "--output_dir", str(prepared), "--eval_start", EVAL_START])
    model_dir = root / "models"
    result = train.run(
        ["--prepared_dir", str(prepared), "--model_dir", str(model_dir), "--epochs", "2", "--seed", "7"]
    )
    return {"root": root, "rows": rows, "csv": csv_path, "prepared": prepared,
            "model_dir": model_dir, "result": result}  # fmt: skip


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the process ends, whatever happens
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepared_and_trained_once(root: Path) -> dict:
    """prepare_and_train into `root` by the first process that asks; the others (pytest-xdist
    workers sharing `root`) wait for it and read what it made. A run that died half-way left
    no _DONE file: the next process starts again from a clean directory."""
    root.mkdir(parents=True, exist_ok=True)
    work = root / "trained"
    with _locked(root / "trained.lock"):
        done = root / _DONE
        if not done.exists():
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            made = prepare_and_train(work)
            done.write_text(json.dumps({"result": made["result"]}))
        result = json.loads(done.read_text())["result"]
    return {"root": work, "rows": real_flights(**WEEK), "csv": work / "flights.csv",
            "prepared": work / "prepared", "model_dir": work / "models", "result": result}  # fmt: skip
