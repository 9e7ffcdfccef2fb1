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


def baseline_metrics(
    train_labels: np.ndarray,
    eval_labels: np.ndarray,
    train_dep_delay: np.ndarray,
    eval_dep_delay: np.ndarray,
    rule_threshold: float,
) -> dict:
    """The two baselines on the eval split, with parameters learned on the train split only.

    - majority: always the train set's majority class; its probability is the train base rate.
    - dep_delay_rule: AUC of raw dep_delay as a score, accuracy of `dep_delay > threshold`,
      log loss of a one-feature logistic regression on dep_delay.
    """
    base_rate = float(np.mean(train_labels))
    majority = {
        "auc": 0.5,
        "log_loss": log_loss(eval_labels, np.full(len(eval_labels), base_rate)),
        "accuracy": accuracy(eval_labels, np.full(len(eval_labels), base_rate >= 0.5)),
        "train_base_rate": base_rate,
    }
    a, b = fit_logistic_1d(train_dep_delay, train_labels)
    rule_p = 1.0 / (1.0 + np.exp(-(a + b * np.asarray(eval_dep_delay, dtype=np.float64))))
    rule = {
        "auc": roc_auc(eval_labels, eval_dep_delay),
        "log_loss": log_loss(eval_labels, rule_p),
        "accuracy": accuracy(eval_labels, np.asarray(eval_dep_delay) > rule_threshold),
        "rule": f"dep_delay > {rule_threshold:g} min (AUC: dep_delay as the score)",
        "logistic": {"intercept": a, "slope": b},
    }
    return {"majority": majority, "dep_delay_rule": rule}
