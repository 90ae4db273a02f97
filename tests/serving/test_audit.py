"""The audit writer: one line per record, rotation at the size limit, failures that never reach
the caller (no Ray, no model)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time

import numpy as np
import pytest

from pneumonia.serving.audit import AuditLog, input_fields, replica_path


def _lines(folder, pattern="audit*") -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob(pattern)) for line in path.read_text().splitlines()]


def test_each_record_is_one_json_line_in_this_processs_own_file(tmp_path):
    path = replica_path(tmp_path / "logs" / "audit.jsonl")
    assert path.parent == tmp_path / "logs" and path.name.startswith("audit.") and path.name.endswith(f"-{os.getpid()}.jsonl")
    log = AuditLog(path)
    for index in range(3):
        log.write({"time": f"t{index}", "status": 200, "probability": float("nan")})
    assert log.flush()
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"time": f"t{index}", "status": 200, "probability": None} for index in range(3)]
    assert replica_path("/x/audit.jsonl", pid=7, host="node1").as_posix() == "/x/audit.node1-7.jsonl"


def test_rotation_happens_at_the_size_limit_and_keeps_the_backups(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=2048, backups=2)
    for index in range(60):  # about 80 bytes a line: ~4800 bytes, more than two files' worth
        log.write({"index": index, "padding": "x" * 60})
    assert log.flush()
    log.close()
    files = sorted(tmp_path.iterdir())
    assert [file.name for file in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(file.stat().st_size <= 2048 for file in files)
    kept = sorted(line["index"] for line in _lines(tmp_path))
    assert kept == list(range(60 - len(kept), 60))  # the newest lines, none lost within the kept files


def test_a_write_that_fails_is_counted_and_warned_once_and_never_raises(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the audit folder should be")
    errors = []
    log = AuditLog(blocker / "audit.jsonl", on_error=errors.append)
    with caplog.at_level(logging.WARNING, logger="pneumonia.serving.audit"):
        for index in range(5):
            log.write({"index": index})  # returns at once; the writer thread fails
        assert log.flush()
        warnings = [record for record in caplog.records if "a line was lost" in record.getMessage()]
        assert len(warnings) == 1 and "pneumonia_audit_write_errors" in warnings[0].getMessage()
        assert log.errors == 5 and errors == [1] * 5
        blocker.unlink()  # the folder can be made now: writing resumes, said once
        log.write({"index": 5})
        assert log.flush()
    log.close()
    assert _lines(blocker, "audit.jsonl") == [{"index": 5}]
    assert any("writing again" in record.getMessage() for record in caplog.records)


def test_a_folder_that_disappears_is_made_again(tmp_path):
    folder = tmp_path / "logs"
    log = AuditLog(folder / "audit.jsonl")
    log.write({"index": 0})
    assert log.flush()
    shutil.rmtree(folder)
    log.write({"index": 1})
    assert log.flush()
    log.close()
    assert _lines(folder) == [{"index": 1}] and log.errors == 0


def test_a_full_queue_drops_the_record_instead_of_waiting(tmp_path):
    """The writer is stuck (a hung disk): write() still returns at once, and counts what it drops."""
    release = threading.Event()
    log = AuditLog(tmp_path / "audit.jsonl", queue_lines=2)
    stuck = log._emit
    log._emit = lambda line: (release.wait(10), stuck(line))
    started = time.monotonic()
    for index in range(10):
        log.write({"index": index})
    assert time.monotonic() - started < 1
    assert log.errors >= 7  # one being written, two queued, the rest dropped
    release.set()
    assert log.flush()
    log.close()


def test_an_input_is_identified_by_hash_size_and_type_never_by_content():
    data = b"\xff\xd8 jpeg bytes"
    assert input_fields(data, "image/jpeg") == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                                                "content_type": "image/jpeg"}
    pixels = np.zeros((4, 4, 1), np.uint8)
    assert input_fields(pixels, "UINT8")["bytes"] == 16


@pytest.mark.parametrize("max_bytes, backups", [(10, 1), (4096, 0)])
def test_limits_below_the_minimum_are_refused(tmp_path, max_bytes, backups):
    with pytest.raises(ValueError, match="audit_"):
        AuditLog(tmp_path / "a.jsonl", max_bytes=max_bytes, backups=backups)
