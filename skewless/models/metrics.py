"""Binary-classification metrics in NumPy (AUC, log loss, accuracy) and the baselines a model must beat."""

from __future__ import annotations

import numpy as np

EPS = 1e-7


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U), ties counted as half; NaN with one class only."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    _, inverse, counts = np.unique(s[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0  # 1-based mean rank of each run of ties
    ranks = np.empty(len(s))
    ranks[order] = average_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), EPS, 1.0 - EPS)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean(np.asarray(labels).astype(bool) == np.asarray(predicted).astype(bool)))


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> dict:
    return {
        "auc": roc_auc(labels, probabilities),
        "log_loss": log_loss(labels, probabilities),
        "accuracy": accuracy(labels, np.asarray(probabilities) >= threshold),
        "examples": int(len(labels)),
        "positive_rate": float(np.mean(labels)) if len(labels) else float("nan"),
        # What streaming monitoring compares a window's mean served probability with.
        "mean_probability": float(np.mean(probabilities)) if len(labels) else float("nan"),
    }


def fit_logistic_1d(x: np.ndarray, y: np.ndarray, steps: int = 25) -> tuple[float, float]:
    """(a, b) of p = sigmoid(a + b * x) by Newton's method on standardized x; deterministic."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mu, sd = float(x.mean()), float(x.std() or 1.0)
    z = (x - mu) / sd
    w = np.zeros(2)
    design = np.stack([np.ones_like(z), z], axis=1)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(design @ w)))
        gradient = design.T @ (p - y)
        hessian = (design * (p * (1 - p))[:, None]).T @ design + 1e-9 * np.eye(2)
        w -= np.linalg.solve(hessian, gradient)
    return float(w[0] - w[1] * mu / sd), float(w[1] / sd)


def majority_baseline(train_labels: np.ndarray, eval_labels: np.ndarray) -> dict:
    """Always the train split's majority class; its probability is the train base rate."""
    base_rate = float(np.mean(train_labels))
    return {
        "auc": 0.5,
        "log_loss": log_loss(eval_labels, np.full(len(eval_labels), base_rate)),
        "accuracy": accuracy(eval_labels, np.full(len(eval_labels), base_rate >= 0.5)),
        "train_base_rate": base_rate,
    }


def rule_baseline(
    train_labels: np.ndarray,
    eval_labels: np.ndarray,
    train_values: np.ndarray,
    eval_values: np.ndarray,
    threshold: float,
    label: str,
) -> dict:
    """A one-field rule on the eval split, fitted on the train split only: AUC of the raw field
    as a score, accuracy of `field > threshold`, log loss of a one-field logistic regression.
    `label` names it in metrics.json and the report."""
    train_values = np.asarray(train_values, dtype=np.float64)
    eval_values = np.asarray(eval_values, dtype=np.float64)
    # A missing value (NaN) is below every threshold and the lowest score.
    finite = train_values[np.isfinite(train_values)]
    low = float(finite.min()) - 1.0 if finite.size else 0.0
    train_values = np.where(np.isnan(train_values), low, train_values)
    eval_values = np.where(np.isnan(eval_values), low, eval_values)
    a, b = fit_logistic_1d(train_values, train_labels)
    rule_p = 1.0 / (1.0 + np.exp(-(a + b * eval_values)))
    return {
        "auc": roc_auc(eval_labels, eval_values),
        "log_loss": log_loss(eval_labels, rule_p),
        "accuracy": accuracy(eval_labels, eval_values > threshold),
        "label": label,
        "threshold": threshold,
        "logistic": {"intercept": a, "slope": b},
    }


def baseline_metrics(
    train_labels: np.ndarray,
    eval_labels: np.ndarray,
    rule: dict | None = None,
) -> dict:
    """The baselines on the eval split, with parameters learned on the train split only:
    `majority` always, `rule` when `rule` gives the keyword arguments of `rule_baseline`
    (train_values, eval_values, threshold, label)."""
    out = {"majority": majority_baseline(train_labels, eval_labels)}
    if rule is not None:
        out["rule"] = rule_baseline(train_labels, eval_labels, **rule)
    return out


def compare_with_baselines(model: dict, baselines: dict) -> dict:
    """Whether the model's AUC beats the rule baseline's, or the majority class's when there is
    no rule: `compared_with` names the baseline; `beats_baseline` / `auc_gain_over_baseline`,
    and the same under the baseline's name (`beats_rule_baseline`, ...)."""
    name = "rule" if "rule" in baselines else "majority"
    beats, gain = bool(model["auc"] > baselines[name]["auc"]), model["auc"] - baselines[name]["auc"]
    return {
        "compared_with": name,
        "beats_baseline": beats,
        "auc_gain_over_baseline": gain,
        f"beats_{name}_baseline": beats,
        f"auc_gain_over_{name}_baseline": gain,
    }
