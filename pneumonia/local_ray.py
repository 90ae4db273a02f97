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
:func:`pneumonia.train.check_resources` still treats the cluster as a fixed-size local one.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import Any

ADDRESS_VARIABLE = "RAY_ADDRESS"
GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"
EMBEDDED_MARK = "PNEUMONIA_EMBEDDED_RAY"
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


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
    port = _free_port()
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _node_ip() -> str:
    """The address Ray will register this node under (what its GCS address will say)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()
