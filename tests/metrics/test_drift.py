"""Drift: the PSI of recent probabilities against a reference, its levels, the rolling window, and
the alert rule shipped with the cluster assets."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from pneumonia.metrics.drift import (
    EPSILON,
    LEVELS,
    MIN_WINDOW,
    PSI_RECALIBRATE,
    PSI_WATCH,
    DriftWindow,
    check_reference,
    drift_status,
    drift_summary,
    population_stability,
    reference_distribution,
)

ALERT_RULES = Path(__file__).resolve().parents[2] / "cluster" / "kuberay" / "drift-alert.yaml"


def site(n: int, seed: int, healthy_shift: float = 0.0) -> np.ndarray:
    """Probabilities of a confident model (float32, as served): 74% pneumonia with logits around +6,
    healthy children around -6 (+ ``healthy_shift``: a new site's healthy X-rays look sicker)."""
    rng = np.random.default_rng(seed)
    sick = rng.random(n) < 0.74
    logits = np.where(sick, rng.normal(6, 2.5, n), rng.normal(-6 + healthy_shift, 2.5, n))
    return (1 / (1 + np.exp(-logits))).astype(np.float32)


REFERENCE = reference_distribution(site(600, seed=0), source="validation")


# ----------------------------------------------------------------------------- the reference


def test_the_reference_has_the_documented_shape_and_survives_json():
    assert set(REFERENCE) == {"statistic", "source", "images", "bins", "edges", "fractions"}
    assert REFERENCE["statistic"] == "psi" and REFERENCE["source"] == "validation" and REFERENCE["images"] == 600
    edges, fractions = REFERENCE["edges"], REFERENCE["fractions"]
    assert edges[0] == 0.0 and edges[-1] == 1.0 and all(a < b for a, b in zip(edges, edges[1:]))
    assert len(fractions) == len(edges) - 1 == REFERENCE["bins"] == 10  # deciles
    assert sum(fractions) == pytest.approx(1) and fractions == pytest.approx([0.1] * 10, abs=0.01)
    assert json.loads(json.dumps(REFERENCE, allow_nan=False)) == REFERENCE
    # Deciles of a confident model: most edges crowd near 0 and 1, where its probabilities are.
    assert sum(edge < 0.05 or edge > 0.95 for edge in edges[1:-1]) >= 6


def test_tied_deciles_merge_into_wider_bins_and_every_probability_has_a_bin():
    """A saturated model scores many images exactly 1.0 (or 0.0): the duplicate deciles go."""
    probabilities = np.concatenate([np.ones(70), np.zeros(10), np.linspace(0.2, 0.8, 20)])
    reference = reference_distribution(probabilities, "validation")
    assert reference["edges"][0] == 0 and reference["edges"][-1] == 1 and reference["bins"] < 10
    assert reference["fractions"][-1] == pytest.approx(0.7)  # the 1.0s, in the closed last bin
    assert reference["fractions"][0] >= 0.1  # the 0.0s, in the first
    assert population_stability(reference, probabilities) == pytest.approx(0, abs=1e-12)
    assert reference_distribution([0.5] * 5, "one value")["edges"] == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("probabilities, message", [
    ([], "no probabilities"),
    ([0.2, float("nan")], "finite"),
    ([0.2, float("inf")], "finite"),
    ([0.2, 1.5], r"\[0, 1\]"),
    (["high"], "numbers"),
])
def test_a_reference_refuses_what_is_not_probabilities(probabilities, message):
    with pytest.raises(ValueError, match=message):
        reference_distribution(probabilities, "validation")


def test_a_reference_needs_a_source():
    with pytest.raises(ValueError, match="source"):
        reference_distribution([0.1, 0.9], "")


@pytest.mark.parametrize("broken, message", [
    ({"statistic": "ks"}, "statistic"),
    ({"edges": [0.0, 0.7, 0.5, 1.0]}, "increase strictly"),
    ({"edges": [0.1, 0.5, 1.0]}, "from 0 to 1"),
    ({"fractions": [0.5, 0.5]}, "fractions"),
    ({"fractions": [0.6] * 10}, "summing to 1"),
])
def test_a_malformed_reference_is_a_clear_error(broken, message):
    with pytest.raises(ValueError, match=message):
        check_reference({**REFERENCE, **broken})
    with pytest.raises(ValueError, match=message):
        drift_status({**REFERENCE, **broken}, site(300, seed=1))


# ----------------------------------------------------------------------------- the statistic


def test_an_unshifted_stream_stays_stable_and_a_shifted_one_calls_for_recalibration():
    for seed in range(1, 11):  # windows from the same distribution as the reference
        assert population_stability(REFERENCE, site(1000, seed)) < PSI_WATCH / 2
        assert population_stability(REFERENCE, site(MIN_WINDOW, seed)) < PSI_RECALIBRATE
    # A new site whose healthy X-rays score higher (validation ~0; a later period 0.38 on average).
    assert population_stability(REFERENCE, site(1000, seed=1, healthy_shift=5)) > PSI_RECALIBRATE
    moderate = population_stability(REFERENCE, site(1000, seed=1, healthy_shift=2.5))
    assert PSI_WATCH <= moderate < population_stability(REFERENCE, site(1000, seed=1, healthy_shift=5))


def test_the_same_distribution_gives_zero_and_an_empty_bin_stays_finite():
    probabilities = site(600, seed=0)
    assert population_stability(REFERENCE, probabilities) == pytest.approx(0, abs=1e-12)
    everything_in_one_bin = np.full(500, 0.9999999, np.float32)
    value = population_stability(REFERENCE, everything_in_one_bin)
    # 9 empty bins (0.1 each, against EPSILON) and one full one (1 against 0.1).
    expected = 9 * (EPSILON - 0.1) * np.log(EPSILON / 0.1) + 0.9 * np.log(10)
    assert np.isfinite(value) and value == pytest.approx(expected, rel=0.05)


def test_no_value_below_the_minimum_window_or_without_a_reference():
    few = drift_status(REFERENCE, site(MIN_WINDOW - 1, seed=2))
    assert few["value"] is None and few["level"] == "too few images" and few["images"] == MIN_WINDOW - 1
    none = drift_status(None, site(500, seed=2))
    assert none["value"] is None and none["level"] == "no reference" and none["reference"] is None
    empty = drift_status(REFERENCE, [])
    assert empty["images"] == 0 and empty["level"] == "too few images"


def test_the_status_has_the_documented_shape_and_levels():
    status = drift_status(REFERENCE, site(1000, seed=3))
    assert status == {"statistic": "psi", "value": status["value"], "images": 1000, "reference": "validation",
                      "reference_images": 600, "level": "stable", "watch_at": PSI_WATCH,
                      "recalibrate_at": PSI_RECALIBRATE, "min_images": MIN_WINDOW}
    assert isinstance(status["value"], float) and 0 <= status["value"] < PSI_WATCH
    assert json.loads(json.dumps(status, allow_nan=False)) == status
    shifted = drift_status(REFERENCE, site(1000, seed=3, healthy_shift=5))
    assert shifted["level"] == "recalibrate" and shifted["value"] >= PSI_RECALIBRATE
    assert {status["level"], shifted["level"], "watch", "too few images", "no reference"} == set(LEVELS)
    assert (PSI_WATCH, PSI_RECALIBRATE) == (0.1, 0.25)


def test_the_summary_is_one_line_that_says_what_to_do():
    shifted = drift_summary(drift_status(REFERENCE, site(1204, seed=4, healthy_shift=5)))
    assert re.fullmatch(r"drift: PSI \d\.\d{3} against validation \(1,204 images\): recalibrate \(level 0\.25\): "
                        r".*pneumonia calibrate\)", shifted), shifted
    stable = drift_summary(drift_status(REFERENCE, site(1000, seed=4)))
    assert stable.startswith("drift: PSI 0.0") and stable.endswith("stable (below 0.1)")
    assert "at least 200" in drift_summary(drift_status(REFERENCE, site(10, seed=4)))
    assert "no reference distribution" in drift_summary(drift_status(None, site(10, seed=4)))
    for status in (drift_status(REFERENCE, site(1000, seed=4, healthy_shift=2.5)), drift_status(None, [])):
        assert "\n" not in drift_summary(status)


# ----------------------------------------------------------------------------- the window


def test_the_window_keeps_the_most_recent_images_from_many_threads():
    window = DriftWindow(capacity=MIN_WINDOW)
    assert len(window) == 0 and window.values().shape == (0,)

    def add(offset: int):
        for start in range(0, 500, 25):
            window.add([(offset + start + index) / 10_000 for index in range(25)])

    threads = [threading.Thread(target=add, args=(offset,)) for offset in (0, 5000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert window.total == 1000 and len(window) == MIN_WINDOW == len(window.values())
    assert window.add([0.5]) == 1001 and window.values()[-1] == 0.5
    with pytest.raises(ValueError, match="at least 200"):
        DriftWindow(capacity=10)


# ----------------------------------------------------------------------------- the alert rule


def test_the_alert_rule_watches_the_served_gauge_at_the_documented_levels():
    from pneumonia.serving.app import DRIFT_GAUGE

    documents = list(yaml.safe_load_all(ALERT_RULES.read_text()))
    assert len(documents) == 1
    rule_file = documents[0]
    assert rule_file["apiVersion"] == "monitoring.coreos.com/v1" and rule_file["kind"] == "PrometheusRule"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rule_file["metadata"]["name"])
    rules = {rule["alert"]: rule for group in rule_file["spec"]["groups"] for rule in group["rules"]}
    recalibrate, watch = rules["PneumoniaDriftRecalibrate"], rules["PneumoniaDriftWatch"]
    for rule, level_at in ((recalibrate, PSI_RECALIBRATE), (watch, PSI_WATCH)):
        assert f"ray_{DRIFT_GAUGE}{{" in rule["expr"]  # Ray exports Serve's custom metrics with `ray_`
        assert float(rule["expr"].rsplit(">", 1)[1]) == level_at
        assert rule["expr"].count("(") == rule["expr"].count(")")
    assert recalibrate["for"] == "30m"
    assert "pneumonia calibrate" in recalibrate["annotations"]["description"]
