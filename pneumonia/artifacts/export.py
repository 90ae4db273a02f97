"""Turn a training checkpoint into a versioned serving artifact with its decision threshold.

The threshold is the validation split's answer to the clinical question (highest precision at
recall >= target). With ``--data`` it is chosen on the same patient-grouped validation split
that training carved (same seed and fraction, from the checkpoint's config) by the config's
``objective.threshold_rule``: by default with a margin, so that the lower end of the patient-
bootstrap interval of recall reaches the target (metrics.safe_operating_point). How it was
chosen, and the precision and recall to expect with their intervals, go into the artifact's
metadata as ``validation_metrics.operating_point``. Without ``--data``, the threshold the
checkpoint recorded at its epoch (validation recall >= target, no margin) is used.

What the model learned from goes into the metadata as ``training_data``: the data root that the
run's manifest recorded (the nearest ``pneumonia_run.json`` or ``pneumonia_sweep.json`` above the
checkpoint; ``--data`` when there is none) and whether it is synthetic, which
:func:`pneumonia.data.synth.make_synthetic_dataset` marks at the dataset root. The service then
warns in every answer of a model trained on synthetic images (``registry.artifact_warning``).

With ``--data`` the validation carve's probabilities also become the artifact's drift reference
(metadata ``drift_reference``, :func:`pneumonia.metrics.drift.reference_distribution`): what the
service, ``pneumonia score`` and ``pneumonia evaluate`` compare recent probabilities with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pneumonia.artifacts.publish import data_fingerprint, export_artifact
from pneumonia.artifacts.runs import manifest_above, sweep_manifest, validation_metrics
from pneumonia.artifacts.tracking import (
    Tracker,
    default_uri,
    flatten,
    numbers,
    register_artifact,
    resolve_uri,
    source_run,
)
from pneumonia.config import config_from_dict
from pneumonia.data.pipeline import load_images
from pneumonia.data.records import carve_validation
from pneumonia.data.synth import MARKER_FILE
from pneumonia.errors import CheckpointError, PneumoniaError
from pneumonia.metrics.binary import SafeOperatingPoint, binary_metrics, safe_operating_point
from pneumonia.metrics.drift import reference_distribution
from pneumonia.models.checkpoint import load_checkpoint
from pneumonia.models.ood import features_and_probabilities, fit_guard, model_with_features
from pneumonia.storage import exists, join, read_bytes

# Resamples of the validation split for the operating point's intervals: fixed, so that exporting
# the same checkpoint on the same data always gives the same threshold.
BOOTSTRAP_SEED = 0


@dataclass
class Exported:
    artifact: str
    version: str
    threshold: float
    target_recall: float
    metrics: dict[str, Any]
    operating_point: SafeOperatingPoint | None = None  # how the threshold was chosen (with --data)
    ood: dict[str, Any] | None = None  # the out-of-distribution guard's metadata (with --data)
    tracking: dict[str, Any] | None = None  # the MLflow runs and model version (metadata "tracking")

    def to_json(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "version": self.version, "threshold": self.threshold,
                "target_recall": self.target_recall, "metrics": self.metrics,
                "operating_point": self.operating_point.to_json() if self.operating_point else None,
                "out_of_distribution": self.ood, "tracking": self.tracking}

    def summary(self) -> str:
        """Terminal text: where the artifact went and how far to trust its threshold."""
        if self.operating_point is None:
            how = f"threshold {self.threshold:.4f} (target recall {self.target_recall}, recorded by training)"
        else:
            how = self.operating_point.summary()
        guard = ("no out-of-distribution guard (export with --data to fit one)" if self.ood is None else
                 f"out-of-distribution guard: {self.ood['method']}, threshold {self.ood['threshold']:.1f} "
                 f"({self.ood['validation_pass_rate']:.1%} of validation X-rays pass), policy {self.ood['policy']}")
        text = f"exported {self.version} to {self.artifact}\n  {how}\n  {guard}"
        tracking = self.tracking or {}
        if tracking.get("export_run_id"):
            registered = tracking.get("registered_model")
            text += (f"\n  MLflow: export run {tracking['export_run_id']}"
                     + (f", training run {tracking['run_id']}" if tracking.get("run_id") else "")
                     + (f", model {registered['name']} version {registered['version']}" if registered else "")
                     + f" in {tracking['tracking_uri']}")
        return text


def _manifest_data(checkpoint: str) -> str | None:
    """The data root recorded by the nearest run or sweep manifest above a checkpoint, or None."""
    manifest = manifest_above(checkpoint)
    return manifest.get("data") if manifest else None


def _dataset_marker(root: str) -> dict[str, Any] | None:
    """The marker :mod:`pneumonia.data.synth` leaves at a dataset's root, or None (not made there)."""
    location = join(root, MARKER_FILE)
    if not exists(location):
        return None
    try:
        marker = json.loads(read_bytes(location))
    except ValueError as error:
        raise ValueError(f"{location} is not JSON: {error}") from None
    if not isinstance(marker, dict):
        raise ValueError(f"{location} is not a JSON object")
    return marker


