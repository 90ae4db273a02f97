"""Grad-CAM explanations: layer choice, map shape and range, exact probabilities, PNGs, localisation."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from pneumonia.config import ModelConfig
from pneumonia.models.explain import Explanation, GradCam

pytestmark = pytest.mark.timeout(120)

SIZE = 64


def build(name: str, size: int = SIZE, **config):
    import tensorflow as tf

    from pneumonia.models.architectures import build_model

    tf.keras.utils.set_random_seed(0)
    return build_model(ModelConfig(name=name, **config), (size, size, 1))


def random_images(n: int, size: int = SIZE, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def model_probabilities(model, images: np.ndarray) -> np.ndarray:
    return model(images.astype(np.float32), training=False).numpy().reshape(-1)


def conv_names(model) -> list[str]:
    import tensorflow as tf

    return [layer.name for layer in model.layers if isinstance(layer, tf.keras.layers.Conv2D)]


@pytest.fixture(scope="module")
def xraynet():
    return build("xraynet", width=8)


@pytest.fixture(scope="module")
def xraynet_cam(xraynet):
    return GradCam(xraynet)


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("name", ["seed", "xraynet"])
def test_default_layer_is_the_last_conv(name):
    model = build(name, width=8)
    cam = GradCam(model)
    assert cam.layer == conv_names(model)[-1]
    explanation = cam.explain(random_images(1)[0])
    assert explanation.layer == cam.layer
    assert explanation.heatmap.shape == (SIZE, SIZE)


def test_explicit_layer(xraynet):
    cam = GradCam(xraynet, layer="block2_conv")
    assert cam.layer == "block2_conv"
    heatmap = cam.explain(random_images(1)[0]).heatmap
    assert heatmap.shape == (SIZE, SIZE) and np.isfinite(heatmap).all()


def test_bad_layers_are_value_errors(xraynet):
    import tensorflow as tf

    with pytest.raises(ValueError, match="no layer 'nope'.*last_conv"):
        GradCam(xraynet, layer="nope")
    with pytest.raises(ValueError, match="Grad-CAM needs"):
        GradCam(xraynet, layer="probability")
    dense_only = tf.keras.Sequential([
        tf.keras.Input((SIZE, SIZE, 1)), tf.keras.layers.Flatten(), tf.keras.layers.Dense(1, activation="sigmoid"),
    ])
    with pytest.raises(ValueError, match="no Conv2D layer"):
        GradCam(dense_only)


def test_nested_backbone_in_sequential():
    """Transfer-learning shape: the last Conv2D sits inside a nested model and is found there."""
    import tensorflow as tf

    layers = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    backbone = tf.keras.Sequential([
        tf.keras.Input((SIZE, SIZE, 1)), layers.Rescaling(1 / 255),
        layers.Conv2D(4, 3, activation="relu", name="inner_a"), layers.Conv2D(4, 3, activation="relu", name="inner_b"),
    ], name="backbone")
    model = tf.keras.Sequential([
        tf.keras.Input((SIZE, SIZE, 1)), backbone, layers.GlobalAveragePooling2D(),
        layers.Dense(1, activation="sigmoid"),
    ])
    images = random_images(3)
    explanations = GradCam(model).explain_batch(images)
    assert explanations[0].layer == "inner_b"
    np.testing.assert_allclose([e.probability for e in explanations], model_probabilities(model, images),
                               rtol=1e-6, atol=1e-7)
    assert all(e.heatmap.shape == (SIZE, SIZE) and e.heatmap.max() == 1.0 for e in explanations)

    functional_input = tf.keras.Input((SIZE, SIZE, 1))
    pooled = layers.GlobalAveragePooling2D()(backbone(functional_input))
    functional = tf.keras.Model(functional_input, layers.Dense(1, activation="sigmoid")(pooled))
    with pytest.raises(ValueError, match="nested model"):
        GradCam(functional)


# ----------------------------------------------------------------------------- maps and probabilities


def test_maps_have_the_input_size_and_range(xraynet_cam):
    explanations = xraynet_cam.explain_batch(random_images(5))
    assert len(explanations) == 5
    for explanation in explanations:
        assert isinstance(explanation, Explanation)
        assert explanation.heatmap.dtype == np.float32 and explanation.heatmap.shape == (SIZE, SIZE)
        assert np.isfinite(explanation.heatmap).all()
        assert explanation.heatmap.min() >= 0 and explanation.heatmap.max() == 1.0
    assert xraynet_cam.explain_batch(np.zeros((0, SIZE, SIZE, 1), np.uint8)) == []


@pytest.mark.parametrize("name", ["seed", "xraynet"])
def test_probability_is_the_models_output(name):
    model = build(name, width=8)
    images = random_images(40, seed=1)  # more than one compiled batch
    explanations = GradCam(model).explain_batch(images)
    np.testing.assert_allclose([e.probability for e in explanations], model_probabilities(model, images),
                               rtol=1e-6, atol=1e-7)
    assert GradCam(model).explain(images[3]).probability == pytest.approx(explanations[3].probability, abs=1e-7)


def test_serving_artifact_model(xraynet, tmp_path):
    """The serving path: an exported artifact's Keras model, explained with the logit (its saturated
    probability would give a blank map) and agreeing with the artifact's own SavedModel."""
    from pneumonia.artifacts.publish import export_artifact
    from pneumonia.artifacts.registry import load_artifact
    from pneumonia.data.preprocess import PreprocessSpec
    from pneumonia.models.checkpoint import CheckpointInfo, save_checkpoint

    spec = PreprocessSpec(image_size=SIZE)
    info = CheckpointInfo(epoch=1, config={}, preprocess=spec, metrics={})
    save_checkpoint(tmp_path / "checkpoint", xraynet, info)
    artifact = export_artifact(str(tmp_path / "checkpoint"), tmp_path / "registry", threshold=0.5,
                               target_recall=0.9, validation_metrics={}, training_config={})
    loaded = load_artifact(artifact.path)
    model = loaded.keras_model()
    model.get_layer("probability").bias.assign([60.0])  # the loaded copy, not the fixture's model
    images = random_images(2)
    explanations = GradCam(model).explain_batch(images)
    assert [e.probability for e in explanations] == [1.0, 1.0]
    assert all(e.heatmap.max() == 1.0 for e in explanations)

    reference = GradCam(xraynet).explain_batch(images)
    np.testing.assert_allclose([e.probability for e in reference], loaded.predict(images), rtol=1e-6)
    for explained, expected in zip(explanations, reference):  # the bias does not change the map
        np.testing.assert_allclose(explained.heatmap, expected.heatmap, atol=1e-5)


