"""Keep long Ray work honest on a shared or busy cluster: say why it waits, bound how long, and
report an interruption as one.

Without it, a Train run whose workers cannot get their CPUs waits in silence (Ray Train retries
the start forever); a sweep stopped with Ctrl-C exits 0 and lists a trial that never ran as
TERMINATED; Ray Train's own Ctrl-C handler ends the process with ``sys.exit(0)``. Here:

- :class:`ResourceWatch` (a driver thread) looks every few seconds at this job's placement groups.
  When the workers of a run (a group shaped like ``scaling``: ``workers`` bundles of
  ``cpus_per_worker`` CPUs) have waited ``run.resource_wait_s``, it prints one line: what is
  wanted, what the cluster has free, and who holds the rest (placement groups and actors, by
  job). On a cluster with an autoscaler it keeps waiting and says so; otherwise, after
  ``run.resource_timeout_s``, it stops the run (a sweep as Ctrl-C would: Tune stops its trials
  and saves its state; a plain run by ending Ray Train's controller, which ignores an abort while
  it waits for its workers) and removes the group it waited for; the command fails with that line.
- :func:`raise_if_interrupted` turns a Tune run that ended early (Ctrl-C, SIGTERM) into
  :class:`~pneumonia.errors.Interrupted` with counts of what finished, what stopped mid-run and
  what never started; the CLI exits 130 (143 for SIGTERM).
- :func:`start_settings` bounds Ray Train's worker start-up retries (``run.start_retries``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pneumonia.artifacts.runs import read_history
from pneumonia.config import ExperimentConfig
from pneumonia.errors import Interrupted, PneumoniaError
from pneumonia.local_ray import has_autoscaler

START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # read by Ray Train's controller
POLL_S = 2.0
START_MARGIN_S = 10.0  # Train's start timeout past ours: a few polls, and a slow state query
FINISHED = ("TERMINATED", "ERROR")


# ----------------------------------------------------------------------------- start-up


def start_settings(config: ExperimentConfig) -> int:
    """Export Ray Train's worker start timeout for this run; returns its ``controller_failure_limit``.

    The timeout sits just past ``run.resource_timeout_s``: our watch, which can say who holds the
    resources, speaks first, and Train's controller, which cannot act on an abort while it waits
    for its workers, gets to the abort a few seconds later. Start-up failures (a worker that dies
    while starting, a timeout) are retried ``run.start_retries`` times on a fixed cluster, always
    on an autoscaling one.
    """
    run = config.run
    limit = run.resource_timeout_s if run.resource_timeout_s is not None else 24 * 3600
    os.environ[START_TIMEOUT_VARIABLE] = str(float(limit) + START_MARGIN_S)  # Ray Train passes it to its controller
    return -1 if has_autoscaler() else run.start_retries


# ----------------------------------------------------------------------------- describing the cluster


def _resources(bundle: dict[str, float]) -> str:
    """'{CPU: 0.9, GPU: 1}': CPUs, GPUs and custom resources; not memory nor Ray's bookkeeping keys."""
    def shown(key: str) -> bool:
        return not (key.startswith("node:") or "_group_" in key or key in ("memory", "object_store_memory"))

    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items()) if shown(k)) + "}"


def _bundles(bundles: list[dict[str, float]]) -> str:
    counts = Counter(_resources(b) for b in bundles)
    return ", ".join(f"{n} x {shape}" if n > 1 else shape for shape, n in counts.items())


