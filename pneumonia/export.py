"""Turn a training checkpoint into a versioned serving artifact with its decision threshold.

The threshold is the validation split's answer to the clinical question (highest precision at
recall >= target). With ``--data`` it is recomputed exactly on the same patient-grouped
validation split that training carved (same seed and fraction, from the checkpoint's config);
without, the threshold the checkpoint recorded at its epoch is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from pneumonia.checkpoint import load_checkpoint
from pneumonia.config import config_from_dict
from pneumonia.errors import CheckpointError, PneumoniaError
from pneumonia.metrics import binary_metrics, operating_point
from pneumonia.storage import exists, join, read_bytes


@dataclass
class Exported:
    artifact: str
    version: str
    threshold: float
    target_recall: float
    metrics: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "version": self.version, "threshold": self.threshold,
                "target_recall": self.target_recall, "metrics": self.metrics}


def _sweep_config(checkpoint: str) -> dict[str, Any] | None:
    """The tune section of the sweep a trial checkpoint came from (…/<sweep>/trials/<trial>/<ckpt>)."""
    from pneumonia.tune import SWEEP_MANIFEST

    sweep_dir = str(PurePosixPath(checkpoint.rstrip("/")).parent.parent.parent)
    location = join(sweep_dir, SWEEP_MANIFEST)
    if not exists(location):
        return None
    return json.loads(read_bytes(location))["config"].get("tune")


def export(checkpoint: str, registry: str, data_root: str | None = None, name: str = "pneumonia-cnn") -> Exported:
    from pneumonia.registry import data_fingerprint, export_artifact

    model, info = load_checkpoint(checkpoint)
    config = config_from_dict(info.config, source=f"checkpoint {checkpoint}")
    target = config.objective.target_recall
    fingerprint = None
    if data_root is not None:
        from pneumonia.pipeline import load_images, predict_probabilities
        from pneumonia.train import carve_validation

        _, train_part, val_part = carve_validation(data_root, config)
        validation = load_images(val_part, info.preprocess)
        probabilities = predict_probabilities(model, validation.images)
        point = operating_point(validation.labels, probabilities, target)
        threshold = point.threshold
        metrics = binary_metrics(validation.labels, probabilities, threshold)
        metrics["precision_at_recall"] = point.precision
        fingerprint = data_fingerprint(train_part)
    elif "val_threshold" in info.metrics:
        threshold = float(info.metrics["val_threshold"])
        metrics = {key[4:]: value for key, value in info.metrics.items() if key.startswith("val_")}
    else:
        raise CheckpointError(
            f"{checkpoint} records no decision threshold; pass --data so that it is chosen on the validation split"
        )
    try:
        artifact = export_artifact(
            checkpoint, registry, threshold=threshold, target_recall=target, validation_metrics=metrics,
            training_config=info.config, tuning_config=_sweep_config(checkpoint),
            data_fingerprint=fingerprint, name=name,
        )
    except ValueError as error:
        raise PneumoniaError(str(error)) from None
    return Exported(str(artifact.path), artifact.version, threshold, target, metrics)
