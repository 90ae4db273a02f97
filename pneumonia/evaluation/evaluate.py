"""Score a checkpoint or a serving artifact on a labelled split, with exact metrics.

An artifact's evaluation also reports the drift of the split's probabilities against the
artifact's ``drift_reference`` (:func:`pneumonia.metrics.drift.drift_status`), over the images its
guard lets through, as the service measures it: on a new site's labelled sample, the number that
says whether its threshold still holds there. A checkpoint has no reference, so no drift."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pneumonia.artifacts.registry import load_artifact, read_metadata
from pneumonia.config import check_shift_names, config_from_dict
from pneumonia.data.pipeline import decode_threads, load_images, predict_probabilities
from pneumonia.data.preprocess import PreprocessSpec
from pneumonia.data.records import carve_validation, class_counts, discover, evaluation_records
from pneumonia.data.shifts import load_sources, shifted_images, stratified_subset
from pneumonia.errors import DataError
from pneumonia.metrics.binary import binary_metrics
from pneumonia.metrics.drift import drift_status
from pneumonia.models import checkpoint as checkpoints
from pneumonia.storage import local_directory


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    split: str
    counts: dict[str, int]
    skipped: int  # files not used (non-images or undecodable)
    labels: np.ndarray = field(repr=False)
    probabilities: np.ndarray = field(repr=False)
    patient_ids: list[str] = field(repr=False)
    stress: Any = field(default=None, repr=False)  # a pneumonia.metrics.stress.StressReport when asked for
    ood: dict[str, Any] | None = None  # an artifact's guard on this split: rate, count, threshold, policy
    drift: dict[str, Any] | None = None  # an artifact's drift status on this split (metrics.drift.drift_status)


VALIDATION = "validation"
"""Split name for the patient-grouped validation set carved out of train (as training did)."""


def split_records(data_root: str, split: str, training_config: dict[str, Any] | None = None):
    """(dataset, records) of a split; ``validation`` is rebuilt from the training config."""
    if split == VALIDATION:
        dataset, _, records = carve_validation(data_root, config_from_dict(training_config or {}))
        return dataset, records
    dataset = discover(data_root)
    return dataset, evaluation_records(dataset, split)


def stress_evaluate(
    predict: Callable[[np.ndarray], np.ndarray],
    spec: PreprocessSpec,
    data_root: str,
    split: str = VALIDATION,
    training_config: dict[str, Any] | None = None,
    target_recall: float = 0.95,
    threshold: float | None = None,
    shifts: list[str] | None = None,
    max_images: int | None = None,
    seed: int = 0,
):
    """Shift stress validation (``pneumonia.data.shifts``) of a predictor on a split.

    ``threshold`` is the operating point whose drift is reported (an artifact's own); by default
    the one the clean images give for ``target_recall``.
    """
    from pneumonia.metrics.stress import stress_report  # lazy: scikit-learn

    shifts = check_shift_names(shifts)
    _, records = split_records(data_root, split, training_config)
    decoded = _decode(records, spec, data_root)  # which files decode, and their labels
    chosen = stratified_subset(decoded.labels, max_images, seed)
    sources = load_sources([decoded.records[index].location for index in chosen])
    images = shifted_images(sources, spec, shifts, seed=seed, threads=decode_threads())
    return stress_report(predict, images, decoded.labels[chosen], target_recall, threshold)


def proxy_evaluate(
    predict: Callable[[np.ndarray], np.ndarray],
    spec: PreprocessSpec,
    data_root: str,
    split: str = VALIDATION,
    training_config: dict[str, Any] | None = None,
    target_recall: float = 0.95,
    seed: int = 0,
):
    """The site proxy (:mod:`pneumonia.evaluation.proxy`) of a predictor on a split's images that decode."""
    from pneumonia.evaluation.proxy import site_proxy  # lazy: scikit-learn

    _, records = split_records(data_root, split, training_config)
    decoded = _decode(records, spec, data_root)
    return site_proxy(predict, decoded.records, spec, target_recall, seed=seed, threads=decode_threads())


def evaluate(
    predict: Callable[[np.ndarray], np.ndarray],
    spec: PreprocessSpec,
    data_root: str,
    split: str = "test",
    threshold: float = 0.5,
    training_config: dict[str, Any] | None = None,
) -> Evaluation:
    """Metrics of a predictor (uint8 images -> probabilities) on data_root's split or class folders.

    ``split="validation"`` scores the validation set that training carved out of train/, rebuilt
    from the training config (same seed and fraction), never the official val/ folder.
    """
    dataset, records = split_records(data_root, split, training_config)
    return _score(predict, _decode(records, spec, data_root), dataset, split, threshold)


def _decode(records, spec: PreprocessSpec, data_root: str):
    decoded = load_images(records, spec)
    if len(decoded.records) == 0:
        raise DataError(f"none of the {len(records)} images in {data_root} could be decoded")
    return decoded


def _score(predict, decoded, dataset, split: str, threshold: float) -> Evaluation:
    probabilities = np.asarray(predict(decoded.images), dtype=np.float32)
    metrics = binary_metrics(decoded.labels, probabilities, threshold)
    return Evaluation(
        metrics=metrics,
        split=split if dataset.splits != [None] else "class folders",
        counts=class_counts(decoded.records),
        skipped=len(dataset.skipped) + len(decoded.failures),
        labels=decoded.labels.astype(int),
        probabilities=probabilities,
        patient_ids=[record.patient_id for record in decoded.records],
    )


def evaluate_checkpoint(checkpoint: str, data_root: str, split: str = "test", threshold: float = 0.5) -> Evaluation:
    """Score a training checkpoint. The data is found and decoded before the model loads, so a
    wrong --data or --split fails in a second, not after TensorFlow has started."""
    with local_directory(checkpoint) as directory:
        info = checkpoints.read_info(directory)
        dataset, records = split_records(data_root, split, info.config)
        decoded = _decode(records, info.preprocess, data_root)
        model = checkpoints.load_model_from_directory(directory)
    return _score(lambda images: predict_probabilities(model, images), decoded, dataset, split, threshold)


def evaluate_artifact(location: str, data_root: str, split: str = "test", threshold: float | None = None) -> Evaluation:
    """Score a serving artifact at its stored threshold (or the one given). Its metadata is read
    and the data found before the model loads (a wrong --data or --split fails in a second)."""
    metadata = read_metadata(location)
    reference = metadata.get("drift_reference")  # checked by read_metadata, before the split is scored
    dataset, records = split_records(data_root, split, metadata.get("training_config"))
    artifact = load_artifact(location)
    chosen = artifact.threshold if threshold is None else threshold
    decoded = _decode(records, artifact.preprocess, data_root)
    probabilities, scores = artifact.predict_scored(decoded.images)
    evaluation = _score(lambda _: probabilities, decoded, dataset, split, chosen)
    passed = np.ones(len(probabilities), bool) if scores is None else scores <= artifact.ood["threshold"]
    evaluation.drift = drift_status(reference, probabilities[passed])
    if scores is not None:  # a sudden rise on a new site's data is itself a warning
        guard = artifact.ood
        refused = int(np.sum(~passed))
        evaluation.ood = {"rate": refused / max(len(scores), 1), "count": refused, "n": int(len(scores)),
                          "threshold": float(guard["threshold"]), "policy": guard.get("policy"),
                          "expected_rate": round(1 - float(guard.get("validation_pass_rate", 0.99)), 4)}
    return evaluation
