"""Ensembles: K members trained in parallel as Ray Train runs, combined into one checkpoint.

Why: members that differ only in their seed (weight initialisation, shuffling, augmentation)
make different mistakes on images unlike their training set; the mean of their probabilities
ranks new X-rays better than any one of them, and it is steadier from run to run, which is what
a threshold chosen on validation needs to hold at a new site.

How: each member is one Tune trial whose function runs one distributed Ray Train run (the same
``fit_run`` as a single training run, ``train.seed`` = base seed + member index), so members
train side by side on a cluster (``ensemble.max_concurrent`` at once; by default as many as the
cluster's CPUs or GPUs fit) and are checkpointed every epoch. Each member's best checkpoint by
``run.checkpoint_metric`` is kept; ``pneumonia.models.ensemble.combine_checkpoints`` turns them into
one checkpoint whose model averages the members' probabilities, scored on the validation split.
That checkpoint is what ``pneumonia export`` takes, like any other.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pneumonia.artifacts.runs import (
    ENSEMBLE_FOLDER,
    MEMBERS_FOLDER,
    RESULT_FILE,
    history_location,
    member_name,
    validation_metrics,
)
from pneumonia.artifacts.tracking import child_run, close_children, flatten
from pneumonia.config import ExperimentConfig, config_from_dict
from pneumonia.data.pipeline import load_images, predict_probabilities
from pneumonia.data.records import ImageRecord
from pneumonia.errors import PneumoniaError
from pneumonia.models.checkpoint import INFO_FILE, load_checkpoint, read_info
from pneumonia.models.ensemble import combine_checkpoints
from pneumonia.storage import join, qualify, staged_directory, write_text
from pneumonia.training.fit import TrainResult, check_resources, fit_run, train_resume_command
from pneumonia.training.launcher import DRIVER_CPU, finite, result_history, run_trials, trial_function
from pneumonia.training.supervision import raise_if_interrupted
from pneumonia.training.worker import rows_to_records, stress_inputs


def member_config(base: dict[str, Any], index: int, storage: str) -> ExperimentConfig:
    """The config member ``index`` trains with: its own seed, its own run folder, no ensemble (and
    no distillation: members are the teacher)."""
    base = {**base, "distill": {**base.get("distill", {}), "enabled": False}}
    config = config_from_dict(base, source=f"ensemble member {index}")
    return config.model_copy(update={
        "train": config.train.model_copy(update={"seed": config.train.seed + index}),
        "run": config.run.model_copy(update={"storage": storage, "name": member_name(index)}),
        "ensemble": config.ensemble.model_copy(update={"members": 1}),
    })


def run_member(params: dict[str, Any], *, base: dict[str, Any], storage: str, train_rows, val_rows,
               tracking: dict[str, str] | None = None) -> None:
    """A Tune trial: one member's distributed training run, its epochs forwarded to Tune (and, with
    ``tracking``, logged to a run nested under the ensemble's MLflow run)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    config = member_config(base, int(params["member"]), storage)
    index = config.train.seed - base["train"]["seed"]
    own = child_run(tracking, join(storage, config.run.name), config.run.name, "train",
                    params=flatten(config.model_dump(exclude={"tune"})), tags={"pneumonia.member": str(index)})
    fit_run(config, rows_to_records(train_rows), rows_to_records(val_rows), callbacks=[TuneReportCallback()],
            label=f"member {index}", watch=False, tracking=own)


def concurrent_members(config: ExperimentConfig) -> int:
    """How many members train at once: the config's cap, else as many as the cluster fits."""
    import ray

    if config.ensemble.max_concurrent:
        return min(config.ensemble.max_concurrent, config.ensemble.members)
    resources = ray.cluster_resources()
    per_member_cpu = config.scaling.workers * config.scaling.cpus_per_worker + DRIVER_CPU
    fit = math.floor(resources.get("CPU", 0) / per_member_cpu + 1e-9)
    if config.scaling.gpu:
        fit = min(fit, math.floor(resources.get("GPU", 0) / config.scaling.workers))
    return max(1, min(config.ensemble.members, fit))


