"""An ensemble recipe end to end on a local Ray: members train in parallel (weight averaging,
cosine schedule, stress metrics per epoch as the checkpoint metric), combine, export and score;
then one student learns the ensemble (distillation) and becomes the run's best checkpoint.
(Two-worker training with weight averaging is covered by tests/training/test_train.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pneumonia.config import ExperimentConfig, with_overrides

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ensemble_run(ray_cluster, synthetic_data, tmp_path_factory):
    from pneumonia.training.driver import train

    storage = tmp_path_factory.mktemp("ensemble-runs")
    config = with_overrides(ExperimentConfig(), {
        "data.image_size": 64,
        "data.normalize": "standardize",
        "data.augment.enabled": True,
        "data.augment.brightness": 0.1,
        "data.augment.gamma": 0.2,
        "train.batch_size": 16,
        "train.epochs": 4,
        "train.schedule": "cosine",
        "train.warmup_epochs": 1,
        "train.ema_decay": 0.9,
        "scaling.workers": 1,
        "scaling.cpus_per_worker": 1.0,
        "stress.enabled": True,
        "stress.max_images": 60,
        "stress.shifts": ["darker", "blur", "shifted"],
        "run.checkpoint_metric": "val_stress_worst_roc_auc",
        "ensemble.members": 2,
        "distill.enabled": True,
        "distill.epochs": 3,
        "run.storage": str(storage),
        "run.name": "ens",
    })
    lines: list[str] = []
    result = train(config, str(synthetic_data), progress=lines.append)
    return result, lines, storage


def test_members_train_in_parallel_and_combine_into_one_checkpoint(ensemble_run):
    from pneumonia.models.checkpoint import load_checkpoint, read_info
    from pneumonia.models.ensemble import is_ensemble

    result, lines, storage = ensemble_run
    ensemble, ensemble_metrics = result.teacher["checkpoint"], result.teacher["metrics"]
    assert ensemble.endswith("/ensemble")
    assert any("ensemble of 2 members (2 at a time)" in line for line in lines)
    assert sum(line.startswith("member ") for line in lines) == 2
    info = read_info(ensemble)
    assert len(info.members) == 2 and info.preprocess.normalize == "standardize"
    assert info.metrics["val_roc_auc"] == pytest.approx(ensemble_metrics["roc_auc"])
    assert "stress_worst_roc_auc" in ensemble_metrics
    assert ensemble_metrics["roc_auc"] > 0.85, "the averaged members learned the synthetic signal"
    model, _ = load_checkpoint(ensemble)
    assert is_ensemble(model)
    seeds = {read_info(member).config["train"]["seed"] for member in info.members}
    assert seeds == {0, 1}, "members differ by their seed"
    _check_tracking(storage, result)


def test_a_student_learns_the_ensemble_and_is_the_runs_checkpoint(ensemble_run):
    from pneumonia.models.checkpoint import load_checkpoint, read_info
    from pneumonia.models.ensemble import is_ensemble

    result, lines, _ = ensemble_run
    assert "/ens/student/" in result.best_checkpoint and result.run_dir.endswith("/ens")
    student, info = load_checkpoint(result.best_checkpoint)
    assert not is_ensemble(student), "one model: one model's serving cost"
    assert info.config["distill"]["teacher"] == result.teacher["checkpoint"], "the checkpoint names its teacher"
    assert info.config["train"]["seed"] == 2 and info.config["train"]["epochs"] == 3
    assert read_info(result.teacher["checkpoint"]).preprocess == info.preprocess
    assert result.metrics["roc_auc"] > 0.85, "the student learned the synthetic signal from its teacher"
    assert any(line.startswith("distilling ") and "0.7 x the teacher's probability" in line for line in lines)
    assert any(line.startswith("student: val ROC-AUC") and "(teacher " in line for line in lines)
    saved = json.loads((Path(result.run_dir) / "pneumonia_result.json").read_text())
    assert saved["best_checkpoint"] == result.best_checkpoint and saved["teacher"] == result.teacher
    assert result.to_json()["teacher"]["checkpoint"] == result.teacher["checkpoint"]


def test_distilling_needs_a_teacher():
    from pneumonia.errors import ConfigError

    with pytest.raises(ConfigError, match="distill.enabled needs a teacher"):
        with_overrides(ExperimentConfig(), {"distill.enabled": True})


def _check_tracking(storage, result) -> None:
    """The ensemble is one MLflow run with a nested run per member and one for the student, each with its epochs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(run for run in runs if run.info.run_name == "ens")
    members = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.info.run_name for run in members) == ["member_0", "member_1", "student"]
    assert {run.info.status for run in [parent, *members]} == {"FINISHED"}
    for run in members:
        history = client.get_metric_history(run.info.run_id, "val_stress_worst_roc_auc")
        epochs = 3 if run.info.run_name == "student" else 4
        assert sorted(metric.step for metric in history) == list(range(1, epochs + 1))
    assert parent.data.metrics["checkpoint.val_roc_auc"] == pytest.approx(result.metrics["roc_auc"])


def test_ensemble_exports_and_scores_like_any_checkpoint(ensemble_run, synthetic_data, tmp_path):
    result, _, _ = ensemble_run
    registry = tmp_path / "registry"
    exported = subprocess.run(
        [sys.executable, "-m", "pneumonia", "export", "--checkpoint", result.teacher["checkpoint"],
         "--registry", str(registry), "--data", str(synthetic_data), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert exported.returncode == 0, exported.stderr
    printed = json.loads(exported.stdout.strip().splitlines()[-1])
    artifact = printed["artifact"]
    manifest = json.loads((Path(result.run_dir) / "pneumonia_run.json").read_text())
    assert printed["tracking"]["run_id"] == manifest["tracking"]["run_id"]  # the ensemble's run
    metadata = json.loads((registry / "pneumonia-cnn" / "v0001" / "metadata.json").read_text())
    assert metadata["ensemble"]["members"] == 2
    scored = subprocess.run(
        [sys.executable, "-m", "pneumonia", "evaluate", "--artifact", artifact, "--data", str(synthetic_data),
         "--stress", "--shifts", "darker,noise", "--proxy", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert scored.returncode == 0, scored.stderr
    payload = json.loads(scored.stdout.strip().splitlines()[-1])
    assert payload["roc_auc"] > 0.85 and payload["threshold"] == pytest.approx(metadata["threshold"])
    assert [row["shift"] for row in payload["stress"]["rows"]] == ["clean", "darker", "noise"]
    assert np.isfinite(payload["stress"]["summary"]["stress_worst_roc_auc"])
    proxy = payload["proxy"]
    assert {row["view"] for row in proxy["rows"]} == {"clean", "harsh_site"}
    assert proxy["summary"]["proxy_roc_auc"] <= payload["roc_auc"], "the proxy is harder than the split itself"
    assert "site proxy: ROC-AUC" in subprocess.run(
        [sys.executable, "-m", "pneumonia", "evaluate", "--artifact", artifact, "--data", str(synthetic_data), "--proxy"],
        capture_output=True, text=True, timeout=300).stdout
