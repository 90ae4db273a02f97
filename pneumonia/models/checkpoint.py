"""The checkpoint format: a Keras model plus the facts needed to use it correctly.

A checkpoint folder holds ``model.keras`` (architecture, weights and optimizer state, so training
can resume exactly) and ``pneumonia.json``: the format version, the epoch, the full experiment
config, the preprocessing spec, the validation metrics and, for an ensemble
(:mod:`pneumonia.models.ensemble`), the member checkpoints it was combined from. Whoever loads a
checkpoint preprocesses images with the stored spec, never with a guess.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pneumonia import __version__
from pneumonia.data.labels import CLASS_NAMES
from pneumonia.data.preprocess import PreprocessSpec
from pneumonia.errors import CheckpointError
from pneumonia.runtime import require_legacy_keras
from pneumonia.storage import local_directory

FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
INFO_FILE = "pneumonia.json"


@dataclass
class CheckpointInfo:
    epoch: int  # epochs completed; training resumes at this (0-based) epoch index
    config: dict[str, Any]
    preprocess: PreprocessSpec
    metrics: dict[str, float]
    format_version: int = FORMAT_VERSION
    classes: tuple[str, ...] = CLASS_NAMES
    package_version: str = __version__
    # An ensemble's member checkpoints (paths or URIs), in member order; empty for a single model.
    # Optional in the file, so format 1 checkpoints written before ensembles still read.
    members: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        data = asdict(self)
        data["preprocess"] = asdict(self.preprocess)
        data["classes"] = list(self.classes)
        return json.dumps(data, indent=2, sort_keys=True, default=float)

    @classmethod
    def from_json(cls, text: str) -> CheckpointInfo:
        data = json.loads(text)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format version {version} is not supported (this version reads {FORMAT_VERSION})"
            )
        if tuple(data.get("classes", ())) != CLASS_NAMES:
            raise CheckpointError(f"checkpoint classes {data.get('classes')} differ from {list(CLASS_NAMES)}")
        members = data.get("members", [])
        if not isinstance(members, list) or not all(isinstance(member, str) for member in members):
            raise TypeError(f"'members' must be a list of checkpoint locations, got {members!r}")
        return cls(
            epoch=int(data["epoch"]),
            config=data["config"],
            preprocess=PreprocessSpec(**data["preprocess"]),
            metrics=data.get("metrics", {}),
            format_version=version,
            classes=tuple(data["classes"]),
            package_version=data.get("package_version", "unknown"),
            members=members,
        )


def save_checkpoint(directory: str | Path, model, info: CheckpointInfo) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # save_format explicit: tf-keras silently falls back to HDF5 after its first save in a thread.
    model.save(str(directory / MODEL_FILE), save_format="keras_v3")
    (directory / INFO_FILE).write_text(info.to_json())
    return directory


def read_info(directory: str | Path) -> CheckpointInfo:
    path = Path(directory) / INFO_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a pneumonia checkpoint (no {INFO_FILE})")
    try:
        return CheckpointInfo.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is corrupt: {error}") from None


def load_model_from_directory(directory: str | Path, compile: bool = False):
    import tensorflow as tf

    require_legacy_keras(tf)
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {MODEL_FILE}")
    try:
        return tf.keras.models.load_model(str(path), compile=compile)
    except Exception as error:  # Keras raises many types for a damaged file
        raise CheckpointError(f"cannot load {path}: {error}") from None


def load_checkpoint(location: str, compile: bool = False):
    """(model, info) from a checkpoint folder given as a path or URI."""
    with local_directory(location) as directory:
        info = read_info(directory)
        model = load_model_from_directory(directory, compile=compile)
    return model, info
