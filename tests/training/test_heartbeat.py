"""The workers' TensorFlow coordination service waits run.heartbeat_timeout_s for a heartbeat, not
TensorFlow's 10 s: a worker starved of CPU for a few seconds is late, not dead."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest

from pneumonia.config import ExperimentConfig

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_strategy_keeps_the_configured_heartbeat_timeout(tmp_path):
    script = textwrap.dedent("""
        from pneumonia.runtime import activate; activate()
        import tensorflow as tf
        from tensorflow.python.eager import context
        from pneumonia.training.worker import configure_heartbeat
        configure_heartbeat(45.5)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        with strategy.scope():
            tf.Variable(1.0)
        print("HEARTBEAT_MS", context.context().config.experimental.coordination_config.heartbeat_timeout_in_ms)
    """)
    env_config = {"cluster": {"worker": [f"127.0.0.1:{_free_port()}"]}, "task": {"type": "worker", "index": 0}}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100,
                          env={**__import__("os").environ, "TF_CONFIG": json.dumps(env_config)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HEARTBEAT_MS 45500" in done.stdout


def test_the_default_heartbeat_timeout_is_two_minutes():
    assert ExperimentConfig().run.heartbeat_timeout_s == 120.0
