"""Hyperparameter search with Ray Tune, where every trial is a distributed Ray Train run.

Objective: precision at recall >= ``objective.target_recall`` on the patient-grouped validation
split. Each trial reports every epoch (Ray Train's ``TuneReportCallback`` forwards the workers'
reports), so ASHA can stop poor trials early; Optuna's TPE (or random search) proposes the next
configuration. Trials checkpoint every epoch into the sweep's storage, so an interrupted sweep
resumes (``--resume``) losing at most the epochs since those checkpoints.

How the winner is chosen (the selection rule, also written in the results table's ``score_rule``):
a trial's **score** is the mean of its objective over its last :data:`SMOOTHING_EPOCHS` epochs, not
its best single epoch. On a validation split of a few dozen NORMAL images one epoch's precision
at 95% recall swings by several points, and the maximum over trials x epochs of such a noisy
number picks a lucky spike, not a better recipe (issue 24: a "winner" whose test precision was
lower than the untuned baseline's). The winner is the trial with the highest score among those that
ran every epoch (ASHA's stopped trials only when none did; ties broken by PR-AUC), and its model is
its **last** epoch's checkpoint with that epoch's threshold: with ``train.ema_decay`` (weights
EMA, as tune_configs/quick.yaml sets) the last checkpoints are steady. Trials therefore keep their
latest checkpoints (``run.checkpoint_metric: epoch``). ASHA stops and Tune's "current best" ranks
by the same score (reported as ``smoothed_objective`` every epoch).

An untuned baseline compared with the winner must go through the same rule: ``tune(...,
untuned_first=True)`` makes the sweep's first trial the recipe untuned (every searched key at the
config's own value: :func:`untuned_params`), a trial like the others (same epochs, validation
carve, selection rule; only the searched values differ), reported as ``TuneResult.baseline`` and
left out of the winner's choice (the winner is the best *searched* trial). Give such a sweep no
early stopping (``tune.scheduler: none``), so the baseline is never stopped at fewer epochs.

Each trial's training run (checkpoints, history.json) is ``<sweep>/trials/<trial id>/``; Tune's own
trial files are ``<sweep>/<trial id>/``.

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
    read_history,
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
from pneumonia.training.worker import rows_to_records

OBJECTIVE = "val_precision_at_recall"
"""The default objective (``objective.metric``); a stress metric such as
``val_stress_worst_precision_at_recall`` (with ``stress.enabled``) favours shift-robust trials."""
TIEBREAK = "val_pr_auc"
SMOOTHING_EPOCHS = 3
"""A trial's score is the mean of its objective over this many last epochs (module docstring)."""
SCORE = "smoothed_objective"
"""What each trial reports as its score every epoch (what ASHA and Tune's table rank by)."""
CURRENT = "objective"
"""The epoch's own objective, as reported next to the score (short names: Tune's table cuts at 20 characters)."""


def score_rule(objective: str) -> str:
    """The selection rule in words, for the results table and the demo."""
    return (f"mean {objective} of the last {SMOOTHING_EPOCHS} epochs; winner among trials that ran every epoch; "
            f"model: its last epoch's checkpoint")


def smoothed(values: list[float]) -> float | None:
    """The score of a trial whose objective went through ``values`` (epoch order): the mean of the
    last :data:`SMOOTHING_EPOCHS` finite ones, None when there is none."""
    numbers_ = [float(value) for value in values if finite(value)][-SMOOTHING_EPOCHS:]
    return sum(numbers_) / len(numbers_) if numbers_ else None


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
    # With untuned_first: the untuned trial's row of the table (its score as "objective", its
    # "checkpoint" and "threshold"), None otherwise.
    baseline: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
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
        # Keep the latest checkpoints: a trial's model is its last epoch's (the selection rule above).
        "checkpoint_metric": "epoch",
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
    objective = config.objective.metric
    # Epochs a resumed trial ran before (its workers' history): the score spans them too.
    earlier = {row["epoch"]: row.get(objective) for row in read_history(history_location(trials_storage, trial_id))}

    class ReportScore(TuneReportCallback):
        """Forward each epoch to Tune led by the trial's score, its objective and ROC-AUC under
        short, distinct names (Tune's table shows the first four metrics, cut to 20 characters)."""

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and finite(metrics[0].get(objective)) and "epoch" in metrics[0]:
                row = metrics[0]
                earlier[row["epoch"]] = row[objective]
                values = [earlier[epoch] for epoch in sorted(earlier) if epoch <= row["epoch"]]
                score = smoothed(values)
                lead = {SCORE: float("nan") if score is None else score, CURRENT: row[objective], "roc_auc": row.get("val_roc_auc"),
                        "epoch": row["epoch"]}
                metrics = [{**lead, **row}, *metrics[1:]]
            super().after_report(run_context, metrics, checkpoint)

    fit_run(config, rows_to_records(train_rows), rows_to_records(val_rows), callbacks=[ReportScore()],
            label=f"trial {trial_id}", watch=False, tracking=own)