def training_data(checkpoint: str, members: list[str], data_root: str | None) -> dict[str, Any]:
    """``{"synthetic": true|false|null, "roots": [...], "dataset": marker}``: what the model at
    ``checkpoint`` learned from. Its roots come from the run's manifest, else from the members'
    (an ensemble combined from other runs), else from ``data_root``; synthetic when any root is
    marked so, unknown (null, with the ``problem``) when no root is known or one cannot be read."""
    roots: list[str] = []
    try:
        found = _manifest_data(checkpoint)
        roots = [found] if found else [root for root in map(_manifest_data, members) if root]
        roots = list(dict.fromkeys(roots or ([data_root] if data_root else [])))
        markers = [_dataset_marker(root) for root in roots]
    except (OSError, ValueError, PneumoniaError) as error:  # moved, unreadable, a store that is down
        return {"synthetic": None, "roots": roots, "problem": str(error)}
    if not roots:
        return {"synthetic": None, "roots": []}
    flags = [marker.get("synthetic") if marker else False for marker in markers]
    synthetic = True if True in flags else None if None in flags else False
    dataset = next((marker for marker in markers if marker), None)
    return {"synthetic": synthetic, "roots": roots, **({"dataset": dataset} if dataset else {})}


# Training images the out-of-distribution guard is fitted on (a seeded, label-stratified sample):
# enough for a stable covariance of a few hundred to a thousand features, seconds to decode.
GUARD_FIT_IMAGES = 2000


def fit_ood_guard(dual, train_part, validation_features: np.ndarray, spec, seed: int = BOOTSTRAP_SEED):
    """The guard (pneumonia.models.ood) from a sample of the training carve's features, its threshold
    letting 99% of the validation carve's images through."""
    rng = np.random.default_rng(seed)
    sample = [train_part[i] for i in sorted(rng.permutation(len(train_part))[:GUARD_FIT_IMAGES])]
    training = load_images(sample, spec)
    features, _ = features_and_probabilities(dual, training.images)
    return fit_guard(features, training.labels, validation_features)


def export_tracker(checkpoint: str, registry: str, settings, tracking_uri: str | None = None, track: bool = True,
                   warn: Callable[[str], None] | None = None) -> tuple[Tracker, dict[str, str] | None]:
    """(the tracker export logs with, the training run the checkpoint came from or None). The store:
    ``tracking_uri``, else the one the training run was tracked in (its run folder or manifest says),
    else the checkpoint's ``tracking`` settings, ``$MLFLOW_TRACKING_URI``, or ``mlflow.db`` in the
    run's storage folder (in the registry for a checkpoint from no known run)."""
    recorded, storage_root = source_run(checkpoint)
    uri = None
    if track:
        uri = tracking_uri or resolve_uri(settings.enabled, settings.uri, recorded and recorded.get("tracking_uri"),
                                          default_uri(storage_root or str(registry)))
    tracker = Tracker(uri, (recorded or {}).get("experiment", settings.experiment), **({"warn": warn} if warn else {}))
    return tracker, recorded


