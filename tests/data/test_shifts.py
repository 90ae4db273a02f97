"""Shift stress validation: the shifts are real changes, the report ranks robust models first."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pneumonia.config import SHIFT_NAMES, check_shift_names
from pneumonia.data.preprocess import PreprocessSpec, decode_image, normalize_intensity
from pneumonia.data.shifts import CLEAN, SHIFTS, shifted_images, stratified_subset
from pneumonia.metrics.stress import stress_report

SIZE = 96
SPEC = PreprocessSpec(SIZE, 1, "stretch")


def _xray_like(rng: np.random.Generator, sick: bool, exposure: float) -> bytes:
    """A textured chest-like image; the sick ones have a small bright opacity at a fixed spot."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    body = 90 + 40 * np.exp(-(((xx - SIZE / 2) / 30) ** 2 + ((yy - SIZE / 2) / 38) ** 2))
    texture = rng.normal(0, 6, (SIZE, SIZE))
    image = body + texture
    if sick:
        image += 70 * np.exp(-(((xx - 30) / 4) ** 2 + ((yy - 40) / 4) ** 2))
    image = np.clip(image * exposure, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(3)
    labels = np.array([0] * 30 + [1] * 30)
    sources = [_xray_like(rng, bool(label), exposure=rng.uniform(0.9, 1.1)) for label in labels]
    return sources, labels


def _brittle(images: np.ndarray) -> np.ndarray:
    """Looks only at the exact spot where the opacity was in every training image."""
    return images[:, 38:43, 28:33, 0].astype(np.float64).mean(axis=(1, 2)) / 255.0


def _robust(images: np.ndarray) -> np.ndarray:
    """Looks for a bright opacity anywhere, relative to the image's own median and spread."""
    pixels = images[..., 0].astype(np.float64)
    kernel = np.ones(5) / 5
    smooth = np.apply_along_axis(lambda row: np.convolve(row, kernel, "same"), 2, pixels)
    smooth = np.apply_along_axis(lambda col: np.convolve(col, kernel, "same"), 1, smooth)
    inner = smooth[:, 8:-8, 8:-8]
    median = np.median(pixels, axis=(1, 2))
    spread = pixels.std(axis=(1, 2)) + 1.0
    score = (inner.max(axis=(1, 2)) - median) / spread
    return 1.0 / (1.0 + np.exp(-(score - 3.0)))


def test_every_shift_a_config_may_name_is_made_and_no_other():
    assert tuple(SHIFTS) == SHIFT_NAMES  # report order too


def test_every_shift_changes_the_pixels_but_keeps_the_shape(dataset):
    sources, _ = dataset
    images = shifted_images(sources[:4], SPEC, seed=0, threads=2)
    assert set(images) == {CLEAN, *SHIFTS}
    clean = images[CLEAN]
    assert np.array_equal(clean[0], decode_image(sources[0], SPEC)), "clean images are the shared preprocessing"
    for name, batch in images.items():
        assert batch.shape == (4, *SPEC.shape) and batch.dtype == np.uint8
        if name != CLEAN:
            assert not np.array_equal(batch, clean), f"{name} changed nothing"


def test_shifts_are_deterministic(dataset):
    sources, _ = dataset
    first = shifted_images(sources[:3], SPEC, ["noise", "shifted", "rotated"], seed=5, threads=2)
    second = shifted_images(sources[:3], SPEC, ["noise", "shifted", "rotated"], seed=5, threads=1)
    for name in first:
        assert np.array_equal(first[name], second[name])


MILD = [name for name in SHIFT_NAMES if name != "harsh_site"]
"""The shifts of a size one site shows; harsh_site is the site proxy's, made to be hard."""


def test_stress_ranks_a_shift_robust_model_above_a_brittle_one(dataset):
    sources, labels = dataset
    images = shifted_images(sources, SPEC, MILD, seed=0, threads=2)
    brittle = stress_report(_brittle, images, labels, target_recall=0.9)
    robust = stress_report(_robust, images, labels, target_recall=0.9)
    # On the clean split both look perfect: validation alone cannot tell them apart.
    assert brittle.rows[0].shift == CLEAN and brittle.rows[0].roc_auc > 0.99
    assert robust.rows[0].roc_auc > 0.99
    # Under the shifts a new site brings, the brittle one breaks and the report says where.
    assert brittle.summary()["stress_worst_roc_auc"] < 0.8
    assert robust.summary()["stress_worst_roc_auc"] > brittle.summary()["stress_worst_roc_auc"] + 0.15
    assert robust.summary()["stress_worst_precision_at_recall"] > brittle.summary()["stress_worst_precision_at_recall"]
    assert brittle.worst_shifts()["roc_auc"] in {"new_site", "shifted", "zoom_in", "zoom_out", "rotated", "narrower"}
    table = brittle.table()
    assert "worst ROC-AUC" in table and all(name in table for name in MILD)
    json.dumps(brittle.to_json())  # plain JSON for --json and the report


def test_the_harsh_site_is_harder_than_a_new_site_for_a_robust_model_too(dataset):
    """new_site saturates for robust models; harsh_site is there to still separate them."""
    sources, labels = dataset
    images = shifted_images(sources, SPEC, ["new_site", "harsh_site"], seed=0, threads=2)
    rows = {row.shift: row for row in stress_report(_robust, images, labels, target_recall=0.9).rows}
    assert rows["harsh_site"].roc_auc < rows["new_site"].roc_auc - 0.03
    assert rows["harsh_site"].roc_auc > 0.75, "hard, not random"


def test_fixed_threshold_columns_show_drift_of_an_exposure_sensitive_model(dataset):
    """A model that reads brightness keeps its ranking under a uniform exposure change but its
    fixed threshold drifts: the recall/precision-at-threshold columns are there to show that."""
    sources, labels = dataset
    images = shifted_images(sources, SPEC, ["darker", "brighter"], seed=0, threads=2)
    report = stress_report(_brittle, images, labels, target_recall=0.9)
    rows = {row.shift: row for row in report.rows}
    assert rows["darker"].recall_at_threshold < rows[CLEAN].recall_at_threshold
    assert rows["brighter"].recall_at_threshold > rows[CLEAN].recall_at_threshold
    assert rows["darker"].roc_auc > 0.99  # the ranking itself holds


def test_standardization_removes_exposure_changes():
    rng = np.random.default_rng(0)
    image = rng.integers(40, 200, (64, 64)).astype(np.uint8)
    darker = np.clip(image.astype(float) * 0.7 + 10, 0, 255).astype(np.uint8)
    a, b = normalize_intensity(image, "standardize"), normalize_intensity(darker, "standardize")
    assert abs(float(a.mean()) - 128) < 1 and abs(float(a.std()) - 48) < 1
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.5
    equalized = normalize_intensity(image, "equalize")
    assert equalized.min() == 0 and equalized.max() == 255
    assert np.array_equal(normalize_intensity(np.full((8, 8), 77, np.uint8), "equalize"), np.full((8, 8), 77))


def test_decode_applies_the_specs_normalisation_so_serving_matches_training(dataset):
    sources, _ = dataset
    plain = decode_image(sources[0], SPEC)
    standardized = decode_image(sources[0], PreprocessSpec(SIZE, 1, "stretch", "standardize"))
    assert np.array_equal(standardized[..., 0], normalize_intensity(plain[..., 0], "standardize"))
    with pytest.raises(ValueError, match="normalize"):
        PreprocessSpec(SIZE, 1, "stretch", "whiten")


def test_unknown_shift_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown stress shift.*choose from"):
        check_shift_names(["darker", "upside_down"])


def test_stratified_subset_keeps_the_class_ratio():
    labels = np.array([0] * 100 + [1] * 300)
    chosen = stratified_subset(labels, 80, seed=1)
    assert len(chosen) == 80 and labels[chosen].sum() == 60
    assert np.array_equal(stratified_subset(labels, None), np.arange(400))


def test_stress_metrics_need_stress_enabled():
    from pneumonia.config import config_from_dict
    from pneumonia.errors import ConfigError

    with pytest.raises(ConfigError, match="stress.enabled"):
        config_from_dict({"run": {"checkpoint_metric": "val_stress_worst_roc_auc"}})
    with pytest.raises(ConfigError, match="unknown stress shift"):
        config_from_dict({"stress": {"enabled": True, "shifts": ["sideways"]}})
    config = config_from_dict({"stress": {"enabled": True}, "objective": {"metric": "val_stress_worst_roc_auc"}})
    assert config.objective.metric == "val_stress_worst_roc_auc"
