"""Ensembles as checkpoints: the mean of the members, checked specs, export, Grad-CAM and serving."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumonia.data.preprocess import PreprocessSpec
from pneumonia.errors import CheckpointError
from pneumonia.models.checkpoint import CheckpointInfo, load_checkpoint, read_info, save_checkpoint

pytestmark = pytest.mark.timeout(180)

SIZE = 32
SPEC = PreprocessSpec(SIZE, 1)
BIASES = (-1.5, 0.0, 2.0)  # spreads the members' probabilities, so a wrong mean shows


def config(members: int = 3) -> dict:
    from pneumonia.config import ExperimentConfig

    data = ExperimentConfig().model_dump()
    data["ensemble"]["members"] = members
    return data


def tiny_model(seed: int, size: int = SIZE, bias: float = 0.0):
    import tensorflow as tf

    from pneumonia.config import ModelConfig
    from pneumonia.models.architectures import build_model

    tf.keras.utils.set_random_seed(seed)
    model = build_model(ModelConfig(name="xraynet", width=4), (size, size, 1))
    model.get_layer("probability").bias.assign([bias])
    return model


def save_member(path, model, spec: PreprocessSpec = SPEC, epoch: int = 1) -> str:
    info = CheckpointInfo(epoch=epoch, config=config(), preprocess=spec, metrics={"val_threshold": 0.4})
    save_checkpoint(path, model, info)
    return str(path)


def images(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("members")
    return [save_member(root / f"member{index}", tiny_model(index, bias=bias), epoch=epoch)
            for index, (bias, epoch) in enumerate(zip(BIASES, (2, 5, 3)))]


@pytest.fixture(scope="module")
def member_mean(members) -> np.ndarray:
    """The mean of the members' probabilities for images(), after checking that they disagree
    (so that a wrong mean, or one member's output, would fail the comparisons)."""
    from pneumonia.data.pipeline import predict_probabilities

    probabilities = np.array([predict_probabilities(load_checkpoint(member)[0], images()) for member in members])
    assert (np.ptp(probabilities, axis=0) > 0.3).all()
    return probabilities.mean(axis=0)


@pytest.fixture(scope="module")
def ensemble(members, tmp_path_factory) -> str:
    from pneumonia.models.ensemble import combine_checkpoints

    out = tmp_path_factory.mktemp("ensemble") / "checkpoint"
    return combine_checkpoints(members, str(out), metrics={"val_threshold": 0.45, "val_roc_auc": 0.9})


@pytest.fixture(scope="module")
def artifact(ensemble, tmp_path_factory):
    from pneumonia.artifacts.publish import export_artifact

    return export_artifact(ensemble, tmp_path_factory.mktemp("registry"), threshold=0.45, target_recall=0.95,
                           validation_metrics={}, training_config=config())


# ----------------------------------------------------------------------------- combine


def test_combined_checkpoint_is_the_mean_of_its_members(members, ensemble, member_mean):
    from pneumonia.data.pipeline import predict_probabilities
    from pneumonia.models.checkpoint import load_model_from_directory
    from pneumonia.models.ensemble import is_ensemble, member_models

    model = load_model_from_directory(ensemble)  # plain tf.keras load_model, no custom objects
    assert model.name == "ensemble" and model.output_names == ["probability"]
    assert is_ensemble(model) and [m.name for m in member_models(model)] == ["member_0", "member_1", "member_2"]
    assert model.output.dtype == "float32"
    probabilities = predict_probabilities(model, images())
    np.testing.assert_allclose(probabilities, member_mean, atol=1e-5)

    info = read_info(ensemble)
    assert info.members == members  # absolute local paths, in member order
    assert info.epoch == 5 and info.preprocess == SPEC
    assert info.config == read_info(members[0]).config and info.config["ensemble"]["members"] == 3
    assert info.metrics == {"val_threshold": 0.45, "val_roc_auc": 0.9}
    assert not is_ensemble(load_checkpoint(members[0])[0])


def test_one_member_ensemble_is_the_member(members, tmp_path):
    from pneumonia.data.pipeline import predict_probabilities
    from pneumonia.models.ensemble import combine_checkpoints

    out = combine_checkpoints([members[1]], str(tmp_path / "one"))
    model, info = load_checkpoint(out)
    assert model.output_names == ["probability"] and info.members == [members[1]] and info.metrics == {}
    np.testing.assert_array_equal(predict_probabilities(model, images()),
                                  predict_probabilities(load_checkpoint(members[1])[0], images()))


def test_members_must_share_the_preprocessing_and_input(members, ensemble, tmp_path):
    from pneumonia.models.ensemble import combine_checkpoints

    with pytest.raises(CheckpointError, match="at least one member"):
        combine_checkpoints([], str(tmp_path / "none"))
    padded = save_member(tmp_path / "padded", tiny_model(7), spec=PreprocessSpec(SIZE, 1, resize="pad"))
    with pytest.raises(CheckpointError, match=r"member 1 \(.*padded\).*resize='pad'.*share one spec"):
        combine_checkpoints([members[0], padded], str(tmp_path / "out"))
    larger = save_member(tmp_path / "larger", tiny_model(8, size=SIZE + 8), spec=SPEC)  # model and spec disagree
    with pytest.raises(CheckpointError, match=r"member 2 \(.*larger\) takes input \(40, 40, 1\)"):
        combine_checkpoints([members[0], members[1], larger], str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match="itself an ensemble"):
        combine_checkpoints([members[0], ensemble], str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match=r"member 1 \(.*missing\) cannot be read"):
        combine_checkpoints([members[0], str(tmp_path / "missing")], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_checkpoints_without_a_members_field_still_read(tmp_path):
    data = json.loads(CheckpointInfo(epoch=1, config={}, preprocess=SPEC, metrics={}).to_json())
    assert data.pop("members") == []
    (tmp_path / "pneumonia.json").write_text(json.dumps(data))
    assert read_info(tmp_path).members == []
    data["members"] = "not-a-list"
    (tmp_path / "pneumonia.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="corrupt.*members"):
        read_info(tmp_path)


# ----------------------------------------------------------------------------- export


def test_exported_ensemble_loads_and_predicts_the_mean(artifact, members, member_mean):
    from pneumonia.artifacts.registry import load_artifact

    loaded = load_artifact(artifact.path)
    assert loaded.metadata["ensemble"] == {"members": 3, "sources": members}
    np.testing.assert_allclose(loaded.predict(images()), member_mean, atol=1e-5)


def test_pneumonia_export_takes_an_ensemble_checkpoint(ensemble, members, tmp_path, capsys):
    """The CLI path: config from the first member, threshold from the metrics combine_checkpoints got."""
    from pneumonia.artifacts.registry import read_metadata
    from pneumonia.cli import main

    assert main(["export", "--checkpoint", ensemble, "--registry", str(tmp_path), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["threshold"] == 0.45
    metadata = read_metadata(exported["artifact"])
    assert metadata["ensemble"] == {"members": 3, "sources": members}
    assert metadata["source_checkpoint"] == ensemble and metadata["training_config"]["ensemble"]["members"] == 3


def test_a_single_model_artifact_has_no_ensemble_key(members, tmp_path):
    from pneumonia.artifacts.publish import export_artifact

    exported = export_artifact(members[0], tmp_path, threshold=0.5, target_recall=0.95,
                               validation_metrics={}, training_config=config(1))
    assert "ensemble" not in exported.metadata


# ----------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_of_the_mean(artifact, member_mean):
    from pneumonia.artifacts.registry import load_artifact
    from pneumonia.models.explain import GradCam

    loaded = load_artifact(artifact.path)
    cam = GradCam(loaded.keras_model())
    assert cam.layer == "member_*/last_conv"
    explanations = cam.explain_batch(images())
    np.testing.assert_allclose([e.probability for e in explanations], member_mean, atol=1e-5)
    for explanation in explanations:
        heatmap = explanation.heatmap
        assert heatmap.shape == (SIZE, SIZE) and heatmap.dtype == np.float32 and np.isfinite(heatmap).all()
        assert 0 <= heatmap.min() and heatmap.max() <= 1 and explanation.layer == cam.layer
    assert GradCam(loaded.keras_model(), layer="block2_conv").layer == "member_*/block2_conv"
    with pytest.raises(ValueError, match="no layer 'nope'"):
        GradCam(loaded.keras_model(), layer="nope")


def test_grad_cam_of_identical_members_is_the_members_map(members, tmp_path):
    """K copies of one model: the mean logit's gradient is the member's own, so the ensemble's map
    is that member's map (checks the per-member wiring and the averaging)."""
    from pneumonia.models.ensemble import combine_checkpoints
    from pneumonia.models.explain import GradCam

    out = combine_checkpoints([members[2]] * 2, str(tmp_path / "twins"))
    model, _ = load_checkpoint(out)
    member, _ = load_checkpoint(members[2])
    batch = images(4, seed=3)
    for layer in ("block2_conv", None):
        expected = GradCam(member, layer=layer).explain_batch(batch)
        got = GradCam(model, layer=layer).explain_batch(batch)
        for explained, reference in zip(got, expected):
            assert explained.probability == pytest.approx(reference.probability, abs=1e-6)
            np.testing.assert_allclose(explained.heatmap, reference.heatmap, atol=1e-5)
        assert any(e.heatmap.max() == 1.0 for e in got)


# ----------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def server(ray_cluster, artifact):
    from ray import serve

    from pneumonia.serving import build_app
    from tests.serving.test_serving import _free_port

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"artifact": str(artifact.path)}), name="ensemble", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.mark.ray
def test_serve_predicts_and_explains_the_ensemble(server, artifact, members):
    from pneumonia.artifacts.registry import load_artifact
    from pneumonia.data.preprocess import decode_image
    from tests.serving.test_serving import _png, request

    body = _png(images(1, seed=5)[0, :, :, 0])
    pixels = decode_image(body, SPEC)[None]
    expected = np.mean([load_checkpoint(member)[0](pixels.astype(np.float32), training=False).numpy()
                        for member in members])
    status, answer = request(f"{server}/predict", body, "image/png")
    assert status == 200, answer
    assert answer["probability"] == pytest.approx(expected, abs=1e-5)
    assert answer["probability"] == pytest.approx(float(load_artifact(artifact.path).predict(pixels)[0]), abs=1e-6)
    assert answer["threshold"] == 0.45

    status, answer = request(f"{server}/explain", body, "image/png")
    assert status == 200, answer
    assert answer["layer"] == "member_*/last_conv"
    assert answer["probability"] == pytest.approx(expected, abs=1e-5)
    heatmap = np.asarray(answer["heatmap"])
    assert heatmap.shape == (SIZE, SIZE) and 0 <= heatmap.min() and heatmap.max() <= 1

    status, metadata = request(f"{server}/model")
    assert status == 200 and metadata["ensemble"] == {"members": 3, "sources": members}
