"""Score a checkpoint on a labelled split with exact metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pneumonia.checkpoint import load_checkpoint
from pneumonia.data import class_counts, discover, evaluation_records
from pneumonia.errors import DataError
from pneumonia.metrics import binary_metrics
from pneumonia.pipeline import load_images, predict_probabilities


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    split: str
    counts: dict[str, int]
    skipped: int  # files not used (non-images or undecodable)


def evaluate_checkpoint(checkpoint: str, data_root: str, split: str = "test", threshold: float = 0.5) -> Evaluation:
    """Metrics of a checkpoint on data_root's split (or its class folders), at a threshold."""
    model, info = load_checkpoint(checkpoint)
    dataset = discover(data_root)
    records = evaluation_records(dataset, split)
    decoded = load_images(records, info.preprocess)
    if len(decoded.records) == 0:
        raise DataError(f"none of the {len(records)} images in {data_root} could be decoded")
    probabilities = predict_probabilities(model, decoded.images)
    metrics = binary_metrics(decoded.labels, probabilities, threshold)
    name = split if dataset.splits != [None] else "class folders"
    return Evaluation(metrics, name, class_counts(decoded.records), len(dataset.skipped) + len(decoded.failures))
