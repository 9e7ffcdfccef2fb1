"""`skewless retrain`: a rolling window of raw events or of examples already built (prepared or
label-joined) -> a candidate model, promoted to the next numbered version only if it passes
the gate against the serving version on the same held-out slice (skewless.models.gate decides;
prepare and the trainer do the work).

One run: resolve the serving version (the highest under --model_dir) -> prepare the window
(examples of [start, end), the last --holdout of it as the eval split, the window validated
against the serving version's training baseline by prepare's --validate_against, the code
`skewless validate` runs) -> train the candidate on the window minus the slice -> score the
slice's raw examples through both models' serving signatures -> the gate -> publish, or keep
the candidate under MODEL_DIR/refused/<stamp>/ (never a number, so a scorer never serves it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence

from skewless.beam_pipelines.runtime.job import Job
from skewless.beam_pipelines.runtime.launch import launch

LOG = logging.getLogger("skewless.retrain")
EXIT_BLOCKING = 3  # the window failed validation (as `skewless validate`); nothing trained
EXIT_REFUSED = 4  # the candidate failed the gate; kept under MODEL_DIR/refused/, not served
DEFAULT_HOLDOUT = "7d"
_DURATION = re.compile(r"^([1-9][0-9]*)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

JOB = Job(
    name="retrain",
    summary="train on a rolling window; promote only if not worse than the serving model",
    description="Prepare a window of raw events (validated against the serving version's "
    "training data), train a candidate on it minus its last --holdout, evaluate candidate and "
    "serving version on that held-out slice, and publish the candidate as the next numbered "
    f"version under --model_dir only if it passes the gate. Exit 0: promoted; "
    f"{EXIT_REFUSED}: refused by the gate (kept under MODEL_DIR/refused/); {EXIT_BLOCKING}: the "
    "window failed validation (nothing trained); 2: bad options; 1: failure.",
    beam=False,
    native_libraries=("tensorflow",),
)


def duration_ms(text: str, flag: str) -> int:
    """'60d', '12h', '2w', '90m', '30s' -> milliseconds; ValueError (a usage error) otherwise."""
    match = _DURATION.match(text or "")
    if not match:
        raise ValueError(f"{flag} {text!r} is not a duration such as 60d, 12h, 2w")
    return int(match.group(1)) * _UNIT_S[match.group(2)] * 1000


def instant_ms(text: str, flag: str) -> int:
    from skewless.transforms.record_checks import to_epoch_ms

    try:
        return to_epoch_ms(text)
    except ValueError as exc:
        raise ValueError(f"{flag} {text!r} is not an ISO-8601 instant ({exc})") from None


def iso(ms: int) -> str:
    from skewless.transforms.record_checks import ms_to_datetime

    return ms_to_datetime(ms).isoformat()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=JOB.prog,
        description=JOB.description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--input",
        help="Raw events: a path or glob of CSV, Parquet or JSON-lines files (default, without "
        "--examples: the feature set's bundled input, as prepare's).",
    )
    source.add_argument(
        "--examples",
        help="Examples already built instead of raw events: comma-separated prepare, label-join "
        "or retrain output directories (an entry may be a glob, e.g. out/labelled/*), as prepare "
        "--examples reads them; a key held by several keeps the first directory's example "
        "(list label-joined ones first: the features as served where they exist).",
    )
    parser.add_argument(
        "--input_format", choices=("csv", "parquet", "jsonl"), help="Override format detection."
    )
    parser.add_argument(
        "--model_dir", required=True, help="Base directory of numbered model versions."
    )
    parser.add_argument(
        "--feature_set",
        help="Feature set (default: the serving version's; without one, required unless flights).",
    )
    window = parser.add_argument_group("the window")
    window.add_argument(
        "--window",
        help="Window length ending at --end, e.g. 60d (default: every event before --end).",
    )
    window.add_argument("--start", help="Window start (ISO-8601, inclusive); instead of --window.")
    window.add_argument(
        "--end",
        help="Window end (ISO-8601, exclusive). Default: just after the latest event of --input.",
    )
    window.add_argument(
        "--holdout",
        default=DEFAULT_HOLDOUT,
        help="The held-out slice: the window's last this long, left out of the candidate's "
        "training; both models are measured on it.",
    )
    gate = parser.add_argument_group("the gate")
    gate.add_argument(
        "--max_auc_drop", type=float, default=0.0,
        help="Refuse a candidate whose slice AUC is lower than the serving version's by more.",
    )  # fmt: skip
    gate.add_argument(
        "--max_log_loss_rise", type=float, default=0.0,
        help="Refuse a candidate whose slice log loss is higher than the serving version's by more.",
    )  # fmt: skip
    parser.add_argument(
        "--baseline",
        help="Prepared directory to validate the window against. Default: the serving "
        "version's training data (prepared_dir in its model.json); none without a serving version.",
    )
    parser.add_argument(
        "--prepared_dir",
        help="Where prepare writes the window (it becomes the next version's baseline). "
        "Default: MODEL_DIR/prepared/<stamp>.",
    )
    training = parser.add_argument_group("training (as skewless train)")
    training.add_argument("--epochs", type=int, default=10)
    training.add_argument("--patience", type=int, default=2)
    training.add_argument("--batch_size", type=int, default=1024)
    training.add_argument("--learning_rate", type=float, default=2e-3)
    training.add_argument("--hidden_units", default="64,32")
    training.add_argument("--dropout", type=float, default=0.1)
    training.add_argument("--seed", type=int, default=42)
    training.add_argument(
        "--shuffle_train_labels",
        action="store_true",
        help="Train on the window's labels shuffled (a candidate that learned nothing): to "
        "check that the gate refuses it.",
    )
    return parser.parse_args(list(sys.argv[1:] if argv is None else argv))


def run(argv: Sequence[str] | None = None) -> dict:
    """The whole run; returns the evaluation (with `version` when promoted), exits
    EXIT_REFUSED when the gate refuses and EXIT_BLOCKING when validation blocks."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from skewless.models import gate

    args = parse_args(argv)
    thresholds = gate.Thresholds(args.max_auc_drop, args.max_log_loss_rise)
    serving = serving_version(args.model_dir)
    fs_spec = (
        args.feature_set
        or (serving.metadata.get("feature_set_spec") if serving else None)
        or "flights"
    )
    fs = feature_set(serving, fs_spec, args.feature_set)
    window = resolve_window(args, fs)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
    prepared_dir = args.prepared_dir or os.path.join(args.model_dir, "prepared", stamp)
    baseline = args.baseline or (serving.metadata.get("prepared_dir") if serving else None)
    if baseline and not os.path.exists(os.path.join(baseline, "statistics")):
        raise SystemExit(
            f"skewless retrain: the validation baseline {baseline!r} (the serving version's "
            "training data unless --baseline) has no statistics/: give --baseline, a prepare output"
        )
    prepare_window(args, fs_spec, window, prepared_dir, baseline)
    return train_and_gate(args, thresholds, serving, window, prepared_dir, baseline, stamp)


