"""The safe operating point (a recall margin from the patient bootstrap) and model comparison at a target recall.

NumPy only: no TensorFlow, no Ray. The export path that records the point is in test_export.py.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from pneumonia.evaluation.compare import ModelScores, compare_at_target_recall
from pneumonia.evaluation.report import write_report
from pneumonia.metrics.binary import binary_metrics, operating_point, safe_operating_point
from pneumonia.metrics.intervals import bootstrap_intervals

TARGET = 0.9


def children(n: int, seed: int = 0, separation: float = 0.35, images_each: int = 1):
    """(labels, probabilities, patient ids): n children, ~60% sick, each with ``images_each`` identical images."""
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=n) < 0.6).astype(int)
    probabilities = np.clip(separation * labels + rng.uniform(0, 1 - separation, n), 0, 1)
    patients = np.array([f"person{i}" for i in range(n)])
    return np.repeat(labels, images_each), np.repeat(probabilities, images_each), np.repeat(patients, images_each)


def width(interval) -> float:
    return interval[1] - interval[0]


# ----------------------------------------------------------------------------- the rule


def test_lower_bound_keeps_a_margin_below_the_point_threshold():
    labels, probabilities, patients = children(400)
    safe = safe_operating_point(labels, probabilities, patients, TARGET)
    point = operating_point(labels, probabilities, TARGET)
    assert safe.rule == "lower_bound" and safe.met
    assert safe.threshold < point.threshold  # a real margin, not a tie
    assert safe.recall_ci[0] >= TARGET and safe.recall >= safe.recall_ci[0]
    assert safe.recall > point.recall
    # The numbers are those of binary_metrics at the threshold, and lie in their intervals.
    at = binary_metrics(labels, probabilities, safe.threshold)
    for name in ("recall", "precision", "specificity"):
        value, interval = getattr(safe, name), getattr(safe, f"{name}_ci")
        assert value == pytest.approx(at[name]) and interval[0] <= value <= interval[1], name
    # At the point threshold the lower recall bound falls short: that is what the margin is for.
    assert bootstrap_intervals(labels, probabilities, point.threshold, groups=patients)["recall"].low < TARGET


def test_point_rule_is_operating_point_with_intervals():
    labels, probabilities, patients = children(300, seed=4)
    point = safe_operating_point(labels, probabilities, patients, TARGET, rule="point")
    expected = operating_point(labels, probabilities, TARGET)
    assert point.threshold == expected.threshold and point.met
    assert point.recall == pytest.approx(expected.recall) and point.precision == pytest.approx(expected.precision)
    assert point.recall_ci[0] <= point.recall <= point.recall_ci[1]


def test_the_choice_matches_a_brute_force_search_over_thresholds():
    # Rounded scores: ties within and across classes.
    labels, probabilities, patients = children(90, seed=2)
    probabilities = np.round(probabilities, 2)
    safe = safe_operating_point(labels, probabilities, patients, TARGET, samples=300, seed=5)
    best = None
    for threshold in np.unique(probabilities[labels == 1])[::-1]:  # the higher threshold wins ties
        metrics = binary_metrics(labels, probabilities, threshold)
        low = bootstrap_intervals(labels, probabilities, threshold, n_boot=300, seed=5, groups=patients)["recall"].low
        if metrics["recall"] >= TARGET and low >= TARGET and (best is None or metrics["precision"] > best[1]):
            best = (threshold, metrics["precision"])
    assert best is not None and safe.threshold == best[0]


def test_intervals_are_the_reports_at_the_same_threshold():
    # One resampling scheme (pneumonia.metrics.bootstrap): what export records is what the report shows.
    labels, probabilities, patients = children(200, seed=3, images_each=2)
    safe = safe_operating_point(labels, probabilities, patients, TARGET, samples=400, seed=11)
    report = bootstrap_intervals(labels, probabilities, safe.threshold, n_boot=400, seed=11, groups=patients)
    for name in ("recall", "precision", "specificity"):
        assert getattr(safe, f"{name}_ci") == (report[name].low, report[name].high), name
    assert safe.units == 200 and safe.samples == 400 and safe.seed == 11


def test_fewer_sick_patients_need_a_larger_margin():
    many = safe_operating_point(*children(1500, seed=1), TARGET)
    few = safe_operating_point(*children(150, seed=1), TARGET)
    assert few.met and many.met
    assert few.recall - TARGET > 2 * (many.recall - TARGET)
    assert width(few.recall_ci) > 2 * width(many.recall_ci)


def test_the_same_seed_gives_the_same_point():
    labels, probabilities, patients = children(250, seed=6)
    first = safe_operating_point(labels, probabilities, patients, TARGET, samples=300, seed=7)
    assert safe_operating_point(labels, probabilities, patients, TARGET, samples=300, seed=7) == first
    other = safe_operating_point(labels, probabilities, patients, TARGET, samples=300, seed=8)
    assert (other.recall_ci, other.precision_ci) != (first.recall_ci, first.precision_ci)


def test_images_of_one_child_are_resampled_together():
    # 60 children with 5 identical images each hold 60 independent cases, not 300.
    labels, probabilities, patients = children(60, seed=1, images_each=5)
    # At one threshold (the point rule's), the intervals by patient are wider...
    point_by_patient = safe_operating_point(labels, probabilities, patients, 0.8, rule="point")
    point_by_image = safe_operating_point(labels, probabilities, np.arange(len(labels)), 0.8, rule="point")
    assert point_by_patient.threshold == point_by_image.threshold
    assert point_by_patient.units == 60 and point_by_image.units == 300
    for name in ("recall_ci", "precision_ci", "specificity_ci"):
        assert width(getattr(point_by_patient, name)) > 1.5 * width(getattr(point_by_image, name)), name
    # ...so the lower_bound rule keeps a larger margin.
    by_patient = safe_operating_point(labels, probabilities, patients, 0.8)
    by_image = safe_operating_point(labels, probabilities, np.arange(len(labels)), 0.8)
    assert by_patient.threshold < by_image.threshold and by_patient.recall > by_image.recall
    assert safe_operating_point(labels, probabilities, None, 0.8) == by_image  # None: images one by one


def test_a_target_the_split_cannot_vouch_for_is_not_met():
    # One sick child among 40: about a third of the resamples hold no sick child (recall 0 there),
    # so no threshold's lower recall bound reaches any target. The threshold then flags that child.
    labels = np.array([1] + [0] * 39)
    probabilities = np.linspace(0.9, 0.0, 40)
    safe = safe_operating_point(labels, probabilities, None, 0.5)
    assert not safe.met
    assert safe.threshold == 0.9 and safe.recall == 1.0 and safe.recall_ci[0] == 0.0
    assert "NOT met" in safe.summary() and safe.to_json()["met"] is False
    # The point rule needs no margin and is met.
    assert safe_operating_point(labels, probabilities, None, 0.5, rule="point").met


def test_the_lowest_sick_score_is_the_fallback_threshold():
    # Two sick children, both scored low: flagging both needs the lower of their scores.
    labels = np.array([1, 1] + [0] * 60)
    probabilities = np.r_[0.3, 0.2, np.linspace(0.99, 0.0, 60)]
    safe = safe_operating_point(labels, probabilities, None, 0.9)
    assert not safe.met and safe.threshold == 0.2 and safe.recall == 1.0


def test_no_sick_children_is_a_clear_error():
    with pytest.raises(ValueError, match="no positive \\(PNEUMONIA\\) examples"):
        safe_operating_point([0, 0, 0], [0.1, 0.5, 0.9], ["a", "b", "c"], TARGET)


@pytest.mark.parametrize("change, message", [
    ({"rule": "median"}, "threshold rule must be one of point, lower_bound"),
    ({"target_recall": 0.0}, "target_recall"),
    ({"target_recall": 1.5}, "target_recall"),
    ({"confidence": 1.0}, "confidence"),
    ({"samples": 0}, "at least 1"),
    ({"patient_ids": ["a"]}, "groups has 1 entries for 4 examples"),
    ({"labels": [0, 1, 2, 1]}, "0 \\(NORMAL\\) or 1"),
    ({"probabilities": [0.1, 0.9]}, "differ in length"),
])
def test_bad_settings_are_refused(change, message):
    arguments = {"labels": [0, 1, 0, 1], "probabilities": [0.1, 0.9, 0.4, 0.6], "patient_ids": None,
                 "target_recall": TARGET, **change}
    with pytest.raises(ValueError, match=message):
        safe_operating_point(**arguments)


def test_json_and_summary_say_how_the_threshold_was_chosen():
    safe = safe_operating_point(*children(300, seed=9), 0.95)
    record = json.loads(json.dumps(safe.to_json(), allow_nan=False))
    assert record["rule"] == "lower_bound" and record["met"] is True
    assert record["confidence"] == 0.95 and record["samples"] == 1000 and record["target_recall"] == 0.95
    assert record["threshold"] == safe.threshold and record["recall_ci"] == list(safe.recall_ci)
    for name in ("precision", "recall", "specificity"):
        assert record[name] == getattr(safe, name) and len(record[f"{name}_ci"]) == 2
    line = safe.summary()
    assert line.startswith(f"threshold {safe.threshold:.3f} (lower end of the 95% CI of validation recall >= 0.95): ")
    assert (f"expected precision {safe.precision:.3f} [{safe.precision_ci[0]:.3f}, {safe.precision_ci[1]:.3f}], "
            f"recall {safe.recall:.3f} [{safe.recall_ci[0]:.3f}, {safe.recall_ci[1]:.3f}]") in line


def test_a_validation_split_is_bootstrapped_in_well_under_a_second():
    # ~1,000 images of ~700 patients, 1,000 resamples: every candidate threshold from one count matrix.
    labels, probabilities, patients = children(700, seed=12)
    patients = np.r_[patients, patients[:300]]
    labels, probabilities = np.r_[labels, labels[:300]], np.r_[probabilities, probabilities[:300]]
    safe_operating_point(labels, probabilities, patients, TARGET, samples=10)  # warm up
    start = time.perf_counter()
    safe_operating_point(labels, probabilities, patients, TARGET)
    assert time.perf_counter() - start < 2.0


# ----------------------------------------------------------------------------- the report


def test_the_report_says_how_the_artifacts_threshold_was_chosen(tmp_path):
    labels, probabilities, patients = children(200, seed=5)
    choice = safe_operating_point(labels, probabilities, patients, TARGET, samples=200).to_json()
    files = write_report(tmp_path / "chosen", labels, probabilities, choice["threshold"], title="artifact",
                         groups=patients, n_boot=100, threshold_choice=choice)
    page = files.html.read_text()
    assert "How the threshold was chosen" in page
    assert "lower end of its 95% confidence interval (200 resamples of 200 patients)" in page
    assert f"{choice['precision']:.1%}" in page
    assert f"{choice['precision_ci'][0]:.1%} – {choice['precision_ci'][1]:.1%}" in page
    assert json.loads(files.json.read_text())["threshold_choice"] == choice

    plain = write_report(tmp_path / "plain", labels, probabilities, 0.5, title="no choice", n_boot=50)
    assert "How the threshold was chosen" not in plain.html.read_text()
    assert json.loads(plain.json.read_text())["threshold_choice"] is None


# ----------------------------------------------------------------------------- comparison


def model(separation: float, squash: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Children scored by a model: logit = separation * (label - 0.5) + noise - squash."""
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=600) < 0.6).astype(int)
    logits = separation * (labels - 0.5) + rng.normal(0, 1, 600) - squash
    return labels, 1 / (1 + np.exp(-logits)), np.array([f"p{seed}-{i}" for i in range(600)])


