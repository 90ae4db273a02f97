"""What a training run or sweep leaves in storage, and how to find it again.

One place for the run layout that training writes and export, resume and the interruption
checks read: folder and file names, the manifest (name, data, config, creation time in UTC ISO
8601), the per-epoch history the workers append to, and the latest run in a storage root.

    <storage>/<run>/pneumonia_run.json       manifest of a training run (`pneumonia train`)
    <storage>/<run>/history.json             every epoch's metrics (written by the workers)
    <storage>/<run>/pneumonia_result.json    the best checkpoint and its metrics, once finished
    <storage>/<run>/members/member_<i>/      an ensemble's member runs; <run>/ensemble its checkpoint
    <storage>/<sweep>/pneumonia_sweep.json   manifest of a sweep (`pneumonia tune`)
    <storage>/<sweep>/trials/<trial id>/     each trial's training run
    <run folder>/pneumonia_tracking.json     the MLflow store and run id of a run, trial or member
    <storage>/mlflow.db                      the embedded MLflow store (pneumonia.artifacts.tracking)
    <storage>/mlartifacts/                   its runs' files
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from pneumonia.errors import PneumoniaError
from pneumonia.storage import exists, is_uri, join, list_files, read_bytes, write_text

RUN_MANIFEST = "pneumonia_run.json"
SWEEP_MANIFEST = "pneumonia_sweep.json"
RESULT_FILE = "pneumonia_result.json"
HISTORY_FILE = "history.json"
TRIALS_FOLDER = "trials"
MEMBERS_FOLDER = "members"
ENSEMBLE_FOLDER = "ensemble"


def member_name(index: int) -> str:
    """Member ``index``'s run name (its folder under ``<run>/members``; also its Tune trial folder)."""
    return f"member_{index}"


def resolve_storage(storage: str) -> str:
    """Ray needs an absolute local path or a URI."""
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())


def write_manifest(storage: str, name: str, manifest_name: str, data_root: str, config: dict[str, Any],
                   tracking: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
    """Record a new run or sweep: what ``--resume`` and export read back. ``tracking``: the MLflow
    store and run id it is tracked in (:mod:`pneumonia.artifacts.tracking`), None when it is not;
    ``extra``: more keys a resume needs (a sweep's ``untuned_first``)."""
    write_text(join(storage, name, manifest_name), json.dumps({
        "name": name, "data": data_root, "config": config,
        "created": datetime.now(UTC).isoformat(), "tracking": tracking, **(extra or {}),
    }, indent=2))


def load_manifest(storage: str, name: str, manifest_name: str = RUN_MANIFEST, what: str = "run") -> dict[str, Any]:
    location = join(storage, name, manifest_name)
    if not exists(location):
        raise PneumoniaError(f"--resume: {what} {name!r} not found in {storage}")
    return json.loads(read_bytes(location))


def _created(manifest: dict[str, Any]) -> datetime:
    """A manifest's creation time, comparable across time zones (a naive one is taken as UTC)."""
    try:
        created = datetime.fromisoformat(manifest.get("created") or "")
    except (TypeError, ValueError):
        return datetime.min.replace(tzinfo=UTC)
    return created if created.tzinfo else created.replace(tzinfo=UTC)


def latest_run(storage: str, manifest_name: str = RUN_MANIFEST, what: str = "run") -> str:
    """The most recently started run (or sweep) in storage, by its manifest's creation time."""
    candidates = []
    try:
        entries = list_files(storage)
    except PneumoniaError:
        entries = []
    for entry in entries:
        parts = entry.relative.split("/")
        if len(parts) == 2 and parts[1] == manifest_name:
            candidates.append((_created(json.loads(read_bytes(entry.location))), parts[0]))
    if not candidates:
        raise PneumoniaError(f"--resume: no earlier {what} found in {storage}")
    return max(candidates)[1]


MANIFEST_DEPTH = 3
"""How far above a checkpoint its manifest can be: 1 folder for a run's checkpoint_* or
<run>/ensemble, 3 for a sweep trial's trials/<trial>/<ckpt> or a member's members/member_<k>/<ckpt>."""


def parent(location: str) -> str:
    """The folder holding a path or URI (a URI keeps its ``scheme://``)."""
    if is_uri(location):
        scheme, _, path = location.rstrip("/").partition("://")
        return f"{scheme}://{path.rsplit('/', 1)[0]}" if "/" in path else location
    return str(PurePosixPath(location.rstrip("/")).parent)


def manifest_above(checkpoint: str) -> dict[str, Any] | None:
    """The nearest run or sweep manifest above a checkpoint, or None (a checkpoint from elsewhere)."""
    folder = checkpoint
    for _ in range(MANIFEST_DEPTH):
        folder = parent(folder)
        for name in (RUN_MANIFEST, SWEEP_MANIFEST):
            location = join(folder, name)
            if exists(location):
                return json.loads(read_bytes(location))
    return None


def sweep_manifest(checkpoint: str) -> dict[str, Any] | None:
    """The manifest of the sweep a trial's checkpoint came from (<sweep>/trials/<trial>/<ckpt>), or None."""
    location = join(parent(parent(parent(checkpoint))), SWEEP_MANIFEST)
    return json.loads(read_bytes(location)) if exists(location) else None


def validation_metrics(reported: dict[str, Any], finite: bool = False) -> dict[str, float]:
    """The validation metrics of an epoch report, history row or checkpoint (``val_<name>``), by
    their plain names; only numbers (with ``finite``, only finite ones)."""
    return {key[4:]: float(value) for key, value in reported.items()
            if key.startswith("val_") and isinstance(value, (int, float)) and not isinstance(value, bool)
            and (not finite or math.isfinite(value))}


def history_location(storage: str, name: str) -> str:
    """Where run ``name`` in ``storage`` keeps its history (what the run's workers write)."""
    return join(storage, name, HISTORY_FILE)


def read_history(location: str) -> list[dict[str, Any]]:
    return json.loads(read_bytes(location)) if exists(location) else []
