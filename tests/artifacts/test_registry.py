"""The serving-artifact registry: export, versioning, resolution, verified loading, fingerprints."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from pneumonia.artifacts.publish import data_fingerprint, export_artifact
from pneumonia.artifacts.registry import (
    SYNTHETIC_WARNING,
    ArtifactError,
    artifact_warning,
    list_versions,
    load_artifact,
    resolve_artifact,
)
from pneumonia.data.preprocess import PreprocessSpec
from pneumonia.data.records import ImageRecord

SPEC = PreprocessSpec(image_size=32)
SETTINGS = dict(threshold=0.37, target_recall=np.float32(0.75),  # numpy numbers are fine
                validation_metrics={"roc_auc": np.float32(0.91), "f1": float("nan")},
                training_config={"model": {"name": "xraynet", "width": 8}}, tuning_config={"trials": 4},
                data_fingerprint="sha256:abc")
METADATA_KEYS = {
    "name", "version", "created", "git_commit", "package_version", "format_version", "classes", "input",
    "threshold", "target_recall", "validation_metrics", "training_config", "tuning_config",
    "data_fingerprint", "training_data", "out_of_distribution", "drift_reference", "tracking", "source_checkpoint",
    "files",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(checkpoint folder, Keras model): a tiny untrained xraynet with non-trivial batch-norm
    statistics, so serving in training mode (batch statistics) would give different numbers."""
    from pneumonia.config import ModelConfig
    from pneumonia.models.architectures import build_model, compile_model
    from pneumonia.models.checkpoint import CheckpointInfo, save_checkpoint

    model = build_model(ModelConfig(name="xraynet", width=8), SPEC.shape)
    compile_model(model, "adam", 1e-3)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if hasattr(layer, "moving_variance"):
            layer.moving_mean.assign(rng.normal(0, 0.5, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    folder = tmp_path_factory.mktemp("checkpoint") / "checkpoint_000001"
    info = CheckpointInfo(epoch=1, config={"model": {"name": "xraynet"}}, preprocess=SPEC, metrics={"roc_auc": 0.9})
    save_checkpoint(folder, model, info)
    return folder, model


@pytest.fixture(scope="module")
def registry(checkpoint, tmp_path_factory):
    """A registry with two exports of the checkpoint: (root, first, second)."""
    root = tmp_path_factory.mktemp("registry")
    first = export_artifact(str(checkpoint[0]), root, **SETTINGS)
    second = export_artifact(str(checkpoint[0]), root, **SETTINGS)
    return root, first, second


@pytest.fixture(scope="module")
def loaded(registry):
    return load_artifact(registry[2].path)


@pytest.fixture
def copy_of_latest(registry, tmp_path) -> Path:
    """A private copy of the newest version, free to damage."""
    return Path(shutil.copytree(registry[2].path, tmp_path / "v0002"))


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SPEC.shape), dtype=np.uint8)


# ----------------------------------------------------------------------------- export and find


def test_versions_count_up_and_latest_names_the_newest(registry):
    root, first, second = registry
    assert (first.version, second.version) == ("v0001", "v0002")
    assert first.path == root / "pneumonia-cnn" / "v0001"
    assert (root / "pneumonia-cnn" / "LATEST").read_text().strip() == "v0002"
    listed = list_versions(root)
    assert [artifact.version for artifact in listed] == ["v0001", "v0002"]
    assert [artifact.path for artifact in listed] == [first.path, second.path]
    assert listed[1].metadata == second.metadata
    assert list_versions(root, name="other") == []
    assert sorted(path.name for path in (root / "pneumonia-cnn").iterdir()) == ["LATEST", "v0001", "v0002"]


@pytest.mark.parametrize("form", ["version", "name", "root", "LATEST", "latest", "root/latest"])
def test_resolve_accepts_every_documented_form(registry, form):
    root, first, second = registry
    location = {
        "version": first.path,
        "name": root / "pneumonia-cnn",
        "root": root,
        "LATEST": root / "pneumonia-cnn" / "LATEST",
        "latest": str(root / "pneumonia-cnn" / "latest"),
        "root/latest": root / "latest",
    }[form]
    assert resolve_artifact(location) == (first.path if form == "version" else second.path)