def test_no_evidence_gives_an_all_zero_map(xraynet):
    """A head that ignores the features: every gradient is zero, and the map stays 0, not NaN."""
    import tensorflow as tf

    flat = tf.keras.models.clone_model(xraynet)
    flat.set_weights(xraynet.get_weights())
    flat.get_layer("probability").kernel.assign(tf.zeros_like(flat.get_layer("probability").kernel))
    heatmap = GradCam(flat).explain(random_images(1)[0]).heatmap
    assert np.isfinite(heatmap).all() and not heatmap.any()


def test_saturated_probability_still_explained(xraynet):
    """p == 1.0 in float32 has a zero sigmoid gradient; differentiating the logit still gives a map."""
    import tensorflow as tf

    flat = tf.keras.models.clone_model(xraynet)
    flat.set_weights(xraynet.get_weights())
    flat.get_layer("probability").bias.assign([60.0])
    explanation = GradCam(flat).explain(random_images(1)[0])
    assert explanation.probability == 1.0
    assert explanation.heatmap.max() == 1.0


def test_sigmoid_activation_layer_head():
    """A model that ends in an Activation layer (no Dense to split) is explained through its probability."""
    import tensorflow as tf

    layers = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([
        tf.keras.Input((SIZE, SIZE, 1)), layers.Rescaling(1 / 255), layers.Conv2D(4, 3, activation="relu"),
        layers.GlobalAveragePooling2D(), layers.Dense(1), layers.Activation("sigmoid"),
    ])
    images = random_images(2)
    explanations = GradCam(model).explain_batch(images)
    np.testing.assert_allclose([e.probability for e in explanations], model_probabilities(model, images), rtol=1e-6)
    assert all(np.isfinite(e.heatmap).all() and e.heatmap.max() == 1.0 for e in explanations)