def scores(separation: float, squash: float) -> ModelScores:
    validation, test = model(separation, squash, seed=1), model(separation, squash, seed=2)
    return ModelScores(*validation, *test[:2])


def test_models_are_compared_at_the_same_target_recall():
    # The baseline scores low: at 0.5 it flags only the surest cases, with high precision and low
    # recall, and reading it there makes the better tuned model look worse.
    baseline, tuned = scores(separation=2.0, squash=2.5), scores(separation=3.5, squash=0.0)
    at_half = binary_metrics(baseline.test_labels, baseline.test_probabilities, 0.5)
    comparison = compare_at_target_recall({"baseline (notebook recipe)": baseline, "tuned": tuned}, TARGET,
                                          samples=300)
    base, tune = comparison.models
    assert at_half["recall"] < 0.6 and at_half["precision"] > tune.test["precision"]  # the misleading headline
    for matched, scored in ((base, baseline), (tune, tuned)):
        assert matched.chosen == safe_operating_point(scored.validation_labels, scored.validation_probabilities,
                                                      scored.validation_patients, TARGET, samples=300)
        assert matched.test == binary_metrics(scored.test_labels, scored.test_probabilities, matched.chosen.threshold)
        assert matched.test["recall"] > TARGET - 0.05
    assert tune.test["precision"] > base.test["precision"] + 0.05
    assert base.chosen.threshold < 0.5

    table = comparison.table().splitlines()
    assert table[0] == ("test split, each model at its validation threshold "
                        "(lower end of the 95% CI of validation recall >= 0.9)")
    assert [name.strip() for name in table[1].split("|")] == ["baseline (notebook recipe)", "tuned"]
    assert [line.split()[0] for line in table[2:6]] == ["threshold", "precision", "recall", "specificity"]
    assert len({len(line) for line in table[1:6]}) == 1  # aligned columns
    # The same two models at matched test recall (each its own test-split point for the target): the ranking.
    assert table[6].startswith("test split, each model at its own threshold for test recall >= 0.9")
    assert [line.split()[0] for line in table[7:]] == ["threshold", "precision", "recall"]
    for matched, scored in ((base, baseline), (tune, tuned)):
        assert matched.at_test_recall == operating_point(scored.test_labels, scored.test_probabilities, TARGET)
        assert matched.at_test_recall.recall >= TARGET
    gap, error = comparison.matched_gap()
    assert gap == tune.at_test_recall.precision - base.at_test_recall.precision and gap > 2 * error > 0
    assert table[3].split()[1:] == [f"{base.test['precision']:.3f}", "|", f"{tune.test['precision']:.3f}"]
    sentence = comparison.sentence()
    assert sentence == (f"At the same target (validation recall >= 0.9), tuned raises test precision from "
                        f"{base.test['precision']:.3f} to {tune.test['precision']:.3f} compared with baseline "
                        f"(notebook recipe), at test recall {tune.test['recall']:.3f} against "
                        f"{base.test['recall']:.3f}.")
    record = json.loads(json.dumps(comparison.to_json(), allow_nan=False))
    assert list(record["models"]) == ["baseline (notebook recipe)", "tuned"]
    assert record["models"]["tuned"]["test"]["precision"] == tune.test["precision"]


def test_the_sentence_names_a_model_whose_target_was_not_met():
    labels = np.array([1] + [0] * 39)
    few_sick = ModelScores(labels, np.linspace(0.9, 0.0, 40), None, labels, np.linspace(0.9, 0.0, 40))
    comparison = compare_at_target_recall({"a": few_sick, "b": few_sick}, 0.5, samples=200)
    assert comparison.sentence().endswith(
        "b keeps test precision at 1.000 compared with a, at test recall 1.000 against 1.000; "
        "the validation split could not vouch for the target for a and b.")
    with pytest.raises(ValueError, match="no models"):
        compare_at_target_recall({}, 0.5)