def train_members(
    config: ExperimentConfig,
    train_part: list[ImageRecord],
    val_part: list[ImageRecord],
    resume: bool = False,
    progress: Callable[[str], None] = print,
    tracking: dict[str, str] | None = None,
) -> list[tuple[str, dict[str, float]]]:
    """Train every member (config.run.storage absolute, config.run.name set); returns each
    member's best checkpoint (qualified path) and that checkpoint's reported metrics."""
    from ray import tune

    members = config.ensemble.members
    at_once = concurrent_members(config)
    check_resources(config, copies=at_once, extra_cpus=DRIVER_CPU,
                    hint="lower ensemble.max_concurrent, scaling.workers or scaling.cpus_per_worker")
    run_dir = join(config.run.storage, config.run.name)
    storage = join(run_dir, MEMBERS_FOLDER)
    trainable = trial_function(run_member, config.model_dump(exclude={"tune"}), train_part, val_part, storage=storage,
                               tracking=tracking)
    progress(f"ensemble of {members} members ({at_once} at a time), each {config.scaling.workers} worker(s) "
             f"for {config.train.epochs} epochs")
    tuner_path = join(run_dir, "tuner")

    def new_tuner():
        return tune.Tuner(
            trainable,
            param_space={"member": tune.grid_search(list(range(members)))},
            tune_config=tune.TuneConfig(max_concurrent_trials=at_once,
                                        trial_dirname_creator=lambda trial: member_name(trial.config["member"])),
            run_config=tune.RunConfig(name="tuner", storage_path=run_dir, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )

    grid, statuses = run_trials(trainable, tuner_path, resume, new_tuner, config, f"ensemble run {config.run.name}",
                                history_of=lambda trial: history_location(storage, member_name(trial.config["member"])))
    close_children(tracking, grid, statuses, lambda result: join(storage, member_name(int(result.config["member"]))),
                   warn=progress)
    raise_if_interrupted(statuses, members, f"ensemble run {config.run.name}", "members",
                         train_resume_command(config.run.name, config.run.storage))
    metric, mode = config.run.checkpoint_metric, config.run.checkpoint_mode
    chosen: list[tuple[int, str, dict[str, float]]] = []
    for result in grid:
        index = int(result.config["member"])
        if result.error:
            raise PneumoniaError(f"ensemble member {index} failed: {str(result.error).splitlines()[0]}")
        history = result_history(result)
        rows = [row for row in history if row.get("checkpoint_path") and finite(row.get(metric))]
        if not rows:
            raise PneumoniaError(f"ensemble member {index} reported no checkpoint with {metric}")
        sign = 1 if mode == "max" else -1
        best = max(rows, key=lambda row: sign * row[metric])
        metrics = validation_metrics(best, finite=True)
        chosen.append((index, qualify(best["checkpoint_path"], run_dir), metrics))
        progress(f"member {index}: best epoch {int(best.get('epoch', 0))} of {int(history[-1].get('epoch', 0))}, "
                 f"val ROC-AUC {metrics.get('roc_auc', float('nan')):.4f}, "
                 f"precision at recall {metrics.get('precision_at_recall', float('nan')):.3f}")
    return [(path, metrics) for _, path, metrics in sorted(chosen)]


def score_ensemble(checkpoint: str, config: ExperimentConfig, val_part: list[ImageRecord]) -> dict[str, float]:
    """Validation metrics of the combined model (what the members' reports cannot say)."""
    from pneumonia.metrics.binary import binary_metrics, operating_point  # lazy: scikit-learn

    model, info = load_checkpoint(checkpoint)
    validation = load_images(val_part, info.preprocess)
    predict = lambda images: predict_probabilities(model, images)  # noqa: E731
    probabilities = predict(validation.images)
    point = operating_point(validation.labels, probabilities, config.objective.target_recall)
    metrics = binary_metrics(validation.labels, probabilities)
    metrics.update(precision_at_recall=point.precision, threshold=point.threshold)
    if config.stress.enabled:
        from pneumonia.metrics.stress import stress_report  # lazy: scikit-learn

        images, labels = stress_inputs(config, info.preprocess, validation)
        metrics.update(stress_report(predict, images, labels, config.objective.target_recall,
                                     threshold=point.threshold).summary())
    return {key: float(value) for key, value in metrics.items()}


def train_ensemble(config: ExperimentConfig, train_part, val_part, storage: str, name: str, resume: bool,
                    progress: Callable[[str], None], tracking: dict[str, str] | None = None) -> TrainResult:
    """Members in parallel (pneumonia.training.members), combined into one checkpoint in <run>/ensemble;
    with ``tracking``, each member is an MLflow run nested under the ensemble's."""
    members = train_members(config, train_part, val_part, resume=resume, progress=progress, tracking=tracking)
    target = join(storage, name, ENSEMBLE_FOLDER)
    with staged_directory(target) as local:
        if local.exists():
            shutil.rmtree(local)  # a resumed run combines its members again
        combine_checkpoints([path for path, _ in members], str(local))
        metrics = score_ensemble(str(local), config, val_part)
        _record_metrics(str(local), metrics)
    progress(f"ensemble of {len(members)}: val ROC-AUC {metrics['roc_auc']:.4f}, precision "
             f"{metrics['precision_at_recall']:.3f} at recall >= {config.objective.target_recall}"
             + (f", stress worst ROC-AUC {metrics['stress_worst_roc_auc']:.4f}" if "stress_worst_roc_auc" in metrics else ""))
    summary = TrainResult(
        run_dir=join(storage, name),
        best_checkpoint=target,
        metrics={key: value for key, value in metrics.items() if key not in ("n", "tp", "fp", "tn", "fn")},
        best_epoch=config.train.epochs,
        epochs_completed=config.train.epochs,
        history=[{"member": index, "checkpoint": path, **{f"val_{k}": v for k, v in member.items()}}
                 for index, (path, member) in enumerate(members)],
    )
    write_text(join(storage, name, RESULT_FILE), json.dumps(asdict(summary), indent=2, default=float))
    return summary


def _record_metrics(checkpoint_dir: str, metrics: dict[str, float]) -> None:
    """Store the ensemble's own validation metrics in its checkpoint info (as val_<name>)."""
    info = read_info(checkpoint_dir)
    info.metrics = {f"val_{key}": value for key, value in metrics.items()}
    (Path(checkpoint_dir) / INFO_FILE).write_text(info.to_json())
