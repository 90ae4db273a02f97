"""Exact classification metrics from labels and probabilities (NumPy and scikit-learn, no TF).

PNEUMONIA is the positive class: recall is sensitivity (sick children found), specificity is the
share of healthy children correctly cleared, precision is how many alarms are real.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, log_loss, precision_recall_curve, roc_auc_score

from pneumonia.metrics.bootstrap import (
    BLOCK_CELLS,
    check_settings,
    percentile_interval,
    ratio,
    resample_counts,
    sampling_units,
    tail_percent,
)

METRIC_NAMES = ("loss", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")
THRESHOLD_RULES = ("point", "lower_bound")  # objective.threshold_rule; see safe_operating_point

# Recall is compared with its target with this slack, so 19/20 meets 0.95 despite floating point.
_RECALL_SLACK = 1e-12


def validated_scores(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
    """(int labels, float64 probabilities) as flat arrays, or a ValueError that says what is wrong."""
    labels = np.asarray(labels).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if labels.shape != probabilities.shape:
        raise ValueError("labels and probabilities differ in length")
    if len(labels) == 0:
        raise ValueError("no examples to score")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    return labels.astype(int), probabilities


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
    eligible = np.flatnonzero(recall >= target_recall - _RECALL_SLACK)
    best = eligible[np.lexsort((thresholds[eligible], precision[eligible]))[-1]]
    return OperatingPoint(float(thresholds[best]), float(precision[best]), float(recall[best]), float(target_recall))


@dataclass(frozen=True)
class SafeOperatingPoint:
    """A decision threshold, the rule that chose it, and what it achieved on the validation split.

    Each interval is a two-sided ``confidence`` percentile interval over patient-bootstrap
    resamples of that split: how far the number could move on another set of children like
    these. ``met`` is False when no threshold satisfies the rule; the threshold then flags every
    sick child of the split, the most cautious choice the data allows.
    """

    threshold: float
    rule: str  # one of THRESHOLD_RULES
    target_recall: float
    confidence: float
    samples: int
    seed: int
    units: int  # patients resampled (images when no patient ids were given)
    met: bool
    recall: float
    recall_ci: tuple[float, float]
    precision: float
    precision_ci: tuple[float, float]
    specificity: float
    specificity_ci: tuple[float, float]

    def rule_text(self) -> str:
        """How the threshold was chosen, in words."""
        if self.rule == "point":
            return f"validation recall >= {self.target_recall:g}"
        return f"lower end of the {self.confidence:.0%} CI of validation recall >= {self.target_recall:g}"

    def summary(self) -> str:
        """One line for a terminal: the threshold, its rule, and the precision and recall to expect."""
        line = (f"threshold {self.threshold:.3f} ({self.rule_text()}): "
                f"expected precision {_with_interval(self.precision, self.precision_ci)}, "
                f"recall {_with_interval(self.recall, self.recall_ci)}")
        if not self.met:
            line += ("; target NOT met: the validation split has too few sick patients to vouch for it, "
                     "so the threshold flags every sick child there")
        return line

    def to_json(self) -> dict:
        """Plain JSON values (intervals as [low, high]), as artifact metadata stores them."""
        return {
            "rule": self.rule,
            "description": self.rule_text(),
            "target_recall": self.target_recall,
            "confidence": self.confidence,
            "samples": self.samples,
            "seed": self.seed,
            "units": self.units,
            "met": self.met,
            "threshold": self.threshold,
            "recall": self.recall,
            "recall_ci": list(self.recall_ci),
            "precision": self.precision,
            "precision_ci": list(self.precision_ci),
            "specificity": self.specificity,
            "specificity_ci": list(self.specificity_ci),
        }


def _with_interval(value: float, interval: tuple[float, float]) -> str:
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def safe_operating_point(labels, probabilities, patient_ids, target_recall: float, confidence: float = 0.95,
                         samples: int = 1000, seed: int = 0, *, rule: str = "lower_bound") -> SafeOperatingPoint:
    """The decision threshold for ``target_recall`` by ``rule``, with patient-bootstrap intervals at it.

    ``point`` is operating_point's threshold: the highest validation precision among thresholds
    whose validation recall reaches the target. It fits the very children it was chosen on, so
    on new children (another hospital) recall falls short of the target about half the time.
    ``lower_bound`` keeps a margin for that: among the thresholds where validation recall *and*
    the lower end of its bootstrap interval reach the target, the highest validation precision
    (ties: the higher threshold). Where precision rises with the threshold, as it usually does,
    that is simply the highest threshold whose lower recall bound reaches the target; it is never
    above the point threshold, and the margin grows as the split holds fewer sick patients.

    One bootstrap serves every candidate: a (samples x patients) matrix of how often each resample
    drew each patient (``patient_ids``; None resamples images one by one), from which recall at
    every candidate threshold (the distinct probabilities of sick images) follows by cumulative
    sums; memory is samples x (patients + candidates) numbers, about 8 MB at the defaults for a
    split of 500 patients. The resamples are pneumonia.metrics.bootstrap's, the same the report draws, so
    with the same seed the intervals here match the report's at this threshold.

    A resample that draws no sick child has recall 0, as binary_metrics defines it. A split with
    so few sick patients that more than the interval's tail of resamples miss them all can vouch
    for no threshold: ``met`` is False and the threshold is the lowest probability of a sick
    image, which flags all of them.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, not {rule!r}")
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], not {target_recall}")
    check_settings(samples, confidence)
    labels, probabilities = validated_scores(labels, probabilities)
    if not np.any(labels == 1):
        raise ValueError("no positive (PNEUMONIA) examples: recall is undefined, so no threshold can be "
                         "chosen for a target recall")
    unit = sampling_units(patient_ids, len(labels))
    counts = resample_counts(int(unit.max()) + 1, samples, seed)
    if rule == "point":
        threshold, met = operating_point(labels, probabilities, target_recall).threshold, True
    else:
        threshold, met = _lower_bound_threshold(labels, probabilities, unit, counts, target_recall, confidence)
    return _bootstrapped_point(labels, probabilities, unit, counts, threshold, met, rule=rule,
                               target_recall=float(target_recall), confidence=float(confidence), seed=int(seed))


