"""``train()``: from a data root and a config to the best checkpoint of one run or an ensemble.

The driver finds the data, carves validation out of train by patient, records the run's manifest
(:mod:`pneumonia.artifacts.runs`), starts Ray, and runs one distributed training run
(:func:`pneumonia.training.fit.fit_run`) or K ensemble members (:mod:`pneumonia.training.members`).
Re-running with the same run name (``--resume``) continues an interrupted run from its last checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from pneumonia.artifacts.runs import (
    RESULT_FILE,
    RUN_MANIFEST,
    history_location,
    latest_run,
    load_manifest,
    resolve_storage,
    write_manifest,
)
from pneumonia.artifacts.tracking import dataset_tags, flatten, numbers, start_tracking
from pneumonia.config import ExperimentConfig, config_from_dict
from pneumonia.data.records import (
    carve_validation,
    check_readable,
    class_counts,
)
from pneumonia.errors import PneumoniaError
from pneumonia.local_ray import init_ray
from pneumonia.storage import exists, join
from pneumonia.training.distill import train_student
from pneumonia.training.fit import TrainResult, check_resources, fit_run, summarize_run
from pneumonia.training.members import train_ensemble

# ----------------------------------------------------------------------------- driver side


def train(
    config: ExperimentConfig,
    data_root: str,
    resume: bool = False,
    overrides_on_resume: Callable[[ExperimentConfig], ExperimentConfig] | None = None,
    progress: Callable[[str], None] = print,
) -> TrainResult:
    """Train on data_root with the given config; returns the best checkpoint and its metrics.

    With ``resume``, the run named in ``config.run.name`` (or the latest in storage) continues
    from its last checkpoint, with its stored config and data (``overrides_on_resume`` may
    change them, e.g. to add epochs).
    """
    storage = resolve_storage(config.run.storage)
    manifest = None
    if resume:
        name = config.run.name or latest_run(storage)
        manifest = load_manifest(storage, name)
        config = config_from_dict(manifest["config"], source=f"run {name}")
        if overrides_on_resume:
            config = overrides_on_resume(config)
        data_root = manifest["data"]
        progress(f"resuming run {name} from {join(storage, name)}")
    else:
        name = config.run.name or datetime.now().strftime("train-%Y%m%d-%H%M%S")
        if exists(join(storage, name, RUN_MANIFEST)):
            raise PneumoniaError(
                f"run {name!r} already exists in {storage}: pass --resume to continue it, or another --name"
            )
    config = config.model_copy(update={"run": config.run.model_copy(update={"name": name, "storage": storage})})

    dataset, train_part, val_part = carve_validation(data_root, config)
    check_readable(train_part + val_part)  # a folder of non-images fails here, in seconds, not in N workers
    progress(
        f"data {data_root}: train {class_counts(train_part)} / validation {class_counts(val_part)} "
        f"({len({r.patient_id for r in val_part})} patients held out)"
        + (f"; skipped {len(dataset.skipped)} non-image files" if dataset.skipped else "")
    )
    tracker, tracking = start_tracking(
        config.tracking, storage, name, "train", manifest, flatten(config.model_dump(exclude={"tune"})),
        {**dataset_tags(dataset.root, train_part, val_part), "pneumonia.run_dir": join(storage, name)}, progress)
    write_manifest(storage, name, RUN_MANIFEST, dataset.root, config.model_dump(), tracking=tracking)
    with tracker.ended_on_error(tracking and tracking["run_id"]):
        result = _train(config, train_part, val_part, storage, name, resume, progress, tracking)
    if tracking:
        run_id = tracking["run_id"]
        tracker.log_metrics(run_id, numbers(result.metrics, "checkpoint.val_"), step=result.best_epoch)
        tracker.log_metrics(run_id, {"best_epoch": result.best_epoch, "epochs_completed": result.epochs_completed})
        tracker.log_files(run_id, [history_location(storage, name), join(storage, name, RESULT_FILE)])
        tracker.set_tags(run_id, {"pneumonia.best_checkpoint": result.best_checkpoint})
        tracker.end(run_id)
    return result



def _train(config: ExperimentConfig, train_part, val_part, storage: str, name: str, resume: bool, progress,
           tracking: dict | None) -> TrainResult:
    init_ray()
    if config.ensemble.members == 1:
        check_resources(config)
    progress(
        (f"training an ensemble of {config.ensemble.members} {config.model.name} members"
         if config.ensemble.members > 1 else f"training {config.model.name}")
        + f" on {config.scaling.workers} worker(s){' each' if config.ensemble.members > 1 else ''}"
        f"{' with GPUs' if config.scaling.gpu else ''} for {config.train.epochs} epochs; run {name} in {storage}"
    )
    if config.ensemble.members > 1:
        ensemble = train_ensemble(config, train_part, val_part, storage, name, resume, progress, tracking)
        if not config.distill.enabled:
            return ensemble
        return train_student(config, ensemble.best_checkpoint, train_part, val_part, storage, name, progress,
                             tracking, teacher_metrics=ensemble.metrics)
    if config.distill.enabled:
        return train_student(config, config.distill.teacher, train_part, val_part, storage, name, progress, tracking)
    result = fit_run(config, train_part, val_part, tracking=tracking)
    return summarize_run(result, config, storage, name)
