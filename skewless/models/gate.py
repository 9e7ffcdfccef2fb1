"""The promotion gate of `skewless retrain`: a candidate and the serving version measured on the
same held-out slice -> promote or refuse, with every check and why; refused candidates listed.

Like TFX's Evaluator blessing a model against the latest blessed one: absolute floors (the
candidate must beat the feature set's rule baseline and the majority class on AUC, as train
compares them) and change thresholds against the serving version (AUC not lower by more than
`max_auc_drop`, log loss not higher by more than `max_log_loss_rise`). Without a serving
version only the floors apply. Pure NumPy/JSON: no TensorFlow here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

EVALUATION_FILE = "evaluation.json"
REFUSED_DIR = "refused"  # under the model directory; never a number, so never served
PROMOTED = "promoted"
REFUSED = "refused"


@dataclass(frozen=True)
class Thresholds:
    """How much worse than the serving version a candidate may be on the slice."""

    max_auc_drop: float = 0.0
    max_log_loss_rise: float = 0.0

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not value >= 0:  # NaN too
                raise ValueError(f"--{name} must be >= 0, got {value}")


def decide(candidate: dict, serving: dict | None, baselines: dict, thresholds: Thresholds) -> dict:
    """{decision, checks, reasons}: each check {name, passed, candidate, reference, limit}.

    `candidate` / `serving`: binary_metrics on the slice; `baselines`: baseline_metrics on the
    slice (`majority`, and `rule` when the feature set has one)."""
    checks = []
    for name in ("rule", "majority"):
        if name not in baselines:
            continue
        reference = baselines[name]["auc"]
        checks.append({
            "name": f"auc_above_{name}_baseline",
            "describes": f"AUC > the {baselines[name].get('label', 'majority class')}'s",
            "passed": bool(candidate["auc"] > reference),
            "candidate": candidate["auc"],
            "reference": reference,
            "limit": reference,
        })  # fmt: skip
    if serving is not None:
        auc_floor = serving["auc"] - thresholds.max_auc_drop
        loss_ceiling = serving["log_loss"] + thresholds.max_log_loss_rise
        checks.append({
            "name": "auc_not_lower_than_serving",
            "describes": f"AUC >= the serving version's - {thresholds.max_auc_drop:g}",
            "passed": bool(candidate["auc"] >= auc_floor),
            "candidate": candidate["auc"],
            "reference": serving["auc"],
            "limit": auc_floor,
        })  # fmt: skip
        checks.append({
            "name": "log_loss_not_higher_than_serving",
            "describes": f"log loss <= the serving version's + {thresholds.max_log_loss_rise:g}",
            "passed": bool(candidate["log_loss"] <= loss_ceiling),
            "candidate": candidate["log_loss"],
            "reference": serving["log_loss"],
            "limit": loss_ceiling,
        })  # fmt: skip
    failed = [c for c in checks if not c["passed"]]
    reasons = [
        f"{c['name']}: {c['candidate']:.4f} vs {c['reference']:.4f} (limit {c['limit']:.4f})"
        for c in failed
    ]
    if not failed:
        reasons.append(f"all {len(checks)} checks passed")
    if serving is None:
        reasons.append("no serving version: only the floors (baselines) apply")
    return {"decision": REFUSED if failed else PROMOTED, "checks": checks, "reasons": reasons}


def refused_candidates(model_dir: str) -> list[dict]:
    """The refused candidates under MODEL_DIR/refused/, oldest first: {path, evaluation}
    (evaluation None when the candidate has no readable evaluation.json)."""
    root = os.path.join(model_dir, REFUSED_DIR)
    if not os.path.isdir(root):
        return []
    names = sorted(os.listdir(root))
    return [
        {
            "name": n,
            "path": os.path.join(root, n),
            "evaluation": read_evaluation(os.path.join(root, n)),
        }
        for n in names
    ]


def read_evaluation(version_path: str) -> dict | None:
    """A version's evaluation.json (a version retrain promoted), None for one train published."""
    try:
        with open(os.path.join(version_path, EVALUATION_FILE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _versus(evaluation: dict) -> str:
    slice_, serving = evaluation["slice"], evaluation.get("serving")
    against = (
        f"serving v{serving['version']} AUC {serving['auc']:.4f}, log loss {serving['log_loss']:.4f}"
        if serving
        else "no serving version"
    )
    return (
        f"candidate AUC {evaluation['candidate']['auc']:.4f}, log loss "
        f"{evaluation['candidate']['log_loss']:.4f} vs {against}, on {slice_['examples']} "
        f"examples [{slice_['start']}, {slice_['end']})"
    )


def format_promotion(evaluation: dict | None) -> list[str]:
    """Report lines of a version retrain promoted: the gate's comparison on its slice."""
    return [f"promoted by retrain: {_versus(evaluation)}"] if evaluation else []


def format_refused(refused: list[dict]) -> list[str]:
    """Report lines: one per refused candidate, with the checks it failed."""
    lines = [f"refused retrain candidates ({len(refused)}, never served):"] if refused else []
    for r in refused:
        evaluation = r["evaluation"]
        if evaluation is None:
            lines.append(f"  {r['name']}: no readable {EVALUATION_FILE}")
            continue
        lines.append(f"  {r['name']}: {_versus(evaluation)}")
        lines += [f"    - {reason}" for reason in evaluation["reasons"]]
    return lines
