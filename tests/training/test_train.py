"""Distributed training on a local Ray: it learns, checkpoints load anywhere, failures recover."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pneumonia.config import ExperimentConfig, with_overrides

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]


def small_config(storage: Path, **overrides) -> ExperimentConfig:
    base = {
        "data.image_size": 64,
        "train.batch_size": 16,
        "train.epochs": 12,
        "scaling.workers": 2,
        "run.storage": str(storage),
        "run.keep_checkpoints": 2,
    }
    base.update(overrides)
    return with_overrides(ExperimentConfig(), base)


@pytest.fixture(scope="module")
def trained(ray_cluster, synthetic_data, tmp_path_factory):
    from pneumonia.training.driver import train

    storage = tmp_path_factory.mktemp("runs")
    # Two workers under MultiWorkerMirroredStrategy, with the cosine schedule and weight averaging
    # of the recommended recipe (the averaged weights are swapped in on every worker at once).
    config = small_config(storage, **{"run.name": "learns", "train.schedule": "cosine", "train.warmup_epochs": 1,
                                      "train.ema_decay": 0.9})
    result = train(config, str(synthetic_data), progress=lambda _: None)
    return result


def test_two_workers_learn_the_synthetic_signal(trained):
    assert trained.epochs_completed == 12
    assert trained.metrics["roc_auc"] >= 0.9, trained.metrics
    assert trained.metrics["pr_auc"] >= 0.9, trained.metrics
    assert set(trained.metrics) >= {"roc_auc", "pr_auc", "precision", "recall", "accuracy", "loss"}
    # Every epoch reported train and validation metrics.
    epochs = [row["epoch"] for row in trained.history]
    assert epochs == list(range(1, 13))
    assert all("val_roc_auc" in row and "roc_auc" in row for row in trained.history)


def tracked_runs(storage: Path):
    """Every MLflow run in the embedded store of ``storage`` (its mlflow.db)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_two_worker_run_is_one_mlflow_run_with_a_point_per_epoch(trained):
    storage = Path(trained.run_dir).parent
    assert (storage / "mlflow.db").is_file()
    client, runs = tracked_runs(storage)
    runs = [run for run in runs if run.data.tags.get("pneumonia.command") == "train"]
    assert len(runs) == 1, [run.info.run_name for run in runs]  # one run, not one per worker
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "learns"
    assert run.data.params["scaling.workers"] == "2" and run.data.params["train.schedule"] == "cosine"
    assert run.data.tags["dataset.fingerprint"].startswith("sha256:") and int(run.data.tags["dataset.train.NORMAL"]) > 0
    assert run.data.tags["pneumonia.git_commit"] and run.data.tags["pneumonia.package_version"]
    history = client.get_metric_history(run.info.run_id, "val_roc_auc")
    assert sorted(metric.step for metric in history) == list(range(1, 13))
    assert run.data.metrics["checkpoint.val_roc_auc"] == pytest.approx(trained.metrics["roc_auc"])
    assert {item.path for item in client.list_artifacts(run.info.run_id)} >= {"history.json", "pneumonia_result.json"}
    manifest = json.loads((Path(trained.run_dir) / "pneumonia_run.json").read_text())
    assert manifest["tracking"]["run_id"] == run.info.run_id


def test_keeps_only_the_best_k_checkpoints(trained):
    run_dir = Path(trained.run_dir)
    kept = sorted(path for path in run_dir.glob("checkpoint_*") if path.is_dir())
    # The best two by validation ROC-AUC, plus the latest one if it is not among them (for resume).
    assert 2 <= len(kept) <= 3, kept
    assert Path(trained.best_checkpoint) in kept
    best_auc = trained.metrics["roc_auc"]
    assert best_auc == max(row["val_roc_auc"] for row in trained.history)


