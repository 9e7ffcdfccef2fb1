"""The trainer: prepared TFRecords + transform_fn -> a numbered model version with its metrics.

`skewless train --prepared_dir DIR --model_dir BASE` trains the wide-and-deep of skewless/models/model.py
on train/, stops early on eval/, and publishes BASE/<next number>/ holding the SavedModel (raw
features in, the tf.Transform graph inside, `probability` out), model.keras (the bare Keras
model, on transformed features), model.json (metadata) and metrics.json (model vs baselines).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

LOG = logging.getLogger("skewless.train")
EXIT_WORSE_THAN_BASELINE = 3
EXIT_ANOMALIES = 3  # as `skewless validate` and `prepare --validate_against`
VALIDATION_ANOMALIES = os.path.join("validation", "anomalies.json")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: the prepared data, where versions are published, the
    hyper-parameters, the rule baseline and the two refusals' overrides."""

    prepared_dir: str
    model_dir: str
    feature_set: str | None = None
    epochs: int = 10
    patience: int = 2
    batch_size: int = 1024
    learning_rate: float = 2e-3
    hidden_units: str = "64,32"
    dropout: float = 0.1
    seed: int = 42
    baseline_feature: str | None = None
    baseline_threshold: float | None = None
    fail_if_worse_than_baseline: bool = False
    allow_anomalies: bool = False

    HYPERPARAMETERS: ClassVar[tuple[str, ...]] = (
        "epochs", "patience", "batch_size", "learning_rate", "hidden_units", "dropout", "seed",
    )  # fmt: skip


@dataclass
class Prepared:
    """What training reads of a prepare run: its summary, feature set, transform output, the
    transformed train/eval examples and the raw features/ rows of each split."""

    summary: dict
    fs_spec: str
    fs: object
    transform_dir: str
    tft_output: object
    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    train_rows: object
    eval_rows: object

    @property
    def y_train(self) -> np.ndarray:
        return self.train[self.fs.label].astype(np.float32)

    @property
    def y_eval(self) -> np.ndarray:
        return self.eval[self.fs.label].astype(np.float32)


def blocking_anomalies(prepared_dir: str, summary: dict) -> list[dict]:
    """The blocking anomalies the validation of the prepared data found: summary.json's
    `validation`, and validation/anomalies.json (written before summary.json, so a run that
    stopped in between is refused too)."""
    found = list(summary.get("validation", {}).get("blocking", []))
    path = os.path.join(prepared_dir, VALIDATION_ANOMALIES)
    if os.path.exists(path):
        with open(path) as f:
            found += [a for a in json.load(f) if a.get("blocking") and a not in found]
    return found


def refuse_anomalous_data(prepared_dir: str, summary: dict, allow: bool) -> None:
    """Exit EXIT_ANOMALIES when the prepared data has blocking anomalies, unless allowed."""
    found = blocking_anomalies(prepared_dir, summary)
    if not found:
        return
    named = "; ".join(f"question {a['question']}, {a['feature']}: {a['kind']}" for a in found[:5])
    if allow:
        LOG.warning("training on data with %d blocking anomalies (--allow_anomalies): %s", len(found), named)
        return
    print(
        f"skewless train: the prepared data in {prepared_dir!r} failed validation with "
        f"{len(found)} blocking anomal{'y' if len(found) == 1 else 'ies'} ({named}); see "
        f"{os.path.join(prepared_dir, 'validation', 'report.html')}, or pass --allow_anomalies",
        file=sys.stderr,
    )
    raise SystemExit(EXIT_ANOMALIES)


def refuse_duplicate_keys(prepared_dir: str, summary: dict) -> None:
    """Exit EXIT_ANOMALIES when prepare refused its examples for sharing example keys: its
    outputs exist (written before the refusal), but the joins by key of the report and the
    audit would be ambiguous. Re-running prepare with --allow_duplicate_example_keys accepts."""
    if not summary.get("duplicate_example_keys_refused"):
        return
    print(
        f"skewless train: prepare refused the data in {prepared_dir!r}: "
        f"{summary['duplicate_example_keys']} examples share their example key with another; "
        f"declare an example_key that identifies one event, or re-run prepare with "
        f"--allow_duplicate_example_keys",
        file=sys.stderr,
    )
    raise SystemExit(EXIT_ANOMALIES)


