"""Ensembles as ordinary checkpoints: K trained members averaged inside one Keras model.

Averaging the probabilities of a few independently trained members is the cheapest reliable way
to generalise better to a new site (docs: validation numbers are optimistic). Rather than teach
export, serving, evaluation and Grad-CAM about "several models", :func:`combine_checkpoints`
writes ONE functional Keras model and saves it as a normal checkpoint, so everything downstream
works unchanged: ``image`` -> ``member_0`` ... ``member_{K-1}`` (the members' own models, weights
copied, nothing retrained) -> ``Average`` -> ``probability`` (float32).

Choices and why:
- Members must share the preprocessing spec exactly: the artifact decodes every request once,
  with one spec, and a member trained on other pixels would be scored on the wrong input.
- Members are renamed ``member_<i>`` (their layers keep their names; Keras only needs the outer
  layer names to be unique) and the model is called ``ensemble``: :func:`is_ensemble` and
  :func:`member_models` recognise it by that structure after a reload, with no custom objects.
- An ensemble of ensembles is refused: its mean would weight members unevenly. Combine the
  members' own checkpoints instead.
- The member sources are recorded in ``CheckpointInfo.members`` (and end up in the artifact's
  metadata), so an audit can find each member's own checkpoint and config.

Only standard layers are used, so the model reloads with ``tf.keras.models.load_model`` alone.
TensorFlow is imported inside the functions: :func:`is_ensemble` is used by serving code.
"""

from __future__ import annotations

import re
from pathlib import Path

from pneumonia.errors import CheckpointError, DataError
from pneumonia.models.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from pneumonia.storage import is_uri

ENSEMBLE_NAME = "ensemble"
MEMBER_PREFIX = "member_"
INPUT_NAME = "image"
OUTPUT_NAME = "probability"

_MEMBER = re.compile(rf"^{MEMBER_PREFIX}(\d+)$")


def combine_checkpoints(checkpoints: list[str], out_dir: str, *, metrics: dict | None = None) -> str:
    """Save the mean of the member checkpoints (paths or URIs) as one checkpoint in ``out_dir``.

    The new checkpoint's info takes the first member's config, the latest member epoch, the shared
    preprocessing spec, ``metrics`` (the ensemble's own validation metrics; pass ``val_threshold``
    there, or ``pneumonia export`` needs ``--data`` to choose a threshold) and the member sources.
    Raises CheckpointError for an empty list, an unreadable member, members whose preprocessing
    or input shape differ, or a member that is itself an ensemble. Returns ``out_dir``.
    """
    if not checkpoints:
        raise CheckpointError("an ensemble needs at least one member checkpoint; got none")
    members, infos = [], []
    for index, location in enumerate(checkpoints):
        try:
            model, info = load_checkpoint(str(location))
        except (CheckpointError, DataError) as error:
            raise CheckpointError(f"member {index} ({location}) cannot be read: {error}") from None
        members.append(model)
        infos.append(info)
    spec = infos[0].preprocess
    for index, (location, model, info) in enumerate(zip(checkpoints, members, infos)):
        if info.preprocess != spec:
            raise CheckpointError(
                f"member {index} ({location}) preprocesses images as {info.preprocess}, "
                f"but member 0 ({checkpoints[0]}) as {spec}; an ensemble's members must share one spec"
            )
        if tuple(model.input_shape[1:]) != spec.shape:
            raise CheckpointError(
                f"member {index} ({location}) takes input {tuple(model.input_shape[1:])}, "
                f"but the shared preprocessing makes {spec.shape}"
            )
        if tuple(model.output_shape[1:]) != (1,):
            raise CheckpointError(
                f"member {index} ({location}) returns {model.output_shape[1:]}, not one probability"
            )
        if is_ensemble(model):
            raise CheckpointError(
                f"member {index} ({location}) is itself an ensemble; combine its members' checkpoints instead"
            )
    ensemble = build_ensemble(members, spec.shape)
    info = CheckpointInfo(
        epoch=max(info.epoch for info in infos),
        config=infos[0].config,
        preprocess=spec,
        metrics=dict(metrics or {}),
        members=[_source(location) for location in checkpoints],
    )
    save_checkpoint(out_dir, ensemble, info)
    return str(out_dir)


def build_ensemble(members: list, input_shape: tuple[int, int, int]):
    """The functional ``ensemble`` model over Keras models that each map images to [n, 1].

    The members' layers (and so their weights) are used as they are, not copied: pass freshly
    loaded models, as :func:`combine_checkpoints` does.
    """
    import tensorflow as tf

    if not members:
        raise ValueError("an ensemble needs at least one member")
    image = tf.keras.Input(shape=input_shape, name=INPUT_NAME)
    # A functional wrapper renames each member without touching the loaded model, and turns a
    # Sequential member into a functional one (its layers' outputs are then reachable for Grad-CAM).
    outputs = [
        tf.keras.Model(member.inputs, member.outputs, name=f"{MEMBER_PREFIX}{index}")(image)
        for index, member in enumerate(members)
    ]
    if len(outputs) == 1:
        probability = tf.keras.layers.Identity(name=OUTPUT_NAME, dtype="float32")(outputs[0])
    else:
        probability = tf.keras.layers.Average(name=OUTPUT_NAME, dtype="float32")(outputs)
    return tf.keras.Model(image, probability, name=ENSEMBLE_NAME)


def is_ensemble(model) -> bool:
    """Whether model is an ensemble that :func:`build_ensemble` made (also after a save and reload)."""
    return getattr(model, "name", None) == ENSEMBLE_NAME and bool(member_models(model))


def member_models(model) -> list:
    """The member models of an ensemble, in member order (empty for any other model)."""
    import tensorflow as tf

    found = [
        (int(match.group(1)), layer)
        for layer in getattr(model, "layers", [])
        if isinstance(layer, tf.keras.Model) and (match := _MEMBER.match(layer.name))
    ]
    return [layer for _, layer in sorted(found, key=lambda pair: pair[0])]


def _source(location: str) -> str:
    """A member's location as recorded: URIs as given, local paths absolute."""
    location = str(location)
    return location if is_uri(location) else str(Path(location).resolve())
