"""Conformance with a real Open Inference Protocol client: Triton's Python HTTP client
(``tritonclient[http]``) against the served app, JSON and binary tensor extension, both inputs.

KServe's Python client is not here: ``kserve`` pins ``protobuf<7`` and ``pandas<3``, while Ray
Serve's ``grpcio-reflection`` needs ``protobuf>=7.35`` (docs/serving.md). ``tritonclient[grpc]``
pins ``protobuf<7`` as well, and the app has no gRPC ingress (same page).

One Serve app for the module (about 20 s to start): a small 64 px model with the recommended
recipe's intensity normalisation (histogram equalisation) and a guard made to order, which
passes the X-rays sent here (the suite's synthetic one and, when ../shared/data is present, a
real one) and refuses a frame of noise.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.helpers import SHARED_DATA
from tests.serving.test_serving_ood import OUTSIDE
from tests.serving.test_serving_ops import serve_port  # noqa: F401  (Serve started on a free port, per module)

httpclient = pytest.importorskip("tritonclient.http", reason="the test extra's tritonclient[http] is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

SIZE = 64
REAL_XRAY = SHARED_DATA / "chest_xray_val16" / "PNEUMONIA"
# The same X-ray sent as a file or resized by the client: the resize differs (Pillow's bilinear
# on the full image against the server's DCT-domain JPEG downscale, then bilinear), not the rest.
SAME_ANSWER = 0.02


def _synthetic_xray(synthetic_data) -> bytes:
    return sorted((synthetic_data / "test" / "PNEUMONIA").glob("*"))[0].read_bytes()


def _real_xray() -> bytes | None:
    files = sorted(REAL_XRAY.glob("*.jpeg")) if REAL_XRAY.is_dir() else []
    return files[0].read_bytes() if files else None


def client_pixels(data: bytes) -> np.ndarray:
    """What a client does by hand: open the file, grey, resize to the model's size (no normalisation)."""
    image = Image.open(io.BytesIO(data)).convert("L").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, np.uint8)[None, :, :, None]


@pytest.fixture(scope="module")
def xrays(synthetic_data) -> dict[str, bytes]:
    found = {"synthetic": _synthetic_xray(synthetic_data)}
    real = _real_xray()
    if real is not None:
        found["real"] = real
    return found


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, xrays):
    """A 64 px model with histogram equalisation, whose guard passes ``xrays`` and refuses noise."""
    from pneumonia.artifacts.publish import export_artifact
    from pneumonia.config import ExperimentConfig, ModelConfig
    from pneumonia.data.preprocess import PreprocessSpec, decode_image
    from pneumonia.models.architectures import build_model, compile_model
    from pneumonia.models.checkpoint import CheckpointInfo, save_checkpoint
    from pneumonia.models.ood import Guard, features_and_probabilities, model_with_features

    root = tmp_path_factory.mktemp("clients")
    spec = PreprocessSpec(SIZE, 1, normalize="equalize")
    model = build_model(ModelConfig(name="xraynet", width=8), spec.shape)
    compile_model(model, "adam", 1e-3)
    save_checkpoint(root / "ckpt", model, CheckpointInfo(epoch=1, config=ExperimentConfig().model_dump(),
                                                         preprocess=spec, metrics={}))
    images = np.stack([decode_image(data, spec) for data in [*xrays.values(), OUTSIDE]])
    features, _ = features_and_probabilities(model_with_features(model), images)
    means, noise = features[:-1].astype(np.float64), features[-1].astype(np.float64)
    distance = float(np.min(np.sum((means - noise) ** 2, axis=1)))
    assert distance > 0
    guard = Guard(means=means, precision=np.eye(features.shape[1]), threshold=distance / 2, pass_rate=0.99,
                  fitted_on=len(means), calibrated_on=len(means), validation_pass_rate=1.0)
    return export_artifact(str(root / "ckpt"), root / "registry", threshold=0.5, target_recall=0.95,
                           validation_metrics={}, training_config=ExperimentConfig().model_dump(), guard=guard)


@pytest.fixture(scope="module")
def client(artifact, serve_port):  # noqa: F811
    from ray import serve

    from pneumonia.serving import build_app

    serve.run(build_app({"artifact": str(artifact.path), "no_auth": True}), name="clients", route_prefix="/")
    with httpclient.InferenceServerClient(f"127.0.0.1:{serve_port}", network_timeout=120) as triton:
        yield triton


@pytest.fixture(scope="module")
def name(artifact) -> str:
    return artifact.metadata["name"]