def untuned_params(config: ExperimentConfig) -> dict[str, Any]:
    """The searched keys at the config's own values: the recipe untuned (e.g. its learning rate and
    a NORMAL class weight of 1)."""
    if config.tune is None:
        raise ConfigError("the config has no `tune:` section (see tune_configs/quick.yaml)")
    base = config.model_dump(exclude={"tune"})
    params = {}
    for key in config.tune.space:
        node: Any = base
        for part in key.split("."):
            node = node[part]
        params[key] = node
    return params


def tune(
    config: ExperimentConfig,
    data_root: str | None,
    resume: bool = False,
    progress: Callable[[str], None] = print,
    untuned_first: bool = False,
) -> TuneResult:
    """Run (or resume) the sweep described by ``config.tune`` on data_root. ``untuned_first``: the
    first of its ``tune.num_samples`` trials is the recipe untuned, the baseline (module docstring)."""
    storage = resolve_storage(config.run.storage)
    if resume:
        name = config.run.name or latest_run(storage, SWEEP_MANIFEST, "sweep")
        manifest = load_manifest(storage, name, SWEEP_MANIFEST, "sweep")
        config = config_from_dict(manifest["config"], source=f"sweep {name}")
        data_root = manifest["data"]
        untuned_first = bool(manifest.get("untuned_first"))
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
        write_manifest(storage, name, SWEEP_MANIFEST, dataset.root, config.model_dump(), tracking=tracking,
                       extra={"untuned_first": untuned_first})
    with tracker.ended_on_error(tracking and tracking["run_id"]):
        result = _sweep(config, name, storage, resume, train_part, val_part, progress, tracking, untuned_first)
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
           tracking: dict | None, untuned_first: bool = False) -> TuneResult:
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
                metric=SCORE,  # the trial's smoothed objective: what ASHA stops by and the winner is chosen by
                mode="max",
                num_samples=sweep.num_samples,
                # random search's generator carries the cap itself (Tune would warn it ignores this)
                max_concurrent_trials=None if sweep.search == "random" else sweep.max_concurrent_trials,
                scheduler=scheduler,
                search_alg=_searcher(sweep, [untuned_params(config)] if untuned_first else None),
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
        # The table first, even of an interrupted sweep.
        return summarize_sweep(grid, config, sweep_path, statuses,
                               baseline_params=untuned_params(config) if untuned_first else None)
    finally:
        # An interruption is the story, also when nothing finished to summarise.
        raise_if_interrupted(statuses, sweep.num_samples, f"sweep {name}", "trials", resume_command)


def _searcher(sweep, first: list[dict[str, Any]] | None = None):
    """The search algorithm; ``first``: configurations to try before any sampled one."""
    if sweep.search == "random":
        from ray.tune.search import BasicVariantGenerator

        # Seeded: repeatable sweeps. An explicit generator must be given the concurrency limit
        # itself (Tune applies max_concurrent_trials only to the default one).
        return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials,
                                     points_to_evaluate=first)
    import warnings

    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if first:
        # The untuned recipe may sit outside the searched range (the demo's learning rate 0.001
        # below a 0.002-0.008 search): on purpose, and Optuna's "Fixed parameter ... is out of
        # range" warning would read as an error in the demo's first minute.
        warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range", category=UserWarning)
    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=sweep.seed), points_to_evaluate=first)


