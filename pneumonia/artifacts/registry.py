"""The serving-artifact registry: versioned, self-describing, verifiable exports of a checkpoint.

A training checkpoint is made for resuming (optimizer state, experiment config); a serving process
needs something else: a model that loads in a fraction of a second without Keras code, the exact
preprocessing, the decision threshold, and proof that the files are the ones that were exported.
An artifact is one folder ``<registry>/<name>/<version>/`` holding:

- ``saved_model/``: a TensorFlow SavedModel whose ``serving_default`` signature takes uint8
  ``image`` [None, size, size, channels] and returns float32 ``probability`` [None]. It holds only
  the traced inference graph and the variables, so ``tf.saved_model.load`` needs no Keras layers
  and a batch of one runs in milliseconds.
- ``model.keras``: the checkpoint's Keras model, kept because Grad-CAM explanations need layers.
- ``metadata.json``: where it came from (git commit, checkpoint, data fingerprint, configs), how
  to use it (input spec, threshold) and the sha256 of every other file, checked on every load.
  An artifact holds its own files only: a symbolic link anywhere in the version folder, a listed
  path that leaves it, or a file in ``saved_model/`` that is not listed is refused; so is a
  version reached through a registry or name folder that resolves outside the folder given
  (a name folder or version linked elsewhere). Before TensorFlow reads the SavedModel its graph is
  checked for file, network and Python ops, and ``model.keras`` loads in safe mode only
  (:mod:`pneumonia.models.safe_load`; docs/security-data.md).
  ``training_data`` says what the model learned from (``{"synthetic": true|false|null, "roots":
  [...], "dataset": the dataset's marker}``, see :mod:`pneumonia.artifacts.export`): a model trained on
  the synthetic stand-in (:mod:`pneumonia.data.synth`) reads real X-rays wrongly, so
  :func:`artifact_warning` gives the warning that the service puts in every answer of one.
  An ensemble (:mod:`pneumonia.models.ensemble`) adds ``ensemble``: ``{"members": K, "sources": [member
  checkpoints]}``; a single model has no such key. The ensemble is one model in both files, so
  loading and serving it is no different.

Versions count up per name (v0001, v0002, ...) and ``<name>/LATEST`` names the newest. Writing a
version is :mod:`pneumonia.artifacts.publish`'s job (staged, then renamed into place in one step, so readers
never see a half-written version); this module finds, verifies and loads them.

This module must stay importable by a serving process: no Ray, and TensorFlow only inside the
functions that need it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia.data.labels import CLASS_NAMES
from pneumonia.data.preprocess import PreprocessSpec
from pneumonia.errors import CheckpointError, PneumoniaError
from pneumonia.metrics.drift import check_reference
from pneumonia.models.checkpoint import MODEL_FILE, load_model_from_directory
from pneumonia.models.ood import SCORE_NAME
from pneumonia.models.safe_load import check_saved_model
from pneumonia.storage import check_listed_files, is_uri

FORMAT_VERSION = 1
DEFAULT_NAME = "pneumonia-cnn"
METADATA_FILE = "metadata.json"
LATEST_FILE = "LATEST"
SAVED_MODEL_DIR = "saved_model"
SIGNATURE = "serving_default"
INPUT_NAME = "image"
OUTPUT_NAME = "probability"
REQUIRED_FILES = (MODEL_FILE, f"{SAVED_MODEL_DIR}/saved_model.pb")
SYNTHETIC_WARNING = "trained on synthetic data: not for real X-rays"
SYNTHETIC_REFUSAL = ("this model was trained on synthetic data and refuses real X-rays; train one on real X-rays "
                     "with `pneumonia demo --data DIR` (README, \"On real X-rays\")")
"""What every refusal by the out-of-distribution guard of a synthetic-trained artifact adds: why
a real X-ray was refused, and the way to a model that answers it (:func:`refusal_hint`)."""

VERSION_PATTERN = re.compile(r"^v(\d{4,})$")  # version folders: v0001, v0002, ...
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # model names (a folder name)
SITE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")  # a calibrated version's site name


class ArtifactError(CheckpointError):
    """A serving artifact is missing, corrupt or incompatible with this version."""


@dataclass
class Artifact:
    """One version in a registry, as found on disk (``load_artifact`` is what verifies it)."""

    path: Path  # the version folder
    version: str  # "v0001", "v0002", ...
    metadata: dict  # the parsed metadata.json


# ----------------------------------------------------------------------------- find


def list_versions(registry: str | Path, name: str = DEFAULT_NAME) -> list[Artifact]:
    """Every version of name, oldest first (metadata parsed, files not verified; unreadable
    metadata is an ArtifactError rather than a silently shorter list)."""
    root = Path(registry).expanduser()
    if not root.is_dir():
        raise ArtifactError(f"registry not found: {registry}")
    name_dir = root / name
    if not name_dir.is_dir():
        return []
    found = sorted((int(match.group(1)), match.group(0))
                   for match in map(VERSION_PATTERN.match, os.listdir(name_dir))
                   if match and (name_dir / match.group(0)).is_dir())
    return [Artifact(name_dir / version, version, _read_metadata(name_dir / version)) for _, version in found]


def resolve_artifact(location: str | Path) -> Path:
    """The version folder meant by location.

    Accepts a version folder (it has metadata.json), a ``<registry>/<name>`` folder (its LATEST),
    a registry root holding exactly one name (that name's LATEST) and ``<...>/latest`` in any case
    (the LATEST of the folder it sits in). A version found through LATEST must resolve inside the
    folder given: a name folder or version that is a link to elsewhere is an ArtifactError.
    """
    if is_uri(str(location)):
        raise ArtifactError(f"artifacts are loaded from a local folder, not {location}")
    path = Path(location).expanduser()
    if path.name.lower() == LATEST_FILE.lower():
        parent = path.parent
        if (parent / METADATA_FILE).is_file():
            raise ArtifactError(f"{location}: a version folder has no LATEST; pass the folder itself")
        return _inside(_resolve_folder(parent), parent)
    if (path / METADATA_FILE).is_file():
        return path
    return _inside(_resolve_folder(path), path)


def _inside(version: Path, start: Path) -> Path:
    """``version`` when it resolves inside ``start`` (the folder the caller named): a name folder
    or version that is a link to somewhere else is refused."""
    try:
        version.resolve().relative_to(start.resolve())
    except ValueError:
        raise ArtifactError(f"{version} resolves outside {start} (a symbolic link?); refused") from None
    return version


def _resolve_folder(path: Path) -> Path:
    """A name folder's LATEST, or the only name folder's LATEST in a registry root."""
    if not path.is_dir():
        raise ArtifactError(f"artifact not found: {path}")
    if (path / LATEST_FILE).is_file():
        return _read_latest(path)
    names = sorted(child.name for child in path.iterdir() if _is_name_folder(child))
    if len(names) == 1:
        return _read_latest(path / names[0])
    if names:
        raise ArtifactError(f"{path} holds several models ({', '.join(names)}); pass one of them")
    versions = sorted(child.name for child in path.iterdir() if VERSION_PATTERN.match(child.name))
    if versions:
        raise ArtifactError(f"{path} has versions ({', '.join(versions)}) but no {LATEST_FILE}; pass a version folder")
    contents = sorted(child.name for child in path.iterdir()) or ["nothing"]
    raise ArtifactError(
        f"{path} is not an artifact, a model folder with {LATEST_FILE} or a registry; found: {', '.join(contents)}"
    )


def _is_name_folder(path: Path) -> bool:
    return path.is_dir() and ((path / LATEST_FILE).is_file() or any(VERSION_PATTERN.match(c.name) for c in path.iterdir()))


def _read_latest(name_dir: Path) -> Path:
    version = (name_dir / LATEST_FILE).read_text().strip()
    if not VERSION_PATTERN.match(version):
        raise ArtifactError(f"{name_dir / LATEST_FILE} does not name a version: {version!r}")
    if not (name_dir / version / METADATA_FILE).is_file():
        raise ArtifactError(f"{name_dir / LATEST_FILE} names {version}, which is missing or has no {METADATA_FILE}")
    return name_dir / version


# ----------------------------------------------------------------------------- load


@dataclass
class VerifiedArtifact:
    """An artifact whose metadata this code can use and whose files match their sha256; made by
    :func:`verify_artifact` (no TensorFlow)."""

    path: Path  # the version folder
    metadata: dict
    preprocess: PreprocessSpec
    threshold: float

    @property
    def version(self) -> str:
        return self.metadata["version"]

    @property
    def name(self) -> str:
        return self.metadata["name"]


@dataclass
class LoadedArtifact(VerifiedArtifact):
    """A verified artifact, ready to score uint8 images; made by :func:`load_artifact`."""

    _signature: Any = field(repr=False)
    _saved_model: Any = field(repr=False)  # the signature's variables live as long as this object
    _keras: Any = field(default=None, repr=False)
    _keras_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Probabilities of PNEUMONIA (float32, shape [n]) for uint8 images [n, size, size, channels]."""
        return self.predict_scored(images, batch_size)[0]

    def _checked(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != self.preprocess.shape:
            raise ValueError(
                f"expected uint8 images of shape (n, {', '.join(map(str, self.preprocess.shape))}), "
                f"got {images.dtype} {images.shape}"
            )
        return images

    @property
    def ood(self) -> dict | None:
        """The out-of-distribution guard's metadata (threshold, policy, ...), None without one."""
        guard = self.metadata.get("out_of_distribution")
        return guard if isinstance(guard, dict) and SCORE_NAME in self._signature.structured_outputs else None

    def predict_scored(self, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities [n], out-of-distribution scores [n] or None without a guard), one forward pass."""
        import tensorflow as tf

        images = self._checked(images)
        probabilities, scores = [], []
        for start in range(0, len(images), batch_size):
            outputs = self._signature(**{INPUT_NAME: tf.constant(images[start : start + batch_size])})
            probabilities.append(outputs[OUTPUT_NAME].numpy())
            if SCORE_NAME in outputs:
                scores.append(outputs[SCORE_NAME].numpy())
        empty = np.zeros(0, np.float32)
        return (np.concatenate(probabilities).astype(np.float32) if probabilities else empty,
                (np.concatenate(scores).astype(np.float32) if scores else empty) if self.ood else None)

    def keras_model(self):
        """The Keras model (uncompiled), loaded on first use: Grad-CAM needs its layers."""
        with self._keras_lock:
            if self._keras is None:
                try:  # verified again now: it loads on first use, maybe long after load_artifact
                    self._keras = load_model_from_directory(self.path, compile=False,
                                                            sha256=self.metadata["files"][MODEL_FILE])
                except CheckpointError as error:
                    raise ArtifactError(str(error)) from None
            return self._keras


def verify_artifact(location: str | Path) -> VerifiedArtifact:
    """Resolve an artifact and check it without TensorFlow: format, classes, metadata, and every
    file against its sha256. A serving command calls it before starting Ray, so a corrupt
    artifact fails in a second with its reason, not after replicas gave up on it."""
    path = resolve_artifact(location)
    metadata = _read_metadata(path)
    spec, threshold = _check_metadata(metadata, path)
    verify_files(path, metadata["files"])
    return VerifiedArtifact(path, metadata, spec, threshold)


def load_artifact(location: str | Path) -> LoadedArtifact:
    """Resolve, verify (format, classes, every file's sha256, signature) and load an artifact."""
    verified = verify_artifact(location)
    saved_model, signature = _load_signature(verified.path, verified.preprocess)
    return LoadedArtifact(**vars(verified), _signature=signature, _saved_model=saved_model)


def artifact_warning(metadata: dict) -> str | None:
    """The warning that every answer served from this artifact must carry, or None: a model
    trained on synthetic images calls real X-rays wrongly (seen: real NORMAL X-rays called
    PNEUMONIA with high confidence), and its numbers look as confident as a real model's."""
    training = metadata.get("training_data")
    if isinstance(training, dict) and training.get("synthetic") is True:
        return SYNTHETIC_WARNING
    return None


def refusal_hint(metadata: dict) -> str | None:
    """What a refusal ("not a chest X-ray") from this artifact must add, or None: a guard fitted
    on synthetic images refuses every real X-ray, and the refusal alone does not say why."""
    return SYNTHETIC_REFUSAL if artifact_warning(metadata) else None


def check_site_name(name: str) -> str:
    """``name`` when it can name a site in metadata, answers and metric labels, else a CheckpointError."""
    if not SITE_PATTERN.match(name):
        raise PneumoniaError(f"site name {name!r} must be 1-64 letters, digits, spaces, '.', '_' or '-', "
                              "starting with a letter or digit")
    return name


def calibration_of(metadata: dict) -> dict:
    """What every answer says of the threshold it applies: ``{"site": NAME, "images": N}`` for a
    version calibrated on a site's sample (pneumonia calibrate), else ``{"site": None}``: the
    shipped threshold, chosen on our validation split with a safety margin."""
    site = metadata.get("site")
    if isinstance(site, dict) and site.get("name"):
        images = site.get("images")
        return {"site": site["name"], "images": sum(images.values()) if isinstance(images, dict) else None}
    return {"site": None}


def read_metadata(location: str | Path) -> dict:
    """An artifact's checked metadata without loading TensorFlow (for a serving gateway)."""
    path = resolve_artifact(location)
    metadata = _read_metadata(path)
    _check_metadata(metadata, path)
    return metadata


def _read_metadata(folder: Path) -> dict:
    path = folder / METADATA_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder} is not an artifact (no {METADATA_FILE})")
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ArtifactError(f"{path} is corrupt: {error}") from None
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{path} is corrupt: not a JSON object")
    return metadata


def _check_metadata(metadata: dict, folder: Path) -> tuple[PreprocessSpec, float]:
    """The preprocessing spec and threshold, after checking that this code can use the artifact."""
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{folder}: artifact format version {version} is not supported (this version reads {FORMAT_VERSION})"
        )
    if metadata.get("classes") != list(CLASS_NAMES):
        raise ArtifactError(f"{folder}: artifact classes {metadata.get('classes')} differ from {list(CLASS_NAMES)}")
    missing = [key for key in ("name", "version", "input", "threshold", "files") if key not in metadata]
    if missing:
        raise ArtifactError(f"{folder / METADATA_FILE} lacks {', '.join(missing)}")
    try:
        facts = metadata["input"]
        if facts["dtype"] != "uint8":
            raise ValueError(f"input dtype {facts['dtype']!r} is not uint8")
        spec = PreprocessSpec(int(facts["image_size"]), int(facts["channels"]), facts["resize"],
                              facts.get("normalize", "none"))
        threshold = float(metadata["threshold"])
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold {threshold} is not a probability")
        if metadata.get("drift_reference") is not None:  # what serving, scoring and evaluation measure drift against
            check_reference(metadata["drift_reference"])
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{folder / METADATA_FILE} is invalid: {error}") from None
    return spec, threshold


def verify_files(folder: Path, files: Any) -> None:
    """Every listed file exists inside folder with its recorded sha256 (the model files must be
    listed); no symbolic link anywhere in folder; every file TensorFlow reads (``saved_model/``) listed."""
    if not isinstance(files, dict) or not all(isinstance(value, str) for value in files.values()):
        raise ArtifactError(f"{folder / METADATA_FILE} is invalid: 'files' is not a mapping of sha256 digests")
    unlisted = [required for required in REQUIRED_FILES if required not in files]
    if unlisted:
        raise ArtifactError(f"{folder / METADATA_FILE} does not list {', '.join(unlisted)}")
    links = _links(folder)
    if links:
        raise ArtifactError(f"{folder} holds symbolic links ({', '.join(links[:5])}); an artifact holds its own "
                            "files only")
    check_listed_files(folder, files, folder / METADATA_FILE, ArtifactError, "the artifact")
    extra = sorted(path.relative_to(folder).as_posix() for path in (folder / SAVED_MODEL_DIR).rglob("*")
                   if path.is_file() and path.relative_to(folder).as_posix() not in files)
    if extra:
        raise ArtifactError(f"{folder} is not as exported: {', '.join(extra[:5])} not listed in {METADATA_FILE}")


def _links(folder: Path) -> list[str]:
    """Paths (relative to folder) of the symbolic links in it, the folder itself not counted."""
    found = []
    for root, directories, names in os.walk(folder):  # does not follow links to folders
        for name in [*directories, *names]:
            if os.path.islink(os.path.join(root, name)):
                found.append(Path(root, name).relative_to(folder).as_posix())
    return sorted(found)


def _load_signature(folder: Path, spec: PreprocessSpec):
    """(loaded SavedModel, its serving signature), checked against the metadata's input spec."""
    import tensorflow as tf

    directory = folder / SAVED_MODEL_DIR
    try:
        check_saved_model(directory)  # its graph holds no file, network or Python op
    except CheckpointError as error:
        raise ArtifactError(str(error)) from None
    try:
        saved_model = tf.saved_model.load(str(directory))
    except Exception as error:  # TensorFlow raises several types for a damaged SavedModel
        raise ArtifactError(f"cannot load {directory}: {error}") from None
    signature = saved_model.signatures.get(SIGNATURE)
    if signature is None:
        raise ArtifactError(f"{directory} has no {SIGNATURE!r} signature")
    image = signature.structured_input_signature[1].get(INPUT_NAME)
    expected = [None, *spec.shape]
    if image is None or image.dtype != tf.uint8 or image.shape.as_list() != expected:
        raise ArtifactError(
            f"{directory}: the signature takes {image}, but {METADATA_FILE} says uint8 {expected}"
        )
    if OUTPUT_NAME not in signature.structured_outputs:
        raise ArtifactError(f"{directory}: the signature has no {OUTPUT_NAME!r} output")
    return saved_model, signature

