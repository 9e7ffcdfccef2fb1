"""A short text report and a PNG chart (calibration + score distribution) for a scored period.

`report(model_dir, score_dir, prepared_dir)` reads the model version's metrics, the score job's
summary and predictions and, when the prepared features are given, the labels of the scored
examples (joined on the example key). It then also checks the scores against the trainer's:
the same examples must get the same AUC, or scoring and training saw different features.
"""

from __future__ import annotations

import json
import os

import numpy as np

from skewless.models import versions
from skewless.models.gate import (
    format_promotion,
    format_refused,
    read_evaluation,
    refused_candidates,
)
from skewless.models.metrics import binary_metrics

SKEW_AUC_TOLERANCE = 1e-4


def _load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def labelled_predictions(score_dir: str, prepared_dir: str | None, key: list[str], label: str):
    """Predictions (pandas) with the label of each example when the prepared features have it."""
    import pyarrow.parquet as pq

    predictions = pq.read_table(os.path.join(score_dir, "predictions")).to_pandas()
    if not prepared_dir:
        return predictions
    features = pq.read_table(os.path.join(prepared_dir, "features"), columns=[*key, label]).to_pandas()
    return predictions.merge(features, on=key, how="left")


def report(
    model_dir: str,
    score_dir: str | None,
    prepared_dir: str | None = None,
    chart_path: str | None = None,
    model_version: int | None = None,
    feature_set: str | None = None,
    compare_model_dir: str | None = None,
) -> dict:
    """Build the report dict, print nothing; `format_report` renders it, `chart_path` gets a PNG.

    The example key and the label are the model's (model.json, else its feature set);
    `feature_set` may only name the feature set the model was trained on. `compare_model_dir`:
    another model (its highest version), e.g. one trained without some features, whose
    trainer metrics on its eval split are shown next to this one's. Without `score_dir`: the
    model, its baselines and the refused retrain candidates only."""
    model = versions.resolve(model_dir, model_version)
    metrics = _load_json(os.path.join(model.path, versions.METRICS_FILE))
    summary_path = os.path.join(score_dir, "summary.json") if score_dir else ""
    summary = _load_json(summary_path) if summary_path and os.path.exists(summary_path) else {}
    fs = model.feature_set(feature_set)
    key = list(model.metadata.get("example_key") or fs.example_key)
    label = model.metadata.get("label") or fs.label
    if score_dir:
        predictions = labelled_predictions(score_dir, prepared_dir, key, label)
    else:
        import pandas as pd

        predictions = pd.DataFrame({"probability": []})
    out = {
        "model_version": model.version,
        "counts": {
            k: summary.get(k)
            for k in (
                "records_read",
                "records_valid",
                "records_rejected",
                "examples",
                "examples_scored",
                "inference_failures",
            )
        },
        "period": summary.get("period"),
        "predictions": len(predictions),
        "training_eval": metrics["model"],
        "baselines": metrics["baselines"],
        "compared_with": metrics["compared_with"],
        "beats_baseline": metrics["beats_baseline"],
        "promotion": read_evaluation(model.path),
        "refused_candidates": refused_candidates(model_dir),
    }
    labelled = predictions.dropna(subset=[label]) if label in predictions else predictions.iloc[:0]
    if len(labelled):
        scored = binary_metrics(labelled[label].to_numpy(), labelled["probability"].to_numpy())
        out["scored_period"] = scored
        # Only comparable when the scored period is exactly the trainer's eval split.
        if scored["examples"] == metrics["model"]["examples"]:
            out["skew_check"] = {
                "auc_difference": scored["auc"] - metrics["model"]["auc"],
                "ok": abs(scored["auc"] - metrics["model"]["auc"]) <= SKEW_AUC_TOLERANCE,
            }
    if compare_model_dir:
        out["compared_model"] = compared_model(compare_model_dir, metrics["model"])
    if chart_path and score_dir:
        write_chart(chart_path, predictions, label if len(labelled) else None, model.version)
        out["chart"] = chart_path
    return out


