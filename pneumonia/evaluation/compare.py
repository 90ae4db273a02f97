"""Compare models the way they would be used: each at its own threshold for the same target recall.

Precision read at a fixed threshold (0.5) says little: a model that flags few children there has
high precision and misses many sick ones, and "precision 1.000 -> 0.875" then reads as tuning
made things worse when it bought the recall the clinic asked for. Here every model gets its
threshold from its validation split by one rule (metrics.safe_operating_point), and all are then
scored on the same held-out test split, so the precisions compare at (about) the same recall.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pneumonia.metrics.binary import (
    OperatingPoint,
    SafeOperatingPoint,
    binary_metrics,
    operating_point,
    safe_operating_point,
)

ROWS = ("threshold", "precision", "recall", "specificity")


@dataclass(frozen=True)
class ModelScores:
    """One model's probabilities on the validation split (to choose its threshold) and on the test split."""

    validation_labels: np.ndarray
    validation_probabilities: np.ndarray
    validation_patients: Sequence[str] | None
    test_labels: np.ndarray
    test_probabilities: np.ndarray

    @classmethod
    def from_evaluations(cls, validation, test) -> ModelScores:
        """From two pneumonia.evaluation.evaluate.Evaluation results (validation split, test split)."""
        return cls(validation.labels, validation.probabilities, validation.patient_ids,
                   test.labels, test.probabilities)


@dataclass(frozen=True)
class MatchedModel:
    name: str
    chosen: SafeOperatingPoint  # the threshold, chosen on validation, and its validation numbers
    test: dict[str, Any]  # binary_metrics on the test split at chosen.threshold
    at_test_recall: OperatingPoint  # the test split's own point for the target recall (its ranking there)
    test_positives: int  # sick images in the test split


@dataclass(frozen=True)
class MatchedComparison:
    """Models scored on one test split, each at its validation threshold for the same target recall."""

    target_recall: float
    rule: str
    confidence: float
    models: tuple[MatchedModel, ...]

    def rule_text(self) -> str:
        return self.models[0].chosen.rule_text()

    def table(self) -> str:
        """An aligned table, one column per model, rows threshold / precision / recall / specificity."""
        names = [model.name for model in self.models]
        label = max(len(row) for row in ROWS) + 2
        widths = [max(len(name), 6) for name in names]
        lines = [f"test split, each model at its validation threshold ({self.rule_text()})",
                 " " * label + " | ".join(f"{name:>{width}}" for name, width in zip(names, widths))]
        for row in ROWS:
            values = [model.chosen.threshold if row == "threshold" else model.test[row] for model in self.models]
            lines.append(f"  {row:<{label - 2}}" + " | ".join(f"{value:>{width}.3f}"
                                                              for value, width in zip(values, widths)))
        lines.append(f"test split, each model at its own threshold for test recall >= {self.target_recall:g} "
                     "(matched recall: the ranking)")
        for row in ROWS[:3]:
            values = [getattr(model.at_test_recall, row) for model in self.models]
            lines.append(f"  {row:<{label - 2}}" + " | ".join(f"{value:>{width}.3f}"
                                                              for value, width in zip(values, widths)))
        return "\n".join(lines)

    def sentence(self) -> str:
        """One sentence comparing the last model with the first (e.g. tuned with baseline)."""
        first, last = self.models[0], self.models[-1]
        p0, p1 = first.test["precision"], last.test["precision"]
        r0, r1 = first.test["recall"], last.test["recall"]
        change = ("raises" if p1 > p0 else "lowers" if p1 < p0 else "keeps") + " test precision"
        change += f" from {p0:.3f} to {p1:.3f}" if p1 != p0 else f" at {p1:.3f}"
        text = (f"At the same target (validation recall >= {self.target_recall:g}), {last.name} {change} "
                f"compared with {first.name}, at test recall {r1:.3f} against {r0:.3f}")
        unmet = [model.name for model in self.models if not model.chosen.met]
        if unmet:
            text += f"; the validation split could not vouch for the target for {' and '.join(unmet)}"
        return text + "."

    def precision_gap(self) -> tuple[float, float]:
        """(last model's test precision minus the first's, the standard error of that difference):
        each precision is a proportion over the images its model flags, taken as independent."""
        first, last = self.models[0].test, self.models[-1].test

        def variance(test) -> float:
            flagged = test["tp"] + test["fp"]
            return test["precision"] * (1 - test["precision"]) / flagged if flagged else 0.0

        return last["precision"] - first["precision"], float(np.sqrt(variance(first) + variance(last)))

    def matched_gap(self) -> tuple[float, float]:
        """(last model's test precision at the target recall on the test split minus the first's, the
        standard error of that difference): each model's own highest precision among its thresholds
        whose test recall reaches the target, so both compare at the same recall. What the sweep
        optimises (a ranking measure), freed from the noise of thresholds chosen on a small
        validation carve; a measurement, not a threshold anyone deploys."""
        first, last = self.models[0], self.models[-1]

        def variance(model) -> float:
            point = model.at_test_recall
            flagged = point.recall * model.test_positives / point.precision if point.precision else 0.0
            return point.precision * (1 - point.precision) / flagged if flagged else 0.0

        return (last.at_test_recall.precision - first.at_test_recall.precision,
                float(np.sqrt(variance(first) + variance(last))))

    def to_json(self) -> dict[str, Any]:
        return {
            "target_recall": self.target_recall, "rule": self.rule, "confidence": self.confidence,
            "models": {model.name: {"validation": model.chosen.to_json(),
                                    "test": {row: model.test[row] for row in ROWS[1:]} | {"n": model.test["n"]},
                                    "at_test_recall": {"threshold": model.at_test_recall.threshold,
                                                       "precision": model.at_test_recall.precision,
                                                       "recall": model.at_test_recall.recall}}
                       for model in self.models},
        }


def compare_at_target_recall(models: dict[str, ModelScores], target_recall: float, *, rule: str = "lower_bound",
                             confidence: float = 0.95, samples: int = 1000, seed: int = 0) -> MatchedComparison:
    """Each model's threshold chosen on its validation scores by ``rule`` for ``target_recall``, then its
    test precision, recall and specificity at that threshold. ``models`` keeps its order (reference first)."""
    if not models:
        raise ValueError("no models to compare")
    matched = []
    for name, scores in models.items():
        chosen = safe_operating_point(scores.validation_labels, scores.validation_probabilities,
                                      scores.validation_patients, target_recall, confidence, samples, seed, rule=rule)
        test = binary_metrics(scores.test_labels, scores.test_probabilities, chosen.threshold)
        matched.append(MatchedModel(name, chosen, test, operating_point(scores.test_labels, scores.test_probabilities,
                                                                        target_recall),
                                    int(np.sum(scores.test_labels))))
    return MatchedComparison(float(target_recall), rule, float(confidence), tuple(matched))
