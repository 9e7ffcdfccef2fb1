"""Batch scoring end to end: one prediction per valid example, dead letters, model errors."""

from __future__ import annotations

import glob
import json
import shutil

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from skewless.beam_pipelines.jobs import score
from skewless.examples.flights import FLIGHTS
from skewless.models.handler import SkewlessModelHandler, arrow_to_feed, predict
from tests.support.flights_data import write_jsonl
from tests.support.training import EVAL_START

KEY = list(FLIGHTS.example_key)
BAD_LINES = {
    '{"year": 2013, "month": 1': "not JSON",
    '{"year": 2013, "month": 1, "day": 6}': "missing required field",
    "[1, 2, 3]": "expected a JSON object",
}


@pytest.fixture(scope="module")
def scored(trained, tmp_path_factory):
    """The week of flights as JSON lines with bad lines and one wrong-typed record, scored from Jan 6."""
    root = tmp_path_factory.mktemp("scored")
    rows = [dict(r) for r in trained["rows"]]
    wrong_type = dict(rows[0], dep_delay="late")
    lines = {**BAD_LINES, json.dumps(wrong_type): "'dep_delay' 'late' is not a number"}
    path = write_jsonl(root / "flights.jsonl", rows, list(lines))
    out = root / "out"
    summary = score.run(
        ["--model_dir", str(trained["model_dir"]), "--input", str(path), "--output", str(out), "--start", EVAL_START]
    )
    return out, summary, lines


def _expected(trained) -> pa.Table:
    """The examples prepare built from the same flights, restricted to the scored period."""
    table = pq.read_table(trained["prepared"] / "features")
    start_ms = 1357430400000  # EVAL_START
    return table.filter(pc.greater_equal(table.column("event_time").cast("int64"), start_ms))


