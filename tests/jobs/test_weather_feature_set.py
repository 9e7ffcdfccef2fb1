"""A user's own feature set through every job, with no flights-specific option.

skewless/examples/weather.py (real NYC weather, every aggregate operation, list and map
features, D = 1 h, a 1-day period) goes through prepare -> train -> score -> report ->
bigtable-setup -> aggregate -> score --streaming. Only the jobs that start from raw data take
`--feature_set`; train, score, report and the streaming scorer take it from the prepared data
and the model. The streaming predictions (aggregates read back from the Bigtable emulator)
equal the batch ones.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from skewless.beam_pipelines.commands import bigtable_setup, report, train
from skewless.beam_pipelines.commands.replay import ReplayStats, order_events
from skewless.beam_pipelines.io.bigtable import open_table, read_all_cells
from skewless.beam_pipelines.io.files import _read_bytes, read_csv_table
from skewless.beam_pipelines.jobs import prepare, score
from skewless.examples.weather import WEATHER, weather_path
from skewless.models.handler import SkewlessModelHandler, predict, rows_to_feed
from skewless.transforms.record_checks import to_epoch_ms
from tests.support.brute_force import brute_cells, brute_example
from tests.support.flights_data import write_jsonl
from tests.support.pipelines import batch_cells, typed_events
from tests.support.streaming_jobs import score_streaming, write_cells_with_the_aggregate_job

SPEC = "skewless.examples.weather:WEATHER"
INPUT_START, INPUT_END = "2013-01-01T00:00:00Z", "2013-01-22T00:00:00Z"
SCORE_START, SCORE_END = "2013-01-15T00:00:00Z", "2013-01-22T00:00:00Z"
RETENTION_S = 20 * 365 * 86_400  # the cells are stamped in 2013: keep them


def _raws() -> list[dict]:
    table, _ = read_csv_table(_read_bytes(weather_path()))
    rows = []
    for row in table.to_pylist():
        row["time_hour"] = row["time_hour"].strftime("%Y-%m-%dT%H:%M:%SZ")
        if INPUT_START <= row["time_hour"] < INPUT_END:
            rows.append(row)
    return rows


def _key(prediction: dict) -> tuple:
    return prediction["origin"], to_epoch_ms(prediction["observed"])


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.timeout(900)
def test_a_user_feature_set_runs_through_every_job_and_streaming_equals_batch(
    tmp_path, pubsub_emulator, bigtable_emulator
):
    ps, bt = pubsub_emulator, bigtable_emulator
    prepared, models, scores = tmp_path / "prepared", tmp_path / "models", tmp_path / "scores"

    # prepare: the feature set's default input (all of weather.csv) and default time split.
    summary = prepare.run(["--feature_set", SPEC, "--output_dir", str(prepared)])
    assert summary["feature_set"] == "weather" and summary["records_rejected"] == 0
    assert summary["split"]["eval_start"].startswith("2013-11-01")

    metrics = train.run(
        ["--prepared_dir", str(prepared), "--model_dir", str(models), "--epochs", "2"]
    )
    rule = metrics["baselines"]["rule"]
    assert rule["label"] == "humid > 90"  # the feature set's baseline, not a flights column
    assert abs(metrics["serving_signature_eval_auc"] - metrics["model"]["auc"]) < 1e-4

    raws = _raws()
    input_path = write_jsonl(tmp_path / "weather.jsonl", raws)
    scored = score.run(
        [
            "--model_dir", str(models), "--input", str(input_path), "--output", str(scores),
            "--start", SCORE_START, "--end", SCORE_END,
        ]
    )  # fmt: skip
    batch = pq.read_table(scores / "predictions").to_pylist()
    assert scored["examples_scored"] == len(batch) == 3 * 24 * 7
    for row in batch:
        row["observed"] = row["observed"].isoformat()
    # Batch scoring equals the model on the brute-force examples (D = 1 h as of each event).
    events = typed_events(WEATHER, raws)
    start, end = to_epoch_ms(SCORE_START), to_epoch_ms(SCORE_END)
    scored_events = [e for e in events if start <= e["observed"] < end]
    handler = SkewlessModelHandler(str(models))
    brute = [brute_example(WEATHER, e, events) for e in scored_events]
    probabilities = predict(handler.load_model(), rows_to_feed(brute, handler.inputs))
    by_key = {
        (e["origin"], e["observed"]): float(p) for e, p in zip(brute, probabilities, strict=True)
    }
    np.testing.assert_allclose(
        [row["probability"] for row in batch],
        [by_key[_key(row)] for row in batch],
        rtol=0,
        atol=1e-6,
    )

    reported = report.run(
        ["--model_dir", str(models), "--score_dir", str(scores), "--prepared_dir", str(prepared)]
    )
    assert reported["baselines"]["rule"]["label"] == "humid > 90"
    assert reported["scored_period"]["examples"] == len(batch)  # labels joined by example key

    table_id = bt.table_name()
    bigtable_setup.run(
        [
            "--feature_set", SPEC, f"--bigtable_project={bt.project}",
            f"--bigtable_instance={bt.instance}", f"--bigtable_table={table_id}",
            f"--retention_s={RETENTION_S}",
        ]
    )  # fmt: skip
    assert write_cells_with_the_aggregate_job(bt, table_id, WEATHER, raws)["cells_written"] > 0
    # Cell by cell, the Bigtable cells (lists and maps as JSON) equal the batch backfill and
    # the brute force of the contract.
    events = typed_events(WEATHER, raws)
    stored = read_all_cells(open_table(bt.project, bt.instance, table_id), WEATHER.name)
    assert stored == batch_cells(WEATHER, events) == brute_cells(WEATHER, events)

    to_score = [r for t, r in order_events(WEATHER, raws, ReplayStats()) if start <= t < end]
    streamed, counters, info = score_streaming(ps, bt, table_id, models, WEATHER, to_score, 180)
    assert info["feature_set"] == "weather"
    by_key = {_key(s): s for s in streamed}
    assert len(by_key) == len(streamed) == len(batch)
    assert set(by_key) == {_key(b) for b in batch}
    np.testing.assert_allclose(
        [by_key[_key(b)]["probability"] for b in batch],
        [b["probability"] for b in batch],
        rtol=0,
        atol=1e-6,
    )
    assert counters["cells_found"] > 0