def test_mixed_precision_model():
    import tensorflow as tf

    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build("xraynet", width=8)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("last_conv").compute_dtype == "float16"
    images = random_images(3)
    explanations = GradCam(model).explain_batch(images)
    np.testing.assert_allclose([e.probability for e in explanations], model_probabilities(model, images), rtol=1e-6)
    for explanation in explanations:
        assert explanation.heatmap.dtype == np.float32 and np.isfinite(explanation.heatmap).all()
        assert 0 <= explanation.heatmap.min() and explanation.heatmap.max() == 1.0


def test_threads_share_one_instance(xraynet_cam):
    images = random_images(8, seed=2)
    expected = [e.heatmap for e in xraynet_cam.explain_batch(images)]
    results: dict[int, np.ndarray] = {}

    def work(index: int) -> None:
        for _ in range(5):
            results[index] = xraynet_cam.explain(images[index]).heatmap

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, heatmap in enumerate(expected):
        np.testing.assert_allclose(results[index], heatmap, atol=1e-5)


def test_wrong_images_are_value_errors(xraynet_cam):
    with pytest.raises(ValueError, match="uint8 image of shape"):
        xraynet_cam.explain(random_images(1)[0].astype(np.float32))
    with pytest.raises(ValueError, match="uint8 image of shape"):
        xraynet_cam.explain(random_images(1, size=SIZE + 1)[0])
    with pytest.raises(ValueError, match="uint8 images of shape"):
        xraynet_cam.explain_batch(random_images(1)[0])


# ----------------------------------------------------------------------------- PNGs


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


@pytest.mark.parametrize("channels", [1, 3])
def test_pngs_decode_at_the_input_size(xraynet_cam, channels):
    gray = random_images(1)[0]
    explanation = xraynet_cam.explain(gray)
    image = np.repeat(gray, 3, axis=2) if channels == 3 else gray
    overlay = decode_png(explanation.overlay_png(image))
    heatmap = decode_png(explanation.heatmap_png())
    assert overlay.mode == heatmap.mode == "RGB"
    assert overlay.size == heatmap.size == (SIZE, SIZE)
    # alpha 0 is the X-ray itself; alpha 1 is the heatmap alone
    assert np.array_equal(np.asarray(decode_png(explanation.overlay_png(image, alpha=0.0))),
                          np.repeat(gray, 3, axis=2))
    assert np.array_equal(np.asarray(decode_png(explanation.overlay_png(image, alpha=1.0))), np.asarray(heatmap))


