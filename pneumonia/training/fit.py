"""One distributed Ray Train run: Ray Train's TensorFlow trainer running MultiWorkerMirroredStrategy.

Shared by a single training run (:mod:`pneumonia.training.driver`), each sweep trial
(:mod:`pneumonia.training.sweep`) and each ensemble member (:mod:`pneumonia.training.members`).
Each worker (:func:`pneumonia.training.worker.train_worker`) decodes only its shard of the
training images, fits the model under the strategy, and after every epoch scores the whole
validation split exactly, saves a checkpoint and reports metrics. Ray keeps the best K checkpoints
by a validation metric, replaces workers that die (``FailureConfig``) and, because every epoch is
checkpointed, resumes from the last one instead of epoch 0.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pneumonia.artifacts.runs import RESULT_FILE, history_location, read_history, validation_metrics
from pneumonia.config import ExperimentConfig
from pneumonia.data.records import ImageRecord
from pneumonia.errors import Interrupted, PneumoniaError
from pneumonia.local_ray import gpu_advice, refuse_or_wait
from pneumonia.storage import join, qualify, write_text
from pneumonia.training.supervision import ResourceWatch, describe_cluster, start_settings
from pneumonia.training.worker import records_to_rows, train_worker


@dataclass
class TrainResult:
    run_dir: str
    best_checkpoint: str
    metrics: dict[str, float]  # validation metrics of the best checkpoint
    best_epoch: int
    epochs_completed: int
    history: list[dict[str, Any]] = field(default_factory=list)
    # A distilled student's teacher: {"checkpoint": path, "metrics": its validation metrics}.
    teacher: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "best_checkpoint": self.best_checkpoint,
            "metrics": self.metrics,
            "best_epoch": self.best_epoch,
            "epochs_completed": self.epochs_completed,
            "run_dir": self.run_dir,
            **({"teacher": self.teacher} if self.teacher else {}),
        }


def summarize_run(result, config: ExperimentConfig, storage: str, name: str) -> TrainResult:
    """The best checkpoint of Ray's ``result`` by ``run.checkpoint_metric``, with the run's history;
    written to ``<storage>/<name>/`` as the run's result file."""
    best = result.best_checkpoints or []
    if not best:
        raise PneumoniaError("training finished without a checkpoint")
    sign = 1 if config.run.checkpoint_mode == "max" else -1
    checkpoint, metrics = max(best, key=lambda item: sign * item[1].get(config.run.checkpoint_metric, -math.inf))
    history = read_history(history_location(storage, name))
    summary = TrainResult(
        run_dir=join(storage, name),
        best_checkpoint=qualify(checkpoint.path, storage),
        metrics=validation_metrics(metrics),
        best_epoch=int(metrics.get("epoch", 0)),
        epochs_completed=int(history[-1]["epoch"]) if history else int(metrics.get("epoch", 0)),
        history=history,
    )
    write_text(join(storage, name, RESULT_FILE), json.dumps(asdict(summary), indent=2, default=float))
    return summary


def check_resources(config: ExperimentConfig, copies: int = 1, extra_cpus: float = 0.0,
                    hint: str = "lower --workers or scaling.cpus_per_worker") -> None:
    """Fail fast when the cluster can never fit ``copies`` concurrent runs of this config, each
    needing ``extra_cpus`` besides its workers (a Tune trial's driver); Ray would wait forever."""
    import ray

    available = ray.cluster_resources()
    what = f"{copies} concurrent runs of " if copies > 1 else ""
    wanted_cpus = copies * (config.scaling.workers * config.scaling.cpus_per_worker + extra_cpus)
    problems = []
    if available.get("CPU", 0) < wanted_cpus - 1e-9:
        extra = f" + {extra_cpus:g}" if extra_cpus else ""
        problems.append(
            f"{what}{config.scaling.workers} workers x {config.scaling.cpus_per_worker} CPUs{extra} = "
            f"{wanted_cpus:g} CPUs, but the cluster has {available.get('CPU', 0):g} ({hint})"
        )
    gpus = available.get("GPU", 0)
    if config.scaling.gpu and gpus < copies * config.scaling.workers:
        advice = gpu_advice(gpus, "--gpu (scaling.gpu)", "lower --workers to the GPUs there are")
        problems.append(f"{what}{config.scaling.workers} workers x 1 GPU, but the cluster has {gpus:g} GPUs ({advice})")
    refuse_or_wait(problems)