def test_resolve_explains_what_it_found(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ArtifactError, match="notes.txt"):
        resolve_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="not found"):
        resolve_artifact(tmp_path / "missing")
    for name in ("model-a", "model-b"):
        (tmp_path / name / "v0001").mkdir(parents=True)
        (tmp_path / name / "LATEST").write_text("v0001\n")
    with pytest.raises(ArtifactError, match="model-a, model-b"):
        resolve_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="v0001"):  # LATEST names a version without metadata
        resolve_artifact(tmp_path / "model-a")


def test_metadata_records_provenance_and_usage(registry, checkpoint):
    metadata = registry[2].metadata
    assert set(metadata) == METADATA_KEYS
    assert metadata == json.loads((registry[2].path / "metadata.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", metadata["git_commit"]) or metadata["git_commit"] == "unknown"
    assert datetime.fromisoformat(metadata["created"]).utcoffset() == UTC.utcoffset(None)
    assert metadata["format_version"] == 1 and metadata["classes"] == ["NORMAL", "PNEUMONIA"]
    assert metadata["input"] == {"image_size": 32, "channels": 1, "resize": "stretch", "normalize": "none",
                                 "dtype": "uint8"}
    assert metadata["threshold"] == 0.37 and metadata["target_recall"] == 0.75
    assert metadata["validation_metrics"]["roc_auc"] == pytest.approx(0.91)
    assert metadata["validation_metrics"]["f1"] is None  # NaN is not JSON
    assert metadata["tuning_config"] == {"trials": 4} and metadata["data_fingerprint"] == "sha256:abc"
    assert metadata["training_data"] == {"synthetic": None}  # nobody said what it learned from
    assert metadata["source_checkpoint"] == str(checkpoint[0].resolve())
    files = metadata["files"]
    assert {"model.keras", "saved_model/saved_model.pb"} <= set(files) and "metadata.json" not in files
    assert any(name.startswith("saved_model/variables/") for name in files)
    assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in files.values())


def test_only_an_artifact_trained_on_synthetic_data_carries_a_warning(registry, checkpoint, tmp_path):
    synthetic = export_artifact(str(checkpoint[0]), tmp_path, **SETTINGS,
                                training_data={"synthetic": True, "roots": ["/data/synthetic"]})
    assert synthetic.metadata["training_data"] == {"synthetic": True, "roots": ["/data/synthetic"]}
    assert artifact_warning(load_artifact(synthetic.path).metadata) == SYNTHETIC_WARNING
    assert "synthetic" in SYNTHETIC_WARNING and "real X-rays" in SYNTHETIC_WARNING
    for training_data in ({"synthetic": False}, {"synthetic": None}, None, "yes"):
        assert artifact_warning({"training_data": training_data}) is None
    assert artifact_warning({}) is None  # an artifact exported before training_data existed


@pytest.mark.parametrize("settings, message", [
    ({"threshold": -0.1}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": float("nan")}, "threshold"),
    ({"target_recall": 0.0}, "target_recall"),
    ({"target_recall": 1.2}, "target_recall"),
    ({"name": "../escape"}, "name"),
    ({"training_config": {"when": object()}}, "JSON"),
])
def test_bad_settings_are_refused_before_any_work(registry, checkpoint, settings, message):
    with pytest.raises(ValueError, match=message):
        export_artifact(str(checkpoint[0]), registry[0], **{**SETTINGS, **settings})
    assert [artifact.version for artifact in list_versions(registry[0])] == ["v0001", "v0002"]


def test_a_folder_that_is_not_a_checkpoint_is_refused(registry, tmp_path):
    (tmp_path / "model.keras").write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="not a pneumonia checkpoint"):
        export_artifact(str(tmp_path), registry[0], **SETTINGS)
    with pytest.raises(ArtifactError, match="not found"):
        export_artifact(str(tmp_path / "missing"), registry[0], **SETTINGS)
    assert sorted(path.name for path in (registry[0] / "pneumonia-cnn").iterdir()) == ["LATEST", "v0001", "v0002"]