def trial_score(history: list[dict[str, Any]], objective: str = OBJECTIVE) -> tuple[float | None, dict[str, Any] | None]:
    """(score, model row) of a trial: its smoothed objective (:func:`smoothed`) and the last epoch
    that has a checkpoint (its model), or (None, None) when it has neither."""
    score = smoothed([row.get(objective) for row in history])
    with_checkpoint = [row for row in history if row.get("checkpoint_path")]
    if score is None or not with_checkpoint:
        return None, None
    return score, with_checkpoint[-1]


def summarize_sweep(grid, config: ExperimentConfig, sweep_path: str,
                    statuses: dict[str, str] | None = None,
                    baseline_params: dict[str, Any] | None = None) -> TuneResult:
    """Results table, plots and the winner by the selection rule (module docstring). The trial with
    ``baseline_params`` (the untuned one) is the baseline, left out of the winner's choice.

    ``statuses`` (:func:`pneumonia.training.supervision.saved_statuses`) keep an interrupted sweep's table
    honest: a trial stopped mid-run is INTERRUPTED, one that never ran NOT_STARTED, never TERMINATED.
    """
    objective = config.objective.metric
    rule = score_rule(objective)
    trials: list[dict[str, Any]] = []
    candidates: list[tuple[bool, float, float, dict[str, Any], dict[str, Any]]] = []
    for result in grid:
        params = {key: value for key, value in (result.config or {}).items() if key in config.tune.space}
        history = result_history(result)
        score, row = trial_score(history, objective)
        last = history[-1] if history else {}
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        epochs = int(last.get("epoch", 0))
        untuned = baseline_params is not None and _same_params(params, baseline_params)
        trials.append({
            "trial_id": trial_id,
            "role": "untuned baseline" if untuned else "searched",
            "status": (statuses or {}).get(trial_id) or ("ERROR" if result.error else "TERMINATED"),
            **{f"param:{key}": value for key, value in params.items()},
            "objective": score,
            "last_objective": row.get(objective) if row else None,
            "pr_auc": row.get(TIEBREAK) if row else None,
            "roc_auc": row.get("val_roc_auc") if row else None,
            "threshold": row.get("val_threshold") if row else None,
            "checkpoint_epoch": row.get("epoch") if row else None,
            "epochs": epochs,
            "time_s": float(last.get("time_total_s", 0.0)),
            "score_rule": rule,
            "checkpoint": row.get("checkpoint_path") if row else None,
            "curve": [(r.get("epoch"), r.get(objective)) for r in history],
            "error": str(result.error).splitlines()[0] if result.error else None,
        })
        if row is not None and not untuned:
            candidates.append((epochs >= config.train.epochs, score, row.get(TIEBREAK, 0.0) or 0.0, row, params))
    if not candidates:
        errors = [t["error"] for t in trials if t["error"]]
        raise PneumoniaError("no trial produced a checkpoint" + (f"; first error: {errors[0]}" if errors else ""))
    _, score, _, row, params = max(candidates, key=lambda candidate: candidate[:3])

    # Written locally: in the sweep folder, or in a scratch folder uploaded next to a remote sweep.
    table = [{k: v for k, v in t.items() if k != "curve"} for t in trials]
    table.sort(key=lambda t: (t["objective"] is not None, t["epochs"], t["objective"] or 0, t["pr_auc"] or 0),
               reverse=True)
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
        objective=float(score),
        threshold=float(row["val_threshold"]),
        metrics=metrics,
        results_csv=outputs["results.csv"],
        results_json=outputs["results.json"],
        plots=[outputs["objective_map.png"], outputs["learning_curves.png"]],
        trials=table,
        baseline=next((t for t in table if t["role"] == "untuned baseline"), None),
    )


def _same_params(params: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return params.keys() == wanted.keys() and all(
        params[key] == wanted[key] or (isinstance(params[key], float) and isinstance(wanted[key], (int, float))
                                       and abs(params[key] - wanted[key]) <= 1e-12 * max(1.0, abs(wanted[key])))
        for key in wanted)


def _column_order(name: str) -> tuple[int, str]:
    first = ["trial_id", "role", "status", "objective", "last_objective", "pr_auc", "roc_auc", "threshold", "checkpoint_epoch",
             "epochs", "time_s", "score_rule"]
    return (first.index(name), name) if name in first else (len(first) + (name == "checkpoint") + (name == "error"), name)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
