"""Exact classification metrics from labels and probabilities (NumPy and scikit-learn, no TF).

PNEUMONIA is the positive class: recall is sensitivity (sick children found), specificity is the
share of healthy children correctly cleared, precision is how many alarms are real.
"""

from __future__ import annotations

import numpy as np
from dataclasses import dataclass

from sklearn.metrics import average_precision_score, log_loss, precision_recall_curve, roc_auc_score

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


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold and what it achieves on the data it was chosen on."""

    threshold: float
    precision: float
    recall: float
    target_recall: float


def operating_point(labels, probabilities, target_recall: float) -> OperatingPoint:
    """The threshold with the highest precision among those whose recall is >= target_recall.

    This is the clinical objective: miss at most (1 - target) of the sick children, and among
    the thresholds that do, raise the fewest false alarms. Ties go to the higher threshold.
    Recall 1.0 is always reachable (flag everyone), so a point always exists.
    """
    if not 0 < target_recall <= 1:
        raise ValueError("target_recall must be in (0, 1]")
    labels = np.asarray(labels).astype(int).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if labels.sum() == 0:
        raise ValueError("no positive (PNEUMONIA) examples: recall is undefined")
    precision, recall, thresholds = precision_recall_curve(labels, probabilities)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    eligible = np.flatnonzero(recall >= target_recall - 1e-12)
    best = eligible[np.lexsort((thresholds[eligible], precision[eligible]))[-1]]
    return OperatingPoint(float(thresholds[best]), float(precision[best]), float(recall[best]), float(target_recall))


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