def test_an_export_that_fails_midway_leaves_no_version(registry, checkpoint, monkeypatch):
    import pneumonia.artifacts.publish

    def crash(model, spec, directory, guard=None):
        directory.mkdir()
        (directory / "saved_model.pb").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pneumonia.artifacts.publish, "_save_serving_model", crash)
    root = registry[0]
    with pytest.raises(RuntimeError, match="disk full"):
        export_artifact(str(checkpoint[0]), root, **SETTINGS)
    assert [artifact.version for artifact in list_versions(root)] == ["v0001", "v0002"]
    assert sorted(path.name for path in (root / "pneumonia-cnn").iterdir()) == ["LATEST", "v0001", "v0002"]
    assert (root / "pneumonia-cnn" / "LATEST").read_text().strip() == "v0002"


# ----------------------------------------------------------------------------- load


def test_predictions_match_the_keras_model_in_inference_mode(loaded, checkpoint):
    model = checkpoint[1]
    batch = images(9)
    expected = model(batch.astype(np.float32), training=False).numpy().reshape(-1)
    got = loaded.predict(batch)
    assert got.dtype == np.float32 and got.shape == (9,)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(loaded.predict(batch[:1]), expected[:1], atol=1e-5)
    np.testing.assert_allclose(loaded.predict(batch, batch_size=4), expected, atol=1e-5)
    assert loaded.predict(batch[:0]).shape == (0,)


def test_predict_refuses_the_wrong_input(loaded):
    with pytest.raises(ValueError, match="uint8"):
        loaded.predict(images(2).astype(np.float32))
    with pytest.raises(ValueError, match=r"\(n, 32, 32, 1\)"):
        loaded.predict(np.zeros((2, 64, 64, 1), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        loaded.predict(images(1)[0])


def test_loaded_artifact_carries_its_spec_and_threshold(loaded, registry):
    assert loaded.preprocess == SPEC
    assert loaded.threshold == 0.37
    assert (loaded.version, loaded.name, loaded.path) == ("v0002", "pneumonia-cnn", registry[2].path)
    assert loaded.metadata == registry[2].metadata


def test_the_keras_model_is_there_for_explanations(loaded):
    model = loaded.keras_model()
    assert model is loaded.keras_model()
    assert model.get_layer("last_conv") is not None
    batch = images(3)
    np.testing.assert_allclose(model(batch.astype(np.float32), training=False).numpy().reshape(-1),
                               loaded.predict(batch), atol=1e-5)


def test_a_flipped_byte_is_caught_and_named(copy_of_latest):
    variables = next((copy_of_latest / "saved_model" / "variables").glob("variables.data-*"))
    data = bytearray(variables.read_bytes())
    data[len(data) // 2] ^= 0xFF
    variables.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"corrupt: saved_model/variables/variables\.data-"):
        load_artifact(copy_of_latest)


def test_a_missing_file_is_caught_and_named(copy_of_latest):
    (copy_of_latest / "model.keras").unlink()
    with pytest.raises(ArtifactError, match="model.keras is missing"):
        load_artifact(copy_of_latest)


def _edit_metadata(folder: Path, **changes) -> None:
    metadata = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**metadata, **changes}))


@pytest.mark.parametrize("changes, message", [
    ({"format_version": 2}, "format version 2 is not supported"),
    ({"classes": ["PNEUMONIA", "NORMAL"]}, "classes"),
    ({"input": {"image_size": 64, "channels": 1, "resize": "stretch", "dtype": "uint8"}}, "signature takes"),
    ({"input": {"image_size": 32, "channels": 1, "resize": "stretch", "dtype": "float32"}}, "uint8"),
    ({"files": {"model.keras": "0" * 64}}, "does not list saved_model/saved_model.pb"),
])
def test_incompatible_metadata_is_refused(copy_of_latest, changes, message):
    _edit_metadata(copy_of_latest, **changes)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(copy_of_latest)


