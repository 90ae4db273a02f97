"""Recognise what is not a pediatric chest X-ray, so that it is never answered as one.

Without it, any decodable image gets a confident NORMAL/PNEUMONIA answer: a holiday photo, a scanned
form, a knee X-ray, a blank frame. The guard here is the Mahalanobis distance of an image's
features to the nearest class mean, with one covariance shared by the classes (Lee et al., 2018,
"A Simple Unified Framework for Detecting Out-of-Distribution Samples"). The features are the
spatial mean of every ReLU activation map and the penultimate features (the input of each
member's ``probability`` layer), concatenated across an ensemble's members: with the penultimate
features alone a small model let blank and gradient frames through; the early maps tell them
apart. The guard is

- fitted at export on a sample of the training carve (class means, shrunk shared covariance);
- its acceptance threshold is the ``pass_rate`` quantile (default 0.99) of the validation
  carve's scores, so that 99% of validation X-rays pass;
- baked into the artifact's SavedModel signature as a second output, ``ood_score``: the network
  runs once per image for both the probability and the score, so the guard costs a
  few reductions and one matrix product per image (bench/serve_load.py --guard measures it), not a
  second forward pass.

Why this method: measured on the recommended recipe's ensemble and on a small test model
(docs/RESULTS.md), it refused every photo, scanned page, rendered text, noise/solid/gradient
frame, rotated and inverted X-ray and CT phantom we could make, while accepting all 16
full-resolution originals; a max-probability or energy score on a binary sigmoid cannot tell
"confident" from "never seen".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pneumonia.data.labels import CLASS_NAMES
from pneumonia.models.ensemble import is_ensemble, member_models

METHOD = "mahalanobis-features"  # ReLU-map means + penultimate features
SCORE_NAME = "ood_score"
FEATURE_LAYER = "probability"  # each model's (member's) output layer: its input is the feature vector
DEFAULT_PASS_RATE = 0.99
POLICIES = ("reject", "flag")
DEFAULT_POLICY = "reject"


@dataclass
class Guard:
    """A fitted guard: class means [classes, d], shared precision matrix [d, d] and threshold."""

    means: np.ndarray
    precision: np.ndarray
    threshold: float
    pass_rate: float
    fitted_on: int
    calibrated_on: int
    validation_pass_rate: float

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean, per row of features [n, d]."""
        features = np.asarray(features, np.float64)
        distances = [np.einsum("ij,jk,ik->i", features - mean, self.precision, features - mean) for mean in self.means]
        return np.min(distances, axis=0).astype(np.float32)

    def serving_arrays(self) -> dict[str, np.ndarray]:
        """What the serving signature's :func:`tf_scores` reads (float32): the precision matrix and
        the per-class terms that do not depend on the image, computed once here in float64."""
        projected = self.precision @ self.means.T  # [d, classes]
        return {"precision": self.precision.astype(np.float32), "projected_means": projected.astype(np.float32),
                "offsets": np.einsum("cd,dc->c", self.means, projected).astype(np.float32)}

    def metadata(self, policy: str = DEFAULT_POLICY) -> dict[str, Any]:
        """What metadata.json records (the arrays live in the SavedModel's variables)."""
        info = {key: value for key, value in asdict(self).items() if key not in ("means", "precision")}
        return {"method": METHOD, "policy": policy, "features": int(self.means.shape[1]), **info}


def fit_guard(features: np.ndarray, labels: np.ndarray, validation_features: np.ndarray,
              pass_rate: float = DEFAULT_PASS_RATE, shrinkage: float = 1e-3) -> Guard:
    """Class means and a shared covariance from training features, shrunk toward the identity
    (scaled by its mean variance) so that it inverts even when features outnumber images; the
    threshold lets ``pass_rate`` of the validation images through."""
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    if len(features) < 2 or len(validation_features) == 0:
        raise ValueError("the guard needs training and validation features")
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    centred = np.concatenate([features[labels == c] - means[i] for i, c in enumerate(classes)])
    covariance = centred.T @ centred / len(centred)
    scale = float(np.trace(covariance)) / len(covariance) or 1.0
    covariance += shrinkage * scale * np.eye(len(covariance))
    precision = np.linalg.inv(covariance)
    guard = Guard(means, precision, 0.0, pass_rate, len(features), len(validation_features), 0.0)
    validation_scores = guard.scores(validation_features)
    guard.threshold = _threshold(validation_scores, pass_rate)
    guard.validation_pass_rate = float(np.mean(validation_scores <= guard.threshold))
    return guard


def _threshold(scores: np.ndarray, pass_rate: float) -> float:
    """The smallest validation score that lets ``pass_rate`` of them through, moved halfway to the
    next one: the served (float32) scores then fall on the same side as these (float64) ones."""
    ordered = np.sort(np.asarray(scores, np.float64))
    index = min(int(np.ceil(pass_rate * len(ordered))) - 1, len(ordered) - 1)
    index = max(index, 0)
    if index + 1 < len(ordered):
        return float((ordered[index] + ordered[index + 1]) / 2)
    return float(ordered[index] * (1 + 1e-6) + 1e-6)


