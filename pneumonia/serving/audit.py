"""The audit trail: one JSON line per request answered on a prediction route, written off the
request path.

What a line holds (docs/security-serving.md has an example): ``time`` (UTC ISO, when the request
arrived), ``request_id`` (the ``X-Request-ID`` of the answer), ``client`` (the peer's address) and
``forwarded_for`` (a proxy's ``X-Forwarded-For``, as sent, when there is one), ``token`` (the
token's *name*, :mod:`pneumonia.serving.auth`; null when the service runs open or the token was
missing or wrong), ``method``, ``route``, ``status``, the model's ``model``, ``version``, ``site``
(whose calibration the threshold is; null for the shipped one) and ``threshold``, one entry per
input image under ``images`` (``sha256``, ``bytes``, ``content_type``, once scored
``probability``, ``label``, ``ood_score``, ``out_of_distribution``, and the image's own ``status``:
200 classified or flagged, 400 undecodable, 413 too large, 422 refused by the guard; a multipart
/predict answers 200 as a whole when any of its images got 200, so ``status`` alone would not
say which were refused) and ``latency_ms``.

What is never written: pixels or any part of an image, multipart file names (they often carry
patient names), tokens, or any other header.

Why a queue: writing can be slow or fail (a full disk, a folder gone), and an answer must never
wait for it or fail because of it. A request only puts its record on a bounded queue
(:meth:`AuditLog.write` never blocks and never raises); one thread encodes and writes the lines.
A failed write or a full queue loses that line, counts it (``on_error``: the
``pneumonia_audit_write_errors`` metric) and logs one warning until writes work again.

Why one file per replica: rotation renames the file, and two processes rotating one file lose or
interleave lines. So each process writes ``<stem>.<host>-<pid><suffix>`` beside the path it is
given (:func:`replica_path`): ``audit.jsonl`` -> ``audit.node1-4242.jsonl``; a restarted replica
starts a new file. Lines begin with their time, so ``sort audit.*.jsonl`` merges them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import os
import queue
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia.storage import json_ready

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
"""Size at which a replica's audit file is rotated (``audit_max_bytes``)."""
DEFAULT_BACKUPS = 10
"""Rotated files kept per replica (``audit_backups``): .1 (newest) to .10."""
QUEUE_LINES = 10_000
"""Records waiting to be written before new ones are dropped (and counted as write errors)."""
HASH_IN_THREAD_BYTES = 256 * 1024
"""Inputs at least this large are hashed in a worker thread, off the event loop."""

logger = logging.getLogger(__name__)


def replica_path(path: str | Path, pid: int | str | None = None, host: str | None = None) -> Path:
    """This process's own audit file beside ``path``: ``<stem>.<host>-<pid><suffix>``."""
    path = Path(path)
    host = (host or socket.gethostname().split(".")[0] or "host").replace(os.sep, "_")
    return path.with_name(f"{path.stem}.{host}-{os.getpid() if pid is None else pid}{path.suffix}")


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Rotating(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose write errors reach the writer thread (not stderr, per line)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        raise  # called from emit's except block: re-raises the write error


class AuditLog:
    """A replica's audit file: ``write`` enqueues a record; a daemon thread writes it as a line,
    rotating at ``max_bytes`` and keeping ``backups`` old files."""

    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS,
                 on_error: Callable[[int], None] | None = None, queue_lines: int = QUEUE_LINES):
        if max_bytes < 1024:
            raise ValueError(f"audit_max_bytes must be at least 1024, not {max_bytes}")
        if backups < 1:
            raise ValueError(f"audit_backups must be at least 1, not {backups}")
        self.path = Path(path)
        self.max_bytes, self.backups = max_bytes, backups
        self.errors = 0  # lines lost (write errors and a full queue), for tests and operators
        self._on_error = on_error or (lambda count: None)
        self._queue: queue.Queue = queue.Queue(queue_lines)
        self._handler: _Rotating | None = None
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="pneumonia-audit", daemon=True)
        self._thread.start()

    # -- the request path

    def write(self, record: dict[str, Any]) -> None:
        """Queue one record; never blocks, never raises (a full queue loses it, counted)."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._lost(f"its queue is full ({self._queue.maxsize} lines waiting)")

    def flush(self, timeout_s: float = 10) -> bool:
        """Wait until every record queued so far has been written or given up (tests, shutdown);
        False if that took longer than ``timeout_s``."""
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout_s)
        except queue.Full:
            return False
        return done.wait(timeout_s)

    def close(self, timeout_s: float = 10) -> None:
        """Write what is queued, then stop the writer and close the file."""
        if self._thread.is_alive():
            try:
                self._queue.put(None, timeout=timeout_s)
            except queue.Full:
                return
            self._thread.join(timeout_s)

    # -- the writer thread

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            if isinstance(record, threading.Event):  # flush()
                record.set()
                continue
            if record is None:  # close()
                self._reset()
                return
            try:
                self._emit(json.dumps(json_ready(record), separators=(",", ":")))
            except Exception as error:  # noqa: BLE001 - no error may end the writer
                self._lost(f"{type(error).__name__}: {getattr(error, 'strerror', None) or error}")
                self._reset()
            else:
                if self._failing:
                    self._failing = False
                    logger.warning("audit log %s: writing again", self.path)

    def _emit(self, line: str) -> None:
        if self._handler is not None and not self.path.exists():  # removed, or its folder: start afresh
            self._reset()
        if self._handler is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handler = _Rotating(self.path, maxBytes=self.max_bytes, backupCount=self.backups,
                                      encoding="utf-8", delay=True)
        self._handler.emit(logging.LogRecord("pneumonia.audit", logging.INFO, __file__, 0, line, None, None))

    def _reset(self) -> None:
        """Drop the file handle after a failure, so that the next line opens the file afresh (a
        folder re-created, a disk with room again)."""
        handler, self._handler = self._handler, None
        if handler is not None:
            try:
                handler.close()
            except Exception:  # noqa: BLE001 - closing a broken stream may fail too
                pass

    def _lost(self, why: str) -> None:
        self.errors += 1
        try:
            self._on_error(1)
        except Exception:  # noqa: BLE001 - a metric must not stop the writer either
            pass
        if not self._failing:
            self._failing = True
            logger.warning("audit log %s: a line was lost (%s); further losses are counted in "
                           "pneumonia_audit_write_errors until writing works again", self.path, why)


# ----------------------------------------------------------------------------- what a line says


def input_fields(data: bytes | np.ndarray, content_type: str | None) -> dict[str, Any]:
    """An input's identity without its content: SHA-256 and size of the bytes received (of the
    pixels for an Open Inference Protocol UINT8 tensor), and the declared content type."""
    raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
    return {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw), "content_type": content_type}


def result_fields(scored: Any, threshold: float) -> dict[str, Any]:
    """What the model said of one image (a :class:`pneumonia.models.ood.Scored`)."""
    return {"probability": round(float(scored.probability), 6), "label": scored.label(threshold),
            "ood_score": None if scored.ood_score is None else round(float(scored.ood_score), 3),
            "out_of_distribution": bool(scored.out_of_distribution)}
