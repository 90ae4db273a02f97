"""Loading a model runs no code from it: Keras safe mode and its gaps, the SavedModel op check,
and checkpoints verified against the sha256 they record."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pneumonia.errors import CheckpointError
from pneumonia.models.safe_load import UnsafeModelError, check_keras_file, check_saved_model, load_keras_model

SHAPE = (32, 32, 1)


def _lambda_model(marker: Path):
    """A Keras model whose Lambda layer's Python code creates ``marker`` when it runs (as it does
    when a loader rebuilds the model); the marker is removed again once saved."""
    import tensorflow as tf

    path = str(marker)  # the closure is saved with the bytecode
    inputs = tf.keras.Input((4,))
    outputs = tf.keras.layers.Lambda(lambda x: (open(path, "w").close(), x)[1])(inputs)
    return tf.keras.Model(inputs, outputs)


def test_a_keras_file_with_a_lambda_layers_bytecode_is_refused_unrun(tmp_path):
    import tensorflow as tf

    marker = tmp_path / "lambda-ran"
    model = _lambda_model(marker)
    model.save(str(tmp_path / "model.keras"), save_format="keras_v3")
    marker.unlink()
    with pytest.raises(UnsafeModelError, match="Lambda layer"):
        load_keras_model(tmp_path / "model.keras")
    assert not marker.exists()
    # and tf-keras's own safe mode, our second line, refuses it as well
    with pytest.raises(ValueError, match="Lambda"):
        tf.keras.models.load_model(str(tmp_path / "model.keras"), safe_mode=True)
    assert not marker.exists()


def test_an_hdf5_file_named_model_keras_is_refused_before_keras_sees_it(tmp_path):
    """tf-keras sends a .keras file that is not a zip to its legacy loader, which ignores
    safe_mode and runs a Lambda's bytecode: the check must refuse it first."""
    marker = tmp_path / "lambda-ran"
    _lambda_model(marker).save(str(tmp_path / "model.h5"))
    (tmp_path / "model.h5").rename(tmp_path / "model.keras")
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafeModelError, match="not a Keras v3 \\(zip\\) file"):
        load_keras_model(tmp_path / "model.keras")
    assert not marker.exists()


def _rewrite_config(source: Path, target: Path, edit) -> None:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename == "config.json":
                data = json.dumps(edit(json.loads(data))).encode()
            new.writestr(item, data)


def test_a_layer_naming_a_foreign_module_is_refused(tmp_path, xraynet_file):
    """Safe mode still imports the module a config names; only Keras's own are accepted."""
    def foreign(config):
        config["config"]["layers"][1]["module"] = "os"
        return config

    _rewrite_config(xraynet_file, tmp_path / "model.keras", foreign)
    with pytest.raises(UnsafeModelError, match="module 'os'"):
        check_keras_file(tmp_path / "model.keras")


def test_a_symlinked_or_missing_keras_file_is_refused(tmp_path, xraynet_file):
    (tmp_path / "model.keras").symlink_to(xraynet_file)
    with pytest.raises(UnsafeModelError, match="not a regular file"):
        check_keras_file(tmp_path / "model.keras")
    (tmp_path / "folder.keras").mkdir()
    with pytest.raises(UnsafeModelError, match="not a regular file"):
        check_keras_file(tmp_path / "folder.keras")


@pytest.fixture(scope="module")
def xraynet_file(tmp_path_factory) -> Path:
    from pneumonia.config import ModelConfig
    from pneumonia.models.architectures import build_model, compile_model

    model = build_model(ModelConfig(name="xraynet", width=4), SHAPE)
    compile_model(model, "adam", 1e-3)
    path = tmp_path_factory.mktemp("keras") / "model.keras"
    model.save(str(path), save_format="keras_v3")
    return path


@pytest.mark.parametrize("name", ["xraynet", "seed"])
def test_every_network_the_project_builds_loads_in_safe_mode(tmp_path, name):
    from pneumonia.config import ModelConfig
    from pneumonia.models.architectures import build_model, compile_model

    shape = (64, 64, 1)  # the seed CNN needs more than 32 px
    model = build_model(ModelConfig(name=name, **({"width": 4} if name == "xraynet" else {})), shape)
    compile_model(model, "adam", 1e-3)
    model.save(str(tmp_path / "model.keras"), save_format="keras_v3")
    loaded = load_keras_model(tmp_path / "model.keras", compile=True)
    batch = np.random.default_rng(0).integers(0, 256, (2, *shape)).astype(np.uint8)
    np.testing.assert_allclose(loaded(batch, training=False), model(batch, training=False), atol=1e-6)


