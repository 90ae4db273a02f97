"""Distributed training with Ray Train: a TensorflowTrainer running MultiWorkerMirroredStrategy.

The driver (``train``) finds the data, carves validation out of train by patient, and starts N
workers. Each worker (``train_worker``) decodes only its shard of the training images, fits the
model under the strategy, and after every epoch scores the whole validation split exactly, saves a
checkpoint and reports metrics. Ray keeps the best K checkpoints by a validation metric, replaces
workers that die (``FailureConfig``) and, because every epoch is checkpointed, resumes from the last
one instead of epoch 0. Re-running with the same run name (``--resume``) continues an interrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
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
    shard,
    split_by_patient,
    training_records,
)
from pneumonia.errors import ConfigError, Interrupted, PneumoniaError
from pneumonia.preprocess import PreprocessSpec
from pneumonia.storage import exists, is_uri, join, list_files, qualify, read_bytes, write_text

RUN_MANIFEST = "pneumonia_run.json"
RESULT_FILE = "pneumonia_result.json"
HISTORY_FILE = "history.json"
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

REPORTED_VAL_METRICS = (
    "loss", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc",
    "precision_at_recall", "threshold",  # the objective, and the threshold that reaches it
)


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


def preprocess_spec(config: ExperimentConfig) -> PreprocessSpec:
    return PreprocessSpec(config.data.image_size, config.data.channels, config.data.resize,
                          config.data.normalize)


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


# ----------------------------------------------------------------------------- worker side


def records_to_rows(records: list[ImageRecord]) -> list[tuple]:
    return [(r.location, r.label, r.patient_id, r.subtype, r.split) for r in records]


def rows_to_records(rows: list) -> list[ImageRecord]:
    return [ImageRecord(*row) for row in rows]


def format_epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {metrics['epoch']:>3}/{epochs}"
        f"  loss {metrics['loss']:.4f} acc {metrics['accuracy']:.3f} auc {metrics['roc_auc']:.3f}"
        f" | val loss {metrics['val_loss']:.4f} acc {metrics['val_accuracy']:.3f}"
        f" prec {metrics['val_precision']:.3f} rec {metrics['val_recall']:.3f}"
        f" roc_auc {metrics['val_roc_auc']:.4f} pr_auc {metrics['val_pr_auc']:.4f}"
        f" prec@rec {metrics['val_precision_at_recall']:.3f}"
        + (f" | stress worst auc {metrics['val_stress_worst_roc_auc']:.4f} prec@rec {metrics['val_stress_worst_precision_at_recall']:.3f}"
           if "val_stress_worst_roc_auc" in metrics else "")
        + f" | {metrics['images_per_s']:.0f} img/s {metrics['epoch_time_s']:.1f}s"
    )


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import tensorflow as tf

    # Keep worker output to one line per epoch: TF logs every collective at INFO level.
    tf.get_logger().setLevel("ERROR")
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" per epoch

    from pneumonia.checkpoint import CheckpointInfo, load_model_from_directory, read_info, save_checkpoint
    from pneumonia.metrics import binary_metrics, operating_point
    from pneumonia.averaging import WeightAverage
    from pneumonia.models import build_model, compile_model, learning_rate_schedule
    from pneumonia.pipeline import load_images, predict_probabilities, training_dataset
    from pneumonia.stress import stress_report

    config = config_from_dict(loop_config["config"])
    train_records = rows_to_records(loop_config["train"])
    val_records = rows_to_records(loop_config["val"])
    label = loop_config.get("label", "")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    threads = max(1, int(config.scaling.cpus_per_worker))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
    mixed = config.train.mixed_precision if config.train.mixed_precision is not None else config.scaling.gpu
    if mixed:
        tf.keras.mixed_precision.set_global_policy("mixed_float16")

    # One worker needs no collectives: the default strategy avoids MultiWorkerMirroredStrategy's
    # per-step all-reduce overhead (measured in bench/train_throughput.py).
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if world > 1 else tf.distribute.get_strategy()
    spec = preprocess_spec(config)
    tf.keras.utils.set_random_seed(config.train.seed * 1000 + rank)
    batch_size = config.train.batch_size
    dataset, _, failures = training_dataset(
        shard(train_records, rank, world),
        spec,
        batch_size=batch_size,
        augment=config.data.augment,
        seed=config.data.seed + 7919 * config.train.seed + rank,
        cache=config.data.cache,
        class_weights=(config.train.normal_class_weight, 1.0),
        mixup=config.train.mixup,
    )
    steps_per_epoch = max(1, math.ceil(len(train_records) / (world * batch_size)))
    # Every worker scores the whole (small) validation split the same way: the forward pass reads
    # synchronised variables, so all workers must run it together; the metrics are then exact.
    validation = load_images(val_records, spec)
    if rank == 0 and (failures or validation.failures):
        print(f"[pneumonia] skipped {len(failures)} unreadable training and "
              f"{len(validation.failures)} validation images on rank 0 (see warnings)", flush=True)

    checkpoint = ray.train.get_checkpoint()
    with strategy.scope():
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                start_epoch = read_info(directory).epoch
                model = load_model_from_directory(directory, compile=True)
            if rank == 0:
                print(f"[pneumonia] resuming from checkpoint after epoch {start_epoch}", flush=True)
        else:
            start_epoch = 0
            model = build_model(config.model, spec.shape)
            rate = learning_rate_schedule(
                config.train.learning_rate, config.train.schedule,
                total_steps=config.train.epochs * steps_per_epoch,
                warmup_steps=round(config.train.warmup_epochs * steps_per_epoch))
            compile_model(model, config.train.optimizer, rate, config.train.label_smoothing)
    average = WeightAverage(config.train.ema_decay) if config.train.ema_decay else None
    stress = stress_inputs(config, spec, validation) if config.stress.enabled else None

    # Every epoch's metrics, kept in storage (Ray keeps only those of the best K checkpoints).
    # After a restart, epochs past the checkpoint we resumed from are dropped: they are redone.
    history_location = join(config.run.storage, config.run.name, HISTORY_FILE)
    history = [row for row in _read_history(history_location) if row["epoch"] <= start_epoch]

    class ReportEpoch(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            with average.applied() if average is not None else contextlib.nullcontext():
                self.report(epoch, logs)

        def report(self, epoch, logs):
            elapsed = time.perf_counter() - self.started
            probabilities = predict_probabilities(model, validation.images)
            val = binary_metrics(validation.labels, probabilities)
            point = operating_point(validation.labels, probabilities, config.objective.target_recall)
            val.update(precision_at_recall=point.precision, threshold=point.threshold)
            metrics: dict[str, Any] = {name: float(value) for name, value in (logs or {}).items()}
            metrics.update({f"val_{name}": val[name] for name in REPORTED_VAL_METRICS})
            if stress is not None:
                report = stress_report(lambda images: predict_probabilities(model, images), stress[0], stress[1],
                                       config.objective.target_recall, threshold=point.threshold)
                metrics.update({f"val_{name}": value for name, value in report.summary().items()})
            metrics.update(
                epoch=epoch + 1,
                start_epoch=start_epoch,
                epoch_time_s=elapsed,
                images_per_s=steps_per_epoch * batch_size * world / elapsed,
            )
            metrics = _objective_first(metrics, history, config.objective.metric)
            info = CheckpointInfo(epoch=epoch + 1, config=config.model_dump(), preprocess=spec,
                                  metrics={k: v for k, v in metrics.items() if k.startswith("val_")})
            with tempfile.TemporaryDirectory(prefix="pneumonia-ckpt-") as directory:
                # Under MultiWorkerMirroredStrategy every worker must save, or saving deadlocks;
                # only rank 0's copy is reported (and so persisted).
                save_checkpoint(directory, model, info)
                if rank == 0:
                    print("[pneumonia] " + (f"{label}: " if label else "")
                          + format_epoch_line(metrics, config.train.epochs), flush=True)
                    history.append(metrics)
                    write_text(history_location, json.dumps(history, indent=1))
                reported = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
                ray.train.report(metrics, checkpoint=reported)

    if start_epoch >= config.train.epochs:
        return
    model.fit(
        dataset,
        epochs=config.train.epochs,
        initial_epoch=start_epoch,
        steps_per_epoch=steps_per_epoch,
        # The average must see each step before the epoch's report swaps it in.
        callbacks=[*([average] if average is not None else []), ReportEpoch()],
        verbose=0,
    )


def best_key(objective: str) -> str:
    """The reported running best of a sweep's objective: what Tune ranks, stops and shows by."""
    return f"best_{objective}"