def test_checkpoint_loads_in_a_fresh_process_with_identical_predictions(trained, synthetic_data, tmp_path):
    from pneumonia.data.pipeline import load_images, predict_probabilities
    from pneumonia.data.records import discover, evaluation_records
    from pneumonia.models.checkpoint import load_checkpoint

    model, info = load_checkpoint(trained.best_checkpoint)
    records = evaluation_records(discover(str(synthetic_data)))[:40]
    images = load_images(records, info.preprocess).images
    here = predict_probabilities(model, images)

    np.save(tmp_path / "images.npy", images)
    script = (
        "import sys, numpy as np\n"
        "from pneumonia.models.checkpoint import load_checkpoint\n"
        "from pneumonia.data.pipeline import predict_probabilities\n"
        "model, _ = load_checkpoint(sys.argv[1])\n"
        "np.save(sys.argv[3], predict_probabilities(model, np.load(sys.argv[2])))\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, trained.best_checkpoint, str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
        check=True, timeout=120,
    )
    there = np.load(tmp_path / "out.npy")
    np.testing.assert_allclose(here, there, atol=1e-6)
    assert info.preprocess.image_size == 64 and info.preprocess.channels == 1


def test_evaluate_cli_prints_metrics_as_json(trained, synthetic_data):
    from pneumonia.data.records import discover, evaluation_records

    test_images = len(evaluation_records(discover(str(synthetic_data))))
    completed = subprocess.run(
        [sys.executable, "-m", "pneumonia.cli", "evaluate", "--checkpoint", trained.best_checkpoint,
         "--data", str(synthetic_data), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    metrics = json.loads(completed.stdout.strip().splitlines()[-1])
    assert metrics["split"] == "test"
    assert metrics["n"] == test_images
    assert metrics["roc_auc"] >= 0.85
    for name in ("accuracy", "precision", "recall", "specificity", "f1", "pr_auc", "loss"):
        assert 0 <= metrics[name] <= (1 if name != "loss" else 100)
    # Tracked in the training run's store, nested under that run.
    storage = Path(trained.run_dir).parent
    assert metrics["tracking"]["tracking_uri"] == f"sqlite:///{storage / 'mlflow.db'}"
    client, runs = tracked_runs(storage)
    evaluation = client.get_run(metrics["tracking"]["run_id"])
    training = [run for run in runs if run.data.tags.get("pneumonia.command") == "train"]
    assert evaluation.data.tags["mlflow.parentRunId"] == training[0].info.run_id
    assert evaluation.data.metrics["roc_auc"] == pytest.approx(metrics["roc_auc"])


def _worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,  # this session's Ray, not another on the machine
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return [actor.pid for actor in actors if actor.pid]


def test_a_killed_worker_is_replaced_and_training_resumes_from_a_checkpoint(ray_cluster, synthetic_data, tmp_path):
    from pneumonia.artifacts.runs import HISTORY_FILE
    from pneumonia.training.driver import train

    config = small_config(tmp_path, **{"train.epochs": 10, "data.image_size": 32, "run.name": "killed", "run.max_failures": 2,
                                       "tracking.enabled": False})
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = train(config, str(synthetic_data), progress=lambda _: None)
        except BaseException as error:  # surfaced by the assertion below
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    history = tmp_path / "killed" / HISTORY_FILE
    deadline = time.monotonic() + 240

    def epochs_done() -> int:
        try:
            return len(json.loads(history.read_text()))
        except (OSError, ValueError):
            return 0

    while time.monotonic() < deadline and thread.is_alive() and epochs_done() < 3:
        time.sleep(0.1)
    assert thread.is_alive(), outcome
    pids = _worker_pids()
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.epochs_completed == 10
    restarted = [row for row in result.history if row.get("start_epoch", 0) > 0]
    assert restarted, "training restarted from epoch 0 after the worker was killed"
    # Ray registers reports asynchronously, so the restart point may lag the epochs already run,
    # but it is a real checkpoint: never epoch 0.
    assert min(row["start_epoch"] for row in restarted) >= 1
    assert set(_worker_pids()).isdisjoint(pids) or not _worker_pids()
    assert not list(tmp_path.rglob("mlflow.db"))  # tracking off: no store


def test_resume_continues_an_interrupted_run(ray_cluster, synthetic_data, tmp_path):
    from pneumonia.config import with_overrides
    from pneumonia.training.driver import train

    # A relative data path must work too: Ray workers run in another working directory.
    first = train(small_config(tmp_path, **{"train.epochs": 2, "run.name": "resumable"}),
                  os.path.relpath(synthetic_data), progress=lambda _: None)
    assert first.epochs_completed == 2
    second = train(
        small_config(tmp_path, **{"run.name": "resumable"}),
        None,
        resume=True,
        overrides_on_resume=lambda stored: with_overrides(stored, {"train.epochs": 4}),
        progress=lambda _: None,
    )
    assert second.epochs_completed == 4
    new_rows = [row for row in second.history if row["epoch"] > 2]
    assert [row["start_epoch"] for row in new_rows] == [2, 2]
    client, runs = tracked_runs(tmp_path)  # the resumed run goes on in the same MLflow run
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_roc_auc")) == [1, 2, 3, 4]


def test_a_new_run_refuses_to_overwrite_an_existing_one(ray_cluster, synthetic_data, tmp_path):
    from pneumonia.artifacts.runs import RUN_MANIFEST
    from pneumonia.errors import PneumoniaError
    from pneumonia.training.driver import train

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / RUN_MANIFEST).write_text("{}")
    with pytest.raises(PneumoniaError, match="already exists"):
        train(small_config(tmp_path, **{"run.name": "taken"}), str(synthetic_data), progress=lambda _: None)


def test_more_workers_than_cpus_fails_fast_instead_of_waiting(ray_cluster, synthetic_data, tmp_path):
    from pneumonia.errors import ConfigError
    from pneumonia.training.driver import train

    with pytest.raises(ConfigError, match="not enough resources"):
        train(small_config(tmp_path, **{"scaling.workers": 64}), str(synthetic_data), progress=lambda _: None)


@pytest.mark.parametrize("gpus, advice", [(0, "drop --gpu (scaling.gpu), or set RAY_ADDRESS to a cluster with GPU nodes"),
                                           (1, "lower --workers to the GPUs there are")])
def test_asking_for_gpus_the_cluster_lacks_says_what_to_change(monkeypatch, gpus, advice):
    import ray

    from pneumonia.config import ExperimentConfig, with_overrides
    from pneumonia.errors import ConfigError
    from pneumonia.training.fit import check_resources

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a fixed local cluster: fail, do not wait
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": float(gpus)})
    config = with_overrides(ExperimentConfig(), {"scaling.workers": 2, "scaling.gpu": True,
                                                 "scaling.cpus_per_worker": 0.9})
    with pytest.raises(ConfigError) as raised:
        check_resources(config)
    assert str(raised.value) == f"not enough resources: 2 workers x 1 GPU, but the cluster has {gpus} GPUs ({advice})"


def test_checkpoints_go_to_a_uri_storage(ray_cluster, synthetic_data, tmp_path):
    """Any pyarrow URI works as storage (file:// here; s3:// and gs:// use the same code path)."""
    from pneumonia.models.checkpoint import load_checkpoint
    from pneumonia.training.driver import train

    with socket.socket() as probe:  # a port nothing listens on: a tracking server that is down
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    storage = f"file://{tmp_path}/remote"
    lines: list[str] = []
    result = train(small_config(tmp_path, **{"train.epochs": 2, "run.storage": storage, "run.name": "uri",
                                             "tracking.uri": dead}),
                   str(synthetic_data), progress=lines.append)
    warnings = [line for line in lines if "WARNING" in line or "tracking" in line]
    assert len(warnings) == 1 and "cannot reach the MLflow tracking server" in warnings[0], warnings
    assert not list(tmp_path.rglob("mlflow.db"))
    assert result.best_checkpoint.startswith(f"file://{tmp_path}/remote/uri/checkpoint_")
    assert result.epochs_completed == 2
    model, info = load_checkpoint(result.best_checkpoint)
    assert info.epoch in (1, 2) and model.output_shape == (None, 1)
