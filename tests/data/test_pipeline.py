"""The tf.data input pipeline and the model definitions (TensorFlow, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from pneumonia.config import AugmentConfig, ModelConfig
from pneumonia.data.preprocess import PreprocessSpec
from pneumonia.data.records import discover, training_records

SPEC = PreprocessSpec(image_size=32)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from pneumonia.data.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("pipe") / "data"
    make_synthetic_dataset(root, n=60, seed=1, image_size=48)
    found = training_records(discover(str(root)))
    bad = root / "train" / "NORMAL" / "IM-9998-0001.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return found, bad


def _one_epoch(dataset, images: int, batch_size: int):
    batches = list(dataset.take(-(-images // batch_size)))
    return (np.concatenate([b[0].numpy() for b in batches]),
            np.concatenate([b[1].numpy() for b in batches]),
            np.concatenate([b[2].numpy() for b in batches]))


@pytest.mark.parametrize("cache", [True, False])
def test_batches_carry_uint8_images_labels_and_class_weights(records, cache):
    from pneumonia.data.pipeline import training_dataset

    found, _ = records
    dataset, count, _ = training_dataset(found, SPEC, batch_size=8, augment=AugmentConfig(), seed=0,
                                         cache=cache, class_weights=(2.5, 1.0))
    images, labels, weights = _one_epoch(dataset, len(found), 8)
    assert images.shape[1:] == (32, 32, 1) and images.dtype == np.uint8
    assert set(np.unique(labels)) == {0.0, 1.0}
    np.testing.assert_allclose(weights, np.where(labels == 0, 2.5, 1.0))
    assert count == len(found)


def test_the_dataset_is_endless_and_reshuffled(records):
    """Workers must be able to run a fixed number of steps, whatever their shard size."""
    from pneumonia.data.pipeline import training_dataset

    found, _ = records
    dataset, _, _ = training_dataset(found, SPEC, batch_size=len(found), augment=AugmentConfig(), seed=0)
    first, second, third = [batch[0].numpy() for batch in dataset.take(3)]
    assert first.shape == second.shape == third.shape
    assert not np.array_equal(first, second)
    assert sorted(first.reshape(len(found), -1).sum(1)) == sorted(second.reshape(len(found), -1).sum(1))


def test_corrupt_files_are_skipped_in_both_modes(records, caplog):
    from pneumonia.data.pipeline import training_dataset
    from pneumonia.data.records import ImageRecord

    found, bad = records
    with_bad = [*found, ImageRecord(str(bad), 0, "IM-9998", "normal", "train")]
    for cache in (True, False):
        dataset, _, failures = training_dataset(with_bad, SPEC, batch_size=len(found), augment=AugmentConfig(),
                                                seed=0, cache=cache)
        images = next(iter(dataset))[0].numpy()
        assert images.shape[0] == len(found)
        if cache:
            assert [location for location, _ in failures] == [str(bad)]
    assert "IM-9998-0001.jpeg" in caplog.text


def test_augmentation_changes_pixels_but_not_shape_or_range(records):
    from pneumonia.data.pipeline import training_dataset

    found, _ = records
    plain, _, _ = training_dataset(found, SPEC, batch_size=len(found), augment=AugmentConfig(), seed=3)
    augmented, _, _ = training_dataset(
        found, SPEC, batch_size=len(found),
        augment=AugmentConfig(enabled=True, rotation_deg=10, shift=0.1, zoom=0.1, contrast=0.3), seed=3,
    )
    x_plain = next(iter(plain))[0].numpy().astype(np.float32)
    x_aug = next(iter(augmented))[0].numpy()
    assert x_aug.shape == x_plain.shape
    assert x_aug.min() >= 0 and x_aug.max() <= 255
    # Same shuffle seed, so the same images in the same order, but moved and re-contrasted.
    assert np.abs(x_aug - x_plain).mean() > 2.0
    # Still recognisably the same image: far closer to its own original than to another one.
    own = np.abs(x_aug[0] - x_plain[0]).mean()
    other = np.abs(x_aug[0] - x_plain[1]).mean()
    assert own < other


@pytest.mark.parametrize("name", ["seed", "xraynet"])
@pytest.mark.parametrize("size, channels", [(150, 1), (64, 3)])
def test_models_output_one_probability_per_image(name, size, channels):
    from pneumonia.data.pipeline import predict_probabilities
    from pneumonia.models.architectures import build_model

    model = build_model(ModelConfig(name=name), (size, size, channels))
    images = np.random.default_rng(0).integers(0, 256, (3, size, size, channels), dtype=np.uint8)
    probabilities = predict_probabilities(model, images, batch_size=2)
    assert probabilities.shape == (3,)
    assert np.all((probabilities >= 0) & (probabilities <= 1))


def test_xraynet_is_cheaper_than_the_seed_network():
    from pneumonia.models.architectures import build_model, multiply_adds

    seed = build_model(ModelConfig(name="seed"), (150, 150, 1))
    xraynet = build_model(ModelConfig(name="xraynet"), (150, 150, 1))
    assert multiply_adds(xraynet) < 0.6 * multiply_adds(seed)
    assert xraynet.count_params() < 0.2 * seed.count_params()


def test_mixed_precision_keeps_the_output_in_float32():
    import tensorflow as tf

    from pneumonia.models.architectures import build_model

    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model(ModelConfig(name="xraynet"), (32, 32, 1))
        assert model.layers[-1].dtype == "float32"
        assert model(np.zeros((1, 32, 32, 1), np.uint8)).dtype == tf.float32
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
