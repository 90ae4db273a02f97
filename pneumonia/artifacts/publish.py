"""Writing a new version into the serving-artifact registry (:mod:`pneumonia.artifacts.registry` finds,
verifies and loads them).

A version is written in a hidden staging folder next to the others and renamed into place in one
step, so readers never see a half-written version; ``LATEST`` is replaced atomically after that.
Two exports at once each get their own number. The SavedModel holds only the traced inference
graph (and the out-of-distribution score when a guard is given), so serving needs no Keras code.

TensorFlow is imported only inside the functions that trace and load models.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import shutil
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pneumonia
from pneumonia.artifacts.registry import (
    DEFAULT_NAME,
    FORMAT_VERSION,
    INPUT_NAME,
    LATEST_FILE,
    METADATA_FILE,
    NAME_PATTERN,
    OUTPUT_NAME,
    SAVED_MODEL_DIR,
    SIGNATURE,
    VERSION_PATTERN,
    Artifact,
    ArtifactError,
    VerifiedArtifact,
    verify_files,
)
from pneumonia.data.labels import CLASS_NAMES
from pneumonia.data.preprocess import PreprocessSpec
from pneumonia.errors import CheckpointError, DataError
from pneumonia.models.checkpoint import MODEL_FILE, load_model_from_directory, read_info
from pneumonia.models.ensemble import is_ensemble, member_models
from pneumonia.models.ood import SCORE_NAME, model_with_features, tf_scores
from pneumonia.storage import is_uri, json_ready, local_directory, sha256_of, write_atomic

if TYPE_CHECKING:
    from pneumonia.data.records import ImageRecord

GIT_TIMEOUT_S = 5


def export_artifact(
    checkpoint: str,
    registry: str | Path,
    *,
    threshold: float,
    target_recall: float,
    validation_metrics: dict,
    training_config: dict,
    tuning_config: dict | None = None,
    data_fingerprint: str | None = None,
    training_data: dict | None = None,
    guard: Any = None,
    ood_policy: str = "reject",
    drift_reference: dict | None = None,
    tracking: dict | None = None,
    name: str = DEFAULT_NAME,
) -> Artifact:
    """Export a training checkpoint (path or URI) as the next version of ``name`` in a local registry.

    ``threshold`` is the probability above which an image is called PNEUMONIA, chosen on
    validation data to reach ``target_recall``; both are stored so serving and audits agree.
    ``training_data`` (what the model learned from, ``{"synthetic": ...}``) is stored as it is;
    None records that nobody said (``{"synthetic": null}``).
    ``drift_reference`` (:func:`pneumonia.metrics.drift.reference_distribution` of the validation
    probabilities) is what the service measures drift against; None records that there is none.
    ``tracking`` (:mod:`pneumonia.artifacts.tracking`: the MLflow store and the training and export
    runs) links the version to the runs that made it; None when nothing was tracked.
    ``guard`` (a :class:`pneumonia.models.ood.Guard`) is baked into the signature as a second output,
    ``ood_score``, and recorded with ``ood_policy`` under ``out_of_distribution``.
    Raises ValueError for impossible settings and ArtifactError for a checkpoint that cannot be
    read; either way no version appears.
    """
    _check_settings(threshold, target_recall, name)
    if is_uri(str(registry)):
        raise ArtifactError(f"the registry must be a local folder, not {registry}")
    # Cleaned and serialised before the slow part, so a bad config fails in the first second.
    facts = json_ready({
        "name": name,
        "package_version": pneumonia.__version__,
        "format_version": FORMAT_VERSION,
        "classes": list(CLASS_NAMES),
        "threshold": float(threshold),
        "target_recall": float(target_recall),
        "validation_metrics": validation_metrics,
        "training_config": training_config,
        "tuning_config": tuning_config,
        "data_fingerprint": data_fingerprint,
        "training_data": training_data if training_data is not None else {"synthetic": None},
        "out_of_distribution": guard.metadata(ood_policy) if guard is not None else None,
        "drift_reference": drift_reference,
        "tracking": tracking,
        "source_checkpoint": str(checkpoint) if is_uri(str(checkpoint)) else str(Path(checkpoint).resolve()),
    }, strict=True)
    name_dir = Path(registry).expanduser().resolve() / name
    name_dir.mkdir(parents=True, exist_ok=True)

    def fill(staging: Path) -> dict:
        staging.mkdir()
        spec, ensemble = _stage(str(checkpoint), staging, guard)
        return {
            **facts,
            **({"ensemble": json_ready(ensemble, strict=True)} if ensemble else {}),
            "input": {"image_size": spec.image_size, "channels": spec.channels,
                      "resize": spec.resize, "normalize": spec.normalize, "dtype": "uint8"},
            "files": _hash_files(staging),
        }

    return _publish_staged(name_dir, fill)


def publish_calibrated(source: VerifiedArtifact, *, threshold: float, target_recall: float, site: dict,
                       drift_reference: dict | None) -> Artifact:
    """Publish ``source``'s model as the next version of its name with a site's ``threshold``.

    The model files are copied byte for byte and checked against the source's sha256 before the
    version appears, so the calibrated version serves exactly the exported model; ``metadata.json``
    is the source's with the new threshold, the ``site`` block (:mod:`pneumonia.evaluation.calibrate`),
    the site's score distribution as the drift reference, and ``calibrated_from`` (the source's
    version and threshold), so that a calibration can be traced and undone by rolling back.
    """
    _check_settings(threshold, target_recall, source.name)
    facts = json_ready({
        "threshold": float(threshold),
        "target_recall": float(target_recall),
        "site": site,
        "drift_reference": drift_reference,
        "calibrated_from": {"version": source.version, "threshold": source.threshold,
                            **({"site": source.metadata["site"].get("name")} if source.metadata.get("site") else {})},
        "package_version": pneumonia.__version__,
    }, strict=True)
    def fill(staging: Path) -> dict:
        shutil.copytree(source.path, staging, ignore=shutil.ignore_patterns(METADATA_FILE))
        verify_files(staging, source.metadata["files"])
        return {**source.metadata, **facts}

    return _publish_staged(source.path.parent, fill)


def _publish_staged(name_dir: Path, fill) -> Artifact:
    """The next version of ``name_dir``: ``fill(staging)`` creates the hidden staging folder, puts
    the files in and returns the metadata; creation time and git commit are added, the folder is
    renamed into place and LATEST moved to it. Nothing is left behind when anything fails."""
    # Not tempfile.mkdtemp: its folder is private (0700) and a serving user could not read it.
    staging = name_dir / f".staging-{uuid.uuid4().hex}"
    try:
        metadata = {**fill(staging), "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "git_commit": git_commit()}
        version_dir = _publish(staging, name_dir, metadata)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_atomic(name_dir / LATEST_FILE, metadata["version"] + "\n")
    return Artifact(version_dir, metadata["version"], metadata)


def _check_settings(threshold: float, target_recall: float, name: str) -> None:
    if not isinstance(threshold, numbers.Real) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a probability between 0 and 1, got {threshold!r}")
    if not isinstance(target_recall, numbers.Real) or not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall!r}")
    if not NAME_PATTERN.match(name):
        raise ValueError(f"artifact name {name!r} must be letters, digits, '.', '_' or '-'")


def _stage(checkpoint: str, staging: Path, guard: Any = None) -> tuple[PreprocessSpec, dict | None]:
    """Fill the staging folder with the SavedModel and model.keras; the checkpoint's spec and,
    for an ensemble, its members' count and sources (None for a single model)."""
    try:
        with local_directory(checkpoint) as folder:
            info = read_info(folder)
            model = load_model_from_directory(folder)
            shutil.copy2(folder / MODEL_FILE, staging / MODEL_FILE)
    except (CheckpointError, DataError) as error:
        raise ArtifactError(f"cannot export {checkpoint}: {error}") from None
    spec = info.preprocess
    if tuple(model.input_shape[1:]) != spec.shape:
        raise ArtifactError(
            f"{checkpoint}: the model takes {model.input_shape[1:]} but its preprocessing makes {spec.shape}"
        )
    _save_serving_model(model, spec, staging / SAVED_MODEL_DIR, guard)
    if not is_ensemble(model):
        return spec, None
    return spec, {"members": len(member_models(model)), "sources": list(info.members)}


