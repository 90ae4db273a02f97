"""Operating the service under bounded loopback load: autoscaling, rollouts, replica failures."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from tests.serving.test_serving import _free_port, call_replicas, request

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

# How long a test waits for a state (a scale-up, a new version serving) before calling it broken.
# Long on purpose: a wait ends as soon as the state holds, and a busy machine (a training run
# beside the tests) may take minutes to start a replica that an idle one starts in seconds.
PATIENCE_S = 300


def _export(registry, width: int):
    from pneumonia.artifacts.publish import export_artifact
    from pneumonia.config import ExperimentConfig, ModelConfig
    from pneumonia.data.preprocess import PreprocessSpec
    from pneumonia.models.architectures import build_model, compile_model
    from pneumonia.models.checkpoint import CheckpointInfo, save_checkpoint

    model = build_model(ModelConfig(name="xraynet", width=width), (64, 64, 1))
    compile_model(model, "adam", 1e-3)
    checkpoint = registry.parent / f"ckpt-{width}"
    save_checkpoint(checkpoint, model, CheckpointInfo(epoch=1, config=ExperimentConfig().model_dump(),
                                                      preprocess=PreprocessSpec(64, 1), metrics={}))
    return export_artifact(str(checkpoint), registry, threshold=0.5, target_recall=0.95,
                           validation_metrics={}, training_config=ExperimentConfig().model_dump())


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops") / "registry"
    _export(root, width=8)
    return root


@pytest.fixture(scope="module")
def serve_port(ray_cluster):
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def deploy(artifact: str, app_options: dict | None = None, **deployment_options):
    from ray import serve

    from pneumonia.serving import Classifier

    options = {"batch_wait_timeout_s": 0.01, **(app_options or {})}
    serve.run(Classifier.options(**deployment_options).bind(artifact, **options), name="ops", route_prefix="/")


def serve_status_text() -> str:
    from ray import serve

    return "; ".join(f"{name}: {app.status} {app.message} "
                     + ", ".join(f"{d}: {s.status} {s.message} {dict(s.replica_states)}" for d, s in app.deployments.items())
                     for name, app in serve.status().applications.items())


def classifier_replicas() -> int:
    from ray import serve

    status = serve.status().applications["ops"].deployments["Classifier"]
    return status.replica_states.get("RUNNING", 0)


@dataclass
class Load:
    """A bounded closed-loop load on loopback: `workers` threads, each one request at a time."""

    url: str
    workers: int
    stop: threading.Event = field(default_factory=threading.Event)
    results: list = field(default_factory=list)  # (finished_at, status, version, error)

    def __post_init__(self):
        buffer = io.BytesIO()
        Image.fromarray(np.full((64, 64), 100, np.uint8)).save(buffer, format="PNG")
        self.body = buffer.getvalue()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(self.workers)]

    def _loop(self):
        deadline = time.monotonic() + 2 * PATIENCE_S  # never runs away, whatever the test does
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                status, answer = request(f"{self.url}/predict", self.body, "image/png")
            except OSError:
                status, answer = 0, {}
            except ValueError:  # an answer that is not JSON
                status, answer = -1, {}
            self.results.append((time.monotonic(), status, answer.get("version"), answer.get("error")))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=90)

    def failures(self, since: float = 0.0) -> list:
        return [r for r in self.results if r[0] >= since and r[1] != 200]


def wait_for(predicate, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def test_the_classifier_scales_up_under_load_and_back_down_after(serve_port, registry):
    deploy(str(registry), autoscaling_config={
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
        "upscale_delay_s": 1, "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2,
    }, max_ongoing_requests=8)
    assert classifier_replicas() == 1
    with Load(f"http://127.0.0.1:{serve_port}", workers=12) as load:
        assert wait_for(lambda: classifier_replicas() == 2, timeout=PATIENCE_S), "no scale-up under load"
        assert len(load.results) > 0
    assert not load.failures(), load.failures()[:5]
    assert wait_for(lambda: classifier_replicas() == 1, timeout=PATIENCE_S), "no scale-down after the load"


def test_a_new_version_rolls_out_under_load_without_failed_requests(serve_port, registry):
    deploy(str(registry / "pneumonia-cnn" / "v0001"), num_replicas=1, autoscaling_config=None)
    second = _export(registry, width=12)
    with Load(f"http://127.0.0.1:{serve_port}", workers=6) as load:
        time.sleep(2)
        deploy(str(second.path), num_replicas=1, autoscaling_config=None)
        assert wait_for(lambda: any(r[2] == "v0002" for r in load.results[-20:]), timeout=PATIENCE_S)
        time.sleep(2)
    assert not load.failures(), load.failures()[:5]
    versions = [r[2] for r in load.results]
    assert versions[0] == "v0001" and versions[-1] == "v0002"


def test_a_killed_replica_is_replaced_while_the_service_keeps_answering(serve_port, registry):
    deploy(str(registry / "pneumonia-cnn" / "v0001"), num_replicas=2, autoscaling_config=None)
    assert wait_for(lambda: classifier_replicas() == 2, timeout=PATIENCE_S)
    pids: set[int] = set()

    def both_replicas_seen() -> bool:
        pids.update(call_replicas("ops", "process_id", calls=16))  # concurrent: spread over replicas
        return len(pids) == 2

    assert wait_for(both_replicas_seen, timeout=PATIENCE_S), pids
    with Load(f"http://127.0.0.1:{serve_port}", workers=6) as load:
        time.sleep(2)
        killed_at = time.monotonic()
        os.kill(sorted(pids)[0], signal.SIGKILL)
        def replaced() -> bool:
            return classifier_replicas() == 2 and len(set(call_replicas("ops", "process_id", calls=16)) - pids) > 0

        assert wait_for(replaced, timeout=PATIENCE_S), "the killed replica was not replaced"
        recovered_at = time.monotonic()
        time.sleep(2)
    failed = load.failures(since=killed_at)
    answered = [r for r in load.results if r[0] >= killed_at and r[1] == 200]
    print(f"replica replaced in {recovered_at - killed_at:.1f} s; {len(failed)} failed, {len(answered)} answered")
    assert len(answered) > 20, "the surviving replica kept answering"
    assert len(failed) <= 6, f"only requests in flight on the killed replica may fail: {failed[:10]}"


def test_overload_is_answered_with_a_quick_json_503(serve_port, registry):
    deploy(str(registry / "pneumonia-cnn" / "v0001"), app_options={"max_pending": 1}, num_replicas=1,
           autoscaling_config=None)
    with Load(f"http://127.0.0.1:{serve_port}", workers=12) as load:
        time.sleep(4)
    statuses = {r[1] for r in load.results}
    refused = [r for r in load.results if r[1] == 503]
    assert statuses <= {200, 503}, statuses
    assert refused and any(r[1] == 200 for r in load.results)
    assert all("overloaded" in r[3] for r in refused), refused[:3]


def test_serve_deploy_of_serve_config_rolls_out_a_new_version_without_failed_requests(
        ray_cluster, serve_port, registry, tmp_path):
    """The production path: `serve deploy` of the shipped serve_config.yaml (only the artifact,
    the port and the import path adjusted for a test), v0001 then a newer model calibrated for a
    site (pneumonia calibrate's kind of version), under load."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from ray import serve

    if not ray_cluster.dashboard_url:
        pytest.skip("the session's Ray runs without a dashboard: `serve deploy` has no address")
    serve.delete("ops")  # `serve deploy` manages only the apps it deployed; this one also routes "/"
    root = Path(__file__).resolve().parents[2]
    address = f"http://{ray_cluster.dashboard_url}"
    serve_cli = str(Path(sys.executable).parent / "serve")
    v1 = registry / "pneumonia-cnn" / "v0001"
    from pneumonia.artifacts.publish import publish_calibrated
    from pneumonia.artifacts.registry import verify_artifact

    exported = _export(registry, width=10)  # v0002, or later when the module's other tests exported first
    newer = publish_calibrated(verify_artifact(exported.path), threshold=0.62, target_recall=0.95,
                               site={"name": "ward 7", "images": {"NORMAL": 80, "PNEUMONIA": 120}},
                               drift_reference=None)
    v2 = newer.path

    def deploy_config(artifact: Path) -> None:
        config = yaml.safe_load((root / "serve_config.yaml").read_text())
        config["http_options"] = {"host": "127.0.0.1", "port": serve_port}
        app = config["applications"][0]
        app["args"]["artifact"] = str(artifact)
        app["runtime_env"]["env_vars"]["PYTHONPATH"] = str(root)  # serve_app.py, as a cluster's working dir
        app["deployments"][0]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
        path = tmp_path / f"serve-{artifact.name}.yaml"
        path.write_text(yaml.safe_dump(config))
        completed = subprocess.run([serve_cli, "deploy", str(path), "--address", address],
                                   capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stdout + completed.stderr

    def serving(version: str) -> bool:
        try:
            status, answer = request(f"http://127.0.0.1:{serve_port}/healthz")
        except (OSError, ValueError):  # not up yet: refused, or Serve's plain-text 404
            return False
        return status == 200 and answer.get("version") == version

    deploy_config(v1)
    assert wait_for(lambda: serving("v0001"), timeout=PATIENCE_S), "serve deploy did not bring up v0001"
    with Load(f"http://127.0.0.1:{serve_port}", workers=6) as load:
        time.sleep(2)
        deploy_config(v2)
        switched = wait_for(lambda: any(r[2] == newer.version for r in load.results[-20:]), timeout=PATIENCE_S)
        assert switched, (f"still {load.results[-3:]} after deploying {newer.version}; "
                          f"Serve: {serve_status_text()}")
        time.sleep(2)
    assert not load.failures(), load.failures()[:5]
    assert load.results[0][2] == "v0001" and load.results[-1][2] == newer.version
    status, card = request(f"http://127.0.0.1:{serve_port}/model")
    assert status == 200 and card["calibration"] == {"site": "ward 7", "images": 200} and card["threshold"] == 0.62
