"""The out-of-distribution guard: what is not a pediatric chest X-ray is recognised (pneumonia.models.ood)."""

from __future__ import annotations

import numpy as np
import pytest

from pneumonia.models.ood import fit_guard


def _clusters(rng, n: int, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 2, n)
    features = rng.normal(0, 1, (n, d)) + labels[:, None] * 3.0
    return features, labels


def test_the_threshold_lets_the_pass_rate_of_validation_through_and_refuses_what_is_far():
    rng = np.random.default_rng(0)
    features, labels = _clusters(rng, 2000)
    validation, _ = _clusters(rng, 1000)
    guard = fit_guard(features, labels, validation, pass_rate=0.99)
    assert guard.validation_pass_rate >= 0.99
    fresh, _ = _clusters(rng, 2000)
    assert np.mean(guard.scores(fresh) <= guard.threshold) == pytest.approx(0.99, abs=0.01)
    far = rng.normal(0, 1, (200, 8)) + 12.0  # nowhere near either class
    assert np.all(guard.scores(far) > guard.threshold)
    info = guard.metadata("flag")
    assert info["method"] == "mahalanobis-features" and info["policy"] == "flag" and info["features"] == 8
    assert info["fitted_on"] == 2000 and info["calibrated_on"] == 1000


def test_more_features_than_images_still_fit():
    """A 1024-feature ensemble fitted on a few hundred images: the shrunk covariance inverts."""
    rng = np.random.default_rng(1)
    features, labels = _clusters(rng, 100, d=300)
    guard = fit_guard(features, labels, features[:50])
    assert np.isfinite(guard.threshold) and np.all(np.isfinite(guard.scores(features)))


def test_the_tensorflow_scores_equal_the_numpy_ones():
    import tensorflow as tf

    from pneumonia.models.ood import tf_scores

    rng = np.random.default_rng(2)
    features, labels = _clusters(rng, 500)
    guard = fit_guard(features, labels, features[:100])
    arrays = {name: tf.constant(array) for name, array in guard.serving_arrays().items()}
    scores = tf_scores(tf.constant(features[:20], tf.float32), **arrays).numpy()
    np.testing.assert_allclose(scores, guard.scores(features[:20]), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("ensemble", [False, True])
def test_features_come_with_the_same_probabilities_from_one_forward_pass(ensemble):
    import tensorflow as tf

    from pneumonia.config import ModelConfig
    from pneumonia.models.architectures import build_model
    from pneumonia.models.ensemble import build_ensemble
    from pneumonia.models.ood import features_and_probabilities, model_with_features

    tf.keras.utils.set_random_seed(0)
    members = [build_model(ModelConfig(name="xraynet", width=8), (32, 32, 1)) for _ in range(2 if ensemble else 1)]
    model = build_ensemble(members, (32, 32, 1)) if ensemble else members[0]
    images = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 1), dtype=np.uint8)
    features, probabilities = features_and_probabilities(model_with_features(model), images)
    expected = model(tf.cast(images, tf.float32), training=False).numpy().reshape(-1)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    # Per member: the spatial mean of xraynet's ReLU maps (4+8+16+32+32 channels at width 8) and the
    # 64 penultimate features; the last map's mean is the penultimate vector (global average
    # pooling) and is not taken twice.
    assert features.shape == (5, (4 + 8 + 16 + 32 + 32 + 64) * len(members))
