"""Another Ray instance on the machine (a notebook's ray.init()) must not make a sweep hang.

Before pneumonia.local_ray, Ray Train v2's PlacementGroupCleaner in our embedded Ray looked for
"the" local cluster, found two, died, and left each stopped or finished trial's worker placement
group behind: the next trial waited for those CPUs until the other Ray went away.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pneumonia.config import load_config, with_overrides

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]

OTHER_RAY = """
import signal, sys, time
import ray
ray.init(num_cpus=1, include_dashboard=False)
print("ready", flush=True)
signal.signal(signal.SIGTERM, lambda *_: (ray.shutdown(), sys.exit(0)))
while True:
    time.sleep(1)
"""


@pytest.fixture
def other_ray(tmp_path):
    """A second embedded Ray on this machine, started the way a notebook would (no address)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ADDRESS", "PNEUMONIA_EMBEDDED_RAY", "RAY_GCS_SERVER_PORT")}
    process = subprocess.Popen([sys.executable, "-c", OTHER_RAY], env=env, stdout=subprocess.PIPE,
                               stderr=open(tmp_path / "other_ray.log", "wb"), text=True, start_new_session=True)
    assert process.stdout.readline().strip() == "ready", (tmp_path / "other_ray.log").read_text()[-2000:]
    yield process
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # anything the other Ray left in its group
    except ProcessLookupError:
        pass


def test_embedded_ray_processes_know_their_own_cluster(ray_cluster):
    import ray

    from pneumonia.local_ray import EMBEDDED_MARK, user_cluster_address

    @ray.remote(num_cpus=0)
    def address_seen_by_a_worker() -> str:
        return os.environ.get("RAY_ADDRESS", "")

    own = ray.get_runtime_context().gcs_address
    assert ray.get(address_seen_by_a_worker.remote()) == own == os.environ[EMBEDDED_MARK]
    assert user_cluster_address() is None, "our own address is not a user's cluster (no autoscaler)"


def test_an_embedded_ray_keeps_token_authentication_without_a_warning_line():
    """Every command that starts a local Ray printed Ray's "Token authentication is enabled ...
    set RAY_AUTH_MODE=disabled to opt out" first; the cluster still uses a token, silently."""
    code = ("import os; from pneumonia.local_ray import start_ray, stop_ray; "
            "start_ray({}, num_cpus=1, include_dashboard=False); print(os.environ.get('RAY_AUTH_MODE')); stop_ray()")
    # (Ray itself puts RAY_AUTH_MODE=token into the environment when it enables it.)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_") and key != "PNEUMONIA_EMBEDDED_RAY"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "token"
    assert "Token authentication is" not in done.stderr, done.stderr[-2000:]


def test_a_sweep_beside_another_ray_finishes_and_gives_every_cpu_back(ray_cluster, other_ray, synthetic_data,
                                                                      tmp_path):
    import ray

    from pneumonia.training.sweep import tune

    # Two trials that each need most of the CPUs: the second starts only once the first's worker
    # placement group is removed, which is what never happened beside another Ray.
    config = with_overrides(load_config(ROOT / "tune_configs" / "quick.yaml"), {
        "run.storage": str(tmp_path), "run.name": "beside", "tune.num_samples": 2, "tune.search": "random",
        "tune.scheduler": "none", "train.epochs": 2, "data.image_size": 32, "tune.max_concurrent_trials": 2,
    })
    result = tune(config, str(synthetic_data), progress=lambda _: None)  # hung here before (test timeout)
    assert len(result.trials) == 2
    assert all(trial["status"] == "TERMINATED" and trial["epochs"] == 2 for trial in result.trials), result.trials
    # Every placement group was removed: the cluster's CPUs are all free again.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
