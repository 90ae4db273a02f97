"""Experiment tracking and model lineage with MLflow: where runs go, and logging that never fails a run.

Every command that trains, tunes, exports, evaluates or calibrates records an MLflow run: the
resolved config as params (flattened, dotted keys), metric histories (``step`` = epoch), the
dataset fingerprint and counts, the git commit and package version as tags, and small files
(history, reports, sweep plots) as run artifacts. A training run is created by the driver (or a
Tune trial) and its id travels to the Ray Train workers in the train loop config; rank 0 logs
every epoch into it, so a distributed run is one MLflow run, not one per worker.

Where runs go (:func:`resolve_uri`): ``--tracking-uri`` / ``tracking.uri``, else
``$MLFLOW_TRACKING_URI``, else a SQLite file ``mlflow.db`` in the local storage folder
(``sqlite:///<storage>/mlflow.db``; ``./mlflow.db`` when storage is an object store, whose
workers must then be given a tracking server). ``--no-tracking`` or ``tracking.enabled: false``
logs nothing. A local store makes no network call; an HTTP store is probed once, with a short
timeout, before anything is logged, and a store that is down or fails later costs one warning
line: tracking is then off for the rest of the command, the work goes on.

Lineage: every tracked training run records its store and run id in its folder
(``pneumonia_tracking.json``, and in the run or sweep manifest), so that export finds the run a
checkpoint came from (:func:`recorded_for`), writes it into the artifact's metadata and registers
the version in MLflow's model registry, linked to that run. The project's hash-verified registry
stays what serving loads.

``mlflow`` is imported only when something is logged: importing it costs a second or two.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pneumonia
from pneumonia.artifacts.publish import git_commit
from pneumonia.artifacts.runs import MANIFEST_DEPTH, RUN_MANIFEST, SWEEP_MANIFEST, parent
from pneumonia.errors import ConfigError, Interrupted
from pneumonia.storage import exists, is_uri, join, read_bytes, write_text

ENV_URI = "MLFLOW_TRACKING_URI"
DB_FILE = "mlflow.db"
ARTIFACTS_FOLDER = "mlartifacts"
TRACKING_FILE = "pneumonia_tracking.json"
"""In a training run's folder (a run, a sweep trial, an ensemble member): its store and MLflow run id."""
PROBE_TIMEOUT_S = 3.0
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
"""MLflow's HTTP client retries for minutes by default: one quick try instead (a user's own setting wins)."""
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def default_uri(storage: str) -> str:
    """The embedded store for runs in ``storage``: ``sqlite:///<storage>/mlflow.db`` for a local
    folder (or file://), ``sqlite:///<cwd>/mlflow.db`` for an object store."""
    if storage.startswith("file://"):
        storage = storage[len("file://"):]
    if is_uri(storage):
        return f"sqlite:///{Path.cwd() / DB_FILE}"
    return f"sqlite:///{Path(storage).expanduser().resolve() / DB_FILE}"


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its run artifacts: beside a SQLite store (``<folder>/mlartifacts``;
    MLflow's own default is ./mlruns in whatever folder the command ran from), else the server's choice."""
    if uri.startswith("sqlite:///") and uri[len("sqlite:///"):] not in ("", ":memory:"):
        return (Path(uri[len("sqlite:///"):]).parent / ARTIFACTS_FOLDER).as_uri()
    return None


def resolve_uri(enabled: bool = True, uri: str | None = None, recorded: str | None = None,
                default: str | None = None) -> str | None:
    """Where this command's runs go, or None (tracking off): ``uri`` (the flag or the config key),
    else ``recorded`` (the store the source run was tracked in), else ``$MLFLOW_TRACKING_URI``,
    else ``default``."""
    if not enabled:
        return None
    return check_uri(uri or recorded or os.environ.get(ENV_URI) or default)


def check_uri(uri: str | None) -> str | None:
    """``uri`` unless it carries credentials (``https://user:secret@host``): the store's URI is
    written into run folders, manifests and artifact metadata (served by ``/model``), so a password
    in it would travel with every artifact. MLflow reads them from its own variables instead."""
    if uri and urllib.parse.urlsplit(uri).password is not None:
        raise ConfigError("the tracking URI holds a password; give it in MLFLOW_TRACKING_USERNAME and "
                          "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead: the URI is recorded "
                          "in run folders and artifact metadata")
    return uri


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": "3"}`` (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text[:MAX_PARAM_LENGTH]
    return flat


def numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite-or-not real numbers of a dict (bools and text dropped), keys prefixed."""
    return {f"{prefix}{key}": float(value) for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def standard_tags(command: str) -> dict[str, str]:
    commit = git_commit()
    return {"pneumonia.command": command, "pneumonia.package_version": pneumonia.__version__,
            "pneumonia.git_commit": commit, **({"mlflow.source.git.commit": commit} if commit != "unknown" else {})}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _quiet_http() -> None:
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)


def probe(uri: str) -> str | None:
    """Why the store at ``uri`` cannot be used now, or None. Only HTTP stores are asked (one
    request, a few seconds at most); a local store is prepared (its folder made), no network."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S):
                return None
        except urllib.error.HTTPError:
            return None  # it answered: a server is there (a proxy may guard /health)
        except (OSError, ValueError) as error:
            reason = getattr(error, "reason", None) or error
            return f"cannot reach the MLflow tracking server {uri} ({reason})"
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                return f"cannot create the tracking store {uri} ({error.strerror or error})"
    return None


class Tracker:
    """MLflow calls for one command against one store, each guarded: the first failure prints one
    warning and turns tracking off (``active`` False) for the rest of the command."""

    def __init__(self, uri: str | None, experiment: str = "pneumonia", warn: Callable[[str], None] = _stderr,
                 check: bool = True):
        self.uri = uri
        self.experiment = experiment
        self.warn = warn
        self._client = None
        self._experiment_id: str | None = None
        if uri and check:
            problem = probe(uri)
            if problem:
                self._off(f"{problem}; tracking is off for this run")

    @property
    def active(self) -> bool:
        return self.uri is not None

    def _off(self, message: str) -> None:
        if self.uri is not None:
            self.warn(f"WARNING: {message}")
        self.uri = None

    @property
    def client(self):
        if self._client is None:
            _quiet_http()
            import logging

            from mlflow.tracking import MlflowClient  # lazy: importing mlflow costs a second or two

            for name in ("alembic", "mlflow.store.db.utils", "mlflow.store.model_registry.abstract_store"):
                logging.getLogger(name).setLevel(logging.WARNING)
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def call(self, what: str, function: Callable[[], Any]) -> Any:
        """``function()`` or None; any error costs one warning and turns tracking off."""
        if not self.active:
            return None
        try:
            return function()
        except Exception as error:  # tracking must never fail the work it records
            text = " ".join(str(error).split())[:300]
            self._off(f"MLflow tracking at {self.uri} failed ({what}: {type(error).__name__}: {text}); "
                      "tracking is off for the rest of this command")
            return None

    def experiment_id(self) -> str | None:
        def find() -> str:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None:
                return found.experiment_id
            try:
                return self.client.create_experiment(self.experiment, artifact_location=artifact_root(self.uri))
            except Exception:  # created meanwhile by a concurrent run
                return self.client.get_experiment_by_name(self.experiment).experiment_id

        if self._experiment_id is None:
            self._experiment_id = self.call("experiment", find)
        return self._experiment_id

    def start(self, name: str, command: str, *, params: dict[str, Any] | None = None,
              tags: dict[str, str] | None = None, parent: str | None = None, resume: str | None = None) -> str | None:
        """A new run (or ``resume``, an existing run id, set running again); its id, or None."""
        if resume:
            self.call("resume run", lambda: self.client.update_run(resume, status="RUNNING"))
            return resume if self.active else None
        experiment = self.experiment_id()
        if experiment is None:
            return None
        all_tags = {**standard_tags(command), **(tags or {}), **({"mlflow.parentRunId": parent} if parent else {})}
        run = self.call("create run", lambda: self.client.create_run(experiment, tags=all_tags, run_name=name))
        if run is None:
            return None
        run_id = run.info.run_id
        if params:
            self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        from_params = {key: value if isinstance(value, str) else json.dumps(value, default=str)
                       for key, value in params.items()}
        items = list(from_params.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            chunk = items[start:start + 100]
            self._batch(run_id, "log params", params=chunk)

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int = 0) -> None:
        self._batch(run_id, "log metrics", metrics=list(metrics.items()), step=step)

    def set_tags(self, run_id: str | None, tags: dict[str, Any]) -> None:
        self._batch(run_id, "set tags", tags=[(key, str(value)) for key, value in tags.items()])

    def _batch(self, run_id: str | None, what: str, *, params=(), metrics=(), tags=(), step: int = 0) -> None:
        if not run_id or not (params or metrics or tags):
            return

        def send() -> None:
            import time

            from mlflow.entities import Metric, Param, RunTag

            now = int(time.time() * 1000)
            self.client.log_batch(
                run_id,
                metrics=[Metric(key, value, now, step) for key, value in metrics],
                params=[Param(key, value[:MAX_PARAM_LENGTH]) for key, value in params],
                tags=[RunTag(key, value[:5000]) for key, value in tags],
                synchronous=True,
            )

        self.call(what, send)

    def log_files(self, run_id: str | None, paths: Iterable[str | Path], folder: str | None = None) -> None:
        """Small local files as run artifacts (missing ones and URIs are skipped)."""
        for path in paths:
            if run_id and path and not is_uri(str(path)) and Path(path).is_file():
                self.call("log artifact", lambda p=path: self.client.log_artifact(run_id, str(p), folder))

    def log_json(self, run_id: str | None, data: Any, name: str) -> None:
        if run_id:
            self.call("log artifact", lambda: self.client.log_dict(run_id, data, name))

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            self.call("end run", lambda: self.client.set_terminated(run_id, status=status))

    @contextlib.contextmanager
    def ended_on_error(self, run_id: str | None):
        """Inside the block, an exception ends the run first: KILLED for Ctrl-C or SIGTERM (an
        interrupted run that may resume), FAILED for anything else."""
        try:
            yield
        except BaseException as error:
            self.end(run_id, "KILLED" if isinstance(error, (KeyboardInterrupt, Interrupted)) else "FAILED")
            raise

    def register(self, name: str, version: str, run_id: str | None, source: str,
                 tags: dict[str, Any]) -> str | None:
        """Register ``version`` (``v0003``) of ``name`` in MLflow's model registry, linked to
        ``run_id``; MLflow numbers versions itself, so the project's version is the tag
        ``pneumonia.version``. MLflow's version number, or None."""
        if not self.active:
            return None

        def register() -> str:
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(name, description="pneumonia classifier (pneumonia export)")
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            made = self.client.create_model_version(
                name, source, run_id=run_id, tags={"pneumonia.version": version,
                                                   **{key: str(value) for key, value in tags.items() if value is not None}},
                description=f"pneumonia registry version {version}")
            return str(made.version)

        number = self.call("register model version", register)
        if number is not None and version.lstrip("v").isdigit() and int(version.lstrip("v")) != int(number):
            self.warn(f"note: MLflow numbers {name} {version} as version {number} (some versions were exported "
                      f"without tracking or to another store); its tag pneumonia.version says {version}")
        return number


# ----------------------------------------------------------------------------- what a run folder records


def record(run_dir: str, uri: str, run_id: str, experiment: str) -> dict[str, str]:
    """Write ``pneumonia_tracking.json`` into a run folder; returns what it wrote."""
    entry = {"tracking_uri": uri, "run_id": run_id, "experiment": experiment}
    write_text(join(run_dir, TRACKING_FILE), json.dumps(entry, indent=2))
    return entry


def recorded_in(run_dir: str) -> dict[str, str] | None:
    location = join(run_dir, TRACKING_FILE)
    try:
        return json.loads(read_bytes(location)) if exists(location) else None
    except (OSError, ValueError):
        return None


def worker_logger(tracking: dict[str, str] | None):
    """For a Ray Train worker (rank 0): ``log(metrics, step)`` into the driver's run, or None.
    Fails once, quietly after that (one line in the worker's output)."""
    if not tracking or not tracking.get("run_id"):
        return None
    uri = tracking["tracking_uri"]
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        print(f"[pneumonia] WARNING: the tracking store {uri} is not on this node (start an `mlflow server` "
              "for a multi-node cluster); this run's epochs are not tracked", flush=True)
        return None
    tracker = Tracker(tracking["tracking_uri"], warn=lambda line: print(f"[pneumonia] {line}", flush=True),
                      check=False)

    def log(metrics: dict[str, Any], step: int) -> None:
        tracker.log_metrics(tracking["run_id"], numbers(metrics), step=step)

    return log


def source_run(checkpoint: str) -> tuple[dict[str, str] | None, str | None]:
    """(what the nearest tracked run above ``checkpoint`` recorded, or None; the storage root
    holding that run, or None when the checkpoint is from no run we know). A sweep trial's or an
    ensemble member's own run is nearer than its sweep's or ensemble's."""
    folder = checkpoint
    for _ in range(MANIFEST_DEPTH):
        folder = parent(folder)
        own = recorded_in(folder)
        if own:
            return own, None
        for name in (RUN_MANIFEST, SWEEP_MANIFEST):
            location = join(folder, name)
            if exists(location):
                try:
                    manifest = json.loads(read_bytes(location))
                except (OSError, ValueError):
                    return None, parent(folder)
                return manifest.get("tracking"), parent(folder)
    return None, None


# ----------------------------------------------------------------------------- training runs


def tracker_for(settings, storage: str, warn: Callable[[str], None] = _stderr, recorded: str | None = None,
                check: bool = True) -> Tracker:
    """The tracker of a command configured by ``settings`` (a :class:`pneumonia.config.TrackingConfig`)
    whose runs live in ``storage``."""
    uri = resolve_uri(settings.enabled, settings.uri, recorded, default_uri(storage))
    return Tracker(uri, settings.experiment, warn, check=check)


def start_tracking(settings, storage: str, name: str, command: str, manifest: dict | None, params: dict[str, Any],
                   tags: dict[str, str], progress: Callable[[str], None], what: str = "") -> tuple[Tracker, dict | None]:
    """(tracker, entry) of a training run or sweep called ``name``: a new MLflow run with ``params``
    and ``tags``, or, resuming (``manifest`` given), the run the manifest recorded; the entry is None
    when untracked (tracking off, or off when the run began). ``what`` adds to the progress line."""
    if manifest is not None:
        recorded = manifest.get("tracking") if settings.enabled else None  # --no-tracking on resume
        tracker = Tracker(recorded["tracking_uri"] if recorded else None, settings.experiment, progress)
        return tracker, entry(tracker, tracker.start(name, command, resume=recorded and recorded["run_id"]))
    tracker = tracker_for(settings, storage, progress)
    if not tracker.active:
        return tracker, None
    run_id = tracker.start(name, command, params=params, tags=tags)
    tracking = entry(tracker, run_id)
    if tracking:
        progress(f"tracking: MLflow run {run_id}{what} in {tracker.uri}")
    return tracker, tracking


def dataset_tags(data_root: str, train_part, val_part) -> dict[str, str]:
    """The data a run learns from: root, fingerprint of the training carve, counts per class."""
    from pneumonia.artifacts.publish import data_fingerprint  # lazy: the publishing stack
    from pneumonia.data.records import class_counts

    tags = {"dataset.root": str(data_root)}
    try:
        tags["dataset.fingerprint"] = data_fingerprint(train_part)
    except Exception as error:  # a file moved meanwhile: the run goes on, the tag says why
        tags["dataset.fingerprint"] = f"unknown ({type(error).__name__})"
    for split, records in (("train", train_part), ("validation", val_part)):
        for label, count in class_counts(records).items():
            tags[f"dataset.{split}.{label}"] = str(count)
        tags[f"dataset.{split}.patients"] = str(len({record.patient_id for record in records}))
    return tags


def entry(tracker: Tracker, run_id: str | None) -> dict[str, str] | None:
    """What a manifest, a run folder and the workers are told: the store and the run, or None."""
    if not tracker.active or not run_id:
        return None
    return {"tracking_uri": tracker.uri, "run_id": run_id, "experiment": tracker.experiment}


def child_run(parent_entry: dict[str, str] | None, run_dir: str, name: str, command: str,
              params: dict[str, Any], tags: dict[str, str] | None = None,
              warn: Callable[[str], None] = _stderr) -> dict[str, str] | None:
    """A nested run (a sweep trial, an ensemble member) under ``parent_entry``'s run, recorded in
    ``run_dir``; a restored trial continues the run its folder recorded."""
    if not parent_entry:
        return None
    tracker = Tracker(parent_entry["tracking_uri"], parent_entry.get("experiment", "pneumonia"), warn, check=False)
    earlier = recorded_in(run_dir)
    if earlier and earlier.get("tracking_uri") == tracker.uri:
        return entry(tracker, tracker.start(name, command, resume=earlier["run_id"]))
    run_id = tracker.start(name, command, params=params, tags=tags, parent=parent_entry["run_id"])
    made = entry(tracker, run_id)
    if made:
        record(run_dir, made["tracking_uri"], made["run_id"], made["experiment"])
    return made


STATUS = {"TERMINATED": "FINISHED", "ERROR": "FAILED"}
"""Tune's trial status -> MLflow's run status (any other, e.g. INTERRUPTED or NOT_STARTED: KILLED)."""


def close_children(parent_entry: dict[str, str] | None, grid, statuses: dict[str, str], folder_of: Callable[[Any], str],
                   warn: Callable[[str], None] = _stderr) -> None:
    """Mark each trial's run by how its trial ended (``folder_of(result)``: the trial's run folder,
    ``statuses``: :func:`pneumonia.training.supervision.saved_statuses`); a trial that ASHA
    stopped early never ends its own run."""
    if not parent_entry:
        return
    tracker = Tracker(parent_entry["tracking_uri"], warn=warn, check=False)
    for result in grid:
        child = recorded_in(folder_of(result))
        if child and child.get("tracking_uri") == tracker.uri:
            trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
            status = statuses.get(trial_id) or ("ERROR" if result.error else "TERMINATED")
            tracker.end(child["run_id"], STATUS.get(status, "KILLED"))


# ----------------------------------------------------------------------------- artifacts: export, calibrate


def register_artifact(tracker: Tracker, artifact, run_id: str | None, extra_tags: dict[str, Any] | None = None) -> str | None:
    """Log an artifact's metadata.json into ``run_id`` (``registry/<name>/<version>/``) and register the
    version in MLflow's model registry under the same name, its source that folder of that run.
    Tags: threshold, target recall, data fingerprint, site (calibrated), sha256 of every file.
    MLflow's version number, or None."""
    if not tracker.active or not run_id:
        return None
    metadata = artifact.metadata
    folder = f"registry/{metadata['name']}/{artifact.version}"
    tracker.log_files(run_id, [Path(artifact.path) / "metadata.json"], folder)
    site = metadata.get("site") or {}
    tags = {
        "pneumonia.path": str(artifact.path),
        "threshold": metadata.get("threshold"),
        "target_recall": metadata.get("target_recall"),
        "data_fingerprint": metadata.get("data_fingerprint"),
        "site": site.get("name"),
        "git_commit": metadata.get("git_commit"),
        **{f"sha256.{name}": digest for name, digest in (metadata.get("files") or {}).items()},
        **(extra_tags or {}),
    }
    return tracker.register(metadata["name"], artifact.version, run_id, f"runs:/{run_id}/{folder}", tags)


def tracker_for_source(checkpoint: str | None = None, artifact: str | None = None, tracking_uri: str | None = None,
                       track: bool = True, warn: Callable[[str], None] = _stderr) -> tuple[Tracker, dict | None]:
    """For a command that reads a checkpoint or an artifact (evaluate, calibrate): (its tracker, the
    training run it descends from or None). The store: ``tracking_uri``, else the one recorded (the
    artifact's metadata ``tracking``, or the checkpoint's run folder), else ``$MLFLOW_TRACKING_URI``,
    else ``mlflow.db`` in the registry (artifact) or the run's storage folder (checkpoint)."""
    recorded: dict | None
    if artifact is not None:
        from pneumonia.artifacts.registry import read_metadata, resolve_artifact

        recorded = read_metadata(artifact).get("tracking")
        version = resolve_artifact(artifact)
        default = default_uri(str(version.parent.parent))
    else:
        recorded, storage_root = source_run(checkpoint)
        default = default_uri(storage_root or parent(checkpoint))
    uri = resolve_uri(track, tracking_uri, recorded and recorded.get("tracking_uri"), default)
    tracker = Tracker(uri, (recorded or {}).get("experiment", "pneumonia"), warn)
    return tracker, recorded


def record_run(tracker: Tracker, name: str, command: str, *, recorded: dict | None, params: dict[str, Any],
               metrics: dict[str, Any], tags: dict[str, Any] | None = None, files: Iterable[str | Path] = (),
               finish: bool = True) -> str | None:
    """One finished run of a command that does not train (evaluate, calibrate), nested under the
    training run ``recorded`` names when it is in the same store; its id, or None."""
    if not tracker.active:
        return None
    same = bool(recorded) and recorded.get("tracking_uri") == tracker.uri and recorded.get("run_id")
    lineage = {key: str(value) for key, value in (recorded or {}).items()
               if key in ("run_id", "export_run_id") and value}
    run_id = tracker.start(name, command, params=flatten(params), parent=recorded["run_id"] if same else None,
                           tags={**{f"pneumonia.training.{key}": value for key, value in lineage.items()},
                                 **{key: str(value) for key, value in (tags or {}).items() if value is not None}})
    tracker.log_metrics(run_id, numbers(metrics))
    tracker.log_files(run_id, files)
    if finish:
        tracker.end(run_id)
    return run_id
