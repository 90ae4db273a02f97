"""Per-shift scores of a model: shift stress validation's numbers.

What is reported per shift (:mod:`pneumonia.data.shifts` makes the images): ROC-AUC (ranking),
precision at the target recall with the threshold re-chosen on the shifted images (ranking at the
clinical operating point), and recall and precision at the clean validation threshold (how far a
fixed threshold drifts under the shift). The worst shift is the number to watch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pneumonia.data.shifts import CLEAN
from pneumonia.metrics.binary import binary_metrics, operating_point


@dataclass
class ShiftScore:
    shift: str
    roc_auc: float
    pr_auc: float
    precision_at_recall: float  # threshold re-chosen on the shifted images
    recall_at_threshold: float  # at the clean validation threshold
    precision_at_threshold: float
    specificity_at_threshold: float


@dataclass
class StressReport:
    """Per-shift scores of one model on one validation split, with the clean row first."""

    target_recall: float
    threshold: float  # the clean validation threshold the fixed-threshold columns use
    n: int
    rows: list[ShiftScore] = field(default_factory=list)

    @property
    def shifted(self) -> list[ShiftScore]:
        return [row for row in self.rows if row.shift != CLEAN]

    def summary(self) -> dict[str, float]:
        """Flat metrics (``stress_`` prefixed) for epoch reports, sweeps and checkpoints."""
        shifted = self.shifted or self.rows
        worst_auc = min(shifted, key=lambda row: row.roc_auc)
        worst_precision = min(shifted, key=lambda row: row.precision_at_recall)
        return {
            "stress_worst_roc_auc": worst_auc.roc_auc,
            "stress_mean_roc_auc": float(np.mean([row.roc_auc for row in shifted])),
            "stress_worst_precision_at_recall": worst_precision.precision_at_recall,
            "stress_mean_precision_at_recall": float(np.mean([row.precision_at_recall for row in shifted])),
            "stress_min_recall_at_threshold": min(row.recall_at_threshold for row in shifted),
        }

    def worst_shifts(self) -> dict[str, str]:
        shifted = self.shifted or self.rows
        return {
            "roc_auc": min(shifted, key=lambda row: row.roc_auc).shift,
            "precision_at_recall": min(shifted, key=lambda row: row.precision_at_recall).shift,
        }

    def to_json(self) -> dict[str, Any]:
        return {"target_recall": self.target_recall, "threshold": self.threshold, "n": self.n,
                "summary": self.summary(), "worst": self.worst_shifts(),
                "rows": [asdict(row) for row in self.rows]}

    def table(self) -> str:
        lines = [f"{'shift':<15}{'roc_auc':>9}{'pr_auc':>9}{'prec@rec':>10}"
                 f"{'rec@thr':>9}{'prec@thr':>10}{'spec@thr':>10}"]
        for row in self.rows:
            lines.append(f"{row.shift:<15}{row.roc_auc:>9.4f}{row.pr_auc:>9.4f}{row.precision_at_recall:>10.3f}"
                         f"{row.recall_at_threshold:>9.3f}{row.precision_at_threshold:>10.3f}"
                         f"{row.specificity_at_threshold:>10.3f}")
        summary, worst = self.summary(), self.worst_shifts()
        lines.append(f"worst ROC-AUC {summary['stress_worst_roc_auc']:.4f} ({worst['roc_auc']}), "
                     f"mean {summary['stress_mean_roc_auc']:.4f}; worst precision at recall >= "
                     f"{self.target_recall:g}: {summary['stress_worst_precision_at_recall']:.3f} "
                     f"({worst['precision_at_recall']}); threshold {self.threshold:.3f}")
        return "\n".join(lines)


def stress_report(
    predict: Callable[[np.ndarray], np.ndarray],
    images: dict[str, np.ndarray],
    labels: np.ndarray,
    target_recall: float,
    threshold: float | None = None,
) -> StressReport:
    """Score ``predict`` (uint8 images -> probabilities) on clean and shifted images.

    ``threshold`` is the operating point the fixed-threshold columns use; by default the one
    chosen on the clean images for ``target_recall`` (what export would pick).
    """
    labels = np.asarray(labels).astype(int)
    if CLEAN not in images:
        raise ValueError("the images must include the clean ones")
    scores = {name: np.asarray(predict(batch), dtype=np.float64) for name, batch in images.items()}
    if threshold is None:
        threshold = operating_point(labels, scores[CLEAN], target_recall).threshold
    report = StressReport(target_recall=float(target_recall), threshold=float(threshold), n=int(len(labels)))
    for name, probabilities in scores.items():
        at = binary_metrics(labels, probabilities, threshold)
        report.rows.append(ShiftScore(
            shift=name,
            roc_auc=at["roc_auc"],
            pr_auc=at["pr_auc"],
            precision_at_recall=operating_point(labels, probabilities, target_recall).precision,
            recall_at_threshold=at["recall"],
            precision_at_threshold=at["precision"],
            specificity_at_threshold=at["specificity"],
        ))
    return report
