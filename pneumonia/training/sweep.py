"""Hyperparameter search with Ray Tune, where every trial is a distributed Ray Train run.

Objective: precision at recall >= ``objective.target_recall`` on the patient-grouped validation
split (ties broken by PR-AUC). Each trial reports every epoch (Ray Train's ``TuneReportCallback``
forwards the workers' reports), so ASHA can stop poor trials early; Optuna's TPE (or random
search) proposes the next configuration. Trials checkpoint every epoch into the sweep's storage,
so an interrupted sweep resumes (``--resume``) losing at most the epochs since those checkpoints.

The outcome: a results table (CSV and JSON), plots, and the best trial's config, checkpoint and
decision threshold (the one that reached the objective on validation).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pneumonia.artifacts.runs import (
    SWEEP_MANIFEST,
    TRIALS_FOLDER,
    history_location,
    latest_run,
    load_manifest,
    resolve_storage,
    validation_metrics,
    write_manifest,
)
from pneumonia.artifacts.tracking import (
    child_run,
    close_children,
    dataset_tags,
    flatten,
    numbers,
    start_tracking,
)
from pneumonia.config import ExperimentConfig, ParamSpec, apply_params, config_from_dict
from pneumonia.data.records import carve_validation
from pneumonia.errors import ConfigError, PneumoniaError
from pneumonia.local_ray import init_ray
from pneumonia.storage import exists, join, qualify, staged_directory
from pneumonia.training.fit import check_resources, fit_run
from pneumonia.training.launcher import DRIVER_CPU, finite, result_history, run_trials, trial_function
from pneumonia.training.plots import plot_learning_curves, plot_objective_map
from pneumonia.training.supervision import raise_if_interrupted
from pneumonia.training.worker import best_key, rows_to_records

OBJECTIVE = "val_precision_at_recall"
"""The default objective (``objective.metric``); a stress metric such as
``val_stress_worst_precision_at_recall`` (with ``stress.enabled``) favours shift-robust trials."""
TIEBREAK = "val_pr_auc"


@dataclass
class TuneResult:
    sweep_dir: str
    best_checkpoint: str
    best_config: dict[str, Any]  # the full experiment config of the best trial
    best_params: dict[str, Any]  # just the searched values
    objective: float
    threshold: float
    metrics: dict[str, float]  # validation metrics of the best checkpoint
    results_csv: str
    results_json: str
    plots: list[str]
    trials: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "best_checkpoint": self.best_checkpoint,
            "best_config": self.best_config,
            "best_params": self.best_params,
            "objective": self.objective,
            "threshold": self.threshold,
            "metrics": self.metrics,
            "results": self.results_csv,
            "results_json": self.results_json,
            "plots": self.plots,
            "sweep_dir": self.sweep_dir,
        }


def search_space(space: dict[str, ParamSpec]) -> dict[str, Any]:
    from ray import tune

    def convert(spec: ParamSpec):
        if spec.type == "loguniform":
            return tune.loguniform(spec.low, spec.high)
        if spec.type == "uniform":
            return tune.uniform(spec.low, spec.high)
        if spec.type == "randint":
            return tune.randint(int(spec.low), int(spec.high))
        return tune.choice(list(spec.values))

    return {key: convert(spec) for key, spec in space.items()}


def trial_config(base: dict[str, Any], params: dict[str, Any], storage: str, trial_id: str) -> ExperimentConfig:
    """The experiment config one trial trains with: the base with the sampled values applied."""
    config = config_from_dict(apply_params(base, params), source=f"trial {trial_id}")
    run = config.run.model_copy(update={
        "storage": storage,
        "name": trial_id,
        # Keep the checkpoints that are best by the sweep's objective, not by ROC-AUC.
        "checkpoint_metric": config.objective.metric,
        "checkpoint_mode": "max",
    })
    return config.model_copy(update={"run": run, "tune": None})


def run_trial(params: dict[str, Any], *, base: dict[str, Any], trials_storage: str, train_rows, val_rows,
              tracking: dict[str, str] | None = None) -> None:
    """A Tune trial: one distributed training run, its epochs forwarded to Tune (and, with
    ``tracking``, logged to an MLflow run nested under the sweep's)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(base, params, trials_storage, trial_id)
    own = child_run(tracking, join(trials_storage, trial_id), trial_id, "tune",
                    params=flatten(config.model_dump(exclude={"tune"})),
                    tags={"pneumonia.trial_id": trial_id, **{f"pneumonia.searched.{key}": str(value)
                                                             for key, value in params.items()}})
    fit_run(config, rows_to_records(train_rows), rows_to_records(val_rows), callbacks=[TuneReportCallback()],
            label=f"trial {trial_id}", watch=False, tracking=own)


def tune(
    config: ExperimentConfig,
    data_root: str | None,
    resume: bool = False,
    progress: Callable[[str], None] = print,
) -> TuneResult:
    """Run (or resume) the sweep described by ``config.tune`` on data_root."""
    storage = resolve_storage(config.run.storage)
    if resume:
        name = config.run.name or latest_run(storage, SWEEP_MANIFEST, "sweep")
        manifest = load_manifest(storage, name, SWEEP_MANIFEST, "sweep")
        config = config_from_dict(manifest["config"], source=f"sweep {name}")
        data_root = manifest["data"]
        progress(f"resuming sweep {name} from {join(storage, name)}")
    else:
        if config.tune is None:
            raise ConfigError("the config has no `tune:` section (see tune_configs/quick.yaml)")
        if data_root is None:
            raise PneumoniaError("--data is required")
        name = config.run.name or datetime.now().strftime("tune-%Y%m%d-%H%M%S")
        if exists(join(storage, name, SWEEP_MANIFEST)):
            raise PneumoniaError(f"sweep {name!r} already exists in {storage}: pass --resume, or another --name")
    sweep = config.tune
    assert sweep is not None
    dataset, train_part, val_part = carve_validation(data_root, config)
    tracker, tracking = start_tracking(
        config.tracking, storage, name, "tune", manifest if resume else None, flatten(config.model_dump()),
        {**dataset_tags(dataset.root, train_part, val_part), "pneumonia.run_dir": join(storage, name)}, progress,
        what=" (one nested run per trial)")
    if not resume:
        write_manifest(storage, name, SWEEP_MANIFEST, dataset.root, config.model_dump(), tracking=tracking)
    with tracker.ended_on_error(tracking and tracking["run_id"]):
        result = _sweep(config, name, storage, resume, train_part, val_part, progress, tracking)
    if tracking:
        run_id = tracking["run_id"]
        tracker.log_metrics(run_id, {"best_objective": result.objective, "best_threshold": result.threshold,
                                     **numbers(result.metrics, "best.val_")})
        tracker.set_tags(run_id, {"pneumonia.best_checkpoint": result.best_checkpoint,
                                  **{f"pneumonia.best.{key}": str(value) for key, value in result.best_params.items()}})
        tracker.log_files(run_id, [result.results_csv, result.results_json, *result.plots,
                                   join(result.sweep_dir, "best_config.yaml")])
        tracker.end(run_id)
    return result



def _sweep(config: ExperimentConfig, name: str, storage: str, resume: bool, train_part, val_part, progress,
           tracking: dict | None) -> TuneResult:
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sweep = config.tune

    init_ray()
    check_resources(config, copies=sweep.max_concurrent_trials, extra_cpus=DRIVER_CPU,
                    hint="lower tune.max_concurrent_trials, scaling.workers or scaling.cpus_per_worker (e.g. 0.9)")
    trials_storage = join(storage, name, TRIALS_FOLDER)  # each trial's training run, named by its trial id
    trainable = trial_function(run_trial, config.model_dump(exclude={"tune"}), train_part, val_part,
                               trials_storage=trials_storage, tracking=tracking)
    sweep_path = join(storage, name)
    progress(
        f"sweep {name}: {sweep.num_samples} trials of {config.scaling.workers}-worker training, "
        f"{sweep.search} search, {'ASHA early stopping' if sweep.scheduler == 'asha' else 'no early stopping'}, "
        + (f"objective precision at recall >= {config.objective.target_recall}"
           if config.objective.metric == OBJECTIVE else f"objective {config.objective.metric}")
    )

    def new_tuner():
        scheduler = (
            ASHAScheduler(
                time_attr="training_iteration",
                max_t=config.train.epochs,
                grace_period=min(sweep.asha.grace_period, config.train.epochs),
                reduction_factor=sweep.asha.reduction_factor,
            )
            if sweep.scheduler == "asha"
            else FIFOScheduler()
        )
        return ray_tune.Tuner(
            trainable,
            param_space=search_space(sweep.space),
            tune_config=ray_tune.TuneConfig(
                metric=best_key(config.objective.metric),  # the trial's best epoch, as the table below keeps
                mode="max",
                num_samples=sweep.num_samples,
                # random search's generator carries the cap itself (Tune would warn it ignores this)
                max_concurrent_trials=None if sweep.search == "random" else sweep.max_concurrent_trials,
                scheduler=scheduler,
                search_alg=_searcher(sweep),
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=ray_tune.RunConfig(
                name=name,
                storage_path=storage,
                verbose=1,
                failure_config=ray_tune.FailureConfig(max_failures=1),
            ),
        )

    grid, statuses = run_trials(trainable, sweep_path, resume, new_tuner, config, f"sweep {name}",
                                history_of=lambda trial: history_location(trials_storage, trial.trial_id))
    close_children(tracking, grid, statuses, lambda result: join(trials_storage, Path(result.path).name), warn=progress)
    resume_command = f"`pneumonia tune --resume --name {name} --storage {storage}`"
    try:
        return summarize_sweep(grid, config, sweep_path, statuses)  # the table first, even of an interrupted sweep
    finally:
        # An interruption is the story, also when nothing finished to summarise.
        raise_if_interrupted(statuses, sweep.num_samples, f"sweep {name}", "trials", resume_command)


def _searcher(sweep):
    if sweep.search == "random":
        from ray.tune.search import BasicVariantGenerator

        # Seeded: repeatable sweeps. An explicit generator must be given the concurrency limit
        # itself (Tune applies max_concurrent_trials only to the default one).
        return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=sweep.seed))


