"""`pneumonia audit` end to end: a tiny checkpoint on the synthetic validation carve (the groups are
the images a user would pick by hand from the scores), an ensemble artifact with `pad` and a
stress shift, the report's files, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia.data.preprocess import PreprocessSpec
from tests.helpers import run_cli

pytestmark = pytest.mark.timeout(240)

SIZE = 64
TOP = 5


def _save_tiny(folder: Path, seed: int, spec: PreprocessSpec, bias: float = 0.0) -> str:
    """An untrained xraynet (width 4) as a checkpoint: enough for scores that differ between images."""
    import tensorflow as tf

    from pneumonia.config import ModelConfig
    from pneumonia.models.architectures import build_model
    from pneumonia.models.checkpoint import CheckpointInfo, save_checkpoint

    tf.keras.utils.set_random_seed(seed)
    model = build_model(ModelConfig(name="xraynet", width=4), spec.shape)
    model.get_layer("probability").bias.assign([bias])
    save_checkpoint(folder, model, CheckpointInfo(epoch=1, config={}, preprocess=spec,
                                                  metrics={"val_threshold": 0.5}))
    return str(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("audit") / "checkpoint", 0, PreprocessSpec(SIZE))


@pytest.fixture(scope="module")
def wide_data(synthetic_data, tmp_path_factory) -> Path:
    """The synthetic train/ split, every image stretched to 5:4 (so `pad` adds bands); no test/."""
    root = tmp_path_factory.mktemp("wide") / "chest_xray"
    for source in sorted((synthetic_data / "train").rglob("*.*")):
        target = root / source.relative_to(synthetic_data)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(source).resize((80, 64)).save(target)
    return root


@pytest.fixture(scope="module")
def ensemble_artifact(tmp_path_factory) -> str:
    """A two-member ensemble with `pad` preprocessing, exported as an artifact."""
    from pneumonia.artifacts.publish import export_artifact
    from pneumonia.models.ensemble import combine_checkpoints

    root = tmp_path_factory.mktemp("ensemble")
    spec = PreprocessSpec(SIZE, resize="pad")
    members = [_save_tiny(root / f"member{index}", index + 1, spec, bias) for index, bias in enumerate((-0.5, 0.5))]
    combined = combine_checkpoints(members, str(root / "combined"), metrics={"val_threshold": 0.5})
    export_artifact(combined, root / "registry", threshold=0.5, target_recall=0.95, validation_metrics={},
                    training_config={}, drift_reference=None)
    return str(root / "registry")


def _validation_scores(checkpoint: str, data: Path):
    """(records, probabilities) of the validation carve, scored directly: what the audit must agree with."""
    from pneumonia.config import config_from_dict
    from pneumonia.data.pipeline import load_images, predict_probabilities
    from pneumonia.data.records import carve_validation
    from pneumonia.models.checkpoint import load_checkpoint

    model, info = load_checkpoint(checkpoint)
    _, _, records = carve_validation(str(data), config_from_dict(info.config))
    decoded = load_images(records, info.preprocess)
    return decoded.records, predict_probabilities(model, decoded.images)


def test_audit_of_a_checkpoint_picks_the_groups_and_writes_the_report(checkpoint, synthetic_data, tmp_path, capsys):
    report = tmp_path / "report"
    code, out, err = run_cli(capsys, "audit", "--checkpoint", checkpoint, "--data", synthetic_data,
                             "--top", TOP, "--report", report, "--json")
    assert code == 0, err
    assert "Grad-CAM of 15 images" in err  # progress on stderr, the result alone on stdout
    payload = json.loads(out.strip().splitlines()[-1])

    records, probabilities = _validation_scores(checkpoint, synthetic_data)
    assert payload["split"] == "validation" and payload["images"] == len(records)  # the carve training made
    by_file = {record.location: (record.label, probability) for record, probability in zip(records, probabilities)}
    healthy = sorted((p for label, p in by_file.values() if label == 0), reverse=True)
    sick = sorted((p for label, p in by_file.values() if label == 1), reverse=True)
    rows = {group: [row for row in payload["rows"] if row["group"] == group]
            for group in ("healthy_high", "healthy_low", "sick_found")}
    for group, expected_label, expected in (("healthy_high", 0, healthy[:TOP]), ("healthy_low", 0, healthy[::-1][:TOP]),
                                            ("sick_found", 1, sick[:TOP])):
        assert [by_file[row["file"]][0] for row in rows[group]] == [expected_label] * TOP
        np.testing.assert_allclose([row["probability"] for row in rows[group]], expected, atol=1e-6)

    groups = {group["group"]: group for group in payload["groups"]}
    assert set(groups) == {"healthy_high", "healthy_low", "sick_found"}
    for group in groups.values():
        assert group["n"] == TOP and group["shift"] == "clean"
        assert group["n"] - group["blank"] == group["counts"].get("border", 0)
        assert all(value >= 0 for value in group["enrichment"].values())
    for row in payload["rows"]:
        if row["share"] is not None:
            assert row["enrichment"]["border"] == pytest.approx(row["share"]["border"] / payload["areas"]["border"])
    assert payload["finding"]

    assert sorted(path.name for path in report.iterdir()) == [
        "audit.json", "healthy_high.png", "healthy_low.png", "sick_found.png"]
    assert json.loads((report / "audit.json").read_text())["groups"] == payload["groups"]
    with Image.open(report / "healthy_high.png") as montage:
        assert montage.format == "PNG" and montage.width == TOP * 192  # one tile per image, one row


def test_audit_of_an_ensemble_artifact_with_pad_under_a_shift(ensemble_artifact, wide_data, capsys):
    code, out, err = run_cli(capsys, "audit", "--artifact", ensemble_artifact, "--data", wide_data,
                             "--top", 3, "--shift", "new_site")
    assert code == 0, err
    assert "member_*/last_conv" in out and "pad 64 px" in out
    table = [line.split() for line in out.splitlines()]
    assert sum(line[:2] == ["healthy_high", "new_site"] for line in table) == 1
    assert sum(line[:2] == ["sick_found", "clean"] for line in table) == 1
    assert "letterbox" in out  # 5:4 X-rays padded to a square: the bands' evidence is reported on its own
    lines = out.strip().splitlines()
    assert lines[-1].startswith("finding: healthy X-rays scored highest put")  # the clean images' sentence last
    assert lines[-2].startswith("under the shift: healthy X-rays scored highest under the new_site shift")


@pytest.mark.parametrize("argv, message, status", [
    (["--data", "/nonexistent/xrays"], "data folder not found", 1),
    (["--top", "0"], "--top: must be at least 1", 2),
    (["--shift", "sunny"], "unknown stress shift(s) sunny", 2),
    (["--split", "test"], "no test/ split", 1),
    (["--split", "val"], "invalid choice: 'val'", 2),
])
def test_bad_input_gives_one_line_and_a_non_zero_exit(checkpoint, wide_data, capsys, argv, message, status):
    code, _, err = run_cli(capsys, "audit", "--checkpoint", checkpoint, "--data", wide_data, *argv)
    assert code == status
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_one_model_is_required(wide_data, checkpoint, capsys):
    for argv in ([], ["--checkpoint", checkpoint, "--artifact", checkpoint]):
        code, _, err = run_cli(capsys, "audit", "--data", wide_data, *argv)
        assert code == 1 and err.strip() == "error: pass exactly one of --checkpoint and --artifact"
