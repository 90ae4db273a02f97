"""Distributed training with Ray Train: a TensorflowTrainer running MultiWorkerMirroredStrategy.

The driver (``train``) finds the data, carves validation out of train by patient, and starts N
workers. Each worker (:func:`pneumonia.worker.train_worker`) decodes only its shard of the training images, fits the
model under the strategy, and after every epoch scores the whole validation split exactly, saves a
checkpoint and reports metrics. Ray keeps the best K checkpoints by a validation metric, replaces
workers that die (``FailureConfig``) and, because every epoch is checkpointed, resumes from the last
one instead of epoch 0. Re-running with the same run name (``--resume``) continues an interrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pneumonia import RAY_ENV
from pneumonia.config import ExperimentConfig, config_from_dict
from pneumonia.data import (
    ImageRecord,
    check_readable,
    class_counts,
    discover,
    split_by_patient,
    training_records,
)
from pneumonia.errors import Interrupted, PneumoniaError
from pneumonia.storage import exists, is_uri, join, list_files, qualify, read_bytes, write_text
from pneumonia.worker import history_location, read_history, records_to_rows, train_worker

RUN_MANIFEST = "pneumonia_run.json"
RESULT_FILE = "pneumonia_result.json"
WORKER_ENV = {
    **RAY_ENV,
    # Ray Train v2 re-logs worker prints; ours are already one line per epoch.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # ... and logs every report at INFO level to the console; the log files are enough.
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    # Starting a worker imports TensorFlow: on a small, busy node that alone can take a minute.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
}
"""Set in every Ray process before TensorFlow loads (Keras 3 cannot train multi-worker)."""

@dataclass
class TrainResult:
    run_dir: str
    best_checkpoint: str
    metrics: dict[str, float]  # validation metrics of the best checkpoint
    best_epoch: int
    epochs_completed: int
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "best_checkpoint": self.best_checkpoint,
            "metrics": self.metrics,
            "best_epoch": self.best_epoch,
            "epochs_completed": self.epochs_completed,
            "run_dir": self.run_dir,
        }


def carve_validation(data_root: str, config: ExperimentConfig):
    """(dataset, train records, validation records): the same carve for train, tune and export."""
    dataset = discover(data_root)
    records = training_records(dataset)
    train_part, val_part = split_by_patient(records, config.data.val_fraction, config.data.seed)
    if not val_part or not any(r.label == 0 for r in val_part) or not any(r.label == 1 for r in val_part):
        raise PneumoniaError(
            f"too few patients in {data_root} to carve a validation split with both classes "
            f"(val_fraction={config.data.val_fraction}); add data or raise data.val_fraction"
        )
    return dataset, train_part, val_part


# ----------------------------------------------------------------------------- driver side


def driver_env_vars() -> dict[str, str]:
    """WORKER_ENV less the variables a Ray Job's own runtime env already sets: Ray refuses to
    merge a job's runtime env with a driver's that sets the same variable, and the job's value
    (what the user submitted) should win anyway."""
    import json

    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        taken = set((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        taken = set()
    return {name: value for name, value in WORKER_ENV.items() if name not in taken}


def init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS, or start an embedded local Ray that knows its own
    address (pneumonia.local_ray: another Ray on the machine must not confuse Ray's own processes)."""
    import ray

    from pneumonia.local_ray import start_ray

    if ray.is_initialized():
        return
    start_ray(driver_env_vars(), log_to_driver=True, logging_level="WARNING")


def check_resources(config: ExperimentConfig, copies: int = 1, extra_cpus: float = 0.0,
                    hint: str = "lower --workers or scaling.cpus_per_worker") -> None:
    """Fail fast when the cluster can never fit ``copies`` concurrent runs of this config, each
    needing ``extra_cpus`` besides its workers (a Tune trial's driver); Ray would wait forever."""
    import ray

    from pneumonia.supervision import gpu_advice, refuse_or_wait

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


def resolve_storage(storage: str) -> str:
    """Ray needs an absolute local path or a URI."""
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())


def latest_run(storage: str, manifest_name: str = RUN_MANIFEST, what: str = "run") -> str:
    """The most recently started run (or sweep) in storage, by its manifest's creation time."""
    candidates = []
    try:
        entries = list_files(storage)
    except PneumoniaError:
        entries = []
    for entry in entries:
        parts = entry.relative.split("/")
        if len(parts) == 2 and parts[1] == manifest_name:
            manifest = json.loads(read_bytes(entry.location))
            candidates.append((manifest.get("created", ""), parts[0]))
    if not candidates:
        raise PneumoniaError(f"--resume: no earlier {what} found in {storage}")
    return max(candidates)[1]


def load_manifest(storage: str, name: str) -> dict[str, Any]:
    location = join(storage, name, RUN_MANIFEST)
    if not exists(location):
        raise PneumoniaError(f"--resume: run {name!r} not found in {storage}")
    return json.loads(read_bytes(location))


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
    write_text(
        join(storage, name, RUN_MANIFEST),
        json.dumps({"name": name, "data": dataset.root, "config": config.model_dump(),
                    "created": datetime.now(timezone.utc).isoformat()}, indent=2),
    )

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
        from pneumonia.members import train_ensemble

        return train_ensemble(config, train_part, val_part, storage, name, resume, progress)
    result = fit_run(config, train_part, val_part)
    return _summarize(result, config, storage, name)


def fit_run(config: ExperimentConfig, train_part: list[ImageRecord], val_part: list[ImageRecord],
            callbacks: list | None = None, label: str = "", watch: bool = True):
    """One Ray Train run (config.run.storage absolute, config.run.name set); returns Ray's Result.

    A run whose name already has a snapshot in storage continues from its latest checkpoint:
    that is how --resume, Ray's worker-failure recovery and restored Tune trials all work.
    With ``watch`` (a driver's own run, not a Tune trial: the sweep's driver watches those), a
    :class:`~pneumonia.supervision.ResourceWatch` says why the workers wait and stops a starved run.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from pneumonia.supervision import ResourceWatch, start_settings

    trainer = TensorflowTrainer(
        train_worker,
        train_loop_config={
            "config": config.model_dump(),
            "train": records_to_rows(train_part),
            "val": records_to_rows(val_part),
            "label": label,  # prefixes the epoch lines when several runs print side by side
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
    resume = f"`pneumonia train --resume --name {config.run.name} --storage {config.run.storage}`"
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
                from pneumonia.supervision import describe_cluster

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


def _summarize(result, config: ExperimentConfig, storage: str, name: str) -> TrainResult:
    best = result.best_checkpoints or []
    if not best:
        raise PneumoniaError("training finished without a checkpoint")
    sign = 1 if config.run.checkpoint_mode == "max" else -1
    checkpoint, metrics = max(best, key=lambda item: sign * item[1].get(config.run.checkpoint_metric, -math.inf))
    history = read_history(history_location(storage, name))
    summary = TrainResult(
        run_dir=join(storage, name),
        best_checkpoint=qualify(checkpoint.path, storage),
        metrics={key[4:]: float(value) for key, value in metrics.items()
                 if key.startswith("val_") and isinstance(value, (int, float))},
        best_epoch=int(metrics.get("epoch", 0)),
        epochs_completed=int(history[-1]["epoch"]) if history else int(metrics.get("epoch", 0)),
        history=history,
    )
    write_text(join(storage, name, RESULT_FILE), json.dumps(asdict(summary), indent=2, default=float))
    return summary