def read_transformed(pattern: str, feature_spec: dict) -> dict[str, np.ndarray]:
    """Gzip TFRecords of transformed tf.Examples -> {feature: array} (all in memory; it is small)."""
    import tensorflow as tf

    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"skewless train: no TFRecords match {pattern}")
    dataset = (
        tf.data.TFRecordDataset(files, compression_type="GZIP")
        .batch(65536)
        .map(lambda x: tf.io.parse_example(x, feature_spec))
    )
    parts: dict[str, list] = {k: [] for k in feature_spec}
    for chunk in dataset.as_numpy_iterator():
        for k, v in chunk.items():
            parts[k].append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def transform_fingerprint(transform_dir: str) -> str:
    """sha256 of the transform graph and its assets (vocabularies): equal means same features."""
    root = os.path.join(transform_dir, "transform_fn")
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        rel = os.path.relpath(path, root)
        if os.path.isfile(path) and (rel == "saved_model.pb" or rel.startswith("assets")):
            digest.update(rel.encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def feature_kinds(tft_output, train: dict[str, np.ndarray], label: str) -> tuple[list[str], dict[str, int]]:
    """Numeric (float) and categorical (int id -> vocabulary size incl. OOV) transformed features."""
    import tensorflow as tf

    numeric, categorical = [], {}
    for name, spec in sorted(tft_output.transformed_feature_spec().items()):
        if name == label:
            continue
        if spec.dtype == tf.float32:
            numeric.append(name)
            continue
        try:
            size = tft_output.num_buckets_for_transformed_feature(name)
        except ValueError:
            # No domain in the schema (e.g. day of week): the ids seen in training, plus one.
            size = int(train[name].max()) + 2
        categorical[name] = int(size)
    return numeric, categorical


def load_split_features(prepared_dir: str, fs, summary: dict):
    """Raw example values (features/) split into train/eval the way prepare split them."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from skewless.transforms.split import Split

    splitter = Split.from_description(fs, summary.get("split"))
    table = pq.read_table(os.path.join(prepared_dir, "features"))
    is_eval = splitter.is_eval(fs, table.combine_chunks().to_batches()[0]) if table.num_rows else None
    return table.filter(pc.invert(is_eval)), table.filter(is_eval)


def prepared_feature_set(prepared_dir: str, summary: dict, override: str | None):
    """(spec, FeatureSet) of the prepared data: the one prepare recorded in summary.json, or
    `override` when it is that same feature set (a FeatureSetMismatch otherwise)."""
    from skewless.models.versions import FeatureSetMismatch, recorded_feature_set

    what = f"the prepared data in {prepared_dir!r}"
    if not summary and not override:
        raise SystemExit(f"skewless train: {what} has no summary.json: give --feature_set")
    try:
        fs = recorded_feature_set(summary, override, what)
    except FeatureSetMismatch as exc:
        raise SystemExit(f"skewless train: {exc}") from None
    return override or summary.get("feature_set_spec") or summary.get("feature_set"), fs


def rule_settings(
    fs, field: str | None, threshold: float | None
) -> tuple[str, float, str] | None:
    """(field, threshold, label) of the rule baseline: the flags, else the feature set's
    `baseline`; None when neither names a field (then only the majority class is reported)."""
    base = fs.baseline
    if field is None and base is None:
        if threshold is not None:
            raise SystemExit(
                "skewless train: --baseline_threshold needs --baseline_feature (the feature set "
                "declares no baseline)"
            )
        return None
    if field is None or (base is not None and field == base.field and threshold in (None, base.threshold)):
        return base.field, base.threshold, base.label
    threshold = 0.0 if threshold is None else threshold
    return field, threshold, f"{field} > {threshold:g}"


def _numeric(table, field: str) -> np.ndarray:
    """A numeric column as float64 (nulls as NaN count as below any threshold)."""
    import pyarrow as pa

    column = table.column(field)
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)):
        raise SystemExit(f"skewless train: baseline field {field!r} is {column.type}, not numeric")
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False)


def _time_range(table, column: str) -> dict:
    import pyarrow.compute as pc

    if not table.num_rows:
        return {"examples": 0}
    bounds = pc.min_max(table.column(column))
    return {"examples": table.num_rows, "first": bounds["min"].as_py().isoformat(), "last": bounds["max"].as_py().isoformat()}


def library_versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("tensorflow", "keras", "tensorflow-transform", "tfx-bsl", "apache-beam", "numpy", "pyarrow")
    return {n: version(n) for n in names}


def train(config: TrainConfig) -> dict:
    """Load, fit, evaluate, export and publish; returns the metrics (with the version number)."""
    started = time.monotonic()
    data = load(config)
    model, history, kinds = fit(config, data)
    metrics = evaluate(config, data, model, history, kinds)
    staging = export(config, data, model, kinds, metrics, started)
    return publish(config, staging, metrics)


def load(config: TrainConfig) -> Prepared:
    """The prepared data (refused if its validation blocked, unless allowed), transformed and
    raw, with the feature set recorded with it."""
    import tensorflow_transform as tft

    summary_path = os.path.join(config.prepared_dir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    refuse_anomalous_data(config.prepared_dir, summary, config.allow_anomalies)
    refuse_duplicate_keys(config.prepared_dir, summary)
    fs_spec, fs = prepared_feature_set(config.prepared_dir, summary, config.feature_set)
    transform_dir = os.path.join(config.prepared_dir, "transform")
    tft_output = tft.TFTransformOutput(transform_dir)
    spec = tft_output.transformed_feature_spec()
    if fs.label not in spec:
        raise SystemExit(
            f"skewless train: the preprocessing_fn of feature set {fs.name!r} outputs no "
            f"{fs.label!r} (the label must come out under the feature set's label name); "
            f"it outputs {', '.join(sorted(spec))}"
        )
    pattern = os.path.join(config.prepared_dir, "{}", "*.tfrecord.gz")
    train_rows, eval_rows = load_split_features(config.prepared_dir, fs, summary)
    data = Prepared(
        summary=summary,
        fs_spec=fs_spec,
        fs=fs,
        transform_dir=transform_dir,
        tft_output=tft_output,
        train=read_transformed(pattern.format("train"), spec),
        eval=read_transformed(pattern.format("eval"), spec),
        train_rows=train_rows,
        eval_rows=eval_rows,
    )
    if len(data.y_eval) == 0 or len(np.unique(data.y_eval)) < 2:
        raise SystemExit("skewless train: the eval split needs examples of both classes")
    if eval_rows.num_rows != len(data.y_eval):
        LOG.warning("features/ has %d eval rows, eval/ %d examples", eval_rows.num_rows, len(data.y_eval))
    LOG.info("train %d examples, eval %d examples", len(data.y_train), len(data.y_eval))
    return data


def fit(config: TrainConfig, data: Prepared):
    """The Keras model fitted on train/, stopped early on eval/ AUC (the best weights kept):
    (model, history, (numeric feature names, {categorical name: vocabulary size}))."""
    import keras
    import tensorflow as tf

    from skewless.models.model import build_model

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    numeric, categorical = feature_kinds(data.tft_output, data.train, data.fs.label)
    hidden = tuple(int(u) for u in config.hidden_units.split(",") if u.strip())
    model = build_model(numeric, categorical, hidden, config.dropout, config.learning_rate)
    names = numeric + list(categorical)
    stop = keras.callbacks.EarlyStopping(
        monitor="val_auc", mode="max", patience=config.patience, restore_best_weights=True
    )
    history = model.fit(
        {k: data.train[k] for k in names},
        data.y_train,
        validation_data=({k: data.eval[k] for k in names}, data.y_eval),
        epochs=config.epochs,
        batch_size=config.batch_size,
        shuffle=True,
        callbacks=[stop],
        verbose=2,
    )
    return model, history, (numeric, categorical)


def evaluate(config: TrainConfig, data: Prepared, model, history, kinds) -> dict:
    """The model's eval metrics next to the baselines' (the rule, the majority class)."""
    from skewless.models.metrics import baseline_metrics, binary_metrics, compare_with_baselines

    numeric, categorical = kinds
    feed = {k: data.eval[k] for k in [*numeric, *categorical]}
    p_eval = np.asarray(model.predict(feed, batch_size=8192, verbose=0)).reshape(-1)
    model_metrics = binary_metrics(data.y_eval, p_eval)
    baselines = baseline_metrics(
        data.train_rows.column(data.fs.label).to_numpy(),
        data.eval_rows.column(data.fs.label).to_numpy(),
        rule_inputs(config, data),
    )
    return {
        "model": model_metrics,
        "baselines": baselines,
        **compare_with_baselines(model_metrics, baselines),
        "epochs_run": len(history.history["loss"]),
        "best_epoch": int(np.argmax(history.history["val_auc"])) + 1,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "note": "eval = the prepared eval split, which early stopping also watched",
    }


def rule_inputs(config: TrainConfig, data: Prepared) -> dict | None:
    """The rule baseline's field values on both splits and its threshold, or None."""
    rule = rule_settings(data.fs, config.baseline_feature, config.baseline_threshold)
    if rule is None:
        return None
    field, threshold, rule_label = rule
    for rows, split in ((data.train_rows, "train"), (data.eval_rows, "eval")):
        if field not in rows.column_names:
            raise SystemExit(
                f"skewless train: baseline field {field!r} is not a column of the prepared "
                f"features ({split}); example fields: {', '.join(rows.column_names)}"
            )
    return {
        "train_values": _numeric(data.train_rows, field),
        "eval_values": _numeric(data.eval_rows, field),
        "threshold": threshold,
        "label": rule_label,
    }


def export(config: TrainConfig, data: Prepared, model, kinds, metrics: dict, started: float) -> str:
    """A staging directory holding the serving model (raw features in, the tf.Transform graph
    inside), the Keras model, metrics.json and model.json; the serving signature's AUC on
    the raw eval features goes into the metrics (a skew check at birth)."""
    import tensorflow as tf

    from skewless.models import versions
    from skewless.models.handler import LoadedModel, arrow_to_feed, predict
    from skewless.models.metrics import roc_auc
    from skewless.models.model import export_serving_model, serving_inputs

    fs = data.fs
    inputs = serving_inputs(fs)
    staging = versions.new_staging_dir(config.model_dir)
    export_serving_model(staging, model, data.tft_output, inputs)
    model.save(os.path.join(staging, versions.KERAS_FILE))
    # The exported model on RAW eval features must rank like the Keras model on the transformed
    # ones: the same examples through the embedded transform graph.
    loaded = tf.saved_model.load(staging)
    served = predict(
        LoadedModel(loaded, loaded.signatures[versions.SIGNATURE], 0),
        arrow_to_feed(data.eval_rows.combine_chunks(), inputs),
    )
    metrics["serving_signature_eval_auc"] = roc_auc(data.eval_rows.column(fs.label).to_numpy(), served)
    numeric, categorical = kinds
    from skewless.models.dependencies import inputs_read, transform_dependencies

    dependencies = transform_dependencies(data.transform_dir)
    metadata = {
        "feature_set": fs.name,
        "feature_set_spec": data.fs_spec,
        "label": fs.label,
        "serving_inputs": inputs,
        "serving_output": versions.OUTPUT,
        "example_key": list(fs.example_key),
        "event_time": fs.event_time,
        "transformed_features": {"numeric": numeric, "categorical": categorical},
        # The raw inputs the model's features are computed from (a prediction cache needs
        # them all in its key), and per transformed feature.
        "reads_inputs": inputs_read(dependencies, [*numeric, *categorical]),
        "transform_dependencies": dependencies,
        "transform_fingerprint": transform_fingerprint(data.transform_dir),
        "prepared_dir": os.path.abspath(config.prepared_dir),
        "training_data": {
            "train": _time_range(data.train_rows, fs.event_time),
            "eval": _time_range(data.eval_rows, fs.event_time),
            "split": data.summary.get("split"),
        },
        "hyperparameters": {k: getattr(config, k) for k in TrainConfig.HYPERPARAMETERS},
        "versions": library_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_seconds": round(time.monotonic() - started, 1),
    }
    versions.write_json(os.path.join(staging, versions.METRICS_FILE), metrics)
    versions.write_json(os.path.join(staging, versions.MODEL_FILE), metadata)
    return staging


def publish(config: TrainConfig, staging: str, metrics: dict) -> dict:
    """The staged model as the next numbered version, unless it does not beat its baseline and
    the config says to fail then (it goes to BASE/rejected/, exit 3)."""
    from skewless.models import versions

    model_metrics = metrics["model"]
    reference = metrics["baselines"][metrics["compared_with"]]
    reference_name = reference.get("label", "the majority class")
    if not metrics["beats_baseline"]:
        LOG.warning(
            "MODEL DOES NOT BEAT THE BASELINE (%s): eval AUC %.4f <= baseline AUC %.4f",
            reference_name,
            model_metrics["auc"],
            reference["auc"],
        )
        if config.fail_if_worse_than_baseline:
            rejected = os.path.join(
                config.model_dir, "rejected", time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
            )
            os.makedirs(os.path.dirname(rejected), exist_ok=True)
            shutil.move(staging, rejected)
            LOG.error("not published; the rejected model is in %s", rejected)
            raise SystemExit(EXIT_WORSE_THAN_BASELINE)
    number, path = versions.publish(config.model_dir, staging)
    LOG.info(
        "published model version %d at %s: AUC %.4f (%s %.4f), log loss %.4f, accuracy %.4f",
        number,
        path,
        model_metrics["auc"],
        reference_name,
        reference["auc"],
        model_metrics["log_loss"],
        model_metrics["accuracy"],
    )
    return {"version": number, "path": path, **metrics}
