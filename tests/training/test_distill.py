"""The teacher a student is given is checked before any worker starts: it exists and sees the
images the student gets. An interrupted student names the run to resume, not its own stage."""

from __future__ import annotations

import re

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


def test_an_interrupted_student_tells_the_user_to_resume_the_whole_run(tmp_path, monkeypatch):
    """The student trains as `<run>/student`; Ctrl-C there must name the run the user started
    (`--resume --name NAME`), whose members are done and whose student continues from its checkpoint."""
    from pneumonia.config import ExperimentConfig, with_overrides
    from pneumonia.errors import Interrupted
    from pneumonia.training import distill

    spec = PreprocessSpec(150, 1, "stretch", "equalize")
    config = with_overrides(ExperimentConfig(), {"data.normalize": "equalize", "ensemble.members": 2,
                                                 "distill.enabled": True})
    assert distill.preprocess_spec(config) == spec

    def interrupted(student, *_, resume_command=None, **__):
        assert student.run.name == "student" and student.run.storage == str(tmp_path / "runs" / "night")
        raise Interrupted(f"training interrupted; {resume_command} continues it from its last checkpoint")

    monkeypatch.setattr(distill, "fit_run", interrupted)
    monkeypatch.setattr(distill, "check_resources", lambda _: None)
    with pytest.raises(Interrupted, match=re.escape(f"--resume --name night --storage {tmp_path / 'runs'}`")):
        distill.train_student(config, _teacher(tmp_path / "t", spec), [], [], str(tmp_path / "runs"), "night",
                              progress=lambda _: None)
