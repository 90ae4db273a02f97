"""resxnet, the residual squeeze-and-excitation network (pneumonia.models.architectures): it builds,
trains, saves and reloads through the safe loader, and Grad-CAM, the OOD guard and sweeps work on it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pneumonia.config import ModelConfig, apply_params, config_from_dict
from pneumonia.errors import ConfigError

pytestmark = pytest.mark.timeout(180)  # the first test pays the TensorFlow import

SIZE = 32
WIDTH = 8


def build(size: int = SIZE, channels: int = 1, **config):
    import tensorflow as tf

    from pneumonia.models.architectures import build_model

    tf.keras.utils.set_random_seed(0)
    return build_model(ModelConfig(**{"name": "resxnet", "width": WIDTH, **config}), (size, size, channels))


def random_images(n: int, size: int = SIZE, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def predict(model, images: np.ndarray) -> np.ndarray:
    return model(images.astype(np.float32), training=False).numpy()


@pytest.mark.parametrize("size, channels", [(64, 1), (150, 3)])
def test_builds_at_64_and_150_px_and_gives_one_probability_per_image(size, channels):
    model = build(size, channels)
    assert model.name == "resxnet" and model.layers[1].__class__.__name__ == "Rescaling"
    probabilities = predict(model, random_images(3, size, channels))
    assert probabilities.shape == (3, 1) and probabilities.dtype == np.float32
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    # the Grad-CAM grid is xraynet's: the stem halves the size, three stage pools halve it again
    assert model.get_layer("last_conv").output_shape[1:] == (-(-size // 16), -(-size // 16), 8 * WIDTH)


def test_the_probability_is_float32_under_mixed_precision():
    import tensorflow as tf

    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build()
        assert model.get_layer("stage1_block1_conv1").compute_dtype == "float16"
        probabilities = predict(model, random_images(2))
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert model.output.dtype == tf.float32 and probabilities.dtype == np.float32
    assert np.all(np.isfinite(probabilities)) and np.all((probabilities >= 0) & (probabilities <= 1))


def _se_parameters(channels: int) -> int:
    hidden = channels // 4
    return channels * hidden + hidden + hidden * channels + channels  # two Dense layers with biases


def _extra_block_parameters(channels: int, se: bool) -> int:
    """A second (identity-shortcut) block of a stage: two bias-free 3x3 convs, two batch norms (4
    weights per channel), the SE gate."""
    return 2 * 9 * channels * channels + 2 * 4 * channels + (_se_parameters(channels) if se else 0)


def test_depth_and_se_change_the_parameter_count_as_the_blocks_say():
    stages = (WIDTH, 2 * WIDTH, 4 * WIDTH)
    base, plain = build(16, se=True), build(16, se=False)
    assert base.count_params() - plain.count_params() == sum(_se_parameters(c) for c in stages)
    assert not any("_se_" in layer.name for layer in plain.layers)
    assert build(16, depth=2).count_params() - base.count_params() == sum(
        _extra_block_parameters(c, True) for c in stages)
    assert build(16, depth=3, se=False).count_params() - plain.count_params() == 2 * sum(
        _extra_block_parameters(c, False) for c in stages)


def test_multiply_adds_are_within_the_documented_range_of_xraynet():
    """The docstring's numbers at 150 px: 277M multiply-adds and 0.61M parameters, 2.2x xraynet."""
    from pneumonia.models.architectures import build_model, multiply_adds

    xraynet = build_model(ModelConfig(name="xraynet", width=32), (150, 150, 1))
    resxnet = build_model(ModelConfig(name="resxnet", width=32, depth=1, se=True), (150, 150, 1))
    ratio = multiply_adds(resxnet) / multiply_adds(xraynet)
    assert 1.5 <= ratio <= 3.0
    assert round(multiply_adds(resxnet) / 1e6) == 277 and round(resxnet.count_params() / 1e4) == 61


