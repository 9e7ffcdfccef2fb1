"""The trainer: prepared TFRecords + transform_fn -> a numbered model version with its metrics.

`skewless train --prepared_dir DIR --model_dir BASE` trains the wide-and-deep of models/model.py
on train/, stops early on eval/, and publishes BASE/<next number>/ holding the SavedModel (raw
features in, the tf.Transform graph inside, `probability` out), model.keras (the bare Keras
model, on transformed features), model.json (metadata) and metrics.json (model vs baselines).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence

import numpy as np

LOG = logging.getLogger("skewless.train")
# Imported where used, so `--help` does not load it; the CLI loads it before the run with
# TensorFlow's C++ start-up lines kept off the terminal.
NATIVE_LIBRARIES = ("tensorflow",)
EXIT_WORSE_THAN_BASELINE = 3
EXIT_ANOMALIES = 3  # as `skewless validate` and `prepare --validate_against`
VALIDATION_ANOMALIES = os.path.join("validation", "anomalies.json")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="skewless train",
        description="Train a model on the output of `skewless prepare` and publish it as the next "
        "numbered version under --model_dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a prefix is a typo, as in the Beam jobs
    )
    parser.add_argument("--prepared_dir", required=True, help="Output directory of `skewless prepare`.")
    parser.add_argument("--model_dir", required=True, help="Base directory of numbered model versions.")
    parser.add_argument(
        "--feature_set",
        help="Feature set (default: the one prepare recorded in its summary.json; another one "
        "is an error).",
    )
    parser.add_argument("--epochs", type=int, default=10, help="Maximum epochs.")
    parser.add_argument("--patience", type=int, default=2, help="Early stopping: epochs without eval AUC gain.")
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--hidden_units", default="64,32", help="Comma-separated dense layer sizes.")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--baseline_feature",
        help="Numeric example field of the rule baseline (positive when field > threshold). "
        "Default: the feature set's baseline; without one only the majority class is reported.",
    )
    parser.add_argument(
        "--baseline_threshold",
        type=float,
        help="Rule baseline threshold (default: the feature set's baseline threshold, else 0).",
    )
    parser.add_argument(
        "--fail_if_worse_than_baseline",
        action="store_true",
        help=f"Exit {EXIT_WORSE_THAN_BASELINE} and publish no version (it goes to BASE/rejected/) when "
        "the model's eval AUC does not beat the rule baseline's (the majority class's when "
        "there is no rule baseline).",
    )
    parser.add_argument(
        "--allow_anomalies",
        action="store_true",
        help=f"Train even when the prepared data failed validation (prepare --validate_against "
        f"found blocking anomalies); without it such data is refused with exit {EXIT_ANOMALIES}.",
    )
    return parser.parse_args(list(sys.argv[1:] if argv is None else argv))


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

    from transforms.split import Split

    splitter = Split.from_description(fs, summary.get("split"))
    table = pq.read_table(os.path.join(prepared_dir, "features"))
    is_eval = splitter.is_eval(fs, table.combine_chunks().to_batches()[0]) if table.num_rows else None
    return table.filter(pc.invert(is_eval)), table.filter(is_eval)


def prepared_feature_set(prepared_dir: str, summary: dict, override: str | None):
    """(spec, FeatureSet) of the prepared data: the one prepare recorded in summary.json, or
    `override` when it is that same feature set (a FeatureSetMismatch otherwise)."""
    from models.versions import FeatureSetMismatch, recorded_feature_set

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


def train(args: argparse.Namespace) -> dict:
    """Train, evaluate, export and publish; returns the metrics (with the version number)."""
    import keras
    import tensorflow as tf
    import tensorflow_transform as tft

    from models import versions
    from models.handler import LoadedModel, arrow_to_feed, predict
    from models.metrics import baseline_metrics, binary_metrics, compare_with_baselines, roc_auc
    from models.model import build_model, export_serving_model, serving_inputs
    started = time.monotonic()
    summary_path = os.path.join(args.prepared_dir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    refuse_anomalous_data(args.prepared_dir, summary, args.allow_anomalies)
    fs_spec, fs = prepared_feature_set(args.prepared_dir, summary, args.feature_set)
    transform_dir = os.path.join(args.prepared_dir, "transform")
    tft_output = tft.TFTransformOutput(transform_dir)
    spec = tft_output.transformed_feature_spec()
    if fs.label not in spec:
        raise SystemExit(
            f"skewless train: the preprocessing_fn of feature set {fs.name!r} outputs no "
            f"{fs.label!r} (the label must come out under the feature set's label name); "
            f"it outputs {', '.join(sorted(spec))}"
        )
    train_data = read_transformed(os.path.join(args.prepared_dir, "train", "*.tfrecord.gz"), spec)
    eval_data = read_transformed(os.path.join(args.prepared_dir, "eval", "*.tfrecord.gz"), spec)
    label = fs.label
    y_train, y_eval = train_data[label].astype(np.float32), eval_data[label].astype(np.float32)
    if len(y_eval) == 0 or len(np.unique(y_eval)) < 2:
        raise SystemExit("skewless train: the eval split needs examples of both classes")
    LOG.info("train %d examples, eval %d examples", len(y_train), len(y_eval))

    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    numeric, categorical = feature_kinds(tft_output, train_data, label)
    hidden = tuple(int(u) for u in args.hidden_units.split(",") if u.strip())
    model = build_model(numeric, categorical, hidden, args.dropout, args.learning_rate)
    names = numeric + list(categorical)
    stop = keras.callbacks.EarlyStopping(
        monitor="val_auc", mode="max", patience=args.patience, restore_best_weights=True
    )
    history = model.fit(
        {k: train_data[k] for k in names},
        y_train,
        validation_data=({k: eval_data[k] for k in names}, y_eval),
        epochs=args.epochs,
        batch_size=args.batch_size,
        shuffle=True,
        callbacks=[stop],
        verbose=2,
    )
    p_eval = np.asarray(model.predict({k: eval_data[k] for k in names}, batch_size=8192, verbose=0)).reshape(-1)
    model_metrics = binary_metrics(y_eval, p_eval)

    train_rows, eval_rows = load_split_features(args.prepared_dir, fs, summary)
    rule = rule_settings(fs, args.baseline_feature, args.baseline_threshold)
    if rule is not None:
        field, threshold, rule_label = rule
        for rows, split in ((train_rows, "train"), (eval_rows, "eval")):
            if field not in rows.column_names:
                raise SystemExit(
                    f"skewless train: baseline field {field!r} is not a column of the prepared "
                    f"features ({split}); example fields: {', '.join(rows.column_names)}"
                )
        rule = {
            "train_values": _numeric(train_rows, field),
            "eval_values": _numeric(eval_rows, field),
            "threshold": threshold,
            "label": rule_label,
        }
    baselines = baseline_metrics(
        train_rows.column(label).to_numpy(), eval_rows.column(label).to_numpy(), rule
    )
    if eval_rows.num_rows != len(y_eval):
        LOG.warning("features/ has %d eval rows, eval/ %d examples", eval_rows.num_rows, len(y_eval))

    inputs = serving_inputs(fs)
    staging = versions.new_staging_dir(args.model_dir)
    export_serving_model(staging, model, tft_output, inputs)
    model.save(os.path.join(staging, versions.KERAS_FILE))
    # The exported model on RAW eval features must rank like the Keras model on the transformed
    # ones: the same examples through the embedded transform graph (a skew check at birth).
    loaded = tf.saved_model.load(staging)
    served = predict(
        LoadedModel(loaded, loaded.signatures[versions.SIGNATURE], 0),
        arrow_to_feed(eval_rows.combine_chunks(), inputs),
    )
    serving_auc = roc_auc(eval_rows.column(label).to_numpy(), served)

    comparison = compare_with_baselines(model_metrics, baselines)
    beats = comparison["beats_baseline"]
    metrics = {
        "model": model_metrics,
        "baselines": baselines,
        **comparison,
        "serving_signature_eval_auc": serving_auc,
        "epochs_run": len(history.history["loss"]),
        "best_epoch": int(np.argmax(history.history["val_auc"])) + 1,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "note": "eval = the prepared eval split, which early stopping also watched",
    }
    metadata = {
        "feature_set": fs.name,
        "feature_set_spec": fs_spec,
        "label": label,
        "serving_inputs": inputs,
        "serving_output": versions.OUTPUT,
        "example_key": list(fs.example_key),
        "event_time": fs.event_time,
        "transformed_features": {"numeric": numeric, "categorical": categorical},
        "transform_fingerprint": transform_fingerprint(transform_dir),
        "prepared_dir": os.path.abspath(args.prepared_dir),
        "training_data": {
            "train": _time_range(train_rows, fs.event_time),
            "eval": _time_range(eval_rows, fs.event_time),
            "split": summary.get("split"),
        },
        "hyperparameters": {
            k: getattr(args, k)
            for k in ("epochs", "patience", "batch_size", "learning_rate", "hidden_units", "dropout", "seed")
        },
        "versions": library_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_seconds": round(time.monotonic() - started, 1),
    }
    versions.write_json(os.path.join(staging, versions.METRICS_FILE), metrics)
    versions.write_json(os.path.join(staging, versions.MODEL_FILE), metadata)

    reference = baselines[comparison["compared_with"]]
    reference_name = reference.get("label", "the majority class")
    if not beats:
        LOG.warning(
            "MODEL DOES NOT BEAT THE BASELINE (%s): eval AUC %.4f <= baseline AUC %.4f",
            reference_name,
            model_metrics["auc"],
            reference["auc"],
        )
        if args.fail_if_worse_than_baseline:
            rejected = os.path.join(args.model_dir, "rejected", time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}")
            os.makedirs(os.path.dirname(rejected), exist_ok=True)
            shutil.move(staging, rejected)
            LOG.error("not published; the rejected model is in %s", rejected)
            raise SystemExit(EXIT_WORSE_THAN_BASELINE)
    number, path = versions.publish(args.model_dir, staging)
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


def run(argv: Sequence[str] | None = None) -> dict:
    """The train job (`skewless train`; the CLI configures logging, as for every job)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return train(parse_args(argv))


if __name__ == "__main__":
    run()