def model_with_features(model):
    """A Keras model from the image to [probability [n, 1], features [n, d]] that runs the network
    once: each member's output and the input of its ``probability`` layer; an ensemble averages
    the members' probabilities (as its Average layer does) and concatenates their features."""
    import tensorflow as tf

    members = member_models(model) if is_ensemble(model) else [model]
    image = tf.keras.Input(shape=model.input_shape[1:], name="image", dtype=model.input.dtype)
    probabilities, features = [], []
    for member in members:
        dual = tf.keras.Model(member.input, [member.output, *_taps(member)])
        probability, *taps = dual(image)
        probabilities.append(probability)
        features += [tf.keras.layers.Flatten()(tap) for tap in taps]
    probability = probabilities[0] if len(probabilities) == 1 else tf.keras.layers.Average()(probabilities)
    feature = features[0] if len(features) == 1 else tf.keras.layers.Concatenate()(features)
    return tf.keras.Model(image, [probability, feature], name="with_features")


def _taps(member) -> list:
    """The feature vectors of one model: the spatial mean of every ReLU activation map (texture and
    contrast at each depth: what tells a blank frame or a photo from an X-ray early on) and the
    penultimate features (what the classifier itself sees). A map whose mean already is the
    penultimate vector (the one global average pooling reads) is not taken twice: it would only
    enlarge the [d, d] product every served image pays for."""
    import tensorflow as tf

    pooled_globally = {id(layer.input) for layer in member.layers
                       if isinstance(layer, tf.keras.layers.GlobalAveragePooling2D)}
    maps = [layer.output for layer in member.layers
            if len(layer.output.shape) == 4 and id(layer.output) not in pooled_globally
            and (isinstance(layer, tf.keras.layers.ReLU)
                 or getattr(getattr(layer, "activation", None), "__name__", "") == "relu")]
    pooled = [tf.reduce_mean(output, axis=[1, 2]) for output in maps]
    return [*pooled, member.get_layer(FEATURE_LAYER).input]


def features_and_probabilities(dual, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, d], probabilities [n]) of uint8 images through :func:`model_with_features`."""
    import tensorflow as tf

    forward = tf.function(lambda x: dual(tf.cast(x, tf.float32), training=False))
    features, probabilities = [], []
    for start in range(0, len(images), batch_size):
        probability, feature = forward(tf.constant(images[start : start + batch_size]))
        probabilities.append(np.reshape(probability.numpy(), [-1]))
        features.append(feature.numpy())
    if not features:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
    return np.concatenate(features), np.concatenate(probabilities)


def tf_scores(features, precision, projected_means, offsets):
    """:meth:`Guard.scores` in TensorFlow, for the serving signature, with one [d, d] product for
    all classes: (f - m)' P (f - m) = f'Pf - 2 f'(Pm) + m'Pm (P symmetric). ``projected_means``
    (Pm, [d, classes]) and ``offsets`` (m'Pm, [classes]) are :meth:`Guard.serving_arrays`, fixed
    at export: a served batch reads the [d, d] matrix once."""
    import tensorflow as tf

    features = tf.cast(features, tf.float32)
    quadratic = tf.reduce_sum(tf.matmul(features, precision) * features, axis=1, keepdims=True)  # [n, 1]
    cross = tf.matmul(features, projected_means)  # [n, classes]: f'P m_c
    return tf.maximum(tf.reduce_min(quadratic - 2.0 * cross + offsets, axis=1), 0.0)


NOT_AN_XRAY = "the image does not look like a pediatric chest X-ray"


@dataclass(frozen=True)
class Scored:
    """One image's probability and guard score, judged by the artifact's guard metadata (None
    without a guard: every image is then in distribution)."""

    probability: float
    ood_score: float | None
    guard: dict | None

    @property
    def out_of_distribution(self) -> bool:
        return self.guard is not None and self.ood_score is not None and self.ood_score > self.guard["threshold"]

    @property
    def refused(self) -> bool:
        """Whether the policy refuses (HTTP 422) rather than flags (200, no label) such an image."""
        return self.guard is not None and self.guard.get("policy", DEFAULT_POLICY) == "reject"

    def label(self, threshold: float) -> str | None:
        """NORMAL or PNEUMONIA at ``threshold``; None for an image the guard says is not an X-ray."""
        return None if self.out_of_distribution else CLASS_NAMES[int(self.probability >= threshold)]

    def guard_fields(self) -> dict[str, float]:
        if self.guard is None or self.ood_score is None:
            return {}
        return {"ood_score": round(self.ood_score, 3), "ood_threshold": round(float(self.guard["threshold"]), 3)}


def judge(probabilities, scores, guard: dict | None) -> list[Scored]:
    """A batch's answers as the service gives them: each probability with its guard score
    (``scores`` None for an artifact without a guard), judged by the guard's metadata."""
    scores = [None] * len(probabilities) if scores is None else [float(score) for score in scores]
    return [Scored(float(probability), score, guard) for probability, score in zip(probabilities, scores)]