def compared_model(model_dir: str, this: dict) -> dict:
    """Another model's trainer metrics, and how this model's differ (same eval examples only)."""
    other = versions.resolve(model_dir)
    theirs = _load_json(os.path.join(other.path, versions.METRICS_FILE))["model"]
    same = theirs["examples"] == this["examples"]
    return {
        "model_dir": model_dir,
        "model_version": other.version,
        "feature_set": other.metadata.get("feature_set"),
        "eval": theirs,
        "same_eval_examples": same,
        "auc_gain": this["auc"] - theirs["auc"] if same else None,
        "log_loss_gain": theirs["log_loss"] - this["log_loss"] if same else None,
    }


def write_chart(path: str, predictions, label: str | None, version: int, bins: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    p = predictions["probability"].to_numpy()
    edges = np.linspace(0.0, 1.0, bins + 1)
    if label is not None:
        data = predictions.dropna(subset=[label])
        y, q = data[label].to_numpy().astype(float), data["probability"].to_numpy()
        which = np.clip(np.digitize(q, edges) - 1, 0, bins - 1)
        filled = [b for b in range(bins) if (which == b).any()]
        mean_p = [q[which == b].mean() for b in filled]
        rate = [y[which == b].mean() for b in filled]
        left.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
        left.plot(mean_p, rate, "o-", label=f"model v{version}")
        left.set_xlabel("mean predicted probability")
        left.set_ylabel("observed positive rate")
        left.set_title("Calibration")
        left.legend()
        right.hist(q[y == 0], bins=edges, histtype="step", linewidth=2, label="negative (0)")
        right.hist(q[y == 1], bins=edges, histtype="step", linewidth=2, label="positive (1)")
    else:
        left.text(0.5, 0.5, "no labels: pass the prepared dir", ha="center")
        right.hist(p, bins=edges)
    right.set_xlabel("predicted probability")
    right.set_ylabel("examples")
    right.set_yscale("log")
    right.set_title("Score distribution")
    if label is not None:
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_report(r: dict) -> str:
    def row(name: str, m: dict) -> str:
        return f"  {name:<22} AUC {m['auc']:.4f}  log loss {m['log_loss']:.4f}  accuracy {m['accuracy']:.4f}"

    counts = r["counts"]
    lines = [f"model version {r['model_version']}; period {r.get('period')}"]
    if any(v is not None for v in counts.values()):
        lines.append("counts: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v is not None))
    lines += ["eval split (trainer):", row("model", r["training_eval"])]
    rule = r["baselines"].get("rule")
    if rule is not None:
        lines.append(row(f"rule: {rule['label']}", rule))
    lines.append(row("majority class", r["baselines"]["majority"]))
    if rule is None:
        lines.append("  (no rule baseline: the feature set declares none; compared with the majority class)")
    if not r["beats_baseline"]:
        reference = "the rule baseline" if r["compared_with"] == "rule" else "the majority class"
        lines.append(f"  WARNING: the model does not beat {reference} on AUC")
    if "compared_model" in r:
        other = r["compared_model"]
        lines.append(row(f"{other['feature_set']} v{other['model_version']}", other["eval"]))
        if other["same_eval_examples"]:
            lines.append(
                f"  this model vs {other['feature_set']}: AUC {other['auc_gain']:+.4f}, "
                f"log loss {-other['log_loss_gain']:+.4f}"
            )
        else:
            lines.append("  (the compared model's eval split has other examples: not comparable)")
    if "scored_period" in r:
        lines.append(row("scored period", r["scored_period"]))
    if "skew_check" in r:
        check = r["skew_check"]
        verdict = "OK" if check["ok"] else "SKEW: scoring and training features differ"
        lines.append(f"  skew check: AUC difference {check['auc_difference']:+.2e} -> {verdict}")
    if "chart" in r:
        lines.append(f"chart: {r['chart']}")
    lines += format_promotion(r.get("promotion"))
    lines += format_refused(r.get("refused_candidates", []))
    return "\n".join(lines)