def _sum(bundles: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def placement_groups() -> list[dict[str, Any]]:
    """Every live placement group: id, job, state, bundles, strategy (from the GCS; no dashboard needed)."""
    import ray

    groups = []
    for group_id, info in ray.util.placement_group_table().items():
        if info.get("state") == "REMOVED":
            continue
        groups.append({
            "id": group_id,
            "job": group_id[-8:],  # a placement group's id ends with its creator job's id
            "name": info.get("name") or "",
            "state": info.get("state"),
            "bundles": [dict(b) for _, b in sorted(info.get("bundles", {}).items(), key=lambda kv: int(kv[0]))],
            "strategy": info.get("strategy", ""),
        })
    return groups


def _actors_by_group() -> tuple[dict[str, list[str]], list[str]]:
    """Actor class names per placement group, and actors outside any group that hold resources
    (through Ray's state API; empty when the cluster has no dashboard)."""
    try:
        from ray.util.state import list_actors

        actors = list_actors(detail=True, filters=[("state", "=", "ALIVE")], timeout=5, raise_on_missing_output=False)
    except Exception:
        return {}, []
    by_group: dict[str, list[str]] = {}
    loose: list[str] = []
    for actor in actors:
        name = actor.class_name or "actor"
        if actor.placement_group_id:
            by_group.setdefault(actor.placement_group_id, []).append(name)
        elif any(v for k, v in (actor.required_resources or {}).items() if k in ("CPU", "GPU")):
            loose.append(f"actor {name} (job {actor.job_id}) {_resources(actor.required_resources)}")
    return by_group, loose


def describe_cluster(exclude: str | None = None) -> str:
    """'the cluster has {CPU: 0.2} of {CPU: 2} free; held by: ...' (one clause, for one line)."""
    import ray

    free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    by_group, loose = _actors_by_group()
    holders = []
    for group in placement_groups():
        if group["state"] != "CREATED" or group["id"] == exclude:
            continue
        names = Counter(by_group.get(group["id"], []))
        inside = ", ".join(f"{n} x {name}" if n > 1 else name for name, n in names.items())
        holders.append(f"placement group {group['name'] or group['id'][:8]} (job {group['job']}"
                       + (f": {inside}" if inside else "") + f") {_resources(_sum(group['bundles']))}")
    holders += loose
    return (f"the cluster has {_resources(free)} of {_resources(total)} free; held by: "
            + ("; ".join(holders) if holders else "nothing we can see (Ray's own actors, or another node's)"))


# ----------------------------------------------------------------------------- the watch


class ResourceWatch:
    """A driver thread that notices this job's workers waiting for resources (see module doc).

    Use as a context manager around ``trainer.fit()`` or ``tuner.fit()``: when it had to stop the
    run, leaving the block fails with the line it would have printed (however the fit ended).
    """

    def __init__(self, config: ExperimentConfig, what: str = "this run",
                 report: Callable[[str], None] | None = None, poll_s: float = POLL_S, stops: str = "sweep"):
        self.wait_s = config.run.resource_wait_s
        self.timeout_s = config.run.resource_timeout_s
        self.what = what
        self.report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        self.poll_s = poll_s
        self.stops = stops  # "sweep": Ctrl-C the driver (Tune stops its trials); "run": end Train's controller
        shape = {"CPU": float(config.scaling.cpus_per_worker), **({"GPU": 1.0} if config.scaling.gpu else {})}
        self.worker_bundles = [shape] * config.scaling.workers
        self.message: str | None = None  # set when the watch stopped the run
        self._first_seen: dict[str, float] = {}
        self._said: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._autoscaler = False
        self._can_stop = False
        self._job = ""

    # -- context manager
    def __enter__(self) -> ResourceWatch:
        import ray

        if self.wait_s is None or not ray.is_initialized():
            return self
        self._job = ray.get_runtime_context().get_job_id()
        self._autoscaler = has_autoscaler()
        # A sweep is stopped through SIGINT to this process: only when it runs in the main thread
        # (not, say, a notebook's background thread, whose main thread is the user's).
        self._can_stop = self.stops == "run" or threading.current_thread() is threading.main_thread()
        self._thread = threading.Thread(target=self._loop, name="pneumonia-resource-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind, value, traceback) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.message is not None:  # we stopped the run: that, not its Ctrl-C or failure, is the story
            raise PneumoniaError(self.message) from None
        return False

    # -- the thread
    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check(time.monotonic())
            except Exception:  # a state query failing must never take the run down
                continue
            if self.message is not None:
                return

    def waiting_groups(self) -> list[dict[str, Any]]:
        """This job's placement groups that wait for resources and would hold a run's workers (or,
        when none of ours runs at all, any of ours: a Tune trial that cannot even start)."""
        ours = [g for g in placement_groups() if g["job"] == self._job]
        workers = [g for g in ours if _same_shape(g["bundles"], self.worker_bundles)]
        running = any(g["state"] == "CREATED" for g in workers)
        candidates = workers if running else ours
        return [g for g in candidates if g["state"] in ("PENDING", "RESCHEDULING")]

    def check(self, now: float) -> None:
        waiting = self.waiting_groups()
        ids = {g["id"] for g in waiting}
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in ids}
        for group in waiting:
            since = self._first_seen.setdefault(group["id"], now)
            waited = now - since
            if waited < self.wait_s:
                continue
            give_up = (not self._autoscaler and self._can_stop and self.timeout_s is not None
                       and waited >= self.timeout_s)
            if not give_up and now - self._said.get(group["id"], -1e18) < max(self.wait_s, 60):
                continue
            self._said[group["id"]] = now
            line = (f"{self.what} has waited {waited:.0f} s for resources: it wants "
                    f"{_bundles(group['bundles'])} ({group['strategy']}); {describe_cluster(exclude=group['id'])}")
            if self._autoscaler:
                self.report(f"warning: {line}; waiting for the autoscaler to add nodes")
            elif give_up:
                self.message = (f"{line}. Gave up after {self.timeout_s:g} s (run.resource_timeout_s): free those "
                                "resources, or lower scaling.workers / scaling.cpus_per_worker")
                if self.stops == "sweep":
                    _stop_main_thread()  # first: Tune then starts no trial, nor a retry of one
                # Train's controllers too: one that waits would otherwise retry with a new group,
                # which Train's cleaner never learns about (it registers groups once they start)
                # and which would outlive the run for as long as the job (a notebook, a test session).
                _end_train_controllers(self._job)
                _remove_group(group["id"])  # before Ray grants it to a controller that is gone
                return
            else:
                limit = (f"; giving up after {self.timeout_s:g} s (run.resource_timeout_s)"
                         if self.timeout_s is not None and self._can_stop
                         else "; still waiting (stop it with Ctrl-C)")
                self.report(f"warning: {line}{limit}")


def _same_shape(bundles: list[dict[str, float]], wanted: list[dict[str, float]]) -> bool:
    def key(bundle):
        return {k: round(v, 6) for k, v in bundle.items() if k in ("CPU", "GPU") and v}
    return len(bundles) == len(wanted) and all(key(a) == key(b) for a, b in zip(bundles, wanted))


def _end_train_controllers(job: str) -> None:
    """End this job's Ray Train controller(s): the run then fails at once with our message.

    Ray Train's controller waits for its workers' placement group inside a blocking call, so it
    acts on an abort (Ctrl-C) only after its own start timeout. Train pins the controller to the
    driver's node, so its process is ours to end; Train's placement-group cleaner then removes the
    group it waited for.
    """
    from ray.util.state import list_actors

    for actor in list_actors(filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE"),
                                      ("job_id", "=", job)], detail=True, raise_on_missing_output=False):
        if actor.pid:
            try:
                os.kill(actor.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _remove_group(group_id: str) -> None:
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
    except Exception:  # already removed (Train's cleaner was quicker)
        pass


def _stop_main_thread() -> None:
    """Stop the run the way Ctrl-C does: Train aborts its controller, Tune stops its trials and
    saves the experiment; both release their placement groups.

    A real SIGINT, not ``_thread.interrupt_main()``: the main thread waits inside ``ray.get``,
    which only a signal delivered to the process wakes up.
    """
    os.kill(os.getpid(), signal.SIGINT)


# ----------------------------------------------------------------------------- interruptions

INTERRUPTED = "INTERRUPTED"  # ran some epochs, stopped before its end; `--resume` continues it
NOT_STARTED = "NOT_STARTED"  # never ran an epoch; `--resume` starts it


def saved_statuses(experiment_path: str, history_of: Callable[[Any], str] | None = None) -> dict[str, str]:
    """Each trial's outcome as Tune saved it (by trial id): TERMINATED, ERROR, INTERRUPTED or NOT_STARTED.

    Read from the experiment state Tune writes before it stops its trials: after a Ctrl-C the
    in-memory trials all read TERMINATED, and a trial that was running is saved as PENDING (to be
    restarted on resume), told apart from one that never ran by whether it reported an epoch.
    Tune may not have received the epoch a worker just finished when the stop comes, so
    ``history_of`` (a trial -> the location of its run's history file) is asked too: a trial whose
    workers wrote an epoch there ran, whatever Tune's saved state lags behind.
    """
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(experiment_path).trials
    except Exception:  # no state saved (interrupted before the first trial): nothing ran
        return {}
    statuses = {}
    for trial in trials:
        if trial.status in FINISHED:
            statuses[trial.trial_id] = trial.status
        elif (trial.last_result or {}).get("training_iteration") or (history_of and _read_rows(history_of(trial))):
            statuses[trial.trial_id] = INTERRUPTED
        else:
            statuses[trial.trial_id] = NOT_STARTED
    return statuses


def _read_rows(location: str) -> list:
    try:
        return read_history(location)
    except (OSError, ValueError):  # half-written when the stop came: no whole epoch recorded there
        return []


def outcome_counts(statuses: list[str], noun: str = "") -> str:
    """'1 of 4 trials finished, 1 stopped mid-run, 2 never started'."""
    counts = Counter(statuses)
    finished = counts["TERMINATED"] + counts["ERROR"]
    parts = [f"{finished} of {len(statuses)}{' ' + noun if noun else ''} finished"
             + (f" ({counts['ERROR']} with an error)" if counts["ERROR"] else "")]
    if counts[INTERRUPTED]:
        parts.append(f"{counts[INTERRUPTED]} stopped mid-run")
    if counts[NOT_STARTED]:
        parts.append(f"{counts[NOT_STARTED]} never started")
    return ", ".join(parts)


def raise_if_interrupted(statuses: dict[str, str], expected: int, what: str, noun: str, resume: str) -> None:
    """Raise Interrupted when fewer than ``expected`` trials finished (Tune creates a searcher's
    trials one at a time: those it never created never started either)."""
    outcomes = list(statuses.values()) + [NOT_STARTED] * max(0, expected - len(statuses))
    if all(status in FINISHED for status in outcomes):
        return
    raise Interrupted(f"{what} interrupted: {outcome_counts(outcomes, noun)}; {resume} continues it")