def test_an_ensemble_checkpoint_loads_in_safe_mode(tmp_path):
    from pneumonia.config import ModelConfig
    from pneumonia.data.preprocess import PreprocessSpec
    from pneumonia.models.architectures import build_model, compile_model
    from pneumonia.models.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
    from pneumonia.models.ensemble import combine_checkpoints, is_ensemble

    spec = PreprocessSpec(32, 1)
    members = []
    for index in range(2):
        model = build_model(ModelConfig(name="xraynet", width=4), SHAPE)
        compile_model(model, "adam", 1e-3)
        members.append(str(save_checkpoint(tmp_path / f"m{index}", model, CheckpointInfo(1, {}, spec, {}))))
    combine_checkpoints(members, str(tmp_path / "ensemble"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every checkpoint here records its sha256: no warning
        model, info = load_checkpoint(str(tmp_path / "ensemble"))
    assert is_ensemble(model) and set(info.files) == {"model.keras"}


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    from pneumonia.config import ModelConfig
    from pneumonia.data.preprocess import PreprocessSpec
    from pneumonia.models.architectures import build_model, compile_model
    from pneumonia.models.checkpoint import CheckpointInfo, save_checkpoint

    model = build_model(ModelConfig(name="xraynet", width=4), SHAPE)
    compile_model(model, "adam", 1e-3)
    return save_checkpoint(tmp_path / "ckpt", model, CheckpointInfo(1, {}, PreprocessSpec(32, 1), {}))


def test_a_checkpoint_records_its_model_files_sha256_and_a_changed_file_is_refused(checkpoint):
    from pneumonia.models.checkpoint import load_checkpoint, load_model_from_directory, read_info
    from pneumonia.storage import sha256_of

    assert read_info(checkpoint).files == {"model.keras": sha256_of(checkpoint / "model.keras")}
    with zipfile.ZipFile(checkpoint / "model.keras", "a") as archive:
        archive.writestr("extra.txt", "x")  # still a loadable zip, different bytes
    for load in (load_checkpoint, load_model_from_directory):
        with pytest.raises(CheckpointError, match="model.keras does not match its sha256"):
            load(str(checkpoint))


def test_a_checkpoint_written_before_hashes_loads_with_a_warning(checkpoint):
    from pneumonia.models.checkpoint import UnverifiedCheckpointWarning, load_checkpoint

    info = json.loads((checkpoint / "pneumonia.json").read_text())
    del info["files"]
    (checkpoint / "pneumonia.json").write_text(json.dumps(info))
    with pytest.warns(UnverifiedCheckpointWarning, match="records no sha256"):
        model, _ = load_checkpoint(str(checkpoint))
    assert model.input_shape[1:] == SHAPE


# ----------------------------------------------------------------------------- SavedModel


def _saved_model(folder: Path, body) -> Path:
    import tensorflow as tf

    class Module(tf.Module):
        def __init__(self):
            self.weight = tf.Variable([1.0])

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def serve(self, x):
            return {"probability": body(x) * self.weight}

    module = Module()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    return folder


def test_our_own_saved_model_passes_the_op_check(tmp_path):
    import tensorflow as tf

    folder = _saved_model(tmp_path / "plain", lambda x: tf.sigmoid(x))
    check_saved_model(folder)


@pytest.mark.parametrize("case, ops", [
    ("read", "ReadFile"),
    ("write", "WriteFile"),
    ("save", "SaveV2"),
    ("print", "PrintV2"),
])
def test_a_saved_model_that_touches_files_is_refused_before_loading(tmp_path, case, ops):
    import tensorflow as tf

    target = str(tmp_path / "written")

    def body(x):
        if case == "read":
            return x + tf.cast(tf.strings.length(tf.io.read_file(target)), tf.float32) * 0.0
        if case == "write":
            tf.io.write_file(target, "x")
        if case == "save":
            tf.raw_ops.SaveV2(prefix=target, tensor_names=["x"], shape_and_slices=[""], tensors=[x])
        if case == "print":
            tf.print(x, output_stream=f"file://{target}")
        return x

    folder = _saved_model(tmp_path / case, body)
    with pytest.raises(UnsafeModelError, match=ops):
        check_saved_model(folder)


def test_a_graph_file_beside_saved_model_pb_is_refused(tmp_path):
    import tensorflow as tf

    folder = _saved_model(tmp_path / "plain", lambda x: tf.sigmoid(x))
    (folder / "saved_model.pbtxt").write_text("")
    with pytest.raises(UnsafeModelError, match="saved_model.pbtxt"):
        check_saved_model(folder)
