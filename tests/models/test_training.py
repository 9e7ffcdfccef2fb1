"""The trainer: export parity (raw features in == transform + Keras by hand), versions, metrics."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import keras
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
import tensorflow_transform as tft

from skewless.beam_pipelines.commands import train
from skewless.examples.flights import FLIGHTS
from skewless.models import training, versions
from skewless.models.handler import SkewlessModelHandler, arrow_to_feed, predict
from skewless.models.metrics import (
    baseline_metrics,
    compare_with_baselines,
    fit_logistic_1d,
    log_loss,
    roc_auc,
)
from tests.support.toy_featureset import CLICKS
from tests.support.training import EVAL_START_MS


def _eval_features(prepared: Path, limit: int = 600):
    table = pq.read_table(prepared / "features")
    table = table.filter(pc.greater_equal(table.column("event_time").cast("int64"), EVAL_START_MS))
    return table.slice(0, limit).combine_chunks()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_exported_model_equals_transform_graph_plus_keras_by_hand(trained):
    path = Path(trained["result"]["path"])
    handler = SkewlessModelHandler(str(trained["model_dir"]))
    served = predict(handler.load_model(), arrow_to_feed(_eval_features(trained["prepared"]), handler.inputs))

    raw = _eval_features(trained["prepared"])
    spec = {i["name"]: i for i in handler.inputs}
    raw_tensors = {}
    for name, i in spec.items():
        values = raw.column(name)
        if pa.types.is_timestamp(values.type):
            values = values.cast("int64")
        raw_tensors[name] = tf.constant(values.to_numpy(zero_copy_only=False), dtype=tf.as_dtype(i["dtype"]))
    tft_output = tft.TFTransformOutput(str(trained["prepared"] / "transform"))
    transformed = tft_output.transform_raw_features(raw_tensors, drop_unused_features=True)
    model = keras.models.load_model(path / versions.KERAS_FILE)
    by_hand = np.asarray(model({k: transformed[k] for k in model.input}, training=False)).reshape(-1)

    assert served.shape == (raw.num_rows,)
    np.testing.assert_allclose(served, by_hand, rtol=0, atol=1e-6)
    assert 0.0 < served.min() and served.max() < 1.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_version_holds_metrics_and_metadata(trained):
    result = trained["result"]
    path = Path(result["path"])
    assert path.name == str(result["version"]) and result["version"] >= 1
    metrics = json.loads((path / versions.METRICS_FILE).read_text())
    for block in (metrics["model"], metrics["baselines"]["majority"], metrics["baselines"]["rule"]):
        assert {"auc", "log_loss", "accuracy"} <= block.keys()
    assert metrics["baselines"]["majority"]["auc"] == 0.5
    # The rule baseline is the feature set's own (FLIGHTS.baseline), with its label.
    assert metrics["baselines"]["rule"]["label"] == FLIGHTS.baseline.label
    assert metrics["baselines"]["rule"]["threshold"] == FLIGHTS.baseline.threshold
    assert metrics["compared_with"] == "rule"
    assert metrics["beats_rule_baseline"] == metrics["beats_baseline"] == (
        metrics["model"]["auc"] > metrics["baselines"]["rule"]["auc"]
    )
    # Same examples through the exported signature (raw) and the Keras model (transformed).
    assert metrics["serving_signature_eval_auc"] == pytest.approx(metrics["model"]["auc"], abs=1e-5)

    meta = json.loads((path / versions.MODEL_FILE).read_text())
    assert meta["feature_set"] == "flights" and meta["feature_set_spec"] == "flights"
    assert meta["example_key"] == list(FLIGHTS.example_key)
    assert meta["transform_fingerprint"] == training.transform_fingerprint(str(trained["prepared"] / "transform"))
    assert meta["training_data"]["train"]["last"] < "2013-01-06T00:00:00+00:00"
    assert meta["training_data"]["eval"]["first"] >= "2013-01-06T00:00:00+00:00"
    assert meta["versions"]["tensorflow"] == tf.__version__
    assert "label" not in {i["name"] for i in meta["serving_inputs"]}
    assert meta["transformed_features"]["categorical"]["carrier_id"] == (
        tft.TFTransformOutput(str(trained["prepared"] / "transform")).vocabulary_size_by_name("carrier") + 1
    )
    assert not [p for p in os.listdir(trained["model_dir"]) if p.startswith(".tmp-")]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_next_run_takes_the_next_number_and_a_worse_model_can_fail_the_run(trained, tmp_path):
    model_dir = tmp_path / "models"
    shutil.copytree(Path(trained["result"]["path"]), model_dir / "3")
    args = ["--prepared_dir", str(trained["prepared"]), "--model_dir", str(model_dir), "--epochs", "1"]
    # A learning rate of ~0 leaves the model at its random start: worse than the rule baseline.
    weak = [*args, "--learning_rate", "1e-12", "--hidden_units", "4"]
    result = train.run(weak)
    assert result["version"] == 4 and not result["beats_rule_baseline"]
    assert json.loads((model_dir / "4" / versions.METRICS_FILE).read_text())["beats_rule_baseline"] is False
    with pytest.raises(SystemExit) as exc:
        train.run([*weak, "--fail_if_worse_than_baseline"])
    assert exc.value.code == train.EXIT_WORSE_THAN_BASELINE
    assert versions.list_versions(str(model_dir)) == [3, 4]  # nothing published
    assert len(os.listdir(model_dir / "rejected")) == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resolve_picks_the_highest_version_and_explains_bad_dirs(trained, tmp_path):
    source = Path(trained["result"]["path"])
    with pytest.raises(versions.ModelDirError, match="does not exist"):
        versions.resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(versions.ModelDirError, match="no numbered model version"):
        versions.resolve(str(tmp_path / "empty"))
    base = tmp_path / "models"
    shutil.copytree(source, base / "2")
    shutil.copytree(source, base / "10")
    (base / ".tmp-abc").mkdir()
    assert versions.resolve(str(base)).version == 10  # numeric, not lexicographic
    assert versions.resolve(str(base), 2).version == 2
    with pytest.raises(versions.ModelDirError, match=r"version 5 not found .*\[2, 10\]"):
        versions.resolve(str(base), 5)
    (base / "10" / "saved_model.pb").write_bytes(b"\x0a\xff garbage")
    with pytest.raises(versions.ModelDirError, match="corrupt: saved_model.pb does not parse"):
        versions.resolve(str(base))
    (base / "2" / versions.MODEL_FILE).unlink()
    with pytest.raises(versions.ModelDirError, match="model.json is missing"):
        versions.resolve(str(base), 2)
    with pytest.raises(versions.ModelDirError, match="single SavedModel"):
        versions.resolve(str(source))


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounding makes ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert roc_auc(labels, scores) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert np.isnan(roc_auc(np.ones(5), np.arange(5)))
    assert log_loss([1, 0], [0.5, 0.5]) == pytest.approx(np.log(2))


def test_logistic_baseline_recovers_known_coefficients():
    rng = np.random.default_rng(1)
    x = rng.normal(10, 30, 20000)
    y = rng.random(20000) < 1 / (1 + np.exp(-(-2.0 + 0.1 * x)))
    a, b = fit_logistic_1d(x, y)
    assert a == pytest.approx(-2.0, abs=0.15) and b == pytest.approx(0.1, abs=0.01)


def test_the_rule_baseline_comes_from_the_feature_set_unless_the_flags_set_one():
    flights_rule = training.rule_settings(FLIGHTS, None, None)
    assert flights_rule == (FLIGHTS.baseline.field, FLIGHTS.baseline.threshold, FLIGHTS.baseline.label)
    assert training.rule_settings(FLIGHTS, FLIGHTS.baseline.field, FLIGHTS.baseline.threshold) == flights_rule
    assert training.rule_settings(FLIGHTS, "distance", 500.0) == ("distance", 500.0, "distance > 500")
    # A feature set without a baseline: no rule, unless the flags name a field.
    assert CLICKS.baseline is None
    assert training.rule_settings(CLICKS, None, None) is None
    assert training.rule_settings(CLICKS, "price", 2.5) == ("price", 2.5, "price > 2.5")
    with pytest.raises(SystemExit, match="--baseline_threshold needs --baseline_feature"):
        training.rule_settings(CLICKS, None, 3.0)


def test_without_a_rule_baseline_the_model_is_compared_with_the_majority_class():
    labels = np.array([0, 1, 0, 1, 1, 0, 0, 0])
    baselines = baseline_metrics(labels, labels)
    assert set(baselines) == {"majority"}
    comparison = compare_with_baselines({"auc": 0.7}, baselines)
    assert comparison["compared_with"] == "majority"
    assert comparison["beats_baseline"] is comparison["beats_majority_baseline"] is True
    assert comparison["auc_gain_over_majority_baseline"] == pytest.approx(0.2)
    assert not any("rule" in key for key in comparison)
    scores = np.array([0.0, 9.0, np.nan, 7.0, 8.0, 1.0, 2.0, 0.5])  # a missing value scores lowest
    rule = {"train_values": scores, "eval_values": scores, "threshold": 5.0, "label": "x > 5"}
    with_rule = baseline_metrics(labels, labels, rule)
    assert with_rule["rule"]["auc"] == 1.0 and with_rule["rule"]["accuracy"] == 1.0
    assert compare_with_baselines({"auc": 0.9}, with_rule)["beats_rule_baseline"] is False


def test_train_takes_the_feature_set_prepare_recorded_and_refuses_another(tmp_path):
    summary = {"feature_set": "clicks", "feature_set_spec": "tests.support.toy_featureset:CLICKS"}
    spec, fs = training.prepared_feature_set(str(tmp_path), summary, None)
    assert (spec, fs) == ("tests.support.toy_featureset:CLICKS", CLICKS)
    assert training.prepared_feature_set(str(tmp_path), summary, "tests.support.toy_featureset:CLICKS")[1] is CLICKS
    with pytest.raises(SystemExit, match="was made with feature set 'clicks', not 'flights'"):
        training.prepared_feature_set(str(tmp_path), summary, "flights")
    with pytest.raises(SystemExit, match="no summary.json: give --feature_set"):
        training.prepared_feature_set(str(tmp_path), {}, None)


def test_a_model_version_names_its_feature_set_and_refuses_another():
    clicks = versions.ModelVersion(
        "/m/1", 1, {"feature_set": "clicks", "feature_set_spec": "tests.support.toy_featureset:CLICKS"}
    )
    assert clicks.feature_set() is CLICKS
    assert clicks.feature_set("tests.support.toy_featureset:CLICKS") is CLICKS
    with pytest.raises(versions.FeatureSetMismatch, match="model version 1 was trained on feature set 'clicks', not 'flights'"):
        clicks.feature_set("flights")
    # A model that records only the name of the bundled set; one that records nothing.
    assert versions.ModelVersion("/m/2", 2, {"feature_set": "flights"}).feature_set() is FLIGHTS
    with pytest.raises(versions.FeatureSetMismatch, match="records no feature set: give --feature_set"):
        versions.ModelVersion("/m/3", 3, {}).feature_set()
    assert versions.ModelVersion("/m/3", 3, {}).feature_set("flights") is FLIGHTS
