"""Classification metrics: PNEUMONIA is the positive class, numbers match hand counts and sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from pneumonia.metrics.binary import METRIC_NAMES, binary_metrics, format_table

# 8 children, 4 with pneumonia. At threshold 0.5 (p >= 0.5 means PNEUMONIA):
# index      0    1    2    3    4    5    6    7
LABELS = [1, 1, 1, 0, 0, 0, 1, 0]
PROBS = [0.9, 0.6, 0.4, 0.7, 0.2, 0.1, 0.5, 0.5]
# predicted  P    P    N    P    N    N    P    P   -> TP 0,1,6  FN 2  FP 3,7  TN 4,5


def test_hand_computed_example():
    m = binary_metrics(LABELS, PROBS)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (3, 2, 2, 1, 8)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    assert m["accuracy"] == pytest.approx(5 / 8)
    expected_loss = -np.mean([math.log(p) if y else math.log(1 - p) for y, p in zip(LABELS, PROBS)])
    assert m["loss"] == pytest.approx(expected_loss)
    # 16 positive/negative pairs: 0.9 beats 4, 0.6 beats 3, 0.4 beats 2, 0.5 beats 2 and ties 1.
    assert m["roc_auc"] == pytest.approx(11.5 / 16)
    assert m["threshold"] == 0.5
    assert set(METRIC_NAMES) <= set(m)


def test_threshold_moves_the_confusion_matrix():
    strict = binary_metrics(LABELS, PROBS, threshold=0.55)  # the two 0.5s are now NORMAL
    assert (strict["tp"], strict["fp"], strict["tn"], strict["fn"]) == (2, 1, 3, 2)
    assert strict["recall"] == pytest.approx(2 / 4) and strict["specificity"] == pytest.approx(3 / 4)
    everyone_sick = binary_metrics(LABELS, PROBS, threshold=0.0)
    assert everyone_sick["recall"] == 1.0 and everyone_sick["specificity"] == 0.0
    assert everyone_sick["precision"] == pytest.approx(0.5)
    nobody_sick = binary_metrics(LABELS, PROBS, threshold=0.95)
    assert (nobody_sick["tp"], nobody_sick["fp"]) == (0, 0)
    assert nobody_sick["precision"] == 0.0 and nobody_sick["recall"] == 0.0 and nobody_sick["f1"] == 0.0
    assert nobody_sick["specificity"] == 1.0
    # Threshold-free numbers do not depend on the threshold.
    for name in ("loss", "roc_auc", "pr_auc"):
        assert strict[name] == binary_metrics(LABELS, PROBS)[name] == nobody_sick[name]


def test_aucs_and_loss_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    probs = np.clip(0.35 * labels + rng.uniform(0, 0.65, 500), 0, 1)
    m = binary_metrics(labels, probs)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert m["pr_auc"] == pytest.approx(average_precision_score(labels, probs))
    assert m["loss"] == pytest.approx(log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7)))
    assert 0.5 < m["roc_auc"] < 1.0


def test_keras_shaped_inputs_give_the_same_numbers():
    labels = np.array(LABELS, dtype=np.float32).reshape(-1, 1)
    probs = np.array(PROBS, dtype=np.float32).reshape(-1, 1)  # model.predict returns (n, 1)
    reshaped, flat = binary_metrics(labels, probs), binary_metrics(LABELS, PROBS)
    for name in ("tp", "fp", "tn", "fn", "accuracy", "roc_auc", "pr_auc"):
        assert reshaped[name] == pytest.approx(flat[name])


def test_confident_mistakes_give_a_finite_loss():
    m = binary_metrics([1, 0], [0.0, 1.0])
    assert math.isfinite(m["loss"]) and m["loss"] > 10
    assert m["accuracy"] == 0.0


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_nan_aucs_not_an_exception(label):
    m = binary_metrics([label] * 4, [0.1, 0.4, 0.6, 0.9])
    assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert math.isfinite(m["loss"])
    assert "nan" in format_table(m)


def test_length_mismatch_and_empty_input_raise():
    with pytest.raises(ValueError, match="length"):
        binary_metrics([0, 1, 1], [0.2, 0.8])
    with pytest.raises(ValueError, match="no examples"):
        binary_metrics([], [])


def test_format_table_shows_metrics_and_confusion():
    table = format_table(binary_metrics(LABELS, PROBS), title="val")
    lines = table.splitlines()
    assert lines[0] == "val"
    assert any(line.split() == ["recall", "0.7500"] for line in lines)
    assert "TP 3  FP 2  TN 2  FN 1  (n=8)" in table