def serving_version(model_dir: str):
    """The highest published version, None when there is none yet; a corrupt one is an error."""
    from skewless.models import versions

    if not versions.list_versions(model_dir):
        return None
    try:
        return versions.resolve(model_dir)
    except versions.ModelDirError as exc:
        raise SystemExit(f"skewless retrain: the serving version: {exc}") from None


def feature_set(serving, spec: str, override: str | None):
    from skewless.models.versions import FeatureSetMismatch
    from skewless.transforms.featureset import load_feature_set

    if serving is None:
        return load_feature_set(spec)
    try:
        return serving.feature_set(override)
    except FeatureSetMismatch as exc:
        raise SystemExit(f"skewless retrain: {exc}") from None


def resolve_window(args: argparse.Namespace, fs) -> dict:
    """{start_ms (None: open), end_ms, holdout_start_ms} from the flags; --end defaults to just
    after the latest event of the input (one pass over it)."""
    if args.window and args.start:
        raise ValueError("give --window or --start, not both")
    holdout = duration_ms(args.holdout, "--holdout")
    if args.examples and args.input_format:
        raise ValueError("--input_format applies to --input, not to --examples")
    end = instant_ms(args.end, "--end") if args.end else latest_event_ms(args, fs) + 1
    if args.start:
        start = instant_ms(args.start, "--start")
    elif args.window:
        start = end - duration_ms(args.window, "--window")
    else:
        start = None
    holdout_start = end - holdout
    if start is not None and holdout_start <= start:
        raise ValueError(
            f"--holdout {args.holdout} leaves nothing of the window [{iso(start)}, {iso(end)}) to train on"
        )
    return {"start_ms": start, "end_ms": end, "holdout_start_ms": holdout_start}