def test_unreadable_metadata_is_refused(copy_of_latest):
    (copy_of_latest / "metadata.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="metadata.json is corrupt"):
        load_artifact(copy_of_latest)
    (copy_of_latest / "metadata.json").unlink()
    with pytest.raises(ArtifactError):
        load_artifact(copy_of_latest)


# ----------------------------------------------------------------------------- loading is safe


def _rehash(folder: Path) -> None:
    """Record the current sha256 of every file, as a forger who can rewrite metadata.json would."""
    from pneumonia.storage import sha256_of

    files = {path.relative_to(folder).as_posix(): sha256_of(path) for path in sorted(folder.rglob("*"))
             if path.is_file() and path.name != "metadata.json"}
    _edit_metadata(folder, files=files)


def test_a_symbolic_link_inside_an_artifact_is_refused_even_when_its_target_matches(copy_of_latest, tmp_path):
    model = copy_of_latest / "model.keras"
    elsewhere = tmp_path / "elsewhere.keras"
    model.rename(elsewhere)
    model.symlink_to(elsewhere)  # same bytes, same sha256: the link itself is refused
    with pytest.raises(ArtifactError, match=r"symbolic links \(model\.keras\)"):
        load_artifact(copy_of_latest)


def test_a_linked_variables_folder_is_refused(copy_of_latest, tmp_path):
    variables = copy_of_latest / "saved_model" / "variables"
    shutil.move(variables, tmp_path / "variables")
    variables.symlink_to(tmp_path / "variables")
    with pytest.raises(ArtifactError, match="saved_model/variables"):
        load_artifact(copy_of_latest)


def test_a_listed_file_outside_the_artifact_is_refused(copy_of_latest):
    metadata = json.loads((copy_of_latest / "metadata.json").read_text())
    _edit_metadata(copy_of_latest, files={**metadata["files"], "../escape.txt": "0" * 64})
    with pytest.raises(ArtifactError, match="outside the artifact: ../escape.txt"):
        load_artifact(copy_of_latest)


def test_an_unlisted_file_where_tensorflow_reads_is_refused(copy_of_latest):
    (copy_of_latest / "saved_model" / "assets").mkdir(exist_ok=True)
    (copy_of_latest / "saved_model" / "assets" / "vocabulary.txt").write_text("x")
    with pytest.raises(ArtifactError, match="saved_model/assets/vocabulary.txt not listed"):
        load_artifact(copy_of_latest)


def test_a_registry_path_that_escapes_its_root_is_refused(registry, tmp_path):
    root = tmp_path / "registry"
    (root / "pneumonia-cnn").mkdir(parents=True)
    shutil.copytree(registry[1].path, tmp_path / "outside" / "v0001")
    # LATEST naming a path, not a version
    (root / "pneumonia-cnn" / "LATEST").write_text("../../outside/v0001\n")
    with pytest.raises(ArtifactError, match="does not name a version"):
        resolve_artifact(root)
    # a version folder that is a link to elsewhere
    (root / "pneumonia-cnn" / "LATEST").write_text("v0001\n")
    (root / "pneumonia-cnn" / "v0001").symlink_to(tmp_path / "outside" / "v0001")
    for location in (root, root / "pneumonia-cnn", root / "pneumonia-cnn" / "LATEST"):
        with pytest.raises(ArtifactError, match="resolves outside"):
            resolve_artifact(location)
    # a name folder that is a link to elsewhere
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(registry[0] / "pneumonia-cnn", tmp_path / "linked-name")
    (other / "pneumonia-cnn").symlink_to(tmp_path / "linked-name")
    with pytest.raises(ArtifactError, match="resolves outside"):
        resolve_artifact(other)
    assert resolve_artifact(tmp_path / "linked-name") == tmp_path / "linked-name" / "v0002"  # named itself: fine


def test_a_saved_model_that_reads_files_is_refused_even_with_matching_hashes(copy_of_latest):
    """A forged artifact (metadata.json rewritten to match) whose signature reads a file."""
    import tensorflow as tf

    class Reader(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, *SPEC.shape], tf.uint8)])
        def serve(self, image):
            leaked = tf.cast(tf.strings.length(tf.io.read_file("/etc/hostname")), tf.float32)
            return {"probability": tf.reduce_mean(tf.cast(image, tf.float32), axis=[1, 2, 3]) * 0.0 + leaked}

    shutil.rmtree(copy_of_latest / "saved_model")
    module = Reader()
    tf.saved_model.save(module, str(copy_of_latest / "saved_model"), signatures={"serving_default": module.serve})
    _rehash(copy_of_latest)
    with pytest.raises(ArtifactError, match="ReadFile"):
        load_artifact(copy_of_latest)