def _save_serving_model(model, spec: PreprocessSpec, directory: Path, guard: Any = None) -> None:
    """Trace inference (training=False: batch-norm statistics, no dropout) into a SavedModel.

    Only the variables are tracked, not the Keras model, so the SavedModel has no Keras layer
    metadata: saving is quicker and loading needs no Keras code. With a guard the one forward
    pass also yields the features, and the signature adds their ``ood_score``.
    """
    import tensorflow as tf

    module = tf.Module()
    module.model_variables = list(model.variables)
    forward = model
    if guard is not None:
        forward = model_with_features(model)  # (probability, features) from one pass
        module.ood_arrays = {name: tf.Variable(array, trainable=False, name=f"ood_{name}")
                             for name, array in guard.serving_arrays().items()}

    @tf.function(input_signature=[tf.TensorSpec([None, *spec.shape], tf.uint8, name=INPUT_NAME)])
    def serve(image):
        outputs = forward(tf.cast(image, tf.float32), training=False)
        probability = outputs[0] if guard is not None else outputs
        answer = {OUTPUT_NAME: tf.reshape(tf.cast(probability, tf.float32), [-1])}
        if guard is not None:
            answer[SCORE_NAME] = tf_scores(outputs[1], **module.ood_arrays)
        return answer

    tf.saved_model.save(module, str(directory), signatures={SIGNATURE: serve})