def latest_event_ms(args: argparse.Namespace, fs) -> int:
    """The latest event time of --input (a small Beam pass: read, check, max as a metric) or
    of the --examples directories (their event time column)."""
    if args.examples:
        from skewless.beam_pipelines.io import prepared_examples

        dirs = prepared_examples.example_dirs(args.examples)
        prepared_examples.check_example_dirs(dirs, fs)
        latest = prepared_examples.latest_event_ms(dirs, fs)
        if latest is None:
            raise SystemExit(f"skewless retrain: --examples {args.examples!r} holds no example")
        return latest
    import apache_beam as beam
    import pyarrow as pa
    import pyarrow.compute as pc
    from apache_beam.metrics import Metrics
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    from skewless.beam_pipelines.runtime.inputs import read_source
    from skewless.transforms.record_checks import CheckRecords

    flags = (["--input", args.input] if args.input else []) + (
        ["--input_format", args.input_format] if args.input_format else []
    )
    options = PipelineOptions(flags)
    source = read_source(options, fs)
    latest = Metrics.distribution("skewless", "retrain_latest_event_ms")
    event_time = fs.event_time

    def measure(events):  # a batch of events: its latest event time
        if events.num_rows:
            latest.update(pc.max(events.column(event_time).cast(pa.int64())).as_py())

    p = beam.Pipeline(options=PipelineOptions(["--runner", "DirectRunner"]))
    events, _ = p | "Read" >> source | "Check" >> CheckRecords(fs, batches=True)
    _ = events | "Latest" >> beam.Map(measure)
    result = p.run()
    result.wait_until_finish()
    found = result.metrics().query(MetricsFilter().with_name("retrain_latest_event_ms"))[
        "distributions"
    ]
    if not found or not found[0].committed or not found[0].committed.count:
        raise SystemExit(f"skewless retrain: --input {args.input!r} holds no valid event")
    return int(found[0].committed.max)


def prepare_window(
    args, fs_spec: str, window: dict, prepared_dir: str, baseline: str | None
) -> None:
    """prepare over the input, keeping the window's examples, its slice as the eval split and
    the window validated against `baseline`; exits EXIT_BLOCKING (nothing trained) on a
    blocking anomaly."""
    from skewless.beam_pipelines.runtime.launch import run_job
    from skewless.beam_pipelines.validation.baseline import EXIT_BLOCKING as PREPARE_BLOCKED

    source = (
        ["--examples", args.examples] if args.examples
        else ["--input", args.input] if args.input else []
    )  # fmt: skip
    argv = [*source, "--output_dir", prepared_dir, "--feature_set", fs_spec,
            "--end", iso(window["end_ms"]), "--eval_start", iso(window["holdout_start_ms"])]  # fmt: skip
    if args.input_format:
        argv += ["--input_format", args.input_format]
    if window["start_ms"] is not None:
        argv += ["--start", iso(window["start_ms"])]
    if baseline:
        argv += ["--validate_against", baseline]
    else:
        LOG.warning("no serving version and no --baseline: the window is not validated")
    code = run_job("prepare", argv)  # by name, as the CLI runs it: its errors in one line
    if code == PREPARE_BLOCKED:
        report = os.path.join(prepared_dir, "validation", "report.html")
        print(
            f"skewless retrain: the window failed validation against {baseline} (blocking "
            f"anomalies, see {report}); nothing trained",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_BLOCKING)
    if code:
        raise SystemExit(code)  # prepare printed why


