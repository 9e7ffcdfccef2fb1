"""`skewless report`: a model and its scored period in a few lines of text, and a PNG chart
(skewless.models.report computes it)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from skewless.beam_pipelines.runtime.job import Job
from skewless.beam_pipelines.runtime.launch import launch
from skewless.models import versions
from skewless.models.report import format_report, report

JOB = Job(
    name="report",
    summary="print a model + scoring report and write a PNG chart",
    description="A short text report and a PNG chart (calibration + score distribution) for a "
    "scored period: the model next to its baselines and, given the prepared data, the period's "
    "metrics with the labels joined on the model's example key; and the retrain candidates the "
    "gate refused, with their evaluation.",
    beam=False,
)


def run(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog=JOB.prog, description=JOB.description, allow_abbrev=False
    )
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--model_version", type=int)
    parser.add_argument(
        "--score_dir",
        help="--output of `skewless score`. Without it: the model, its baselines and the "
        "refused retrain candidates under --model_dir.",
    )
    parser.add_argument("--prepared_dir", help="Output of `skewless prepare` (for the labels).")
    parser.add_argument("--chart", help="Write the PNG chart here.")
    parser.add_argument(
        "--compare_model_dir",
        help="Another model directory (its highest version): its eval-split AUC and log loss "
        "are shown next to this model's (e.g. the model trained without reference tables).",
    )
    parser.add_argument(
        "--feature_set",
        help="Feature set (default: the one recorded with the model version; another one is an "
        "error).",
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.chart and not args.score_dir:
        parser.error("--chart needs --score_dir (the chart is of the scored predictions)")
    try:
        r = report(
            args.model_dir,
            args.score_dir,
            args.prepared_dir,
            args.chart,
            args.model_version,
            args.feature_set,
            args.compare_model_dir,
        )
    except versions.FeatureSetMismatch as exc:
        raise SystemExit(f"skewless report: {exc}") from None
    print(format_report(r))
    return r


if __name__ == "__main__":
    launch(JOB, run)
