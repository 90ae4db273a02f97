"""What runs on every Ray Train worker: decode this worker's shard, fit under the strategy, and
after each epoch score the whole validation split, save a checkpoint and report.

The driver (:mod:`pneumonia.training.driver`, and the sweep and ensemble drivers that reuse it) passes the
config and the records as plain rows; everything here runs in the worker's process, where
TensorFlow is imported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from typing import Any

from pneumonia.artifacts.runs import history_location, read_history
from pneumonia.artifacts.tracking import worker_logger
from pneumonia.config import ExperimentConfig, config_from_dict
from pneumonia.data.pipeline import decode_threads, load_images, predict_probabilities, training_dataset
from pneumonia.data.preprocess import PreprocessSpec
from pneumonia.data.records import ImageRecord, shard
from pneumonia.data.shifts import load_sources, shifted_images, stratified_subset
from pneumonia.models.checkpoint import (
    CheckpointInfo,
    load_checkpoint,
    load_model_from_directory,
    read_info,
    save_checkpoint,
)
from pneumonia.storage import write_text

REPORTED_VAL_METRICS = (
    "loss", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc",
    "precision_at_recall", "threshold",  # the objective, and the threshold that reaches it
)



def preprocess_spec(config: ExperimentConfig) -> PreprocessSpec:
    return PreprocessSpec(config.data.image_size, config.data.channels, config.data.resize,
                          config.data.normalize)



def records_to_rows(records: list[ImageRecord]) -> list[tuple]:
    return [(r.location, r.label, r.patient_id, r.subtype, r.split) for r in records]


def rows_to_records(rows: list) -> list[ImageRecord]:
    return [ImageRecord(*row) for row in rows]


def format_epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {metrics['epoch']:>3}/{epochs}"
        f"  loss {metrics['loss']:.4f}"
        # A distilled student's training targets are probabilities: no accuracy or AUC on them.
        + (f" acc {metrics['accuracy']:.3f} auc {metrics['roc_auc']:.3f}" if "roc_auc" in metrics else "")
        + f" | val loss {metrics['val_loss']:.4f} acc {metrics['val_accuracy']:.3f}"
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

    from pneumonia.metrics.binary import binary_metrics, operating_point  # lazy: scikit-learn
    from pneumonia.metrics.stress import stress_report  # lazy: scikit-learn
    from pneumonia.models.architectures import (  # lazy: TensorFlow, loaded by the workers only
        build_model,
        compile_model,
        learning_rate_schedule,
    )
    from pneumonia.training.ema import WeightAverage  # lazy: TensorFlow, loaded by the workers only

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
    if world > 1:
        configure_heartbeat(config.run.heartbeat_timeout_s)
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if world > 1 else tf.distribute.get_strategy()
    spec = preprocess_spec(config)
    tf.keras.utils.set_random_seed(config.train.seed * 1000 + rank)
    batch_size = config.train.batch_size
    # A distilled student (pneumonia.training.distill): the teacher labels every augmented batch
    # on this worker, outside the strategy (it is not trained, nothing of it is synchronised).
    teaching = loop_config.get("teacher")
    teacher = load_checkpoint(teaching["checkpoint"])[0] if teaching else None
    dataset, _, failures = training_dataset(
        shard(train_records, rank, world),
        spec,
        batch_size=batch_size,
        augment=config.data.augment,
        seed=config.data.seed + 7919 * config.train.seed + rank,
        cache=config.data.cache,
        class_weights=(config.train.normal_class_weight, 1.0),
        mixup=config.train.mixup,
        teacher=teacher,
        teacher_weight=teaching["weight"] if teaching else 0.0,
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
            compile_model(model, config.train.optimizer, rate, config.train.label_smoothing,
                          label_metrics=teacher is None)
    average = WeightAverage(config.train.ema_decay) if config.train.ema_decay else None
    stress = stress_inputs(config, spec, validation) if config.stress.enabled else None

    # Every epoch's metrics, kept in storage (Ray keeps only those of the best K checkpoints).
    # After a restart, epochs past the checkpoint we resumed from are dropped: they are redone.
    history_file = history_location(config.run.storage, config.run.name)
    history = [row for row in read_history(history_file) if row["epoch"] <= start_epoch]
    # One MLflow run per training run, not per worker: the driver made it, rank 0 logs each epoch.
    log_epoch = worker_logger(loop_config.get("tracking")) if rank == 0 else None

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
            metrics = objective_first(metrics, history, config.objective.metric)
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
                    write_text(history_file, json.dumps(history, indent=1))
                    if log_epoch is not None:
                        log_epoch(metrics, epoch + 1)
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


def configure_heartbeat(timeout_s: float) -> None:
    """Start TensorFlow's coordination service as MultiWorkerMirroredStrategy would, but with a
    heartbeat timeout of ``timeout_s`` instead of TensorFlow's 10 s (the strategy configures the
    service only when nobody has: ``collective_all_reduce_strategy``, TF 2.21).

    Why: on a CPU-bound cluster (measured: four Ray Train workers and their drivers on two cores,
    at the nice level Ray gives workers) a worker's heartbeat thread can go more than 10 s without
    the CPU. The service then marks that live worker failed, aborts every collective, and the late
    heartbeat is answered "Unexpected heartbeat request from an already-in-error task"; Ray Train
    restarts the run from its checkpoint and the epoch is lost. A worker that really dies is found
    by Ray (its actor dies) long before a 2-minute heartbeat would be.
    """
    import json
    import os

    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    session = context.context()
    if session.coordination_service is not None:
        return
    cluster = multi_worker_util.normalize_cluster_spec(json.loads(os.environ["TF_CONFIG"])["cluster"])
    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=cluster.num_tasks(job))
            for job in ("chief", "worker") if job in cluster.jobs]
    session.configure_coordination_service(
        service_type="standalone", service_leader=multi_worker_util.coordination_leader(cluster),
        coordinated_jobs=jobs, heartbeat_timeout_in_ms=int(timeout_s * 1000))


def best_key(objective: str) -> str:
    """The reported running best of a sweep's objective: what Tune ranks, stops and shows by."""
    return f"best_{objective}"


def objective_first(metrics: dict[str, Any], history: list[dict[str, Any]], objective: str) -> dict[str, Any]:
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
    chosen = stratified_subset(validation.labels, config.stress.max_images, config.data.seed)
    sources = load_sources([validation.records[index].location for index in chosen])
    images = shifted_images(sources, spec, config.stress.shifts, seed=config.data.seed, threads=decode_threads())
    return images, validation.labels[chosen]