def test_the_keras_model_is_verified_again_when_it_loads_later(copy_of_latest):
    import zipfile

    artifact = load_artifact(copy_of_latest)
    with zipfile.ZipFile(copy_of_latest / "model.keras", "a") as archive:
        archive.writestr("extra.txt", "x")  # replaced after load_artifact verified it
    with pytest.raises(ArtifactError, match="model.keras does not match"):
        artifact.keras_model()


def test_scoring_actors_verify_the_shipped_files_again(registry):
    """The driver verifies and ships the bytes; an actor writes them out and verifies them again."""
    from pneumonia.scoring.pipeline import pack_artifact, unpack_artifact

    packed = pack_artifact(str(registry[2].path))
    damaged = dict(packed.files)
    damaged["model.keras"] = damaged["model.keras"][:-1] + bytes([damaged["model.keras"][-1] ^ 1])
    with pytest.raises(ArtifactError, match="model.keras does not match"):
        unpack_artifact(damaged)
    assert unpack_artifact(packed.files).version == "v0002"


def test_importing_the_registry_loads_neither_tensorflow_nor_ray():
    """The serving process imports this module; TensorFlow must load only when a model does."""
    code = ("import sys, pneumonia.artifacts.registry; "
            "print(sorted(m for m in ('tensorflow', 'ray', 'pneumonia.training.driver', 'pneumonia.training.sweep') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- data fingerprint


def _records(root: Path) -> list[ImageRecord]:
    return [ImageRecord(str(path), int(path.parent.name == "PNEUMONIA"), path.stem, "unknown", "train")
            for path in sorted(root.rglob("*.jpeg"))]


def test_the_data_fingerprint_is_stable_and_sensitive(tmp_path):
    root = tmp_path / "a" / "train"
    for index, label in enumerate(["NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA"]):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"img{index}.jpeg").write_bytes(bytes(100 + index))
    records = _records(root)
    fingerprint = data_fingerprint(records)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint)
    assert data_fingerprint(list(reversed(records))) == fingerprint
    moved = Path(shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b"))
    assert data_fingerprint(_records(moved / "train")) == fingerprint  # same data, another place

    changed = records[0].location
    Path(changed).write_bytes(bytes(999))
    assert data_fingerprint(records) != fingerprint
    Path(changed).write_bytes(bytes(100))
    assert data_fingerprint(records) == fingerprint

    assert data_fingerprint(records[1:]) != fingerprint  # removed
    extra = root / "NORMAL" / "img9.jpeg"
    extra.write_bytes(bytes(5))
    assert data_fingerprint(_records(root)) != fingerprint  # added
    relabelled = [ImageRecord(r.location, 1 - r.label, r.patient_id, r.subtype, r.split) for r in records]
    assert data_fingerprint(relabelled) != fingerprint
    with pytest.raises(ValueError):
        data_fingerprint([])
