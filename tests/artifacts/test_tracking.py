"""MLflow tracking (pneumonia.artifacts.tracking): where runs go, and a store that is down costs one line."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pneumonia.artifacts.tracking import (
    ENV_URI,
    Tracker,
    default_uri,
    flatten,
    record,
    resolve_uri,
    source_run,
    worker_logger,
)
from pneumonia.config import ExperimentConfig


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_runs_go_to_a_sqlite_file_in_the_storage_folder_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_URI, raising=False)
    assert default_uri(str(tmp_path / "runs")) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert default_uri(f"file://{tmp_path}/runs") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    assert default_uri("s3://bucket/runs") == f"sqlite:///{tmp_path / 'mlflow.db'}"  # an object store: ./mlflow.db
    assert resolve_uri(default="sqlite:///d.db") == "sqlite:///d.db"
    monkeypatch.setenv(ENV_URI, "http://mlflow:5000")
    assert resolve_uri(default="sqlite:///d.db") == "http://mlflow:5000"
    assert resolve_uri(recorded="sqlite:///r.db", default="sqlite:///d.db") == "sqlite:///r.db"
    assert resolve_uri(uri="http://other:5000", recorded="sqlite:///r.db") == "http://other:5000"
    assert resolve_uri(enabled=False, uri="http://other:5000") is None


def test_the_config_flattens_into_dotted_params():
    params = flatten(ExperimentConfig().model_dump(exclude={"tune"}))
    assert params["train.epochs"] == "10" and params["tracking.enabled"] == "true"
    assert params["data.augment.enabled"] == "false" and params["run.name"] == "null"


def test_a_run_logs_params_metric_histories_and_a_registered_version(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pneumonia.artifacts.registry import Artifact
    from pneumonia.artifacts.tracking import register_artifact

    monkeypatch.chdir(tmp_path / "..")
    uri = default_uri(str(tmp_path))
    tracker = Tracker(uri)
    run_id = tracker.start("run", "train", params={"train.epochs": "3"}, tags={"dataset.fingerprint": "sha256:x"})
    for epoch in (1, 2, 3):
        tracker.log_metrics(run_id, {"val_roc_auc": 0.5 + epoch / 10}, step=epoch)
    version = tmp_path / "registry" / "pneumonia-cnn" / "v0001"
    version.mkdir(parents=True)
    (version / "metadata.json").write_text("{}")
    metadata = {"name": "pneumonia-cnn", "threshold": 0.3, "target_recall": 0.95, "data_fingerprint": "sha256:x",
                "files": {"model.keras": "ab" * 32}}
    assert register_artifact(tracker, Artifact(version, "v0001", metadata), run_id) == "1"
    tracker.end(run_id)
    assert (tmp_path / "mlflow.db").is_file()
    # Run artifacts beside the store, not in ./mlruns of whatever folder the command ran from.
    assert list((tmp_path / "mlartifacts").rglob("registry/pneumonia-cnn/v0001/metadata.json"))
    assert not (tmp_path / ".." / "mlruns").exists()

    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "3"
    assert run.data.tags["pneumonia.package_version"] and run.data.tags["pneumonia.git_commit"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_roc_auc")] == [(1, 0.6), (2, 0.7), (3, 0.8)]
    registered = client.get_model_version("pneumonia-cnn", "1")
    assert registered.run_id == run_id and registered.source == f"runs:/{run_id}/registry/pneumonia-cnn/v0001"
    assert registered.tags["pneumonia.version"] == "v0001" and registered.tags["threshold"] == "0.3"
    assert registered.tags["sha256.model.keras"] == "ab" * 32


def test_a_dead_tracking_server_is_one_warning_and_no_run(tmp_path):
    lines: list[str] = []
    tracker = Tracker(f"http://127.0.0.1:{closed_port()}", warn=lines.append)
    assert not tracker.active
    assert tracker.start("run", "train", params={"a": "1"}) is None
    tracker.log_metrics(None, {"a": 1.0})
    assert len(lines) == 1 and "cannot reach the MLflow tracking server" in lines[0], lines


def test_a_store_that_fails_later_is_one_warning_too(tmp_path):
    """Unprobed (a worker), the first failed call turns tracking off with one line; nothing raises."""
    lines: list[str] = []
    tracker = Tracker(f"http://127.0.0.1:{closed_port()}", warn=lines.append, check=False)
    assert tracker.start("run", "train") is None
    tracker.log_metrics("0" * 32, {"a": 1.0}, step=1)
    tracker.end("0" * 32)
    assert len(lines) == 1 and "tracking is off" in lines[0], lines


def test_a_worker_on_another_node_does_not_create_a_second_sqlite_store(tmp_path, capsys):
    missing = tmp_path / "elsewhere" / "mlflow.db"
    assert worker_logger({"tracking_uri": f"sqlite:///{missing}", "run_id": "x"}) is None
    assert "not on this node" in capsys.readouterr().out and not missing.exists()


def test_a_checkpoint_finds_the_nearest_tracked_run_above_it(tmp_path):
    trial = tmp_path / "sweep" / "trials" / "t1"
    (trial / "checkpoint_000001").mkdir(parents=True)
    (tmp_path / "sweep" / "pneumonia_sweep.json").write_text('{"tracking": {"run_id": "parent"}}')
    assert source_run(str(trial / "checkpoint_000001")) == ({"run_id": "parent"}, str(tmp_path))
    record(str(trial), "sqlite:///x.db", "child", "pneumonia")
    assert source_run(str(trial / "checkpoint_000001"))[0]["run_id"] == "child"


def test_importing_the_cli_does_not_import_mlflow():
    code = "import sys, pneumonia.cli.parser, pneumonia.artifacts.tracking; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("argv", [["train", "--no-tracking"], ["tune", "--config", "x", "--tracking-uri", "http://m:5000"]])
def test_tracking_flags_parse(argv):
    from pneumonia.cli.parser import build_parser

    args = build_parser().parse_args(argv)
    assert args.no_tracking or args.tracking_uri == "http://m:5000"


def test_a_tracking_uri_with_a_password_is_refused_before_it_is_recorded(monkeypatch):
    from pneumonia.artifacts.tracking import resolve_uri
    from pneumonia.errors import ConfigError

    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD"):
        resolve_uri(uri="https://alice:s3cret@mlflow.example.org")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:hunter2@10.0.0.5:5000")
    with pytest.raises(ConfigError):
        resolve_uri()
    assert resolve_uri(uri="https://mlflow.example.org") == "https://mlflow.example.org"
