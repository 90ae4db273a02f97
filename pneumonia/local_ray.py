"""Connect to the user's Ray cluster, or start an embedded one that knows its own address.

Why the address matters: some of Ray's own processes use Ray's state API without being told
which cluster to ask (Ray Train v2's detached ``PlacementGroupCleaner``, which removes a finished
or stopped Tune trial's worker placement group). With no ``RAY_ADDRESS`` they look for "the" Ray
on the machine, and when a second one runs there (a notebook's ``ray.init()``, another user's
job, ``pneumonia serve``) they die with "Found multiple active Ray instances". The trial's
placement group is then never removed and the next trial waits forever for its CPUs (seen: a
demo beside a sweep both hung for 10+ minutes).

So an embedded Ray here chooses its GCS port before it starts and puts ``RAY_ADDRESS`` (that
port) into the environment the Ray processes inherit: every process of this cluster, and only
of this cluster, then knows where it belongs. ``PNEUMONIA_EMBEDDED_RAY`` marks such an address
as ours, so that a later embedded start in the same process (or in a child process, which
inherits the environment) starts its own cluster instead of joining this one, and so that
:func:`pneumonia.training.fit.check_resources` still treats the cluster as a fixed-size local one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from pneumonia.errors import ConfigError
from pneumonia.runtime import RAY_ENV

ADDRESS_VARIABLE = "RAY_ADDRESS"
GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"
EMBEDDED_MARK = "PNEUMONIA_EMBEDDED_RAY"
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
WORKER_ENV = {
    **RAY_ENV,
    # Ray Train v2 re-logs worker prints; ours are already one line per epoch.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # ... and logs every report at INFO level to the console; the log files are enough.
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    # Starting a worker imports TensorFlow: on a small, busy node that alone can take a minute.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
}
"""Set in every Ray process before TensorFlow loads (Keras 3 cannot train multi-worker)."""


def user_cluster_address() -> str | None:
    """RAY_ADDRESS when the user set it (a real cluster), None for ours or none."""
    address = os.environ.get(ADDRESS_VARIABLE) or None
    if address is None or os.environ.get(EMBEDDED_MARK) == address:
        return None
    return address


def start_ray(env_vars: dict[str, str], **init_kwargs: Any):
    """ray.init on the user's cluster (RAY_ADDRESS) or on a new embedded one; returns Ray's context."""
    import ray

    sigterm = signal.getsignal(signal.SIGTERM)  # ray.init replaces it (see _restore_sigterm)
    address = user_cluster_address()
    if address is not None:
        # Our job's processes (Train's detached placement-group cleaner among them) are told the
        # cluster's address too: on a machine that also runs another Ray they would guess.
        known = _canonical_address(address)
        env = {**env_vars, ADDRESS_VARIABLE: known} if known and ADDRESS_VARIABLE not in env_vars else env_vars
        context = ray.init(address=address, runtime_env={"env_vars": env}, **init_kwargs)
        _restore_sigterm(sigterm)
        return context
    port = free_port("")
    host = _node_ip()
    own = f"{host}:{port}"
    saved = {name: os.environ.get(name) for name in (ADDRESS_VARIABLE, GCS_PORT_VARIABLE, EMBEDDED_MARK)}
    os.environ.update({ADDRESS_VARIABLE: own, GCS_PORT_VARIABLE: str(port), EMBEDDED_MARK: own})
    # Ray 2.60 enables token authentication for a new local cluster (kept) and says so with a
    # warning before every command's own output; that one line is dropped, nothing else.
    quiet = logging.getLogger(AUTH_LOGGER)
    quiet.addFilter(_not_the_token_notice)
    try:
        # "local": start a new cluster whatever RAY_ADDRESS says (it names the one being started).
        context = ray.init(address="local", runtime_env={"env_vars": env_vars}, **init_kwargs)
    except BaseException:
        _restore(saved)
        raise
    finally:
        quiet.removeFilter(_not_the_token_notice)
    os.environ.pop(GCS_PORT_VARIABLE, None)  # only the start needed it
    _restore_sigterm(sigterm)
    actual = context.address_info.get("gcs_address")
    if actual and actual != own:  # the port was taken between choosing and binding: say where we are
        os.environ[ADDRESS_VARIABLE] = os.environ[EMBEDDED_MARK] = actual
    return context


def driver_env_vars() -> dict[str, str]:
    """WORKER_ENV less the variables a Ray Job's own runtime env already sets: Ray refuses to
    merge a job's runtime env with a driver's that sets the same variable, and the job's value
    (what the user submitted) should win anyway."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        taken = set((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        taken = set()
    return {name: value for name, value in WORKER_ENV.items() if name not in taken}


def init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS, or start an embedded local Ray that knows its own
    address (see the module docstring: another Ray on the machine must not confuse Ray's own processes)."""
    import ray

    if ray.is_initialized():
        return
    start_ray(driver_env_vars(), log_to_driver=True, logging_level="WARNING")


def _not_the_token_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def stop_ray() -> None:
    """ray.shutdown, and forget an embedded cluster's address (the user's RAY_ADDRESS stays)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    own = os.environ.get(EMBEDDED_MARK)
    if own is not None:
        if os.environ.get(ADDRESS_VARIABLE) == own:
            os.environ.pop(ADDRESS_VARIABLE)
        os.environ.pop(EMBEDDED_MARK)


def _canonical_address(address: str) -> str | None:
    """host:port of a user's cluster as its nodes know it (localhost resolved to this node's IP);
    None for a Ray Client address (ray://) or one Ray cannot parse."""
    if "://" in address:
        return None
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address)
    except Exception:
        return None


def _restore_sigterm(before) -> None:
    """Keep the process's own SIGTERM handling after Ray connects.

    ``ray.init`` replaces the SIGTERM handler with one that calls ``sys.exit(15)``, and Ray's core
    worker then installs absl's failure-signal handler at the C level, which prints a
    "*** SIGTERM received" crash dump and aborts. Either way our clean stop (the CLI's
    SIGTERM-as-Ctrl-C, so Train and Tune release their workers and save their state) never ran.
    A handler set before Ray started comes back; otherwise Ray's Python-level one (without the
    crash dump) is registered again.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    handler = before if callable(before) else signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)


def _restore(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for Ray's GCS, a service, a test or a benchmark server)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _node_ip() -> str:
    """The address Ray will register this node under (what its GCS address will say)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


# ----------------------------------------------------------------------------- resources


def gpu_advice(gpus: float, flag: str, fewer: str) -> str:
    """What to change when a run asks for more GPUs than the cluster has: with none at all, drop
    ``flag`` or join a GPU cluster; with some, ``fewer`` (fewer workers or actors)."""
    return f"drop {flag}, or set RAY_ADDRESS to a cluster with GPU nodes" if not gpus else fewer


def refuse_or_wait(problems: list[str]) -> None:
    """A cluster that can never fit the work: on an embedded (fixed-size) Ray a ConfigError listing
    ``problems`` (Ray would wait forever); on the user's cluster a warning, as the autoscaler may
    still add nodes. Nothing when ``problems`` is empty."""
    if not problems:
        return
    message = "not enough resources: " + "; ".join(problems)
    if user_cluster_address():
        print(f"warning: {message}; waiting for the autoscaler", file=sys.stderr)
        return
    raise ConfigError(message)


def has_autoscaler() -> bool:
    """True on a cluster launched with an autoscaler (``ray up``, KubeRay with autoscaling)."""
    try:
        from ray._private.state import state

        return state.get_cluster_config() is not None
    except Exception:  # an older or partial Ray: assume a fixed-size cluster
        return False
