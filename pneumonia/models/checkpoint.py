"""The checkpoint format: a Keras model plus the facts needed to use it correctly.

A checkpoint folder holds ``model.keras`` (architecture, weights and optimizer state, so training
can resume exactly) and ``pneumonia.json``: the format version, the epoch, the full experiment
config, the preprocessing spec, the validation metrics, the sha256 of ``model.keras`` and, for an
ensemble (:mod:`pneumonia.models.ensemble`), the member checkpoints it was combined from. Whoever
loads a checkpoint preprocesses images with the stored spec, never with a guess.

Loading is safe by construction (docs/security-data.md): ``model.keras`` is checked against the
sha256 its ``pneumonia.json`` records before anything reads it, then loaded by
:func:`pneumonia.models.safe_load.load_keras_model` (a zip-format Keras file with Keras's own layers
only, in safe mode). A checkpoint written before the sums were recorded still loads, with an
:class:`UnverifiedCheckpointWarning` that says so: refusing it would strand every earlier run,
and the safe-mode checks still apply to it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pneumonia import __version__
from pneumonia.data.labels import CLASS_NAMES
from pneumonia.data.preprocess import PreprocessSpec
from pneumonia.errors import CheckpointError
from pneumonia.models.safe_load import load_keras_model
from pneumonia.runtime import require_legacy_keras
from pneumonia.storage import check_listed_files, local_directory, sha256_of

FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
INFO_FILE = "pneumonia.json"


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint records no sha256 of its model file (written before they were recorded)."""


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
    # sha256 of the model file(s) by name, recorded by save_checkpoint and checked before loading;
    # empty in checkpoints written before they were recorded (those load with a warning).
    files: dict[str, str] = field(default_factory=dict)

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
        files = data.get("files", {})
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise TypeError("'files' must map file names to sha256 hex digests")
        return cls(
            epoch=int(data["epoch"]),
            config=data["config"],
            preprocess=PreprocessSpec(**data["preprocess"]),
            metrics=data.get("metrics", {}),
            format_version=version,
            classes=tuple(data["classes"]),
            package_version=data.get("package_version", "unknown"),
            members=members,
            files=files,
        )


def save_checkpoint(directory: str | Path, model, info: CheckpointInfo) -> Path:
    """Write ``model.keras`` and ``pneumonia.json`` (``info`` with the model file's sha256)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # save_format explicit: tf-keras silently falls back to HDF5 after its first save in a thread.
    model.save(str(directory / MODEL_FILE), save_format="keras_v3")
    info = replace(info, files={MODEL_FILE: sha256_of(directory / MODEL_FILE)})
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


def load_model_from_directory(directory: str | Path, compile: bool = False, sha256: str | None = None):
    """The ``model.keras`` of a checkpoint or artifact folder, verified, then loaded in safe mode.

    ``sha256`` is the digest to expect (an artifact's ``metadata.json`` records it); without it a
    checkpoint's ``pneumonia.json`` says what to expect. A folder that records none loads with an
    :class:`UnverifiedCheckpointWarning`; a file that does not match is a CheckpointError.
    """
    import tensorflow as tf

    require_legacy_keras(tf)
    directory = Path(directory)
    path = directory / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {MODEL_FILE}")
    if sha256 is None and (directory / INFO_FILE).is_file():
        verify_checkpoint_files(directory, read_info(directory))
    elif sha256 is None:
        _unverified(directory, f"nothing records the sha256 of its {MODEL_FILE}")
    elif sha256_of(path) != sha256:
        raise CheckpointError(f"{directory} is corrupt: {MODEL_FILE} does not match its recorded sha256")
    return load_keras_model(path, compile=compile)


def verify_checkpoint_files(directory: str | Path, info: CheckpointInfo) -> None:
    """Every file ``info`` records matches its sha256 (a CheckpointError if not); a checkpoint
    that records none gets an :class:`UnverifiedCheckpointWarning`."""
    directory = Path(directory)
    if MODEL_FILE not in info.files:
        _unverified(directory, f"its {INFO_FILE} records no sha256 of {MODEL_FILE} (written before they were)")
        return
    check_listed_files(directory, info.files, directory / INFO_FILE, CheckpointError, "the checkpoint")


def _unverified(directory: Path, reason: str) -> None:
    warnings.warn(f"{directory}: {reason}; loading it unverified", UnverifiedCheckpointWarning, stacklevel=3)


def load_checkpoint(location: str, compile: bool = False):
    """(model, info) from a checkpoint folder given as a path or URI."""
    with local_directory(location) as directory:
        info = read_info(directory)
        model = load_model_from_directory(directory, compile=compile)
    return model, info
