"""Distillation: one student model learns an ensemble's probabilities and ships alone.

Why: the mean of K members ranks X-rays from a new site better than one model, but serves at 1/K
of its throughput (docs/BENCHMARKS.md). A student of the members' own architecture, taught by the
ensemble, serves at one model's cost; what it keeps of the ensemble's ranking is measured on the
validation carve and its stress shifts like any run (docs/RESULTS.md).

How: the student is one more Ray Train run, ``<run>/student``, of ``model`` with the run's
data, augmentation, schedule and selection rule. Every worker loads the teacher and labels each
augmented batch it trains on (``pneumonia.data.pipeline.training_dataset``): the student is asked
to match the teacher on every view it sees, the "consistent teaching" that Beyer et al. (2022)
found essential; probabilities precomputed once per image would teach it only the teacher's
(near 0/1) answers on images the teacher was trained on. The target is ``distill.weight`` x the
teacher's probability + the rest x the label. The student's best checkpoint becomes the run's
``best_checkpoint``, so ``pneumonia export`` ships it; the teacher's path and metrics travel in the
run's result (and in the student checkpoint's config, ``distill.teacher``).

Cost: the teacher's forward pass on every batch (K members) on top of the student's step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from pneumonia.artifacts.runs import RESULT_FILE
from pneumonia.artifacts.tracking import Tracker, child_run, flatten
from pneumonia.config import ExperimentConfig
from pneumonia.data.preprocess import PreprocessSpec
from pneumonia.data.records import ImageRecord
from pneumonia.errors import PneumoniaError
from pneumonia.models.checkpoint import read_info
from pneumonia.storage import exists, join, local_directory, write_text
from pneumonia.training.fit import TrainResult, check_resources, fit_run, summarize_run, train_resume_command
from pneumonia.training.worker import preprocess_spec

STUDENT = "student"
"""The student's run folder (and Ray Train run name) inside the run's folder."""


def student_config(config: ExperimentConfig, teacher: str, run_dir: str) -> ExperimentConfig:
    """The student's run: one model, in ``<run_dir>/student``, with a seed no member used, its
    own epochs if ``distill.epochs`` says so, and the teacher it learned from recorded."""
    return config.model_copy(update={
        "train": config.train.model_copy(update={
            "seed": config.train.seed + config.ensemble.members,
            "epochs": config.distill.epochs or config.train.epochs,
        }),
        "run": config.run.model_copy(update={"storage": run_dir, "name": STUDENT}),
        "ensemble": config.ensemble.model_copy(update={"members": 1}),
        "distill": config.distill.model_copy(update={"teacher": teacher}),
    })


def teacher_metrics_of(teacher: str, spec: PreprocessSpec) -> dict[str, float]:
    """The validation metrics a checkpoint recorded when it was made (``val_`` dropped), after
    checking that it exists and sees the images the student will be given (``spec``): a teacher of
    another size or normalisation would fail inside every worker's input pipeline instead."""
    if not exists(teacher):
        raise PneumoniaError(f"distill.teacher {teacher!r} does not exist: give a checkpoint folder, "
                             "e.g. runs/<name>/ensemble or a run's BEST_CHECKPOINT")
    with local_directory(teacher) as directory:
        info = read_info(directory)
    if info.preprocess != spec:
        raise PneumoniaError(f"distill.teacher {teacher!r} was trained on {info.preprocess} but this run's "
                             f"student gets {spec}: set the data section (image_size, channels, resize, normalize) "
                             "to the teacher's")
    return {key.removeprefix("val_"): float(value) for key, value in info.metrics.items()
            if isinstance(value, (int, float))}


def train_student(config: ExperimentConfig, teacher: str, train_part: list[ImageRecord], val_part: list[ImageRecord],
                  storage: str, name: str, progress: Callable[[str], None],
                  tracking: dict[str, str] | None = None, teacher_metrics: dict[str, float] | None = None) -> TrainResult:
    """Train the student of run ``name`` (``config.distill``) on ``teacher``; the run's result
    (``teacher_metrics``: the teacher's validation metrics when the caller has them, else its recorded ones)."""
    recorded = teacher_metrics_of(teacher, preprocess_spec(config))
    teacher_metrics = teacher_metrics if teacher_metrics is not None else recorded
    run_dir = join(storage, name)
    student = student_config(config, teacher, run_dir)
    check_resources(student)
    weight = config.distill.weight
    progress(f"distilling {teacher} into one {config.model.name} for {student.train.epochs} epochs on "
             f"{config.scaling.workers} worker(s): target = {weight:g} x the teacher's probability + "
             f"{1 - weight:g} x the label")
    own = child_run(tracking, join(run_dir, STUDENT), STUDENT, "train",
                    params=flatten(student.model_dump(exclude={"tune"})), tags={"pneumonia.role": "student"})
    # Interrupted here, the whole run is what continues (members done, the student from its checkpoint).
    result = fit_run(student, train_part, val_part, label=STUDENT, tracking=own,
                     teacher={"checkpoint": teacher, "weight": weight},
                     resume_command=train_resume_command(name, storage))
    summary = summarize_run(result, student, run_dir, STUDENT)
    if own:
        Tracker(own["tracking_uri"], own.get("experiment", "pneumonia"), check=False).end(own["run_id"])
    progress(_comparison(summary.metrics, teacher_metrics))
    summary.run_dir = run_dir
    summary.teacher = {"checkpoint": teacher, "metrics": teacher_metrics}
    write_text(join(run_dir, RESULT_FILE), json.dumps(asdict(summary), indent=2, default=float))
    return summary


def _comparison(student: dict[str, Any], teacher: dict[str, Any]) -> str:
    """One line: the student's validation figures beside its teacher's."""
    parts = []
    for key, label, digits in (("roc_auc", "val ROC-AUC", 4), ("precision_at_recall", "precision at the target recall", 3),
                               ("stress_worst_roc_auc", "stress worst ROC-AUC", 4)):
        if isinstance(student.get(key), float) and isinstance(teacher.get(key), float):
            parts.append(f"{label} {student[key]:.{digits}f} (teacher {teacher[key]:.{digits}f})")
    return "student: " + (", ".join(parts) if parts else "trained")