def train_resume_command(name: str, storage: str) -> str:
    """The command that continues the interrupted run ``name`` in ``storage``, as messages quote it."""
    return f"`pneumonia train --resume --name {name} --storage {storage}`"


def fit_run(config: ExperimentConfig, train_part: list[ImageRecord], val_part: list[ImageRecord],
            callbacks: list | None = None, label: str = "", watch: bool = True, tracking: dict | None = None,
            teacher: dict | None = None, resume_command: str | None = None):
    """One Ray Train run (config.run.storage absolute, config.run.name set); returns Ray's Result.

    A run whose name already has a snapshot in storage continues from its latest checkpoint:
    that is how --resume, Ray's worker-failure recovery and restored Tune trials all work.
    With ``watch`` (a driver's own run, not a Tune trial: the sweep's driver watches those), a
    :class:`~pneumonia.training.supervision.ResourceWatch` says why the workers wait and stops a starved run.
    ``tracking`` (:func:`pneumonia.artifacts.tracking.entry`): the MLflow run that rank 0 logs every epoch into.
    ``teacher`` (``{"checkpoint": path, "weight": w}``, :mod:`pneumonia.training.distill`): every worker
    loads that model and blends its probabilities into the training targets.
    ``resume_command``: what an interruption tells the user to run, when this run is a stage of a
    larger one (a student inside its ensemble's run); default: this run's own ``train --resume``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from pneumonia.training.tf_backend import TensorflowBackendConfig

    # Ray's TensorflowTrainer is this trainer with its TensorFlow backend; ours imports no
    # TensorFlow where only Ray's bookkeeping runs (pneumonia.training.tf_backend).
    trainer = DataParallelTrainer(
        train_worker,
        backend_config=TensorflowBackendConfig(),
        train_loop_config={
            "config": config.model_dump(),
            "train": records_to_rows(train_part),
            "val": records_to_rows(val_part),
            "label": label,  # prefixes the epoch lines when several runs print side by side
            "tracking": tracking,  # Train V2 takes no logger callbacks: rank 0 logs into this MLflow run
            "teacher": teacher,
        },
        scaling_config=ScalingConfig(
            num_workers=config.scaling.workers,
            use_gpu=config.scaling.gpu,
            resources_per_worker={"CPU": config.scaling.cpus_per_worker, **({"GPU": 1} if config.scaling.gpu else {})},
        ),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=config.run.storage,
            failure_config=FailureConfig(max_failures=config.run.max_failures,
                                         controller_failure_limit=start_settings(config)),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.run.keep_checkpoints,
                checkpoint_score_attribute=config.run.checkpoint_metric,
                checkpoint_score_order=config.run.checkpoint_mode,
            ),
            callbacks=callbacks or None,
        ),
    )
    resume = resume_command or train_resume_command(config.run.name, config.run.storage)
    with _restored_sigint():
        try:
            with ResourceWatch(config, what=f"run {config.run.name}", stops="run") if watch else contextlib.nullcontext():
                return trainer.fit()
        except PneumoniaError:
            raise
        except (KeyboardInterrupt, SystemExit):
            # Ray Train's Ctrl-C handler aborts the run (workers stopped, placement group removed)
            # and then calls sys.exit(0): that is an interruption, not a success.
            raise Interrupted(f"training interrupted; {resume} continues it from its last checkpoint") from None
        except Exception as error:  # Ray wraps worker errors; keep the cause, drop the stack
            cause = getattr(error, "__cause__", None) or error
            failure = getattr(cause, "controller_failure", cause)  # Ray Train's ControllerError wraps it
            if type(failure).__name__ == "WorkerGroupStartupTimeoutError":  # Train's own timeout, after retries

                raise PneumoniaError(f"training failed: the workers did not get their resources in "
                                     f"{config.run.start_retries + 1} tries; {describe_cluster()}") from error
            raise PneumoniaError(f"training failed: {type(cause).__name__}: {cause}") from error


@contextlib.contextmanager
def _restored_sigint():
    """Ray Train installs a Ctrl-C handler for its run and never removes it: put ours back after."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