def export(checkpoint: str, registry: str, data_root: str | None = None, name: str = "pneumonia-cnn",
           ood_policy: str = "reject", tracking_uri: str | None = None, track: bool = True) -> Exported:
    """Export ``checkpoint`` to the registry. With ``data_root``: the threshold chosen on the
    validation carve, and an out-of-distribution guard fitted on the training carve (its policy
    for what it refuses, ``reject`` or ``flag``, goes into the artifact).

    Tracked (unless ``track`` is False) in an MLflow run nested under the checkpoint's training run,
    in that run's store unless ``tracking_uri`` names another; the version is registered in MLflow's
    model registry under the same name, and the run ids go into metadata.json as ``tracking``."""
    model, info = load_checkpoint(checkpoint)
    config = config_from_dict(info.config, source=f"checkpoint {checkpoint}")
    tracker, training_run = export_tracker(checkpoint, registry, config.tracking, tracking_uri, track)
    same_store = bool(training_run) and tracker.uri == training_run.get("tracking_uri")
    parent = training_run["run_id"] if same_store else None
    run_id = tracker.start(f"export {name}", "export", parent=parent, params={
        "checkpoint": checkpoint, "registry": str(registry), "name": name, "data": data_root, "ood_policy": ood_policy,
        **flatten(info.config, "training."), "checkpoint_epoch": info.epoch,
    }, tags={**({"pneumonia.training_run_id": training_run["run_id"]} if training_run else {})})
    try:
        exported = _export(checkpoint, registry, model, info, config, data_root, name, ood_policy,
                           _tracking_entry(tracker, run_id, training_run, same_store))
    except BaseException:
        tracker.end(run_id, "FAILED")
        raise
    if run_id:
        tracker.log_metrics(run_id, {"threshold": exported.threshold, "target_recall": exported.target_recall,
                                     **numbers(exported.metrics, "val_")})
        artifact = _artifact(exported)
        tracker.log_files(run_id, [artifact.path / "metadata.json"])
        tracker.set_tags(run_id, {"pneumonia.version": exported.version, "pneumonia.artifact": exported.artifact,
                                  "dataset.fingerprint": artifact.metadata.get("data_fingerprint")})
        number = register_artifact(tracker, artifact, parent or run_id, {"pneumonia.export_run_id": run_id})
        if number is not None and exported.tracking is not None:
            exported.tracking["registered_model"] = {"name": name, "version": number}
        tracker.end(run_id)
    return exported


def _tracking_entry(tracker: Tracker, run_id: str | None, training_run: dict | None, same_store: bool) -> dict | None:
    """metadata.json's ``tracking``: the store, the training run (its id in that store) and the export run."""
    if not tracker.active and not training_run:
        return None
    if not tracker.active:
        return {"tracking_uri": training_run.get("tracking_uri"), "run_id": training_run.get("run_id"),
                "export_run_id": None}
    return {"tracking_uri": tracker.uri, "run_id": training_run["run_id"] if same_store else None,
            "export_run_id": run_id,
            **({"training_run": training_run} if training_run and not same_store else {})}


def _artifact(exported: Exported):
    from pathlib import Path

    from pneumonia.artifacts.registry import Artifact

    path = Path(exported.artifact)
    return Artifact(path, exported.version, json.loads((path / "metadata.json").read_text()))


def _export(checkpoint: str, registry: str, model, info, config, data_root: str | None, name: str, ood_policy: str,
            tracking: dict | None) -> Exported:
    """The export itself (see :func:`export`)."""
    objective = config.objective
    target = objective.target_recall
    fingerprint, point, guard, drift_reference = None, None, None, None
    if data_root is not None:
        _, train_part, val_part = carve_validation(data_root, config)
        validation = load_images(val_part, info.preprocess)
        dual = model_with_features(model)
        validation_features, probabilities = features_and_probabilities(dual, validation.images)
        guard = fit_ood_guard(dual, train_part, validation_features, info.preprocess)
        point = safe_operating_point(
            validation.labels, probabilities, [record.patient_id for record in validation.records], target,
            objective.confidence, objective.bootstrap_samples, BOOTSTRAP_SEED, rule=objective.threshold_rule,
        )
        threshold = point.threshold
        metrics = binary_metrics(validation.labels, probabilities, threshold)
        metrics["precision_at_recall"] = point.precision
        metrics["operating_point"] = point.to_json()
        fingerprint = data_fingerprint(train_part)
        drift_reference = reference_distribution(probabilities, source="validation")
    elif "val_threshold" in info.metrics:
        threshold = float(info.metrics["val_threshold"])
        metrics = validation_metrics(info.metrics)
    else:
        raise CheckpointError(
            f"{checkpoint} records no decision threshold; pass --data so that it is chosen on the validation split"
        )
    try:
        artifact = export_artifact(
            checkpoint, registry, threshold=threshold, target_recall=target, validation_metrics=metrics,
            training_config=info.config, tuning_config=(sweep_manifest(checkpoint) or {}).get("config", {}).get("tune"),
            data_fingerprint=fingerprint, training_data=training_data(checkpoint, info.members, data_root),
            guard=guard, ood_policy=ood_policy, drift_reference=drift_reference, name=name,
            tracking=tracking,
        )
    except ValueError as error:
        raise PneumoniaError(str(error)) from None
    return Exported(str(artifact.path), artifact.version, threshold, target, metrics, point,
                    artifact.metadata.get("out_of_distribution"), tracking)

