"""Exact classification metrics from labels and probabilities (NumPy and scikit-learn, no TF).

PNEUMONIA is the positive class: recall is sensitivity (sick children found), specificity is the
share of healthy children correctly cleared, precision is how many alarms are real.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

METRIC_NAMES = ("loss", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")


def binary_metrics(labels, probabilities, threshold: float = 0.5) -> dict[str, float | int]:
    """Metrics at a decision threshold (probability >= threshold means PNEUMONIA)."""
    labels = np.asarray(labels).astype(int).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if labels.shape != probabilities.shape:
        raise ValueError("labels and probabilities differ in length")
    if len(labels) == 0:
        raise ValueError("no examples to score")
    predicted = probabilities >= threshold
    positive = labels == 1
    tp = int(np.sum(predicted & positive))
    fp = int(np.sum(predicted & ~positive))
    tn = int(np.sum(~predicted & ~positive))
    fn = int(np.sum(~predicted & positive))

    def ratio(numerator: int, denominator: int) -> float:
        return numerator / denominator if denominator else 0.0

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    both_classes = 0 < positive.sum() < len(labels)
    clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
    return {
        "loss": float(log_loss(labels, clipped, labels=[0, 1])),
        "accuracy": ratio(tp + tn, len(labels)),
        "precision": precision,
        "recall": recall,
        "specificity": ratio(tn, tn + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": float(roc_auc_score(labels, probabilities)) if both_classes else float("nan"),
        "pr_auc": float(average_precision_score(labels, probabilities)) if both_classes else float("nan"),
        "threshold": float(threshold),
        "n": int(len(labels)),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def format_table(metrics: dict[str, float | int], title: str = "") -> str:
    """A small aligned table for terminals."""
    lines = [title] if title else []
    for name in (*METRIC_NAMES, "threshold"):
        if name in metrics:
            lines.append(f"  {name:<12} {metrics[name]:.4f}")
    if "tp" in metrics:
        lines.append(
            f"  confusion    TP {metrics['tp']}  FP {metrics['fp']}  TN {metrics['tn']}  FN {metrics['fn']}"
            f"  (n={metrics['n']})"
        )
    return "\n".join(lines)