def _hash_files(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder except the top-level metadata.json."""
    return {
        path.relative_to(folder).as_posix(): sha256_of(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() != METADATA_FILE
    }


def _publish(staging: Path, name_dir: Path, metadata: dict) -> Path:
    """Rename the staged folder to the next free version; a concurrent export that took the number
    first makes us take the one after (a rename onto a non-empty folder fails)."""
    while True:
        version = _next_version(name_dir)
        metadata["version"] = version
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True, allow_nan=False))
        target = name_dir / version
        try:
            staging.rename(target)
            return target
        except OSError:
            if not target.exists():
                raise


def _next_version(name_dir: Path) -> str:
    numbers = [int(match.group(1)) for match in map(VERSION_PATTERN.match, os.listdir(name_dir)) if match]
    return f"v{max(numbers, default=0) + 1:04d}"


def git_commit() -> str:
    """HEAD of the git checkout this package's code is tracked in; "unknown" for an installed copy
    (which may sit inside some other repository) or when git is missing or slow."""
    package_dir = Path(pneumonia.__file__).resolve().parent
    try:
        for command in (["ls-files", "--error-unmatch", "__init__.py"], ["rev-parse", "HEAD"]):
            result = subprocess.run(["git", "-C", str(package_dir), *command], capture_output=True,
                                    text=True, timeout=GIT_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


# ----------------------------------------------------------------------------- data fingerprint


def data_fingerprint(records: list[ImageRecord]) -> str:
    """A short id of the data a model saw: "sha256:" over sorted (relative path, label, size).

    Paths are relative to the records' common folder, so the same files copied elsewhere give the
    same fingerprint, while an added, removed, relabelled or resized file changes it. Sizes come
    from a stat of local files (URIs have none): cheap on thousands of images, but an edit that
    keeps a file's size is not seen.
    """
    if not records:
        raise ValueError("cannot fingerprint an empty list of records")
    parts = [record.location.split("/") for record in records]
    root = len(os.path.commonprefix([part[:-1] for part in parts]))
    rows = sorted(
        ("/".join(part[root:]), int(record.label), _local_size(record.location))
        for part, record in zip(parts, records)
    )
    return "sha256:" + hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _local_size(location: str) -> int | None:
    if is_uri(location):
        return None
    try:
        return os.path.getsize(location)
    except OSError as error:
        raise DataError(f"cannot fingerprint {location}: {error}") from None
