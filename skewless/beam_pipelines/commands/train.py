"""`skewless train`: a prepare run's examples -> the next numbered model version, exported
with its tf.Transform graph (skewless.models.training does the work)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from skewless.beam_pipelines.runtime.job import Job
from skewless.beam_pipelines.runtime.launch import launch
from skewless.models.training import (
    EXIT_ANOMALIES,
    EXIT_WORSE_THAN_BASELINE,
    TrainConfig,
    train,
)

JOB = Job(
    name="train",
    summary="train a model on prepared data; export it with its transform graph",
    description="Train a model on the output of `skewless prepare` and publish it as the next "
    "numbered version under --model_dir.",
    beam=False,
    # Imported where used, so --help does not load it; the CLI loads it before the run with
    # TensorFlow's C++ start-up lines kept off the terminal.
    native_libraries=("tensorflow",),
)


def parse_args(argv: Sequence[str] | None) -> TrainConfig:
    """The flags as a TrainConfig (argparse's usage errors are one line from the CLI)."""
    parser = argparse.ArgumentParser(
        prog=JOB.prog,
        description=JOB.description,
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
    namespace = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return TrainConfig(**vars(namespace))


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse the flags, train and publish; the metrics with the version number."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return train(parse_args(argv))


if __name__ == "__main__":
    launch(JOB, run)
