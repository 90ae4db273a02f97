"""An ensemble recipe end to end on a local Ray: members train in parallel (weight averaging,
cosine schedule, stress metrics per epoch as the checkpoint metric), combine, export and score.
(Two-worker training with weight averaging is covered by tests/training/test_train.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

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
    assert result.best_checkpoint.endswith("/ensemble")
    assert any("ensemble of 2 members (2 at a time)" in line for line in lines)
    assert sum(line.startswith("member ") for line in lines) == 2
    info = read_info(result.best_checkpoint)
    assert len(info.members) == 2 and info.preprocess.normalize == "standardize"
    assert info.metrics["val_roc_auc"] == pytest.approx(result.metrics["roc_auc"])
    assert "stress_worst_roc_auc" in result.metrics
    assert result.metrics["roc_auc"] > 0.85, "the averaged members learned the synthetic signal"
    model, _ = load_checkpoint(result.best_checkpoint)
    assert is_ensemble(model)
    seeds = {read_info(member).config["train"]["seed"] for member in info.members}
    assert seeds == {0, 1}, "members differ by their seed"


def test_ensemble_exports_and_scores_like_any_checkpoint(ensemble_run, synthetic_data, tmp_path):
    result, _, _ = ensemble_run
    registry = tmp_path / "registry"
    exported = subprocess.run(
        [sys.executable, "-m", "pneumonia", "export", "--checkpoint", result.best_checkpoint,
         "--registry", str(registry), "--data", str(synthetic_data), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert exported.returncode == 0, exported.stderr
    artifact = json.loads(exported.stdout.strip().splitlines()[-1])["artifact"]
    metadata = json.loads((registry / "pneumonia-cnn" / "v0001" / "metadata.json").read_text())
    assert metadata["ensemble"]["members"] == 2
    scored = subprocess.run(
        [sys.executable, "-m", "pneumonia", "evaluate", "--artifact", artifact, "--data", str(synthetic_data),
         "--stress", "--shifts", "darker,noise", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert scored.returncode == 0, scored.stderr
    payload = json.loads(scored.stdout.strip().splitlines()[-1])
    assert payload["roc_auc"] > 0.85 and payload["threshold"] == pytest.approx(metadata["threshold"])
    assert [row["shift"] for row in payload["stress"]["rows"]] == ["clean", "darker", "noise"]
    assert np.isfinite(payload["stress"]["summary"]["stress_worst_roc_auc"])
