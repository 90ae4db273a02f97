"""Ray Train's TensorFlow backend (each worker's TF_CONFIG), without importing TensorFlow.

What ``ray.train.tensorflow.TensorflowTrainer`` adds to Ray's ``DataParallelTrainer`` is its
backend: before the training function runs, every worker gets ``TF_CONFIG`` (the run's worker
addresses and its own index), which MultiWorkerMirroredStrategy reads. The classes below do what
Ray 2.60's ``TensorflowConfig`` and ``_TensorflowBackend`` do (the same environment, set the same
way), in a module that does not import TensorFlow; re-check them against Ray's on an upgrade.

Why: importing anything from ``ray.train.tensorflow`` imports TensorFlow (its ``__init__``), so with
Ray's own trainer every run imported it three times before its workers started: in the process that
calls ``fit`` (a Tune trial's function, a ``pneumonia tune`` or ``pneumonia train`` driver), in Train's
controller (which unpickles the backend config) and then in each worker, the only place that uses
it. Measured on a 2-core machine: about 5 s of one core each, one after the other, before every
sweep trial's workers could start (and ~0.5 GB more memory in each trial's and controller's process).
"""

from __future__ import annotations

import json
import os

import ray
from ray._common.network_utils import build_address
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework


class TensorflowBackendConfig(BackendConfig):
    @property
    def backend_cls(self):
        return TensorflowBackend

    @property
    def framework(self):
        return TrainingFramework.TENSORFLOW  # Train's run state asks a worker for TensorFlow's version

    def to_dict(self) -> dict:
        return {}


def _worker_url() -> str:
    """host:port of a free port on the worker's node (runs on each worker)."""
    return build_address(*get_address_and_port())


def _set_tf_config(worker_addresses: list[str], index: int) -> None:
    """TF_CONFIG for MultiWorkerMirroredStrategy on worker ``index`` (runs on each worker)."""
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": worker_addresses},
                                          "task": {"type": "worker", "index": index}})
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


class TensorflowBackend(Backend):
    def on_start(self, worker_group, backend_config: TensorflowBackendConfig) -> None:
        urls = worker_group.execute(_worker_url)
        ray.get([worker_group.execute_single_async(index, _set_tf_config, worker_addresses=urls, index=index)
                 for index in range(len(worker_group))])
