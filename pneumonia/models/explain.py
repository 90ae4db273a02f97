"""Grad-CAM heatmaps: which parts of an X-ray drove the model's PNEUMONIA probability.

Grad-CAM (Selvaraju et al., 2017) weights the feature maps of a convolutional layer by the mean
gradient of the class score over each map, sums them and keeps the positive part: a coarse map of
the regions that raise the score. It needs the Keras model's layers, so a serving replica gets the
model from ``LoadedArtifact.keras_model()`` and builds one :class:`GradCam` for its lifetime.

Choices and why:
- The score is the pre-sigmoid logit when the model ends in a one-unit sigmoid ``Dense`` (both
  project models do): d(probability) = p(1 - p) d(logit), a positive factor per image that the
  normalisation cancels, except that a confident prediction (p == 1.0 in float32) makes it exactly
  zero and the map blank. Other models fall back to the probability itself.
- One ``tf.function`` with a fixed input signature, traced in the constructor: a request pays
  for one forward and a partial backward pass (only down to the chosen layer), not for tracing.
  The traced function holds no Python state, so several threads may call one instance at once.
- Maps are computed in float32 whatever the model's precision (mixed-precision models give
  float16 feature maps), resized bilinearly to the input size and scaled so that their maximum is
  1; a map with no positive evidence stays all zero rather than becoming NaN.
- The default layer is the last Conv2D, the usual Grad-CAM choice: the most class-specific maps
  that still have a spatial layout. They are coarse (xraynet's ``last_conv`` is 10x10 at 150 px
  and each cell sees about 109 px); an earlier layer (``layer="block3_conv"``) gives finer but
  less class-specific maps.
- Ensembles (:mod:`pneumonia.models.ensemble`) get the Grad-CAM of their mean. The score is the mean
  of the members' logits (the mean probability when a member has no sigmoid ``Dense`` head), for
  the reason above: the mean probability's gradient weights member k by p_k (1 - p_k), so
  confident members drop out and a confident ensemble gives a blank map. The target is each
  member's last Conv2D (or the layer named ``layer`` in every member); each member's map comes
  from the gradient of that one score with respect to its own feature maps, is resized to the
  input size and the members' maps are averaged, then scaled so that the maximum is 1. A map's
  cells hold score per cell, so before averaging each map is weighted by its number of cells
  relative to member 0's: members with coarser or finer feature maps are compared per pixel
  (members of one architecture all get weight 1). ``Explanation.layer`` reads ``member_*/last_conv``.
- The PNGs use the ``jet`` colormap, the one Grad-CAM figures use, blended uniformly over the
  grayscale X-ray so that the whole image stays readable under the colours.
- The map is computed on the model's input (64 or 150 px, square) but shown to a person over the
  X-ray they sent (:meth:`Explanation.overlay_on`): at its own aspect ratio, its longest side
  :data:`DISPLAY_SIDE` (512) px, the map resized onto it the way preprocessing mapped the X-ray
  into the model's square (stretched back for ``stretch``, the letterbox bands cut off for
  ``pad``). A smaller original is enlarged to 512 px too: its pixels carry no more detail, but the
  map's cells and the anatomy under them are then big enough to read, and every overlay a client
  shows has one predictable size.

This module must stay importable by a serving process: no Ray, and TensorFlow only inside the
functions that need it.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pneumonia.models.ensemble import MEMBER_PREFIX, OUTPUT_NAME, is_ensemble, member_models

COLORMAP = "jet"
BATCH_SIZE = 32  # images per compiled call in explain_batch: bounds the memory of a large batch
DISPLAY_SIDE = 512  # longest side, in pixels, of the overlay drawn over the original X-ray
DEFAULT_ALPHA = 0.45  # the heatmap's opacity in overlays


@dataclass
class Explanation:
    """One image's Grad-CAM result."""

    probability: float  # the model's PNEUMONIA probability for the image
    heatmap: np.ndarray  # float32 [size, size] in [0, 1], at the model's input size
    layer: str  # name of the layer whose feature maps were weighted

    def overlay_png(self, image: np.ndarray, alpha: float = DEFAULT_ALPHA) -> bytes:
        """PNG (RGB) of the colour-mapped heatmap blended over the grayscale X-ray, at the model's
        input size (for a person, :meth:`overlay_on` draws it over the original instead).

        ``image`` is the uint8 [size, size, channels] array that was explained; ``alpha`` is the
        heatmap's opacity (0: the X-ray alone, 1: the heatmap alone).
        """
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[:2] != self.heatmap.shape:
            raise ValueError(
                f"expected a uint8 image of shape ({', '.join(map(str, self.heatmap.shape))}, channels), "
                f"got {image.dtype} {image.shape}"
            )
        return _png(_blend(image.mean(axis=2, dtype=np.float32), self.heatmap, alpha))

    def overlay_on(self, original: Image.Image, resize: str = "stretch", side: int = DISPLAY_SIDE,
                   alpha: float = DEFAULT_ALPHA) -> bytes:
        """PNG (RGB) of the heatmap over the X-ray as it was sent: the original's aspect ratio,
        its longest side ``side`` px (a smaller original is enlarged: see the module docstring).

        ``original`` is the upright image before preprocessing (``preprocess.open_image``);
        ``resize`` is the preprocessing's mode, which says how the model's square maps onto it.
        """
        gray, heatmap = self._on(original, resize, side)
        return _png(_blend(gray, heatmap, alpha))

    def layers_on(self, original: Image.Image, resize: str = "stretch", side: int = DISPLAY_SIDE,
                  alpha: float = DEFAULT_ALPHA) -> tuple[bytes, bytes, bytes]:
        """(:meth:`overlay_on`'s PNG, the X-ray in grey, the colour-mapped heatmap): the overlay and
        the two pictures it is made of, at one size, from one resize of each, for a viewer with its
        own opacity control (the heatmap over the X-ray at opacity a is the overlay blended at a)."""
        gray, heatmap = self._on(original, resize, side)
        return (_png(_blend(gray, heatmap, alpha)), _png(np.clip(np.round(gray), 0, 255).astype(np.uint8)),
                _png(_colorize(heatmap)))

    def _on(self, original: Image.Image, resize: str, side: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 (grey X-ray, heatmap), both at the display size of ``original``."""
        width, height = display_size(original.size, side)
        gray = np.asarray(original.convert("L").resize((width, height), Image.Resampling.BILINEAR), np.float32)
        return gray, _heatmap_over(self.heatmap, original.size, (width, height), resize)

    def heatmap_png(self) -> bytes:
        """PNG (RGB) of the colour-mapped heatmap alone."""
        return _png(_colorize(self.heatmap))


class GradCam:
    """Grad-CAM for a Keras model with one sigmoid output; build once, call from any thread."""

    def __init__(self, model, layer: str | None = None):
        """``layer`` names the layer whose feature maps are used; None picks the last Conv2D,
        searching nested models too (for an ensemble: the layer in every member, by default each
        member's last Conv2D). Raises ValueError when there is no such layer."""
        import tensorflow as tf

        if not model.inputs or len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ValueError("GradCam needs a built functional or Sequential model with one input and one output")
        shape = tuple(model.input_shape[1:])
        if len(shape) != 3 or None in shape:
            raise ValueError(f"GradCam needs a fixed image input (size, size, channels), the model takes {shape}")
        if tuple(model.output_shape[1:]) != (1,):
            raise ValueError(f"GradCam explains one sigmoid output, the model returns {model.output_shape[1:]}")
        self.model = model
        self.input_shape = shape
        if is_ensemble(model):
            forward, self.layer, map_weights = _ensemble_features_and_score(model, layer)
        else:
            target = _find_layer(model, layer)
            self.layer = target.name
            single = _features_and_score(model, target)
            map_weights = [1.0]

            def forward(images):
                features, score, probability = single(images)
                return [features], score, probability

        @tf.function(input_signature=[tf.TensorSpec([None, *shape], tf.uint8, name="image")])
        def compute(images):
            with tf.GradientTape() as tape:
                features, score, probability = forward(tf.cast(images, tf.float32))
            gradients = tape.gradient(score, features)
            maps = [_layer_map(f, g, shape[:2]) for f, g in zip(features, gradients)]
            if len(maps) == 1:
                cam = maps[0]
            else:  # an ensemble: the members' maps, per pixel (see the module docstring), averaged
                cam = tf.add_n([m * weight for m, weight in zip(maps, map_weights)]) / len(maps)
            peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)
            cam = tf.clip_by_value(tf.math.divide_no_nan(cam, peak), 0.0, 1.0)
            return tf.reshape(tf.cast(probability, tf.float32), [-1]), cam

        self._compute = compute.get_concrete_function()

    def explain(self, image: np.ndarray) -> Explanation:
        """Explain one uint8 image of the model's input shape (as ``decode_image`` returns it)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.shape != self.input_shape:
            raise ValueError(
                f"expected a uint8 image of shape ({', '.join(map(str, self.input_shape))}), "
                f"got {image.dtype} {image.shape}"
            )
        return self.explain_batch(image[None])[0]

    def explain_batch(self, images: np.ndarray) -> list[Explanation]:
        """Explain uint8 images [n, size, size, channels], in order."""
        import tensorflow as tf

        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != self.input_shape:
            raise ValueError(
                f"expected uint8 images of shape (n, {', '.join(map(str, self.input_shape))}), "
                f"got {images.dtype} {images.shape}"
            )
        explanations = []
        for start in range(0, len(images), BATCH_SIZE):
            probabilities, maps = self._compute(tf.constant(images[start : start + BATCH_SIZE]))
            explanations.extend(
                Explanation(float(probability), heatmap, self.layer)
                for probability, heatmap in zip(probabilities.numpy(), maps.numpy())
            )
        return explanations


def _layer_map(features, gradients, size):
    """float32 [n, height, width] Grad-CAM map of one layer, before normalisation: the feature maps
    weighted by the mean gradient of the score over each, summed, positive part, resized to
    ``size`` (height, width); non-finite values become 0."""
    import tensorflow as tf

    gradients = tf.cast(gradients, tf.float32)
    features = tf.cast(features, tf.float32)
    weights = tf.reduce_mean(gradients, axis=[1, 2])  # one weight per channel
    cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", features, weights))
    cam = tf.image.resize(cam[..., None], size, method="bilinear")[..., 0]
    return tf.where(tf.math.is_finite(cam), cam, 0.0)


# ----------------------------------------------------------------------------- model surgery


def _all_layers(model) -> list:
    """Every layer in order, nested models replaced by their own layers (depth first)."""
    import tensorflow as tf

    found = []
    for layer in model.layers:
        found.extend(_all_layers(layer) if isinstance(layer, tf.keras.Model) else [layer])
    return found


def _find_layer(model, name: str | None):
    """The layer called name, or the last Conv2D; anything else is a ValueError that says what exists."""
    import tensorflow as tf

    layers = _all_layers(model)
    convolutions = [layer.name for layer in layers if isinstance(layer, tf.keras.layers.Conv2D)]
    if name is None:
        if not convolutions:
            raise ValueError(f"model {model.name!r} has no Conv2D layer; pass layer= a layer with 4-D output")
        name = convolutions[-1]
    matches = [layer for layer in layers if layer.name == name]
    if not matches:
        raise ValueError(
            f"model {model.name!r} has no layer {name!r}; its Conv2D layers are: {', '.join(convolutions) or 'none'}"
        )
    layer = matches[-1]
    if len(layer.output_shape) != 4:
        raise ValueError(f"layer {name!r} has output shape {layer.output_shape}; Grad-CAM needs [n, h, w, channels]")
    return layer


def _logit_head(model):
    """The model's last layer when it is a sigmoid Dense whose logit can be computed, else None."""
    import tensorflow as tf

    head = model.layers[-1]
    if (
        isinstance(head, tf.keras.layers.Dense)
        and head.activation is tf.keras.activations.sigmoid
        and len(head.input_shape) == 2
    ):
        return head
    return None


def _features_and_score(model, target, use_logit: bool = True):
    """A function float32 images -> (target's feature maps, score to differentiate, probability).

    The score is the logit when the model ends in a one-unit sigmoid Dense layer (see the module
    docstring) and use_logit is set, otherwise the probability.
    """
    import tensorflow as tf

    head = _logit_head(model) if use_logit else None
    if head is None:
        split = _split(model, target, before_head=False)

        def probability_score(images):
            features, probability = split(images)
            return features, probability, probability

        return probability_score

    split = _split(model, target, before_head=True)

    def logit_score(images):
        features, head_input = split(images)
        # The Dense layer's own arithmetic, stopped before its sigmoid: the probability is the
        # model's output, bit for bit.
        dtype = head.compute_dtype
        logit = tf.matmul(tf.cast(head_input, dtype), tf.cast(head.kernel, dtype))
        if head.use_bias:
            logit = tf.nn.bias_add(logit, tf.cast(head.bias, dtype))
        return features, logit, tf.sigmoid(logit)

    return logit_score


def _ensemble_features_and_score(model, layer: str | None):
    """(function float32 images -> (each member's feature maps, score, probability), the layer
    label, each member's map weight) for an ensemble; see the module docstring for the choices.

    The probability is the ensemble's own combining layer applied to the members' probabilities,
    so it is the model's output.
    """
    import tensorflow as tf

    members = member_models(model)
    for member in members:
        if len(member.inputs or []) != 1 or tuple(member.output_shape[1:]) != (1,):
            raise ValueError(f"ensemble member {member.name!r} must map one image input to one probability")
    targets = [_find_layer(member, layer) for member in members]
    use_logit = all(_logit_head(member) is not None for member in members)
    forwards = [_features_and_score(member, target, use_logit) for member, target in zip(members, targets)]
    combine = model.get_layer(OUTPUT_NAME)
    cells = [int(target.output_shape[1]) * int(target.output_shape[2]) for target in targets]
    map_weights = [count / cells[0] for count in cells]
    names = {target.name for target in targets}
    label = (f"{MEMBER_PREFIX}*/{targets[0].name}" if len(names) == 1
             else ",".join(f"{member.name}/{target.name}" for member, target in zip(members, targets)))

    def forward(images):
        outputs = [member_forward(images) for member_forward in forwards]
        scores = [tf.cast(score, tf.float32) for _, score, _ in outputs]
        probabilities = [probability for _, _, probability in outputs]
        score = tf.add_n(scores) / len(scores)
        probability = combine(probabilities if len(probabilities) > 1 else probabilities[0])
        return [features for features, _, _ in outputs], score, probability

    return forward, label, map_weights


def _split(model, target, before_head: bool):
    """A function images -> (target's output, the model's output or, before_head, its last layer's input).

    A layer of the model itself gives one two-output Keras model. A layer inside a nested model is
    reached by running the outer model's layers one after another, so the outer model must be
    Sequential (the usual ``Sequential([backbone, pooling, head])``); calling layers inside the
    traced function adds nothing to the caller's model, as rebuilding a Keras graph would.
    """
    import tensorflow as tf

    if target in model.layers:
        both = tf.keras.Model(model.inputs, [target.output, model.layers[-1].input if before_head else model.output])
        return lambda images: both(images, training=False)
    if not isinstance(model, tf.keras.Sequential):
        raise ValueError(
            f"layer {target.name!r} sits inside a nested model of the functional model {model.name!r}; "
            "pass layer= one of the outer model's own layers"
        )
    nested = next(layer for layer in model.layers
                  if isinstance(layer, tf.keras.Model) and target in _all_layers(layer))
    inner = _split(nested, target, before_head=False)
    layers = model.layers[:-1] if before_head else model.layers

    def run(images):
        x, features = images, None
        for layer in layers:
            if layer is nested:
                features, x = inner(x)
            else:
                x = layer(x, training=False)
        return features, x

    return run


# ----------------------------------------------------------------------------- images


@functools.lru_cache(maxsize=1)
def _lookup_table() -> np.ndarray:
    """uint8 [256, 3]: the colormap sampled at 256 levels (matplotlib imported on first use only)."""
    from matplotlib import colormaps

    return np.round(colormaps[COLORMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def _colorize(heatmap: np.ndarray) -> np.ndarray:
    """uint8 RGB [h, w, 3] of a [0, 1] heatmap."""
    levels = np.round(np.clip(np.nan_to_num(heatmap), 0.0, 1.0) * 255).astype(np.uint8)
    return _lookup_table()[levels]


def display_size(size: tuple[int, int], side: int = DISPLAY_SIDE) -> tuple[int, int]:
    """(width, height) with the aspect ratio of ``size`` and the longest side ``side`` (>= 1 px each)."""
    width, height = size
    scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _heatmap_over(heatmap: np.ndarray, original: tuple[int, int], target: tuple[int, int], resize: str) -> np.ndarray:
    """float32 [height, width] of ``target``: the square heatmap mapped back onto the original
    (width, height). ``stretch`` squeezed the whole original into the square, so the whole map
    stretches back; ``pad`` letterboxed it (centred on a square of its longest side), so only the
    part of the map over the image is kept."""
    if resize not in ("stretch", "pad"):
        raise ValueError(f"resize must be 'stretch' or 'pad', got {resize!r}")
    rows, columns = heatmap.shape
    box = (0.0, 0.0, float(columns), float(rows))
    width, height = original
    if resize == "pad" and width != height:
        longest = max(width, height)
        # decode_image pastes at integer offsets; the same offsets, in the map's units.
        left, top = (longest - width) // 2, (longest - height) // 2
        box = (left * columns / longest, top * rows / longest,
               (left + width) * columns / longest, (top + height) * rows / longest)
    layer = Image.fromarray(np.ascontiguousarray(heatmap, np.float32))  # mode "F"
    return np.asarray(layer.resize(target, Image.Resampling.BILINEAR, box=box), np.float32)


def _blend(gray: np.ndarray, heatmap: np.ndarray, alpha: float) -> np.ndarray:
    """uint8 RGB [h, w, 3]: the colour-mapped heatmap over a float grayscale image of the same size."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha!r}")
    blended = (1 - alpha) * gray[:, :, None] + alpha * _colorize(heatmap).astype(np.float32)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