def _diverted(trained) -> int:
    """Departures of the scored period with no arrival delay: scored, but never examples."""
    return sum(
        1
        for r in trained["rows"]
        if r["dep_delay"] is not None and r["arr_delay"] is None and (r["month"], r["day"]) >= (1, 6)
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_valid_example_gets_one_prediction_with_its_key_and_version(trained, scored):
    out, summary, _ = scored
    predictions = pq.read_table(out / "predictions").to_pandas()
    expected = _expected(trained)
    exp = expected.to_pandas()
    assert predictions.columns.tolist() == [*KEY, "event_time", "probability", "model_version"]
    # Every departure of the period is scored: the labelled examples prepare built, plus the
    # diverted flights (no arrival delay, so no label) that training could not use.
    assert len(predictions) == expected.num_rows + _diverted(trained) == summary["examples_scored"]
    assert not predictions.duplicated(KEY).any()
    scored_keys = set(map(tuple, predictions[KEY].astype(str).values))
    assert set(map(tuple, exp[KEY].astype(str).values)) <= scored_keys
    assert (predictions.model_version == trained["result"]["version"]).all()
    # Same probabilities as the model on prepare's examples: scoring rebuilt the same features.
    handler = SkewlessModelHandler(str(trained["model_dir"]))
    exp["served"] = predict(handler.load_model(), arrow_to_feed(expected.combine_chunks(), handler.inputs))
    joined = predictions.merge(exp, on=KEY, suffixes=("", "_prepared"))
    assert len(joined) == expected.num_rows
    assert (joined.event_time == joined.event_time_prepared).all()
    np.testing.assert_allclose(joined.probability, joined.served, rtol=0, atol=1e-6)
    assert summary["examples_outside_period"] == summary["examples"] - len(predictions)
    assert summary["inference_failures"] == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_records_become_dead_letters_with_reasons(trained, scored):
    out, summary, lines = scored
    dead = [json.loads(line) for f in glob.glob(str(out / "dead_letters" / "*.jsonl")) for line in open(f)]
    assert summary["records_rejected"] == len(lines) == len(dead)
    assert summary["records_read"] == len(trained["rows"]) + len(lines)
    reasons = sorted(d["reason"] for d in dead)
    for expected in lines.values():
        assert sum(expected in r for r in reasons) == 1, (expected, reasons)
    assert {d["stage"] for d in dead} <= {"parse", "validate"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_missing_or_corrupt_model_is_a_clear_error_before_the_run(trained, tmp_path):
    base = ["--input", str(trained["csv"]), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="does not exist"):
        score.run(["--model_dir", str(tmp_path / "no_models"), *base])
    broken = tmp_path / "models"
    shutil.copytree(trained["result"]["path"], broken / "1")
    (broken / "1" / "saved_model.pb").write_bytes(b"not a saved model")
    with pytest.raises(SystemExit, match="corrupt"):
        score.run(["--model_dir", str(broken), *base])
    with pytest.raises(SystemExit, match="version 7 not found"):
        score.run(["--model_dir", str(trained["model_dir"]), "--model_version", "7", *base])
    assert not (tmp_path / "out").exists()


class _FailingHandler(SkewlessModelHandler):
    def run_inference(self, batch, model, inference_args=None):
        raise RuntimeError("model exploded")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_inference_and_model_input_failures_become_dead_letters(trained):
    good = _expected(trained).slice(0, 5).combine_chunks().to_batches()[0]
    missing = good.drop_columns(["distance"])
    handler = _FailingHandler(str(trained["model_dir"]), max_batch_size=100)
    with TestPipeline(runner="FnApiRunner") as p:
        predictions, dead = p | beam.Create([good, missing]) | score.ScoreExamples(FLIGHTS, handler)
        assert_that(predictions, equal_to([]), label="NoPredictions")
        reasons = dead | beam.Map(lambda d: (d["stage"], d["reason"], d["record"]["flight"]))
        expected = [("inference", "RuntimeError: model exploded", f) for f in good.column("flight").to_pylist()]
        expected += [("model_input", "missing feature 'distance'", f) for f in good.column("flight").to_pylist()]
        assert_that(reasons, equal_to(expected), label="DeadLetters")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_keyed_handler_on_single_examples_keeps_keys(trained):
    """The streaming shape: (key, example dict) elements through KeyedModelHandler."""
    batch = _expected(trained).slice(0, 3).combine_chunks().to_batches()[0]
    handler = SkewlessModelHandler(str(trained["model_dir"]), max_batch_size=2)
    probabilities = predict(handler.load_model(), arrow_to_feed(batch, handler.inputs))
    rows = []
    for row in batch.to_pylist():
        for name in ("scheduled_departure", "event_time"):
            row[name] = int(row[name].timestamp() * 1000)
        rows.append((f"{row['carrier']}{row['flight']}", row))
    with TestPipeline(runner="FnApiRunner") as p:
        out = (
            p
            | beam.Create(rows)
            | RunInference(KeyedModelHandler(handler))
            | beam.Map(lambda kv: (kv[0], round(kv[1].inference, 5), kv[1].model_id))
        )
        version = str(handler.version)
        expected = [(k, round(float(pr), 5), version) for (k, _), pr in zip(rows, probabilities, strict=True)]
        assert_that(out, equal_to(expected))


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.timeout(300)
def test_predictions_to_bigquery_table(trained, bq_emulator, tmp_path):
    dataset = bq_emulator.create_dataset()
    table = f"{bq_emulator.project}.{dataset}.predictions"
    summary = score.run(
        [
            "--model_dir", str(trained["model_dir"]),
            "--input", str(trained["csv"]),
            "--start", EVAL_START,
            "--output_table", table,
            "--bigquery_endpoint", bq_emulator.rest_endpoint,
            "--dead_letter_dir", str(tmp_path / "dead"),
        ]
    )  # fmt: skip
    assert summary["rows_write_failed"] == 0
    with bq_emulator.client() as client:
        rows = list(client.list_rows(table, timeout=60))
    assert len(rows) == summary["examples_scored"] == _expected(trained).num_rows + _diverted(trained)
    fields = {f.name: f.field_type for f in client.get_table(table).schema}
    assert fields["probability"] == "FLOAT" or fields["probability"] == "FLOAT64"
    assert {r["model_version"] for r in rows} == {trained["result"]["version"]}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_report_checks_scores_against_training_and_draws_the_chart(trained, scored, tmp_path):
    from skewless.models.report import format_report, report

    out, summary, _ = scored
    chart = tmp_path / "report.png"
    r = report(str(trained["model_dir"]), str(out), str(trained["prepared"]), str(chart))
    assert r["counts"]["examples_scored"] == summary["examples_scored"] == r["predictions"]
    # The scored period is the trainer's eval split: same examples, same AUC, or there is skew.
    assert r["skew_check"]["ok"], r["skew_check"]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_report(r)
    assert f"rule: {FLIGHTS.baseline.label}" in text and "majority class" in text
    assert r["compared_with"] == "rule"
    # --compare_model_dir: another model's eval metrics next to this one's (here itself: the
    # same eval examples, no gain).
    both = report(str(trained["model_dir"]), str(out), str(trained["prepared"]),
                  compare_model_dir=str(trained["model_dir"]))  # fmt: skip
    other = both["compared_model"]
    assert other["feature_set"] == FLIGHTS.name and other["same_eval_examples"]
    assert other["eval"] == r["training_eval"] and other["auc_gain"] == 0.0
    assert "this model vs flights: AUC +0.0000" in format_report(both)
