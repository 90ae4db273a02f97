"""Input pipelines: records -> decoded uint8 arrays -> tf.data batches.

Why tf.data over each worker's own file shard, and not Ray Data: every worker reads only its part
of the file list (see ``pneumonia.data.records.shard``), decodes it in a thread pool (Pillow releases the
GIL while decoding), and keeps it in memory, so from the second epoch on the input costs nothing.
The whole official train split at 150 px is 117 MB of uint8, a rounding error next to a GPU
node's memory, and measured decode throughput on 2 cores (docs/BENCHMARKS.md) is far above the
CNN's training throughput, so a separate decoding tier would only add a hop. Ray Data pays off
when a dataset does not fit in memory or CPU-only nodes must decode for GPU nodes; the streaming
mode here (``cache=False``) covers the first case.

Corrupt, truncated and empty files are skipped with a warning and counted, never fatal.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pneumonia.config import AugmentConfig
from pneumonia.data.preprocess import ImageDecodeError, PreprocessSpec, decode_image
from pneumonia.data.records import ImageRecord
from pneumonia.errors import PneumoniaError
from pneumonia.storage import read_bytes

log = logging.getLogger(__name__)


@dataclass
class DecodedImages:
    images: np.ndarray  # uint8, (n, size, size, channels)
    labels: np.ndarray  # float32, (n,)
    records: list[ImageRecord]  # the records that decoded, in order
    failures: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)


def _decode_location(location: str, spec: PreprocessSpec) -> np.ndarray:
    try:
        data = read_bytes(location)
    except (OSError, PneumoniaError) as error:
        raise ImageDecodeError(f"cannot read: {error}") from None
    return decode_image(data, spec)


def decode_threads() -> int:
    return max(2, min(16, (os.cpu_count() or 2) * 2))


def load_images(
    records: list[ImageRecord], spec: PreprocessSpec, threads: int | None = None
) -> DecodedImages:
    """Decode records in parallel; unreadable files are skipped, logged and counted."""
    images = np.zeros((len(records), *spec.shape), dtype=np.uint8)
    ok = np.zeros(len(records), dtype=bool)
    failures: list[tuple[str, str]] = []

    def work(index: int) -> None:
        try:
            images[index] = _decode_location(records[index].location, spec)
            ok[index] = True
        except ImageDecodeError as error:
            failures.append((records[index].location, str(error)))

    with ThreadPoolExecutor(max_workers=threads or decode_threads()) as pool:
        list(pool.map(work, range(len(records))))
    for location, reason in failures:
        log.warning("skipping %s: %s", location, reason)
    kept = [record for record, good in zip(records, ok) if good]
    labels = np.array([record.label for record in kept], dtype=np.float32)
    return DecodedImages(images[ok], labels, kept, failures)


def augmentation_layers(config: AugmentConfig, seed: int):
    """Keras preprocessing layers for label-preserving augmentation (training only)."""
    import tensorflow as tf

    layers = tf.keras.layers
    steps = []
    if config.rotation_deg > 0:
        steps.append(layers.RandomRotation(config.rotation_deg / 360.0, fill_mode="constant", seed=seed))
    if config.shift > 0:
        steps.append(layers.RandomTranslation(config.shift, config.shift, fill_mode="constant", seed=seed + 1))
    if config.zoom > 0:
        steps.append(layers.RandomZoom(config.zoom, fill_mode="constant", seed=seed + 2))
    if config.contrast > 0:
        steps.append(layers.RandomContrast(config.contrast, seed=seed + 3))
    return tf.keras.Sequential(steps, name="augment") if steps else None


def intensity_augmentation(images, config: AugmentConfig):
    """Per-image exposure, gamma, blur and noise on a float batch in [0, 255] (training only).

    These are the changes a new site's X-rays show (see ``pneumonia.data.shifts``); drawn per image.
    """
    import tensorflow as tf

    count = tf.shape(images)[0]
    per_image = lambda low, high: tf.random.uniform([count, 1, 1, 1], low, high)  # noqa: E731
    if config.gamma > 0:
        gamma = tf.exp(per_image(-config.gamma, config.gamma))
        images = 255.0 * tf.pow(tf.clip_by_value(images / 255.0, 0.0, 1.0), gamma)
    if config.brightness > 0:
        images = images + 255.0 * per_image(-config.brightness, config.brightness)
    if config.blur > 0:
        kernel = tf.constant([0.25, 0.5, 0.25])  # a 3x3 binomial blur, applied to a random share
        kernel = tf.reshape(kernel[:, None] * kernel[None, :], [3, 3, 1, 1])
        kernel = tf.tile(kernel, [1, 1, tf.shape(images)[-1], 1])
        blurred = tf.nn.depthwise_conv2d(images, kernel, [1, 1, 1, 1], "SAME")
        chosen = tf.cast(per_image(0.0, 1.0) < config.blur, images.dtype)
        images = chosen * blurred + (1.0 - chosen) * images
    if config.noise > 0:
        std = 255.0 * per_image(0.0, config.noise)
        images = images + std * tf.random.normal(tf.shape(images))
    return images


def mix_up(images, labels, weights, alpha: float):
    """mixup (Zhang et al., 2018): convex blends of image pairs and their labels, one weight per pair."""
    import tensorflow as tf

    count = tf.shape(images)[0]
    first = tf.random.gamma([count], alpha)
    second = tf.random.gamma([count], alpha)
    mix = first / (first + second)
    mix = tf.maximum(mix, 1.0 - mix)  # the first image dominates: its weight is the pair's
    order = tf.random.shuffle(tf.range(count))
    images = tf.cast(images, tf.float32)
    blended = mix[:, None, None, None] * images + (1.0 - mix[:, None, None, None]) * tf.gather(images, order)
    labels = mix * labels + (1.0 - mix) * tf.gather(labels, order)
    return blended, labels, weights


def training_dataset(
    records: list[ImageRecord],
    spec: PreprocessSpec,
    batch_size: int,
    augment: AugmentConfig,
    seed: int,
    cache: bool = True,
    class_weights: tuple[float, float] = (1.0, 1.0),
    mixup: float = 0.0,
    teacher=None,
    teacher_weight: float = 0.0,
):
    """An endless, shuffled, batched dataset of (image, label, weight) from this worker's records.

    With a ``teacher`` (a Keras model, :mod:`pneumonia.training.distill`), each batch's label becomes
    ``teacher_weight`` x the teacher's probability on that very batch, after augmentation and mixup,
    plus the rest of the label; the class weight still follows the true label.

    Endless because under MultiWorkerMirroredStrategy every worker must run the same number of
    steps: the caller fixes ``steps_per_epoch`` and shards that differ by a few images (or lose a
    corrupt file) simply wrap around. Returns (dataset, number of images that decoded or will be
    streamed, failures found so far).
    """
    import tensorflow as tf

    weights = np.asarray(class_weights, dtype=np.float32)
    if cache:
        decoded = load_images(records, spec)
        if len(decoded.records) == 0:
            raise ImageDecodeError("none of this worker's images could be decoded")
        dataset = tf.data.Dataset.from_tensor_slices(
            (decoded.images, decoded.labels, weights[decoded.labels.astype(int)])
        )
        count, failures = len(decoded.records), decoded.failures
    else:
        dataset = _streaming_dataset(records, spec, weights)
        count, failures = len(records), []
    dataset = dataset.shuffle(min(count, 10_000), seed=seed, reshuffle_each_iteration=True).repeat()
    dataset = dataset.batch(batch_size, drop_remainder=False)
    augmenter = augmentation_layers(augment, seed) if augment.enabled else None
    if augmenter is not None:
        def apply(images, labels, sample_weights):
            images = augmenter(tf.cast(images, tf.float32), training=True)
            images = intensity_augmentation(images, augment)
            return tf.clip_by_value(images, 0.0, 255.0), labels, sample_weights
        dataset = dataset.map(apply, num_parallel_calls=tf.data.AUTOTUNE)
    if mixup > 0:
        dataset = dataset.map(lambda images, labels, weights: mix_up(images, labels, weights, mixup),
                              num_parallel_calls=tf.data.AUTOTUNE)
    if teacher is not None:
        def taught(images, labels, sample_weights):
            said = tf.reshape(teacher(tf.cast(images, tf.float32), training=False), [-1])
            labels = tf.cast(labels, tf.float32)
            return images, teacher_weight * tf.cast(said, tf.float32) + (1.0 - teacher_weight) * labels, sample_weights
        # One batch at a time: the teacher's forward pass uses the op threads the training step needs.
        dataset = dataset.map(taught, num_parallel_calls=1)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE), count, failures


def _streaming_dataset(records: list[ImageRecord], spec: PreprocessSpec, weights: np.ndarray):
    """Decode on the fly in parallel (for data larger than memory); bad files are filtered out."""
    import tensorflow as tf

    locations = np.array([record.location for record in records])
    labels = np.array([record.label for record in records], dtype=np.float32)

    def decode(location: bytes) -> tuple[np.ndarray, bool]:
        try:
            return _decode_location(location.decode(), spec), True
        except ImageDecodeError as error:
            log.warning("skipping %s: %s", location.decode(), error)
            return np.zeros(spec.shape, np.uint8), False

    def load(location, label):
        image, ok = tf.numpy_function(decode, [location], (tf.uint8, tf.bool))
        image.set_shape(spec.shape)
        return image, label, tf.gather(weights, tf.cast(label, tf.int32)), ok

    dataset = tf.data.Dataset.from_tensor_slices((locations, labels))
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.filter(lambda image, label, weight, ok: ok)
    return dataset.map(lambda image, label, weight, ok: (image, label, weight))


def predict_probabilities(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Probabilities of PNEUMONIA for uint8 images, through a compiled call (not model.predict,
    which costs about 100 ms of set-up per call)."""
    import tensorflow as tf

    if len(images) == 0:
        return np.zeros(0, dtype=np.float32)
    forward = _compiled_forward(model)
    outputs = [
        forward(tf.convert_to_tensor(images[start : start + batch_size])).numpy().reshape(-1)
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs).astype(np.float32)


def _compiled_forward(model):
    import tensorflow as tf

    cached = getattr(model, "_pneumonia_forward", None)
    if cached is None:
        cached = tf.function(lambda batch: model(batch, training=False), reduce_retracing=True)
        model._pneumonia_forward = cached
    return cached