def test_a_training_step_then_checkpoint_reloads_through_the_safe_loader_and_predicts_identically(tmp_path):
    import tensorflow as tf

    from pneumonia.data.preprocess import PreprocessSpec
    from pneumonia.models.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
    from pneumonia.models.safe_load import check_keras_file

    model = build()
    images = random_images(8, seed=1).astype(np.float32)
    labels = np.array([[0.0], [1.0]] * 4, np.float32)
    with tf.GradientTape() as tape:
        loss = tf.keras.losses.binary_crossentropy(labels, model(images, training=True))
    gradients = tape.gradient(loss, model.trainable_variables)
    # every weight is trained: no block, shortcut or SE gate is cut off from the loss
    assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in gradients)
    tf.keras.optimizers.Adam(1e-2).apply_gradients(zip(gradients, model.trainable_variables))
    # and the training-mode call moved the batch-norm statistics the checkpoint must carry
    assert float(tf.reduce_max(tf.abs(model.get_layer("last_conv_bn").moving_mean))) > 0

    info = CheckpointInfo(epoch=1, config={"model": ModelConfig(name="resxnet", width=WIDTH).model_dump()},
                          preprocess=PreprocessSpec(SIZE, 1), metrics={})
    directory = save_checkpoint(tmp_path / "checkpoint", model, info)
    check_keras_file(directory / "model.keras")  # Keras's own layers only, no Lambda
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sha256 is recorded: no unverified-checkpoint warning
        loaded, _ = load_checkpoint(str(directory))
    test_images = random_images(5, seed=2)
    np.testing.assert_array_equal(predict(loaded, test_images), predict(model, test_images))


def test_grad_cam_finds_last_conv_and_gives_a_map():
    """An untrained head's random signs can leave a map legitimately blank (no positive evidence
    anywhere); with every feature counted as evidence for PNEUMONIA, each map has some."""
    from pneumonia.models.explain import GradCam

    model = build()
    head = model.get_layer("probability")
    head.set_weights([np.full(head.kernel.shape, 0.1, np.float32), np.zeros(1, np.float32)])
    cam = GradCam(model)
    assert cam.layer == "last_conv"
    images = random_images(3, seed=3)
    explanations = cam.explain_batch(images)
    for explanation in explanations:
        heatmap = explanation.heatmap
        assert explanation.layer == "last_conv" and heatmap.shape == (SIZE, SIZE)
        assert np.isfinite(heatmap).all() and heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)
    np.testing.assert_allclose([e.probability for e in explanations], predict(model, images).reshape(-1),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth, se", [(1, True), (2, False)])
def test_the_ood_guard_taps_every_relu_map_and_the_penultimate_features(depth, se):
    """The guard's features: the spatial mean of the stem's ReLU map and of both ReLU maps of every
    block (after the first conv, after the addition), then the penultimate features; last_conv's
    map is what global pooling reads, so it is not taken twice, and the SE gates' 2-D ReLUs are not
    maps."""
    from pneumonia.models.ood import features_and_probabilities, model_with_features

    model = build(depth=depth, se=se)
    images = random_images(4, seed=4)
    features, probabilities = features_and_probabilities(model_with_features(model), images)
    stages = (WIDTH, 2 * WIDTH, 4 * WIDTH)
    assert features.shape == (4, WIDTH // 2 + depth * 2 * sum(stages) + 8 * WIDTH)
    assert np.all(np.isfinite(features))
    np.testing.assert_allclose(probabilities, predict(model, images).reshape(-1), rtol=1e-5, atol=1e-6)


def test_model_depth_se_and_width_are_searchable_sweep_keys():
    space = {"model.depth": {"type": "randint", "low": 1, "high": 5},
             "model.se": {"type": "choice", "values": [True, False]},
             "model.width": {"type": "choice", "values": [16, 32, 48]}}
    config = config_from_dict({"model": {"name": "resxnet"}, "tune": {"space": space}})
    assert set(config.tune.space) == set(space)
    trial = config_from_dict(apply_params(config.model_dump(exclude={"tune"}),
                                          {"model.depth": 3, "model.se": False, "model.width": 16}))
    assert (trial.model.name, trial.model.depth, trial.model.se, trial.model.width) == ("resxnet", 3, False, 16)
    with pytest.raises(ConfigError, match=r"tune\.space\.model\.depth: value 5 is invalid"):
        config_from_dict({"tune": {"space": {"model.depth": {"type": "randint", "low": 1, "high": 6}}}})
