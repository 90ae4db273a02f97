"""Evaluation report: honest bootstrap intervals, and one HTML file a clinician can open anywhere."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from pneumonia.evaluation.report import PLOTS, write_report
from pneumonia.metrics.binary import METRIC_NAMES, binary_metrics
from pneumonia.metrics.intervals import INTERVAL_METRICS, bootstrap_intervals, resampled_metrics


def scores(n: int, seed: int = 0, separation: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """n children, ~60% with pneumonia, probabilities that separate the classes imperfectly."""
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=n) < 0.6).astype(int)
    probabilities = np.clip(separation * labels + rng.uniform(0, 1 - separation, n), 0, 1)
    return labels, probabilities


def width(interval) -> float:
    return interval.high - interval.low


# ----------------------------------------------------------------------------- bootstrap


def test_resamples_are_scored_exactly_like_binary_metrics():
    # Rounded probabilities: ties within and across classes, which AUCs must count as sklearn does.
    labels, probabilities = scores(200, seed=3)
    probabilities = np.round(probabilities, 1)
    rng = np.random.default_rng(0)
    weights = rng.multinomial(200, np.full(200, 1 / 200), size=5)
    vectorised = resampled_metrics(labels, probabilities, 0.5, weights)
    for row, counts in enumerate(weights):
        drawn = np.repeat(np.arange(200), counts)
        expected = binary_metrics(labels[drawn], probabilities[drawn], 0.5)
        for name in INTERVAL_METRICS:
            assert vectorised[name][row] == pytest.approx(expected[name], abs=1e-12), name


def test_intervals_contain_the_estimate_and_narrow_with_more_children():
    small_labels, small_probs = scores(100)
    large_labels, large_probs = scores(2000)
    small = bootstrap_intervals(small_labels, small_probs, 0.5, n_boot=400)
    large = bootstrap_intervals(large_labels, large_probs, 0.5, n_boot=400)
    assert set(small) == set(INTERVAL_METRICS)
    for labels, probabilities, intervals in ((small_labels, small_probs, small), (large_labels, large_probs, large)):
        point = binary_metrics(labels, probabilities, 0.5)
        for name, interval in intervals.items():
            assert interval.low <= point[name] <= interval.high, name
    for name in INTERVAL_METRICS:
        assert width(large[name]) < width(small[name]) / 2, name  # ~sqrt(20) narrower in theory


def test_perfect_classifier_has_auc_interval_of_exactly_one():
    labels = np.array([0] * 20 + [1] * 30)
    probabilities = np.where(labels == 1, 0.9, 0.1)
    intervals = bootstrap_intervals(labels, probabilities, 0.5, n_boot=300)
    for name in INTERVAL_METRICS:
        assert (intervals[name].low, intervals[name].high) == (1.0, 1.0), name


def test_patient_resampling_is_wider_when_a_childs_images_are_copies():
    # 60 children with 5 identical images each: the set holds 60 independent cases, not 300.
    labels, probabilities = scores(60, seed=1)
    labels, probabilities = np.repeat(labels, 5), np.repeat(probabilities, 5)
    patients = np.repeat([f"person{i}" for i in range(60)], 5)
    per_image = bootstrap_intervals(labels, probabilities, 0.5, n_boot=500)
    per_patient = bootstrap_intervals(labels, probabilities, 0.5, n_boot=500, groups=patients)
    for name in INTERVAL_METRICS:
        assert width(per_patient[name]) >= width(per_image[name]), name
    for name in ("accuracy", "recall", "roc_auc"):
        assert width(per_patient[name]) > 1.5 * width(per_image[name]), name


def test_same_seed_same_intervals_other_seed_other_intervals():
    labels, probabilities = scores(150)
    first = bootstrap_intervals(labels, probabilities, 0.5, n_boot=200, seed=7)
    assert bootstrap_intervals(labels, probabilities, 0.5, n_boot=200, seed=7) == first
    assert bootstrap_intervals(labels, probabilities, 0.5, n_boot=200, seed=8) != first


def test_resamples_with_one_class_are_left_out_of_auc_intervals():
    # One sick child in 40: many resamples miss it and have no AUC; the rest still give an interval.
    labels = np.array([1] + [0] * 39)
    probabilities = np.linspace(0.9, 0.0, 40)
    intervals = bootstrap_intervals(labels, probabilities, 0.5, n_boot=300)
    assert (intervals["roc_auc"].low, intervals["roc_auc"].high) == (1.0, 1.0)  # the sick child ranks first
    only_healthy = bootstrap_intervals(np.zeros(10), np.linspace(0, 1, 10), 0.5, n_boot=50)
    assert np.isnan(only_healthy["roc_auc"].low) and np.isnan(only_healthy["pr_auc"].high)


def test_bad_inputs_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_intervals([0, 1], [0.5], 0.5)
    with pytest.raises(ValueError, match="0 \\(NORMAL\\) or 1"):
        bootstrap_intervals([0, 2], [0.1, 0.9], 0.5)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_intervals([0, 1], [0.1, 0.9], 0.5, groups=["a"])


# ----------------------------------------------------------------------------- report


DETAILS = {"model": "xraynet", "version": "3", "split": "test", "data": "/data/chest_xray",
           "note": "<script>alert('x')</script> & more"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    labels, probabilities = scores(300, seed=2)
    patients = np.array([f"person{i // 2}" for i in range(300)])
    files = write_report(tmp_path_factory.mktemp("report") / "out", labels, probabilities, 0.6,
                         title="xraynet v3 <test split>", details=DETAILS, groups=patients, n_boot=200)
    return files, labels, probabilities


def test_report_writes_every_file(report):
    files, _, _ = report
    assert files.directory.is_dir()
    assert files.json == files.directory / "metrics.json" and files.html == files.directory / "report.html"
    assert set(files.images) == set(PLOTS)
    for path in (files.json, files.html, *files.images.values()):
        assert path.is_file() and path.parent == files.directory


def test_metrics_json_matches_binary_metrics_at_the_threshold(report):
    files, labels, probabilities = report
    saved = json.loads(files.json.read_text())
    expected = binary_metrics(labels, probabilities, 0.6)
    assert set(saved["metrics"]) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert saved["metrics"][name]["value"] == pytest.approx(expected[name]), name
    for name in INTERVAL_METRICS:
        entry = saved["metrics"][name]
        assert entry["low"] <= entry["value"] <= entry["high"], name
    assert saved["confusion"] == {key: expected[key] for key in ("tp", "fp", "tn", "fn")}
    assert saved["threshold"] == 0.6 and saved["operating_point"]["sensitivity"] == expected["recall"]
    assert saved["n"] == {"NORMAL": int(np.sum(labels == 0)), "PNEUMONIA": int(np.sum(labels == 1)), "total": 300}
    assert saved["bootstrap"]["unit"] == "patient" and saved["bootstrap"]["units"] == 150
    assert saved["details"] == DETAILS


def test_html_is_one_self_contained_file(report):
    files, _, _ = report
    page = files.html.read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page)
    for external in ("<script", "<link", "<iframe", "url(", "@import"):
        assert external not in page.lower(), external


def test_html_tells_the_reader_what_matters(report):
    files, labels, probabilities = report
    page = files.html.read_text()
    metrics = binary_metrics(labels, probabilities, 0.6)
    assert "xraynet v3 &lt;test split&gt;" in page  # title, escaped
    for value in ("xraynet", "/data/chest_xray"):
        assert value in page  # details table
    assert "95% CI" in page and "Sensitivity" in page and "Specificity" in page
    assert f"of 100 children with pneumonia, about {round(100 * metrics['recall'])} are flagged" in page
    assert f"of 100 healthy children, about {round(100 * (1 - metrics['specificity']))} are wrongly flagged" in page
    assert f"{metrics['tp']} correctly flagged" in page and f"{metrics['fn']} missed" in page
    assert "150 patients" in page


def test_text_from_details_cannot_inject_markup(report):
    page = report[0].html.read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page


def test_plots_are_real_images(report):
    files, _, _ = report
    for name, path in files.images.items():
        assert path.stat().st_size > 10_000, name
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 500 and image.height >= 400, name
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50, name


def test_one_class_labels_give_a_report_with_undefined_aucs(tmp_path):
    labels = np.zeros(40, dtype=int)
    probabilities = np.linspace(0.0, 0.8, 40)
    files = write_report(tmp_path / "healthy", labels, probabilities, 0.5, title="all healthy", n_boot=50)
    saved = json.loads(files.json.read_text())  # strict JSON: no NaN
    assert saved["metrics"]["roc_auc"] == {"value": None, "low": None, "high": None}
    assert saved["metrics"]["pr_auc"]["value"] is None
    expected = binary_metrics(labels, probabilities, 0.5)
    assert saved["metrics"]["specificity"]["value"] == pytest.approx(expected["specificity"])
    page = files.html.read_text()
    assert "n/a" in page and "only one class" in page
    assert page.count('src="data:image/png;base64,') == 4


def test_stress_table_appears_in_the_page_and_the_json(tmp_path):
    from pneumonia.metrics.stress import stress_report

    rng = np.random.default_rng(4)
    labels = np.array([0] * 20 + [1] * 40)
    clean = rng.integers(0, 255, (60, 8, 8, 1)).astype(np.uint8)
    images = {"clean": clean, "darker": (clean * 0.7).astype(np.uint8)}
    predict = lambda batch: labels * 0.6 + batch[:, 0, 0, 0] / 255.0 * 0.4  # noqa: E731
    stress = stress_report(predict, images, labels, target_recall=0.95).to_json()
    files = write_report(tmp_path / "stressed", labels, predict(clean), 0.5, title="stress", n_boot=50,
                         stress=stress)
    page = files.html.read_text()
    assert "shift stress validation" in page and "darker" in page and "(worst)" in page
    assert json.loads(files.json.read_text())["stress"]["rows"][1]["shift"] == "darker"
