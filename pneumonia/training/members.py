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
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumonia.artifacts.runs import ENSEMBLE_FOLDER, MEMBERS_FOLDER, member_name
from pneumonia.config import ExperimentConfig, config_from_dict
from pneumonia.data.records import ImageRecord
from pneumonia.errors import PneumoniaError
from pneumonia.storage import join, qualify
from pneumonia.training.supervision import ResourceWatch, raise_if_interrupted, saved_statuses

if TYPE_CHECKING:
    from pneumonia.training.fit import TrainResult

MEMBER_DRIVER_CPU = 0.1
"""CPU reserved for each member's trial function, which only waits on its Train run."""



def member_config(base: dict[str, Any], index: int, storage: str) -> ExperimentConfig:
    """The config member ``index`` trains with: its own seed, its own run folder, no ensemble."""
    config = config_from_dict(base, source=f"ensemble member {index}")
    return config.model_copy(update={
        "train": config.train.model_copy(update={"seed": config.train.seed + index}),
        "run": config.run.model_copy(update={"storage": storage, "name": member_name(index)}),
        "ensemble": config.ensemble.model_copy(update={"members": 1}),
    })


def run_member(params: dict[str, Any], *, base: dict[str, Any], storage: str, train_rows, val_rows) -> None:
    """A Tune trial: one member's distributed training run, its epochs forwarded to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pneumonia.training.fit import fit_run
    from pneumonia.training.worker import rows_to_records

    config = member_config(base, int(params["member"]), storage)
    fit_run(config, rows_to_records(train_rows), rows_to_records(val_rows), callbacks=[TuneReportCallback()],
            label=f"member {config.train.seed - base['train']['seed']}", watch=False)


def concurrent_members(config: ExperimentConfig) -> int:
    """How many members train at once: the config's cap, else as many as the cluster fits."""
    import ray

    if config.ensemble.max_concurrent:
        return min(config.ensemble.max_concurrent, config.ensemble.members)
    resources = ray.cluster_resources()
    per_member_cpu = config.scaling.workers * config.scaling.cpus_per_worker + MEMBER_DRIVER_CPU
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
) -> list[tuple[str, dict[str, float]]]:
    """Train every member (config.run.storage absolute, config.run.name set); returns each
    member's best checkpoint (qualified path) and that checkpoint's reported metrics."""
    from ray import tune

    from pneumonia.artifacts.runs import history_location
    from pneumonia.training.fit import check_resources
    from pneumonia.training.worker import records_to_rows

    members = config.ensemble.members
    at_once = concurrent_members(config)
    check_resources(config, copies=at_once, extra_cpus=MEMBER_DRIVER_CPU,
                    hint="lower ensemble.max_concurrent, scaling.workers or scaling.cpus_per_worker")
    run_dir = join(config.run.storage, config.run.name)
    storage = join(run_dir, MEMBERS_FOLDER)
    trainable = tune.with_parameters(
        tune.with_resources(run_member, {"CPU": MEMBER_DRIVER_CPU}),
        base=config.model_dump(exclude={"tune"}),
        storage=storage,
        train_rows=records_to_rows(train_part),
        val_rows=records_to_rows(val_part),
    )
    progress(f"ensemble of {members} members ({at_once} at a time), each {config.scaling.workers} worker(s) "
             f"for {config.train.epochs} epochs")
    tuner_path = join(run_dir, "tuner")
    if resume and tune.Tuner.can_restore(tuner_path):
        tuner = tune.Tuner.restore(tuner_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"member": tune.grid_search(list(range(members)))},
            tune_config=tune.TuneConfig(max_concurrent_trials=at_once,
                                        trial_dirname_creator=lambda trial: member_name(trial.config["member"])),
            run_config=tune.RunConfig(name="tuner", storage_path=run_dir, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    with ResourceWatch(config, what=f"ensemble run {config.run.name}"):
        grid = tuner.fit()
    statuses = saved_statuses(tuner_path, history_of=lambda trial: history_location(
        storage, member_name(trial.config["member"])))
    raise_if_interrupted(statuses, members, f"ensemble run {config.run.name}", "members",
                         f"`pneumonia train --resume --name {config.run.name} --storage {config.run.storage}`")
    metric, mode = config.run.checkpoint_metric, config.run.checkpoint_mode
    chosen: list[tuple[int, str, dict[str, float]]] = []
    for result in grid:
        index = int(result.config["member"])
        if result.error:
            raise PneumoniaError(f"ensemble member {index} failed: {str(result.error).splitlines()[0]}")
        history = [] if result.metrics_dataframe is None else result.metrics_dataframe.to_dict(orient="records")
        rows = [row for row in history if row.get("checkpoint_path") and _finite(row.get(metric))]
        if not rows:
            raise PneumoniaError(f"ensemble member {index} reported no checkpoint with {metric}")
        sign = 1 if mode == "max" else -1
        best = max(rows, key=lambda row: sign * row[metric])
        metrics = {key[4:]: float(value) for key, value in best.items() if key.startswith("val_") and _finite(value)}
        chosen.append((index, qualify(best["checkpoint_path"], run_dir), metrics))
        progress(f"member {index}: best epoch {int(best.get('epoch', 0))} of {int(history[-1].get('epoch', 0))}, "
                 f"val ROC-AUC {metrics.get('roc_auc', float('nan')):.4f}, "
                 f"precision at recall {metrics.get('precision_at_recall', float('nan')):.3f}")
    return [(path, metrics) for _, path, metrics in sorted(chosen)]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def score_ensemble(checkpoint: str, config: ExperimentConfig, val_part: list[ImageRecord]) -> dict[str, float]:
    """Validation metrics of the combined model (what the members' reports cannot say)."""
    from pneumonia.data.pipeline import load_images, predict_probabilities
    from pneumonia.metrics.binary import binary_metrics, operating_point
    from pneumonia.models.checkpoint import load_checkpoint

    model, info = load_checkpoint(checkpoint)
    validation = load_images(val_part, info.preprocess)
    predict = lambda images: predict_probabilities(model, images)  # noqa: E731
    probabilities = predict(validation.images)
    point = operating_point(validation.labels, probabilities, config.objective.target_recall)
    metrics = binary_metrics(validation.labels, probabilities)
    metrics.update(precision_at_recall=point.precision, threshold=point.threshold)
    if config.stress.enabled:
        from pneumonia.metrics.stress import stress_report
        from pneumonia.training.worker import stress_inputs

        images, labels = stress_inputs(config, info.preprocess, validation)
        metrics.update(stress_report(predict, images, labels, config.objective.target_recall,
                                     threshold=point.threshold).summary())
    return {key: float(value) for key, value in metrics.items()}


def train_ensemble(config: ExperimentConfig, train_part, val_part, storage: str, name: str, resume: bool,
                    progress: Callable[[str], None]) -> TrainResult:
    """Members in parallel (pneumonia.training.members), combined into one checkpoint in <run>/ensemble."""
    from pneumonia.artifacts.runs import RESULT_FILE
    from pneumonia.models.ensemble import combine_checkpoints
    from pneumonia.storage import is_uri, write_bytes, write_text
    from pneumonia.training.fit import TrainResult

    members = train_members(config, train_part, val_part, resume=resume, progress=progress)
    target = join(storage, name, ENSEMBLE_FOLDER)
    with tempfile.TemporaryDirectory(prefix="pneumonia-ensemble-") as scratch:
        local = target if not is_uri(storage) else str(Path(scratch) / ENSEMBLE_FOLDER)
        if Path(local).exists():
            shutil.rmtree(local)  # a resumed run combines its members again
        combine_checkpoints([path for path, _ in members], local)
        metrics = score_ensemble(local, config, val_part)
        _record_metrics(local, metrics)
        if is_uri(storage):
            for path in Path(local).rglob("*"):
                if path.is_file():
                    write_bytes(join(target, path.relative_to(local).as_posix()), path.read_bytes())
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
    from pneumonia.models.checkpoint import INFO_FILE, read_info

    info = read_info(checkpoint_dir)
    info.metrics = {f"val_{key}": value for key, value in metrics.items()}
    (Path(checkpoint_dir) / INFO_FILE).write_text(info.to_json())