def _objective_first(metrics: dict[str, Any], history: list[dict[str, Any]], objective: str) -> dict[str, Any]:
    """The epoch's metrics with the sweep's objective, its best so far in this run, and the
    validation ROC-AUC first: Tune's progress table shows the first few reported metrics, and
    its "current best" should be the epoch a sweep would keep (each trial's best checkpoint),
    not the last one, nor training metrics at a 0.5 threshold."""
    earlier = [row[objective] for row in history if isinstance(row.get(objective), (int, float))]
    current = metrics.get(objective)
    if not isinstance(current, (int, float)):
        return metrics
    first = {best_key(objective): max([current, *earlier]), objective: current}
    if "val_roc_auc" in metrics:
        first["val_roc_auc"] = metrics["val_roc_auc"]
    first["epoch"] = metrics["epoch"]
    return {**first, **metrics}


def stress_inputs(config: ExperimentConfig, spec: PreprocessSpec, validation):
    """(shifted images by shift name, labels) of the validation images, made once per run."""
    from pneumonia.pipeline import decode_threads
    from pneumonia.stress import load_sources, shifted_images, stratified_subset

    chosen = stratified_subset(validation.labels, config.stress.max_images, config.data.seed)
    sources = load_sources([validation.records[index].location for index in chosen])
    images = shifted_images(sources, spec, config.stress.shifts, seed=config.data.seed, threads=decode_threads())
    return images, validation.labels[chosen]


def _read_history(location: str) -> list[dict[str, Any]]:
    return json.loads(read_bytes(location)) if exists(location) else []


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

    available = ray.cluster_resources()
    what = f"{copies} concurrent runs of " if copies > 1 else ""
    wanted_cpus = copies * (config.scaling.workers * config.scaling.cpus_per_worker + extra_cpus)
    problems = []
    if available.get("CPU", 0) < wanted_cpus - 1e-9:
        extra = f" + {extra_cpus:g}" if extra_cpus else ""
        problems.append(
            f"{what}{config.scaling.workers} workers x {config.scaling.cpus_per_worker} CPUs{extra} = "
            f"{wanted_cpus:g} CPUs, but the cluster has {available.get('CPU', 0):g}"
        )
    wanted_gpus = copies * config.scaling.workers
    if config.scaling.gpu and available.get("GPU", 0) < wanted_gpus:
        problems.append(f"{what}{config.scaling.workers} workers x 1 GPU, but the cluster has "
                        f"{available.get('GPU', 0):g} GPUs")
    if not problems:
        return
    message = "not enough resources: " + "; ".join(problems) + f" ({hint})"
    from pneumonia.local_ray import user_cluster_address

    if user_cluster_address():
        # An autoscaling cluster may still add nodes: warn, do not fail.
        print(f"warning: {message}; waiting for the autoscaler", file=sys.stderr)
        return
    raise ConfigError(message)


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
    history = _read_history(join(storage, name, HISTORY_FILE))
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