def _lower_bound_threshold(labels, probabilities, unit, counts, target_recall: float,
                           confidence: float) -> tuple[float, bool]:
    """(threshold, met) of the lower_bound rule; see safe_operating_point."""
    positive = labels == 1
    order = np.argsort(-probabilities[positive], kind="stable")
    scores = probabilities[positive][order]  # descending
    # Candidate k is the k-th distinct score: it flags every sick image up to the last one with that score.
    ends = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
    candidates = scores[ends]
    tp = ends + 1
    negatives = np.sort(probabilities[~positive])
    fp = len(negatives) - np.searchsorted(negatives, candidates, side="left")
    recall, precision = tp / len(scores), tp / (tp + fp)
    lower = np.percentile(_bootstrap_recall(counts, unit[positive][order], ends), tail_percent(confidence), axis=0)
    eligible = np.flatnonzero((lower >= target_recall - _RECALL_SLACK) & (recall >= target_recall - _RECALL_SLACK))
    if eligible.size == 0:
        return float(candidates[-1]), False
    # argmax takes the first of equal precisions: candidates descend, so that is the higher threshold.
    return float(candidates[eligible[np.argmax(precision[eligible])]]), True


def _bootstrap_recall(counts: np.ndarray, sick_units: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """(samples x candidates) recall of every resample at every candidate threshold.

    ``sick_units`` holds the unit of each sick image in descending score order, so the cumulative
    sum of its draws up to ``ends[k]`` is the sick images candidate k flags in each resample.
    """
    recall = np.empty((len(counts), len(ends)))
    rows = max(1, BLOCK_CELLS // len(sick_units))
    for start in range(0, len(counts), rows):
        flagged = np.cumsum(counts[start:start + rows, sick_units], axis=1, dtype=np.float64)[:, ends]
        recall[start:start + rows] = ratio(flagged, flagged[:, -1:])  # the last candidate flags every sick image
    return recall


def _bootstrapped_point(labels, probabilities, unit, counts, threshold: float, met: bool,
                        **settings) -> SafeOperatingPoint:
    """Validation recall, precision and specificity at a threshold, each with its bootstrap interval."""
    positive, flagged = labels == 1, probabilities >= threshold
    cells = {"tp": flagged & positive, "fp": flagged & ~positive, "tn": ~flagged & ~positive, "fn": ~flagged & positive}
    n_units = counts.shape[1]
    per_unit = {name: np.bincount(unit, weights=cell, minlength=n_units) for name, cell in cells.items()}
    drawn = {name: counts @ per_patient for name, per_patient in per_unit.items()}  # (samples,) each
    whole = {name: float(np.sum(cell)) for name, cell in cells.items()}

    def measure(numerator: str, other: str) -> tuple[float, tuple[float, float]]:
        denominator = whole[numerator] + whole[other]
        value = whole[numerator] / denominator if denominator else 0.0
        resampled = ratio(drawn[numerator], drawn[numerator] + drawn[other])
        return value, percentile_interval(resampled, settings["confidence"])

    recall, recall_ci = measure("tp", "fn")
    precision, precision_ci = measure("tp", "fp")
    specificity, specificity_ci = measure("tn", "fp")
    return SafeOperatingPoint(
        threshold=float(threshold), samples=len(counts), units=n_units, met=met,
        recall=recall, recall_ci=recall_ci, precision=precision, precision_ci=precision_ci,
        specificity=specificity, specificity_ci=specificity_ci, **settings,
    )


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
