"""Real chest X-rays (../shared/data, skipped when absent) through the same code as production."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pneumonia.config import ModelConfig
from pneumonia.data.preprocess import PreprocessSpec, decode_image


def _as_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.timeout(300)
def test_short_training_on_pneumoniamnist_reaches_auc_095(shared_data):
    """Real pixels, seconds of work: PNG-encode each 28x28 image and decode it with the shared
    preprocessing, train the default model briefly, and score the official val split."""
    import tensorflow as tf

    from pneumonia.data.pipeline import predict_probabilities
    from pneumonia.metrics.binary import binary_metrics
    from pneumonia.models.architectures import build_model, compile_model

    arrays = np.load(shared_data / "pneumoniamnist_trainval.npz")
    spec = PreprocessSpec(image_size=28, channels=1)

    def prepare(images: np.ndarray) -> np.ndarray:
        return np.stack([decode_image(_as_png(image), spec) for image in images])

    train_x, val_x = prepare(arrays["train_images"]), prepare(arrays["val_images"])
    train_y = arrays["train_labels"].reshape(-1).astype("float32")
    val_y = arrays["val_labels"].reshape(-1)
    np.testing.assert_array_equal(train_x[..., 0], arrays["train_images"])  # lossless at 28 px

    tf.keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(name="xraynet", width=32, dropout=0.2), spec.shape)
    compile_model(model, "adam", 2e-3)
    model.fit(train_x, train_y, batch_size=64, epochs=5, verbose=0, shuffle=True)
    metrics = binary_metrics(val_y, predict_probabilities(model, val_x))
    assert metrics["roc_auc"] >= 0.95, metrics


def test_full_resolution_originals_decode_to_model_inputs(shared_data):
    files = sorted((shared_data / "chest_xray_val16").glob("*/*.jpeg"))
    assert len(files) == 16
    spec = PreprocessSpec()
    for path in files:
        pixels = decode_image(path.read_bytes(), spec)
        assert pixels.shape == (150, 150, 1) and pixels.dtype == np.uint8
        assert pixels.std() > 20, f"{path.name} decoded to a nearly flat image"
