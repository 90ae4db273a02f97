"""What every writer shares: atomic writes, JSON-ready values, uploads staged through a local folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pneumonia.storage import json_ready, read_bytes, staged_directory, write_atomic


def test_an_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "nested" / "LATEST"
    write_atomic(target, "v0001\n")
    write_atomic(target, b"v0002\n")
    assert target.read_text() == "v0002\n"
    assert [p.name for p in target.parent.iterdir()] == ["LATEST"]


def test_a_failed_atomic_write_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "LATEST"
    write_atomic(target, "v0001\n")

    def crash(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pneumonia.storage.os.replace", crash)
    with pytest.raises(OSError):
        write_atomic(target, "v0002\n")
    assert target.read_text() == "v0001\n"
    assert [p.name for p in tmp_path.iterdir()] == ["LATEST"]  # the temporary file is gone too


def test_json_ready_values_survive_a_strict_encoder():
    value = {"auc": np.float32(0.5), "n": np.int64(3), "nan": math.nan, "inf": -math.inf,
             "curve": np.array([0.1, 0.2]), "pair": (1, 2), "path": Path("/a"), 7: None}
    ready = json_ready(value)
    assert json.loads(json.dumps(ready, allow_nan=False)) == {
        "auc": 0.5, "n": 3, "nan": None, "inf": None, "curve": [0.1, 0.2], "pair": [1, 2], "path": "/a", "7": None}
    with pytest.raises(ValueError, match="cannot store a object as JSON"):
        json_ready({"x": object()}, strict=True)


def test_a_staged_directory_is_the_folder_itself_when_local(tmp_path):
    with staged_directory(str(tmp_path / "out")) as folder:
        assert folder == tmp_path / "out"


def test_a_staged_directory_uploads_to_a_uri_and_removes_its_scratch(tmp_path):
    location = f"file://{tmp_path}/remote/sweep"
    with staged_directory(location) as folder:
        scratch = folder.parent
        (folder / "plots").mkdir(parents=True)
        (folder / "results.csv").write_text("a,b\n")
        (folder / "plots" / "map.png").write_bytes(b"png")
    assert read_bytes(f"{location}/results.csv") == b"a,b\n"
    assert read_bytes(f"{location}/plots/map.png") == b"png"
    assert not scratch.exists()


def test_a_failed_block_uploads_nothing(tmp_path):
    location = f"file://{tmp_path}/remote/sweep"
    with pytest.raises(RuntimeError), staged_directory(location) as folder:
        folder.mkdir()
        (folder / "results.csv").write_text("half")
        raise RuntimeError("plotting failed")
    assert not (tmp_path / "remote").exists()
