"""The teacher a student is given is checked before any worker starts: it exists and sees the
images the student gets."""

from __future__ import annotations

import pytest

from pneumonia.data.preprocess import PreprocessSpec
from pneumonia.errors import PneumoniaError
from pneumonia.models.checkpoint import INFO_FILE, CheckpointInfo
from pneumonia.training.distill import teacher_metrics_of


def _teacher(folder, spec: PreprocessSpec):
    folder.mkdir()
    info = CheckpointInfo(epoch=3, config={}, preprocess=spec, metrics={"val_roc_auc": 0.99, "val_note": "x"})
    (folder / INFO_FILE).write_text(info.to_json())
    return str(folder)


def test_a_matching_teacher_gives_its_recorded_metrics(tmp_path):
    spec = PreprocessSpec(150, 1, "stretch", "equalize")
    assert teacher_metrics_of(_teacher(tmp_path / "t", spec), spec) == {"roc_auc": 0.99}


def test_a_teacher_of_another_image_size_is_refused_with_what_to_change(tmp_path):
    teacher = _teacher(tmp_path / "t", PreprocessSpec(150, 1, "stretch", "equalize"))
    with pytest.raises(PneumoniaError, match="set the data section .* to the teacher's"):
        teacher_metrics_of(teacher, PreprocessSpec(96, 1, "stretch", "equalize"))


def test_a_missing_teacher_is_refused(tmp_path):
    with pytest.raises(PneumoniaError, match="does not exist"):
        teacher_metrics_of(str(tmp_path / "nowhere"), PreprocessSpec())
