"""Interrupted sweeps on a long-lived cluster (`ray start --head`): honest exits, nothing left behind.

A sweep stopped with Ctrl-C, `kill` (SIGTERM) or `kill -9` must leave no placement group and no
worker on the cluster, so that the next sweep gets every CPU; Ctrl-C and SIGTERM exit non-zero
(130, 143) and say what finished; `pneumonia tune --resume` then finishes the interrupted sweep,
continuing its interrupted trial from its checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_cluster import PROJECT_ROOT, LocalCluster, _ray_cli

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

CLUSTER_STATE = """
import json, ray
ray.init(logging_level="ERROR")
from ray.util.placement_group import placement_group_table
print(json.dumps({
    "free": ray.available_resources().get("CPU", 0), "total": ray.cluster_resources().get("CPU", 0),
    "groups": [g["state"] for g in placement_group_table().values() if g["state"] != "REMOVED"],
}))
"""


def _state(env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", CLUSTER_STATE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_clean(env: dict[str, str], after: str) -> None:
    """Every CPU free and no placement group within a minute (Ray removes a dead job's in seconds)."""
    deadline = time.monotonic() + 60
    while True:
        state = _state(env)
        if state["free"] == state["total"] and not state["groups"]:
            return
        assert time.monotonic() < deadline, f"after {after} the cluster still holds: {state}"
        time.sleep(2)


def _epochs(trials: Path) -> int:
    best = 0
    for history in trials.glob("*/history.json"):
        try:
            best = max(best, len(json.loads(history.read_text())))
        except ValueError:
            pass
    return best


def test_interrupted_sweeps_leave_a_long_lived_cluster_clean_and_resume(synthetic_data, tmp_path):
    cluster = LocalCluster(_ray_cli(), cwd=PROJECT_ROOT, logs=tmp_path, env={
        **{key: value for key, value in os.environ.items() if not key.startswith("RAY_") and key != "PNEUMONIA_EMBEDDED_RAY"},
        "RAY_USAGE_STATS_ENABLED": "0"})
    env = {**cluster.env, "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs_port}"}
    storage = tmp_path / "runs"

    def sweep(name: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "pneumonia", "tune", "--config", str(PROJECT_ROOT / "tune_configs" / "quick.yaml"),
                "--data", str(synthetic_data), "--storage", str(storage), "--name", name, "--samples", "2",
                "--set", "train.epochs=6", "--set", "tune.scheduler=none", "--set", "tune.search=random",
                "--set", "data.image_size=32", *extra]

    def interrupt(name: str, signum: int, group: bool) -> tuple[int, str]:
        log = tmp_path / f"{name}.log"
        process = subprocess.Popen(sweep(name), env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                                   start_new_session=True)
        deadline = time.monotonic() + 300
        while _epochs(storage / name / "trials") < 2:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        if group:
            os.killpg(process.pid, signum)  # Ctrl-C in a terminal reaches the whole process group
        else:
            os.kill(process.pid, signum)  # `kill`, a scheduler, the OOM killer: the driver alone
        return process.wait(timeout=180), log.read_text()

    try:
        cluster.start_head(cpus=2)  # inside: a head that never answers is stopped too, not left running
        code, said = interrupt("ctrl-c", signal.SIGINT, group=True)
        assert code == 130, said[-3000:]
        assert "interrupted: 0 of 2 trials finished, 1 stopped mid-run, 1 never started;" in said, said[-3000:]
        assert "`pneumonia tune --resume --name ctrl-c" in said
        _assert_clean(env, "Ctrl-C")

        code, said = interrupt("sigterm", signal.SIGTERM, group=False)
        assert code == 143 and "*** SIGTERM received" not in said, said[-3000:]  # a clean stop, not a crash dump
        assert "interrupted: 0 of 2 trials finished" in said, said[-3000:]
        _assert_clean(env, "SIGTERM")

        code, said = interrupt("killed", signal.SIGKILL, group=False)
        assert code == -signal.SIGKILL
        _assert_clean(env, "a killed driver")

        # The next sweep on this cluster gets all its CPUs: the Ctrl-C'd one, resumed, finishes.
        resumed = subprocess.run([sys.executable, "-m", "pneumonia", "tune", "--storage", str(storage),
                                  "--config", str(PROJECT_ROOT / "tune_configs" / "quick.yaml"),
                                  "--name", "ctrl-c", "--resume", "--json"],
                                 env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        table = json.loads(Path(json.loads(resumed.stdout.strip().splitlines()[-1])["results_json"]).read_text())
        assert [(row["status"], row["epochs"]) for row in table] == [("TERMINATED", 6)] * 2, table
        histories = [json.loads(path.read_text()) for path in (storage / "ctrl-c" / "trials").glob("*/history.json")]
        assert any(row["start_epoch"] > 0 for history in histories for row in history), "a trial restarted from 0"
        _assert_clean(env, "a finished sweep")
    finally:
        cluster.stop()