def test_overlay_rejects_a_mismatched_image(xraynet_cam):
    explanation = xraynet_cam.explain(random_images(1)[0])
    with pytest.raises(ValueError, match="uint8 image of shape"):
        explanation.overlay_png(random_images(1, size=SIZE // 2)[0])
    with pytest.raises(ValueError, match="alpha"):
        explanation.overlay_png(random_images(1)[0], alpha=1.5)


@pytest.mark.parametrize("size, expected", [((1200, 900), (512, 384)), ((300, 600), (256, 512)),
                                            ((100, 40), (512, 205))])
def test_overlay_on_the_original_keeps_its_aspect_with_a_512_px_longest_side(xraynet_cam, size, expected):
    """What a person sees: the X-ray they sent, not the 64 px square the model saw; a small one
    is enlarged so that the map can be read."""
    from pneumonia.models.explain import display_size

    original = Image.fromarray(np.random.default_rng(2).integers(0, 256, size[::-1], dtype=np.uint8))
    explanation = xraynet_cam.explain(random_images(1)[0])
    overlay = decode_png(explanation.overlay_on(original))
    assert overlay.mode == "RGB" and overlay.size == expected == display_size(size)
    assert np.array_equal(np.asarray(decode_png(explanation.overlay_on(original, alpha=0.0)))[..., 0],
                          np.asarray(original.resize(expected, Image.Resampling.BILINEAR)))


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_the_map_lands_where_the_model_saw_the_evidence(resize):
    """A hot spot in the model's square is drawn over the same spot of the original, whichever
    way preprocessing fitted the original into the square (stretched, or letterboxed by pad)."""
    from pneumonia.models.explain import Explanation

    width, height = 400, 200  # a 2:1 X-ray; pad puts it in the middle half of the square
    heatmap = np.zeros((SIZE, SIZE), np.float32)
    if resize == "stretch":
        heatmap[:, SIZE // 2:] = 1.0  # the right half of the square is the right half of the image
    else:
        heatmap[SIZE // 4: SIZE // 2, :] = 1.0  # the top half of the image, below the top band
    overlay = np.asarray(decode_png(Explanation(0.5, heatmap, "x").overlay_on(
        Image.new("L", (width, height), 0), resize, alpha=1.0))).astype(int)
    assert overlay.shape == (256, 512, 3)
    hot, cold = overlay[..., 0] > overlay[..., 2], overlay[..., 2] > overlay[..., 0]  # jet: red vs blue
    if resize == "stretch":
        assert hot[:, 264:].all() and cold[:, :248].all()
    else:
        assert hot[:120].all() and cold[136:].all()
    with pytest.raises(ValueError, match="resize"):
        Explanation(0.5, heatmap, "x").overlay_on(Image.new("L", (8, 4)), "crop")


# ----------------------------------------------------------------------------- localisation

SQUARE = 8
TINY = 32


def squares(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list]:
    """Noisy TINY px images; every other one has a bright SQUARE px square somewhere in its left
    half (label 1); the others have none (label 0). Returns images, labels and the squares' corners."""
    images = rng.normal(90, 20, (n, TINY, TINY, 1))
    labels = np.zeros(n, np.float32)
    corners = []
    for index in range(0, n, 2):
        top, left = rng.integers(0, TINY - SQUARE + 1), rng.integers(0, TINY // 2 - SQUARE + 1)
        images[index, top : top + SQUARE, left : left + SQUARE] += 120
        labels[index] = 1
        corners.append((top, left))
    return np.clip(images, 0, 255).astype(np.uint8), labels, corners


def test_heatmap_localises_the_evidence():
    """A tiny xraynet learns "a bright square in the left half"; Grad-CAM must light the square.

    The layer is block2_conv (8x8 maps, 17 px receptive field). At 32 px the default last_conv is
    a 2x2 map whose receptive field (109 px) covers the whole image, so no method could localise
    there; the code path is the same for every layer.
    """
    from pneumonia.models.architectures import compile_model

    model = build("xraynet", size=TINY, width=8)
    compile_model(model, "adam", 3e-3)
    images, labels, _ = squares(1024, np.random.default_rng(0))
    model.fit(images, labels, batch_size=32, epochs=8, verbose=0)  # 256 steps
    positives, _, corners = squares(40, np.random.default_rng(1))
    positives = positives[::2]  # the 20 images with a square

    explanations = GradCam(model, layer="block2_conv").explain_batch(positives)
    assert min(e.probability for e in explanations) > 0.5, "the model did not learn the task"
    inside, outside, mirrored = [], [], []
    for explanation, (top, left) in zip(explanations, corners):
        mask = np.zeros((TINY, TINY), bool)
        mask[top : top + SQUARE, left : left + SQUARE] = True
        inside.append(explanation.heatmap[mask].mean())
        outside.append(explanation.heatmap[~mask].mean())
        mirror = TINY - left - SQUARE  # the same place in the empty right half: catches a flipped map
        mirrored.append(explanation.heatmap[top : top + SQUARE, mirror : mirror + SQUARE].mean())
    assert np.mean(inside) > 2 * np.mean(outside)
    assert np.mean(inside) > 2 * np.mean(mirrored)