def train_and_gate(args, thresholds, serving, window, prepared_dir, baseline, stamp) -> dict:
    """Train the candidate, measure both models on the slice, decide, write evaluation.json
    into the candidate, and publish it or keep it under refused/."""
    import numpy as np

    from skewless.models import gate, training, versions
    from skewless.models.metrics import binary_metrics

    started = time.monotonic()
    config = training.TrainConfig(
        prepared_dir=prepared_dir, model_dir=args.model_dir, epochs=args.epochs,
        patience=args.patience, batch_size=args.batch_size, learning_rate=args.learning_rate,
        hidden_units=args.hidden_units, dropout=args.dropout, seed=args.seed,
    )  # fmt: skip
    data = training.load(config)
    if args.shuffle_train_labels:
        label = data.fs.label
        data.train[label] = np.random.default_rng(args.seed).permutation(data.train[label])
    model, history, kinds = training.fit(config, data)
    metrics = training.evaluate(config, data, model, history, kinds)
    staging = training.export(config, data, model, kinds, metrics, started)

    rows = data.eval_rows.combine_chunks()  # the slice: prepare's eval split of the window
    labels = rows.column(data.fs.label).to_numpy()
    candidate = binary_metrics(labels, score_slice(staging, rows))
    served = None
    if serving is not None:
        served = binary_metrics(labels, score_slice(serving.path, rows, serving.serving_inputs))
    decision = gate.decide(candidate, served, metrics["baselines"], thresholds)
    evaluation = {
        **decision,
        "slice": {"start": iso(window["holdout_start_ms"]), "end": iso(window["end_ms"]),
                  "examples": int(rows.num_rows), "positive_rate": candidate["positive_rate"]},
        "window": {"start": iso(window["start_ms"]) if window["start_ms"] is not None else None,
                   "end": iso(window["end_ms"]), "train_examples": int(len(data.y_train))},
        "candidate": candidate,
        "serving": None if serving is None else {
            "version": serving.version, "path": serving.path, **served,
            "trained_on": serving.metadata.get("training_data"),
            "saw_the_slice": _saw(serving.metadata, window["holdout_start_ms"]),
        },
        "baselines": metrics["baselines"],
        "thresholds": {"max_auc_drop": thresholds.max_auc_drop,
                       "max_log_loss_rise": thresholds.max_log_loss_rise},
        "prepared_dir": os.path.abspath(prepared_dir),
        "validated_against": baseline,
        "shuffled_train_labels": bool(args.shuffle_train_labels),
        "note": "the candidate's early stopping watched the slice (its eval split), as "
        "TFX's Trainer and Evaluator share the eval split; the serving version never trained on it "
        "unless saw_the_slice",
    }  # fmt: skip
    if evaluation["decision"] == gate.PROMOTED:
        newest = versions.list_versions(args.model_dir)
        if serving is not None and newest and newest[-1] != serving.version:
            evaluation["decision"] = gate.REFUSED
            evaluation["reasons"].append(
                f"version {newest[-1]} was published during this run (compared with "
                f"{serving.version}): run retrain again"
            )
    versions.write_json(os.path.join(staging, gate.EVALUATION_FILE), evaluation)
    if evaluation["decision"] == gate.PROMOTED:
        number, path = versions.publish(args.model_dir, staging)
        LOG.info("PROMOTED as version %d (%s): %s", number, path, "; ".join(evaluation["reasons"]))
        return {**evaluation, "version": number, "path": path}
    refused = os.path.join(args.model_dir, gate.REFUSED_DIR, stamp)
    os.makedirs(os.path.dirname(refused), exist_ok=True)
    shutil.move(staging, refused)
    print(
        f"skewless retrain: candidate REFUSED ({'; '.join(evaluation['reasons'])}); kept in "
        f"{refused}, not served",
        file=sys.stderr,
    )
    raise SystemExit(EXIT_REFUSED)


def score_slice(path: str, rows, inputs: list[dict] | None = None):
    """Probabilities of the slice's raw examples through a SavedModel's serving signature."""
    import tensorflow as tf

    from skewless.models import versions
    from skewless.models.handler import LoadedModel, ModelInputError, arrow_to_feed, predict

    if inputs is None:
        with open(os.path.join(path, versions.MODEL_FILE)) as f:
            inputs = json.load(f)["serving_inputs"]
    try:
        feed = arrow_to_feed(rows, inputs)
    except ModelInputError as exc:
        raise SystemExit(
            f"skewless retrain: the model in {path} cannot score the window's examples ({exc})"
        ) from None
    module = tf.saved_model.load(path)
    return predict(LoadedModel(module, module.signatures[versions.SIGNATURE], 0), feed)


def _saw(metadata: dict, slice_start_ms: int) -> bool:
    """Whether the serving version's training data (train or eval split) reached the slice."""
    last = [
        part.get("last")
        for part in (metadata.get("training_data") or {}).values()
        if isinstance(part, dict) and part.get("last")
    ]
    return any(instant_ms(t, "last") >= slice_start_ms for t in last)


if __name__ == "__main__":
    launch(JOB, run)