def infer(client, name, input_name: str, value: np.ndarray, binary: bool):
    """One inference through the client: the ``image`` (BYTES) or ``pixels`` (UINT8) input, in
    JSON or with the binary extension (inputs and outputs alike)."""
    datatype = "BYTES" if input_name == "image" else "UINT8"
    tensor = httpclient.InferInput(input_name, list(value.shape), datatype)
    if datatype == "BYTES" and not binary:  # JSON has no bytes: image files travel as base64 text
        value = np.array([base64.b64encode(item).decode() for item in value], dtype=object)
    tensor.set_data_from_numpy(value, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(output, binary_data=binary) for output in ("probability", "label")]
    return client.infer(name, [tensor], outputs=outputs, request_id="req-1")


def test_health_readiness_and_metadata(client, name):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name) and not client.is_model_ready("another-model")
    metadata = client.get_model_metadata(name)
    assert metadata["name"] == name and metadata["versions"]
    inputs = {tensor["name"]: tensor for tensor in metadata["inputs"]}
    assert inputs["image"]["datatype"] == "BYTES" and inputs["pixels"]["shape"] == [-1, SIZE, SIZE, 1]
    assert metadata["parameters"]["pixels"]["normalised_by_server"] == "equalize"
    assert "not normalised" in inputs["pixels"]["parameters"]["content"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_files_and_pixels_give_the_same_answer(client, name, xrays, binary):
    """An X-ray sent as a file and the same X-ray resized by the client to the model's size give
    the same probability: the pixels get the model's intensity normalisation too."""
    for kind, data in xrays.items():
        by_file = infer(client, name, "image", np.array([data], dtype=object), binary)
        by_pixels = infer(client, name, "pixels", client_pixels(data), binary)
        for result in (by_file, by_pixels):
            response = result.get_response()
            assert response["id"] == "req-1" and response["model_name"] == name
            assert result.as_numpy("label")[0] in (b"NORMAL", b"PNEUMONIA", "NORMAL", "PNEUMONIA")
        file_p, pixels_p = float(by_file.as_numpy("probability")[0]), float(by_pixels.as_numpy("probability")[0])
        assert 0.0 <= file_p <= 1.0
        assert abs(file_p - pixels_p) <= SAME_ANSWER, (kind, file_p, pixels_p)
    if "real" not in xrays:
        pytest.skip(f"{REAL_XRAY} is not present: checked on the synthetic X-ray only")


def test_a_batch_of_two_in_binary_comes_back_in_order(client, name, xrays):
    data = xrays["synthetic"]
    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([data, data], dtype=object))
    result = client.infer(name, [tensor])  # no outputs named: the client asks for all in binary
    assert result.as_numpy("probability").shape == (2,) and result.as_numpy("ood_score").shape == (2,)
    assert result.as_numpy("probability")[0] == result.as_numpy("probability")[1]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_the_guard_refuses_what_is_not_an_xray(client, name, binary):
    with pytest.raises(InferenceServerException) as raised:
        infer(client, name, "image", np.array([OUTSIDE], dtype=object), binary)
    assert raised.value.status() == "422" and "does not look like" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        infer(client, name, "pixels", client_pixels(OUTSIDE), binary)
    assert raised.value.status() == "422"


def test_errors_say_what_is_wrong(client, name, xrays):
    with pytest.raises(InferenceServerException) as raised:
        infer(client, name, "pixels", np.zeros((1, 32, 32, 1), np.uint8), True)
    assert raised.value.status() == "400" and f"shape [n, {SIZE}, {SIZE}, 1]" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        infer(client, name, "image", np.array([b"not an image"], dtype=object), True)
    assert raised.value.status() == "400"
    with pytest.raises(InferenceServerException) as raised:
        infer(client, "another-model", "image", np.array([xrays["synthetic"]], dtype=object), True)
    assert raised.value.status() == "404" and "unknown model" in raised.value.message()


def test_a_binary_body_whose_header_length_is_wrong_is_a_400_in_the_one_error_shape(client, name, serve_port):  # noqa: F811
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    for length, message in ((str(len(header) + 100), "but the body has"), ("x", "whole number"),
                            (str(len(header)), "goes past the end of the binary data")):
        request = urllib.request.Request(f"http://127.0.0.1:{serve_port}/v2/models/{name}/infer",
                                         data=header + b"\x01\x00\x00\x00a", method="POST",
                                         headers={"Content-Type": "application/octet-stream",
                                                  "Inference-Header-Content-Length": length})
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=60)
        assert raised.value.code == 400
        answer = json.loads(raised.value.read())
        assert list(answer) == ["error"] and message in answer["error"], answer
