"""CNN definitions: the original notebook's network and a better default for grayscale X-rays.

Both take uint8-valued images of shape (size, size, channels) and rescale them to [0, 1] in their
first layer, so training, evaluation and serving feed the same bytes. Both end in one sigmoid unit
(probability of PNEUMONIA) computed in float32, which keeps mixed precision numerically safe.

``tf.keras`` here is Keras 2 (tf-keras): entry points call :func:`pneumonia.runtime.activate` first.
"""

from __future__ import annotations

import tensorflow as tf

from pneumonia.config import ModelConfig
from pneumonia.runtime import require_legacy_keras

MODEL_NAMES = ("seed", "xraynet")


def build_seed(input_shape: tuple[int, int, int]) -> tf.keras.Model:
    """The starting point we must beat: Conv 32-64-128-128 with max pooling, Dense 512, sigmoid."""
    layers = tf.keras.layers
    model = tf.keras.Sequential(name="seed")
    model.add(tf.keras.Input(shape=input_shape, name="image"))
    model.add(layers.Rescaling(1.0 / 255))
    for filters in (32, 64, 128, 128):
        model.add(layers.Conv2D(filters, 3, activation="relu"))
        model.add(layers.MaxPooling2D(2))
    model.add(layers.Flatten())
    model.add(layers.Dense(512, activation="relu"))
    model.add(layers.Dense(1, activation="sigmoid", dtype="float32", name="probability"))
    return model


def build_xraynet(
    input_shape: tuple[int, int, int], width: int = 32, dropout: float = 0.3
) -> tf.keras.Model:
    """Default model: a small all-convolutional network with batch norm and global pooling.

    Why this shape: a strided stem cuts the first (most expensive) layer's cost by 4x; batch norm
    makes training stable at higher learning rates; global average pooling replaces the seed's
    3.2M-parameter dense layer, which over-fits a 5k-image dataset; dropout before the classifier
    regularises further. At 150 px it needs 56% of the seed's multiply-adds and 16% of
    its parameters (see docs/BENCHMARKS.md).
    """
    layers = tf.keras.layers
    image = tf.keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255)(image)

    def conv_bn(x, filters, strides=1, name=None):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=name)(x)
        # momentum 0.9: an epoch of a few thousand images is only ~100 steps, and the default
        # 0.99 leaves the inference statistics far from the data for the first epochs.
        x = layers.BatchNormalization(momentum=0.9)(x)
        return layers.ReLU()(x)

    x = conv_bn(x, width // 2, strides=2, name="stem")
    for stage, filters in enumerate((width, width * 2, width * 4)):
        x = conv_bn(x, filters, name=f"block{stage + 1}_conv")
        x = layers.MaxPooling2D(2, padding="same")(x)
    x = conv_bn(x, width * 4, name="block4_conv1")
    x = conv_bn(x, width * 8, name="last_conv")
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout)(x)
    probability = layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    return tf.keras.Model(image, probability, name="xraynet")


def build_model(config: ModelConfig, input_shape: tuple[int, int, int]) -> tf.keras.Model:
    require_legacy_keras(tf)
    if config.name == "seed":
        return build_seed(input_shape)
    if config.name == "xraynet":
        return build_xraynet(input_shape, width=config.width, dropout=config.dropout)
    raise ValueError(f"unknown model {config.name!r}; choose one of {', '.join(MODEL_NAMES)}")


def keras_metrics() -> list[tf.keras.metrics.Metric]:
    """Streaming metrics reported every epoch (aggregated across workers by the strategy)."""
    return [
        tf.keras.metrics.BinaryAccuracy(name="accuracy"),
        tf.keras.metrics.Precision(name="precision"),
        tf.keras.metrics.Recall(name="recall"),
        tf.keras.metrics.AUC(curve="ROC", num_thresholds=500, name="roc_auc"),
        tf.keras.metrics.AUC(curve="PR", num_thresholds=500, name="pr_auc"),
    ]


def make_optimizer(name: str, learning_rate) -> tf.keras.optimizers.Optimizer:
    if name == "rmsprop":
        return tf.keras.optimizers.RMSprop(learning_rate=learning_rate)
    if name == "adam":
        return tf.keras.optimizers.Adam(learning_rate=learning_rate)
    raise ValueError(f"unknown optimizer {name!r}")


def learning_rate_schedule(learning_rate: float, schedule: str = "constant", total_steps: int = 0,
                           warmup_steps: int = 0):
    """A constant rate, or cosine decay to 1% over the run after a linear warm-up.

    Why cosine: at a constant rate the validation metrics of this small dataset swing from epoch
    to epoch (measured: accuracy at 0.5 from 0.97 to 0.55 between two epochs); a decaying rate
    lets the last epochs settle, so the last and the best checkpoint agree.
    """
    if schedule == "constant" and warmup_steps == 0:
        return learning_rate
    decay_steps = max(1, total_steps - warmup_steps) if schedule == "cosine" else 10**12
    if warmup_steps == 0:
        return tf.keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps, alpha=0.01)
    return tf.keras.optimizers.schedules.CosineDecay(
        learning_rate / 10, decay_steps, alpha=0.01, warmup_target=learning_rate, warmup_steps=warmup_steps)


def compile_model(model: tf.keras.Model, optimizer: str, learning_rate, label_smoothing: float = 0.0) -> None:
    """``learning_rate`` is a float or a schedule (see :func:`learning_rate_schedule`)."""
    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate),
        loss=tf.keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=keras_metrics(),
        weighted_metrics=[],
        # Several steps per compiled call: less Python and GIL work per batch, which matters in a
        # Ray worker whose process also runs Ray's own threads (bench/train_throughput.py).
        steps_per_execution=8,
    )


def multiply_adds(model: tf.keras.Model) -> int:
    """Multiply-adds of one forward pass (convolutions and dense layers), for model comparison."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv2D):
            _, height, width, channels_out = layer.output_shape
            kernel = layer.kernel.shape
            total += height * width * channels_out * kernel[0] * kernel[1] * kernel[2]
        elif isinstance(layer, tf.keras.layers.Dense):
            total += int(layer.kernel.shape[0] * layer.kernel.shape[1])
    return int(total)
