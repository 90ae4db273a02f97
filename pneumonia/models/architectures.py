"""CNN definitions: the original notebook's network, a better default for grayscale X-rays and a
residual, squeeze-and-excitation variant of that default.

All take uint8-valued images of shape (size, size, channels) and rescale them to [0, 1] in their
first layer, so training, evaluation and serving feed the same bytes. All end in one sigmoid unit
(probability of PNEUMONIA) computed in float32, which keeps mixed precision numerically safe.

``tf.keras`` here is Keras 2 (tf-keras): entry points call :func:`pneumonia.runtime.activate` first.
"""

from __future__ import annotations

import tensorflow as tf

from pneumonia.config import ModelConfig
from pneumonia.runtime import require_legacy_keras

MODEL_NAMES = ("seed", "xraynet", "resxnet")


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


SE_REDUCTION = 4
"""resxnet's squeeze-and-excitation bottleneck: a block of C channels gates them through C // 4 units."""


def build_resxnet(
    input_shape: tuple[int, int, int], width: int = 32, depth: int = 1, se: bool = True, dropout: float = 0.3
) -> tf.keras.Model:
    """A stronger single model: xraynet's layout with each conv block replaced by ``depth``
    residual blocks with squeeze-and-excitation (Hu et al., 2018), stock Keras layers only.

    Shape: the strided stem of xraynet (width // 2 filters, stride 2); three stages of width,
    2 x width and 4 x width filters, each ``depth`` residual blocks (3x3 conv, batch norm, ReLU,
    3x3 conv, batch norm, SE gate, + shortcut, ReLU) followed by a 2x2 max-pool; then ``last_conv``
    (8 x width filters, the Grad-CAM target), global average pooling, dropout and the sigmoid unit.
    The shortcut is the identity, or a 1x1 conv + batch norm (stride 1) in a stage's first block,
    where the channel count changes.

    Why max-pooling between stages rather than a stride-2 first block: the resolution schedule is
    xraynet's exactly (75 -> 38 -> 19 -> 10 at 150 px, ``last_conv`` 10x10 as in xraynet), so the
    two models differ only by the residual/SE blocks and compare cleanly, Grad-CAM maps have the
    same grid, and the projection shortcuts need no stride: a strided 1x1 projection reads one
    pixel in four and discards the rest (the ResNet-D observation), the max-pool sees all of them.
    A stride-2 first block would be cheaper (its first conv runs at the lower resolution) but
    would move every stage's maps to a coarser grid than xraynet's.

    Why SE: a per-channel gate computed from the whole image's mean response lets the network
    weight texture channels by global context (overall exposure, how much of the lung field is
    opaque) at ~2% of the parameters; ``se=False`` builds the plain residual network for ablation.

    Cost (``multiply_adds``, 1 channel, 150 px): width 32, depth 1, SE: 277M multiply-adds and
    0.61M parameters, 2.2x xraynet's 124M multiply-adds (0.54M parameters; the seed: 223M, 3.45M);
    SE adds 11k parameters and 11k multiply-adds. Each extra block per stage (depth + 1) adds
    317M multiply-adds and 0.40M parameters at width 32 (depth 2: 593M and 1.01M, 4.8x xraynet);
    width 16, depth 1: 69M and 0.15M.
    """
    layers = tf.keras.layers
    image = tf.keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255)(image)

    def conv_bn(x, filters, name, relu=True):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)  # 0.9: see xraynet
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x

    def squeeze_excite(x, filters, name):
        gate = layers.GlobalAveragePooling2D(name=f"{name}_squeeze")(x)
        gate = layers.Dense(max(1, filters // SE_REDUCTION), activation="relu", name=f"{name}_reduce")(gate)
        gate = layers.Dense(filters, activation="sigmoid", name=f"{name}_expand")(gate)
        gate = layers.Reshape((1, 1, filters), name=f"{name}_gate")(gate)
        return layers.Multiply(name=f"{name}_scale")([x, gate])

    def residual_block(x, filters, name):
        shortcut = x
        if x.shape[-1] != filters:
            shortcut = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_proj")(x)
            shortcut = layers.BatchNormalization(momentum=0.9, name=f"{name}_proj_bn")(shortcut)
        y = conv_bn(x, filters, name=f"{name}_conv1")
        y = conv_bn(y, filters, name=f"{name}_conv2", relu=False)
        if se:
            y = squeeze_excite(y, filters, name=f"{name}_se")
        y = layers.Add(name=f"{name}_add")([y, shortcut])
        return layers.ReLU(name=f"{name}_out")(y)

    x = layers.Conv2D(width // 2, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate((width, width * 2, width * 4), start=1):
        for block in range(1, depth + 1):
            x = residual_block(x, filters, name=f"stage{stage}_block{block}")
        x = layers.MaxPooling2D(2, padding="same", name=f"stage{stage}_pool")(x)
    x = conv_bn(x, width * 8, name="last_conv")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout)(x)
    probability = layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    return tf.keras.Model(image, probability, name="resxnet")


def build_model(config: ModelConfig, input_shape: tuple[int, int, int]) -> tf.keras.Model:
    require_legacy_keras(tf)
    if config.name == "seed":
        return build_seed(input_shape)
    if config.name == "xraynet":
        return build_xraynet(input_shape, width=config.width, dropout=config.dropout)
    if config.name == "resxnet":
        return build_resxnet(input_shape, width=config.width, depth=config.depth, se=config.se,
                             dropout=config.dropout)
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


def compile_model(model: tf.keras.Model, optimizer: str, learning_rate, label_smoothing: float = 0.0,
                  label_metrics: bool = True) -> None:
    """``learning_rate`` is a float or a schedule (see :func:`learning_rate_schedule`).

    ``label_metrics=False`` for targets that are not 0/1 (a distilled student learns probabilities):
    Keras's accuracy and AUC read such targets wrongly (AUC 0.0, accuracy 0.0 on soft targets), so
    the training line shows the loss alone; validation metrics are computed on the labels either way.
    """
    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate),
        loss=tf.keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=keras_metrics() if label_metrics else [],
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
