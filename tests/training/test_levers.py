"""The training levers for shift robustness: schedule, weight averaging, augmentation, mixup."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pneumonia.config import AugmentConfig, ModelConfig
from pneumonia.models.architectures import build_model, compile_model, learning_rate_schedule


def test_cosine_schedule_warms_up_then_decays_to_one_percent():
    schedule = learning_rate_schedule(1e-3, "cosine", total_steps=1000, warmup_steps=100)
    rates = [float(schedule(step)) for step in (0, 50, 100, 550, 1000)]
    assert rates[0] == pytest.approx(1e-4)
    assert rates[0] < rates[1] < rates[2] == pytest.approx(1e-3)
    assert rates[3] < rates[2] and rates[4] == pytest.approx(1e-5, rel=0.05)
    assert learning_rate_schedule(1e-3, "constant") == 1e-3


def test_weight_average_is_applied_inside_the_block_and_training_weights_come_back():
    from pneumonia.training.ema import WeightAverage

    model = build_model(ModelConfig(width=4), (32, 32, 1))
    compile_model(model, "adam", 1e-2)
    images = np.random.default_rng(0).integers(0, 255, (64, 32, 32, 1)).astype(np.float32)
    labels = (images.mean(axis=(1, 2, 3)) > 127).astype(np.float32)
    average = WeightAverage(0.9)
    model.fit(images, labels, batch_size=8, epochs=2, verbose=0, callbacks=[average])
    raw = [weight.copy() for weight in model.get_weights()]
    with average.applied():
        inside = model.get_weights()
        assert any(not np.allclose(a, b) for a, b in zip(inside, raw)), "the average differs from the last step"
        for a, b in zip(inside, average.average):
            np.testing.assert_allclose(a, b)
    for a, b in zip(model.get_weights(), raw):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(1.0)


def test_intensity_augmentation_changes_exposure_but_stays_an_image():
    from pneumonia.data.pipeline import intensity_augmentation

    tf.random.set_seed(1)
    images = tf.fill([16, 24, 24, 1], 100.0)
    config = AugmentConfig(enabled=True, brightness=0.1, gamma=0.3, blur=0.5, noise=0.05)
    out = intensity_augmentation(images, config).numpy()
    assert out.shape == (16, 24, 24, 1) and np.isfinite(out).all()
    means = out.mean(axis=(1, 2, 3))
    assert means.std() > 3, "each image gets its own exposure"
    unchanged = intensity_augmentation(images, AugmentConfig(enabled=True)).numpy()
    np.testing.assert_array_equal(unchanged, images.numpy())


def test_mixup_blends_images_and_labels_with_the_same_weight():
    from pneumonia.data.pipeline import mix_up

    tf.random.set_seed(2)
    images = tf.concat([tf.zeros([8, 4, 4, 1]), tf.fill([8, 4, 4, 1], 200.0)], axis=0)
    labels = tf.concat([tf.zeros([8]), tf.ones([8])], axis=0)
    mixed, soft, weights = mix_up(images, labels, tf.ones([16]), alpha=0.4)
    mixed, soft = mixed.numpy(), soft.numpy()
    assert ((soft >= 0) & (soft <= 1)).all()
    np.testing.assert_allclose(mixed[:, 0, 0, 0] / 200.0, soft, atol=1e-5)  # pixel share == label share
    assert weights.shape == (16,)