def _best_row(rows: list[dict[str, Any]], objective: str = OBJECTIVE) -> dict[str, Any] | None:
    eligible = [row for row in rows if row.get("checkpoint_path") and finite(row.get(objective))]
    if not eligible:
        return None
    return max(eligible, key=lambda row: (row[objective], row.get(TIEBREAK, 0.0)))


def summarize_sweep(grid, config: ExperimentConfig, sweep_path: str,
                    statuses: dict[str, str] | None = None) -> TuneResult:
    """Results table, plots and the best checkpoint across every trial and epoch.

    ``statuses`` (:func:`pneumonia.training.supervision.saved_statuses`) keep an interrupted sweep's table
    honest: a trial stopped mid-run is INTERRUPTED, one that never ran NOT_STARTED, never TERMINATED.
    """
    objective = config.objective.metric
    trials: list[dict[str, Any]] = []
    best: tuple[tuple[float, float], dict[str, Any], dict[str, Any]] | None = None
    for result in grid:
        params = {key: value for key, value in (result.config or {}).items() if key in config.tune.space}
        history = result_history(result)
        row = _best_row(history, objective)
        last = history[-1] if history else {}
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        trials.append({
            "trial_id": trial_id,
            "status": (statuses or {}).get(trial_id) or ("ERROR" if result.error else "TERMINATED"),
            **{f"param:{key}": value for key, value in params.items()},
            "objective": row[objective] if row else None,
            "pr_auc": row.get(TIEBREAK) if row else None,
            "roc_auc": row.get("val_roc_auc") if row else None,
            "threshold": row.get("val_threshold") if row else None,
            "best_epoch": row.get("epoch") if row else None,
            "epochs": int(last.get("epoch", 0)),
            "time_s": float(last.get("time_total_s", 0.0)),
            "checkpoint": row.get("checkpoint_path") if row else None,
            "curve": [(r.get("epoch"), r.get(objective)) for r in history],
            "error": str(result.error).splitlines()[0] if result.error else None,
        })
        if row is not None:
            key = (row[objective], row.get(TIEBREAK, 0.0))
            if best is None or key > best[0]:
                best = (key, row, params)
    if best is None:
        errors = [t["error"] for t in trials if t["error"]]
        raise PneumoniaError("no trial produced a checkpoint" + (f"; first error: {errors[0]}" if errors else ""))
    _, row, params = best

    # Written locally: in the sweep folder, or in a scratch folder uploaded next to a remote sweep.
    table = [{k: v for k, v in t.items() if k != "curve"} for t in trials]
    table.sort(key=lambda t: (t["objective"] is not None, t["objective"] or 0, t["pr_auc"] or 0), reverse=True)
    best_config = trial_config(config.model_dump(exclude={"tune"}), params, "", "best").model_dump(exclude={"run", "tune"})
    with staged_directory(sweep_path) as out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "results.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=sorted({k for t in table for k in t}, key=_column_order))
            writer.writeheader()
            writer.writerows(table)
        (out_dir / "results.json").write_text(json.dumps(table, indent=2, default=str))
        plot_objective_map(trials, config, out_dir / "objective_map.png")
        plot_learning_curves(trials, config, out_dir / "learning_curves.png")
        (out_dir / "best_config.yaml").write_text(_yaml(best_config))
    outputs = {name: join(sweep_path, name) for name in
               ("results.csv", "results.json", "objective_map.png", "learning_curves.png", "best_config.yaml")}
    metrics = validation_metrics(row, finite=True)
    return TuneResult(
        sweep_dir=sweep_path,
        best_checkpoint=qualify(row["checkpoint_path"], sweep_path),
        best_config=best_config,
        best_params=params,
        objective=float(row[objective]),
        threshold=float(row["val_threshold"]),
        metrics=metrics,
        results_csv=outputs["results.csv"],
        results_json=outputs["results.json"],
        plots=[outputs["objective_map.png"], outputs["learning_curves.png"]],
        trials=table,
    )


def _column_order(name: str) -> tuple[int, str]:
    first = ["trial_id", "status", "objective", "pr_auc", "roc_auc", "threshold", "best_epoch", "epochs", "time_s"]
    return (first.index(name), name) if name in first else (len(first) + (name == "checkpoint") + (name == "error"), name)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
