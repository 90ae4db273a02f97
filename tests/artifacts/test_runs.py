"""The run layout: what `--resume` and export find again in a storage root."""

from __future__ import annotations

import json
import math

import pytest

from pneumonia.artifacts import runs
from pneumonia.errors import PneumoniaError


def _manifest(root, name, manifest_name, created):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / manifest_name).write_text(json.dumps({"name": name, "data": f"/data/{name}", "created": created}))


def test_the_latest_run_is_the_latest_in_time_not_in_spelling(tmp_path):
    # 10:30 at UTC+05:00 is 05:30 UTC: earlier than 09:00 UTC although it sorts later as text.
    _manifest(tmp_path, "east", runs.RUN_MANIFEST, "2026-12-06T10:30:00+05:00")
    _manifest(tmp_path, "utc", runs.RUN_MANIFEST, "2026-12-06T09:00:00+00:00")
    _manifest(tmp_path, "naive", runs.RUN_MANIFEST, "2026-12-06T08:00:00")  # older manifests: taken as UTC
    assert runs.latest_run(str(tmp_path)) == "utc"


def test_a_new_manifest_records_its_creation_in_utc_and_reads_back(tmp_path):
    runs.write_manifest(str(tmp_path), "sweep-1", runs.SWEEP_MANIFEST, "/data", {"train": {"epochs": 2}})
    manifest = runs.load_manifest(str(tmp_path), "sweep-1", runs.SWEEP_MANIFEST, "sweep")
    assert manifest["created"].endswith("+00:00") and manifest["config"] == {"train": {"epochs": 2}}
    assert runs.latest_run(str(tmp_path), runs.SWEEP_MANIFEST, "sweep") == "sweep-1"


def test_resuming_what_is_not_there_says_so(tmp_path):
    with pytest.raises(PneumoniaError, match="--resume: sweep 'nope' not found"):
        runs.load_manifest(str(tmp_path), "nope", runs.SWEEP_MANIFEST, "sweep")
    with pytest.raises(PneumoniaError, match="--resume: no earlier run found"):
        runs.latest_run(str(tmp_path / "empty"))


def test_the_manifest_above_a_checkpoint_is_found_where_the_layout_puts_it(tmp_path):
    _manifest(tmp_path, "run", runs.RUN_MANIFEST, "2026-12-06T09:00:00+00:00")
    _manifest(tmp_path, "sweep", runs.SWEEP_MANIFEST, "2026-12-06T09:00:00+00:00")
    assert runs.manifest_above(str(tmp_path / "run" / "checkpoint_000003"))["data"] == "/data/run"
    member = tmp_path / "run" / runs.MEMBERS_FOLDER / runs.member_name(1) / "checkpoint_000001"
    assert runs.manifest_above(str(member))["data"] == "/data/run"
    trial = tmp_path / "sweep" / runs.TRIALS_FOLDER / "a1b2" / "checkpoint_000002"
    assert runs.sweep_manifest(str(trial))["name"] == "sweep"
    assert runs.manifest_above(str(tmp_path / "elsewhere" / "a" / "b" / "checkpoint")) is None
    assert runs.sweep_manifest(str(tmp_path / "run" / "checkpoint_000003")) is None


def test_validation_metrics_are_named_plainly_and_only_numbers_pass():
    reported = {"val_roc_auc": 0.9, "val_f1": math.nan, "loss": 0.3, "val_note": "x", "val_flag": True, "epoch": 3}
    assert runs.validation_metrics(reported) == {"roc_auc": 0.9, "f1": pytest.approx(math.nan, nan_ok=True)}
    assert runs.validation_metrics(reported, finite=True) == {"roc_auc": 0.9}
