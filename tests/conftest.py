"""Shared fixtures: a synthetic dataset, the real data folder (when present) and one local Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumonia import runtime

runtime.activate()  # the suite is an entry point: legacy Keras before anything imports TensorFlow

from pneumonia.serving.local_service import enable_throughput_mode  # noqa: E402
from tests.helpers import SHARED_DATA  # noqa: E402

# Serve runs in the tests as it runs in production (HAProxy in front), set before Ray starts;
# replicas drain for 2 s instead of 30 when they stop, to keep rollouts and teardown quick.
enable_throughput_mode(drain_s=2)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data with the real chest X-rays; tests using it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} (the real X-rays) is not present; set PNEUMONIA_SHARED_DATA to use another copy")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A 1,000-image synthetic dataset at 64 px (train/val/test), made once per test session."""
    from pneumonia.data.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic") / "chest_xray"
    make_synthetic_dataset(root, n=1000, seed=7, image_size=64)
    return root


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for the whole session (starting Ray costs several seconds).

    Four logical CPUs on a 2-core machine: two training workers plus headroom, so that nothing
    waits forever for resources the machine does not declare.
    """
    import ray

    from pneumonia.local_ray import WORKER_ENV, start_ray, stop_ray

    context = start_ray(WORKER_ENV, num_cpus=4, logging_level="WARNING")
    ray.dashboard_url = context.dashboard_url  # for tests that use Ray's REST APIs (`serve deploy`)
    ray.metrics_export_port = context.address_info.get("metrics_export_port")  # Prometheus scrape
    yield ray
    stop_ray()
