"""The Ray Serve application over HTTP on loopback: answers, errors, batching, the v2 protocol."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import threading
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from pneumonia.service import free_port as _free_port  # the name the serving test modules share

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from pneumonia.checkpoint import CheckpointInfo, save_checkpoint
    from pneumonia.config import ExperimentConfig, ModelConfig
    from pneumonia.models import build_model, compile_model
    from pneumonia.preprocess import PreprocessSpec
    from pneumonia.registry import export_artifact

    root = tmp_path_factory.mktemp("serving")
    model = build_model(ModelConfig(name="xraynet", width=8), (64, 64, 1))
    compile_model(model, "adam", 1e-3)
    save_checkpoint(root / "ckpt", model, CheckpointInfo(epoch=1, config=ExperimentConfig().model_dump(),
                                                         preprocess=PreprocessSpec(64, 1), metrics={}))
    exported = export_artifact(str(root / "ckpt"), root / "registry", threshold=0.5, target_recall=0.95,
                               validation_metrics={}, training_config=ExperimentConfig().model_dump())
    return exported


@pytest.fixture(scope="module")
def server(ray_cluster, artifact):
    from ray import serve

    from pneumonia.serving import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"artifact": str(artifact.path.parent.parent), "max_bytes": 2_000_000,
                     "batch_wait_timeout_s": 0.05})
    serve.run(app, name="pneumonia", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


_HANDLE_LOOP: asyncio.AbstractEventLoop | None = None


def call_replicas(app_name: str, method: str, calls: int = 1) -> list:
    """`calls` concurrent calls of a Classifier method through a deployment handle. In Serve's
    throughput mode handles route on the caller's event loop, so they run on one loop that
    lives as long as the test process (Serve shuts the router down on it later)."""
    global _HANDLE_LOOP
    from ray import serve

    if _HANDLE_LOOP is None:
        _HANDLE_LOOP = asyncio.new_event_loop()
        threading.Thread(target=_HANDLE_LOOP.run_forever, daemon=True).start()

    async def run():
        handle = serve.get_deployment_handle("Classifier", app_name=app_name)
        return await asyncio.gather(*(getattr(handle, method).remote() for _ in range(calls)))

    return asyncio.run_coroutine_threadsafe(run(), _HANDLE_LOOP).result(timeout=60)


def request(url: str, body: bytes | None = None, content_type: str | None = None, method: str | None = None):
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_real_xrays_get_a_label_probability_threshold_and_version(server, shared_data):
    for path in sorted((shared_data / "chest_xray_val16").glob("*/*.jpeg"))[::4]:
        status, answer = request(f"{server}/predict", path.read_bytes(), "image/jpeg")
        assert status == 200, answer
        assert answer["label"] in ("NORMAL", "PNEUMONIA")
        assert 0 <= answer["probability"] <= 1
        assert answer["label"] == ("PNEUMONIA" if answer["probability"] >= answer["threshold"] else "NORMAL")
        assert answer["version"] == "v0001" and answer["model"] == "pneumonia-cnn"


def test_predictions_match_the_artifact_run_in_process(server, artifact):
    from pneumonia.preprocess import decode_image
    from pneumonia.registry import load_artifact

    pixels = np.random.default_rng(0).integers(0, 256, (90, 70), dtype=np.uint8)
    body = _png(pixels)
    loaded = load_artifact(artifact.path)
    expected = float(loaded.predict(decode_image(body, loaded.preprocess)[None])[0])
    status, answer = request(f"{server}/predict", body, "image/png")
    assert status == 200
    assert answer["probability"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    "body, content_type, status, fragment",
    [
        (b"this is not an image", "image/jpeg", 400, "not a recognised image"),
        (b"", "image/png", 400, "empty request body"),
        (b"{}", "application/json", 415, "unsupported media type"),
        (b"x" * 2_000_001, "image/jpeg", 413, "above the limit"),
        (_png_claiming(60_000, 60_000), "image/png", 413, "pixels"),
    ],
)
def test_bad_input_gets_a_json_4xx(server, body, content_type, status, fragment):
    got, answer = request(f"{server}/predict", body, content_type)
    assert got == status, answer
    assert fragment in answer["error"]


def test_a_truncated_jpeg_is_a_400(server, shared_data):
    data = (shared_data / "chest_xray_val16" / "NORMAL" / "NORMAL2-IM-1427-0001.jpeg").read_bytes()
    status, answer = request(f"{server}/predict", data[: len(data) // 3], "image/jpeg")
    assert status == 400 and "truncated" in answer["error"]


def test_multipart_with_several_files(server):
    images = [_png(np.full((40, 40), value, np.uint8)) for value in (10, 200)]
    boundary = "pneumoniaboundary"
    parts = []
    for index, data in enumerate(images):
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x{index}.png\"\r\n"
                     "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, answer = request(f"{server}/predict", body, f"multipart/form-data; boundary={boundary}")
    assert status == 200, answer
    assert [item["file"] for item in answer["predictions"]] == ["x0.png", "x1.png"]


def test_parallel_requests_are_batched(server):
    body = _png(np.full((50, 50), 120, np.uint8))
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda _: request(f"{server}/predict", body, "image/png"), range(48)))
    assert all(status == 200 for status, _ in results)
    [sizes] = call_replicas("pneumonia", "recent_batch_sizes")
    assert max(sizes) > 1, sizes


def test_custom_metrics_reach_rays_prometheus_export(server, ray_cluster):
    """Predictions by label, batch sizes and inference latency, as a Prometheus scrape sees them."""
    import time

    port = ray_cluster.metrics_export_port
    if not port:
        pytest.skip("this Ray exports no metrics")
    for value in (0, 255):
        assert request(f"{server}/predict", _png(np.full((40, 40), value, np.uint8)), "image/png")[0] == 200
    wanted = ("ray_pneumonia_predictions_total", "ray_pneumonia_batch_size_bucket", "ray_pneumonia_inference_ms_bucket")
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:  # Ray exports metrics every few seconds
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"not exported: {missing}"
    labels = {line.split('label="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("ray_pneumonia_predictions_total{")}
    assert labels <= {"NORMAL", "PNEUMONIA"} and labels


def test_health_model_and_v2_protocol(server):
    assert request(f"{server}/healthz")[0] == 200
    status, metadata = request(f"{server}/model")
    assert status == 200 and metadata["threshold"] == 0.5 and metadata["input"]["image_size"] == 64
    assert request(f"{server}/v2/health/ready") == (200, {"ready": True})
    status, model = request(f"{server}/v2/models/pneumonia-cnn")
    assert status == 200 and model["versions"] == ["v0001"]
    assert request(f"{server}/v2/models/other")[0] == 404

    image = _png(np.full((64, 64), 90, np.uint8))
    payload = {"id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                       "data": [base64.b64encode(image).decode()] * 2}]}
    status, answer = request(f"{server}/v2/models/pneumonia-cnn/infer", json.dumps(payload).encode(), "application/json")
    assert status == 200, answer
    assert answer["id"] == "r1" and answer["outputs"][0]["shape"] == [2]
    pixels = np.full((1, 64, 64, 1), 90, np.uint8)
    payload = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 64, 64, 1], "data": pixels.ravel().tolist()}]}
    status, raw = request(f"{server}/v2/models/pneumonia-cnn/infer", json.dumps(payload).encode(), "application/json")
    assert status == 200
    assert raw["outputs"][0]["data"][0] == pytest.approx(answer["outputs"][0]["data"][0], abs=1e-5)
    bad = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 3, 3, 1], "data": [0] * 9}]}
    status, error = request(f"{server}/v2/models/pneumonia-cnn/infer", json.dumps(bad).encode(), "application/json")
    assert status == 400 and "shape" in error["error"]
    status, error = request(f"{server}/v2/models/pneumonia-cnn/infer", b"not json", "application/json")
    assert status == 400


def test_explain_returns_a_heatmap_over_the_image(server):
    body = _png(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8))
    status, answer = request(f"{server}/explain", body, "image/png")
    assert status == 200, answer
    heatmap = np.asarray(answer["heatmap"])
    assert heatmap.shape == (64, 64) and 0 <= heatmap.min() and heatmap.max() <= 1
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"])))
    assert overlay.size == (64, 64)


def test_serve_config_is_a_valid_serve_deploy_config():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    root = Path(__file__).resolve().parents[1]
    config = ServeDeploySchema.parse_obj(yaml.safe_load((root / "serve_config.yaml").read_text()))
    app = config.applications[0]
    assert app.import_path == "serve_app:build_app"
    assert [d.name for d in app.deployments] == ["Classifier"]
    assert app.deployments[0].autoscaling_config["max_replicas"] > app.deployments[0].autoscaling_config["min_replicas"]


def test_importing_serve_app_needs_no_artifact():
    import importlib

    module = importlib.import_module("serve_app")
    assert callable(module.build_app)
