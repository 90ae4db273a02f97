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
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia.local_ray import free_port as _free_port  # the name the serving test modules share

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from pneumonia.artifacts.publish import export_artifact
    from pneumonia.config import ExperimentConfig, ModelConfig
    from pneumonia.data.preprocess import PreprocessSpec
    from pneumonia.models.architectures import build_model, compile_model
    from pneumonia.models.checkpoint import CheckpointInfo, save_checkpoint

    root = tmp_path_factory.mktemp("serving")
    model = build_model(ModelConfig(name="xraynet", width=8), (64, 64, 1))
    compile_model(model, "adam", 1e-3)
    save_checkpoint(root / "ckpt", model, CheckpointInfo(epoch=1, config=ExperimentConfig().model_dump(),
                                                         preprocess=PreprocessSpec(64, 1), metrics={}))
    exported = export_artifact(str(root / "ckpt"), root / "registry", threshold=0.5, target_recall=0.95,
                               validation_metrics={}, training_config=ExperimentConfig().model_dump(),
                               drift_reference=SPREAD_REFERENCE)
    return exported


def _spread_reference() -> dict:
    """A drift reference spread over all of [0, 1]: the untrained test model's probabilities sit
    in a narrow band, so hundreds of served images are far from it (PSI well above 0.25)."""
    from pneumonia.metrics.drift import reference_distribution

    return reference_distribution(np.linspace(0.001, 0.999, 500), source="validation")


SPREAD_REFERENCE = _spread_reference()


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
    from pneumonia.artifacts.registry import load_artifact
    from pneumonia.data.preprocess import decode_image

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


def multipart(parts: list[tuple[str, bytes, str]], boundary: str = "partsboundary") -> tuple[bytes, str]:
    """(body, content type) of a multipart request with one `file` field per (name, data, type)."""
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                    f"Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n" for name, data, kind in parts)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_answers_each_part_in_order_and_a_bad_one_fails_alone(server, shared_data):
    """A real X-ray, a text file and a PNG: 200, the text file failed (its 400 reason) between two
    classified images, each with its file name and index in the order sent (issue 24)."""
    xray = sorted((shared_data / "chest_xray_val16").glob("*/*.jpeg"))[0]
    body, kind = multipart([("chest.jpeg", xray.read_bytes(), "image/jpeg"), ("notes.txt", b"ward notes", "text/plain"),
                            ("second.png", _png(np.full((40, 40), 90, np.uint8)), "image/png")])
    status, answer = request(f"{server}/predict", body, kind)
    assert status == 200, answer
    parts = answer["predictions"]
    assert [(part["index"], part["file"], part["outcome"], part["status"]) for part in parts] == [
        (0, "chest.jpeg", "classified", 200), (1, "notes.txt", "failed", 400), (2, "second.png", "classified", 200)]
    assert parts[0]["label"] in ("NORMAL", "PNEUMONIA") and 0 <= parts[0]["probability"] <= 1
    assert parts[1]["error"].startswith("notes.txt: ") and "label" not in parts[1]
    assert answer["counts"] == {"classified": 2, "flagged": 0, "refused": 0, "failed": 1}

    # None readable: the single-image status (400) in the error shape, with every part's reason.
    body, kind = multipart([("a.txt", b"first", "text/plain"), ("b.txt", b"second", "text/plain")])
    status, answer = request(f"{server}/predict", body, kind)
    assert status == 400 and answer["error"].startswith("none of the 2 files could be classified: a.txt: "), answer
    assert [(part["file"], part["outcome"]) for part in answer["predictions"]] == [("a.txt", "failed"), ("b.txt", "failed")]
    # One image as the raw body answers as before: its error alone.
    status, answer = request(f"{server}/predict", b"ward notes", "image/jpeg")
    assert status == 400 and list(answer) == ["error"], answer


def test_parallel_requests_are_batched(server):
    body = _png(np.full((50, 50), 120, np.uint8))
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda _: request(f"{server}/predict", body, "image/png"), range(48)))
    assert all(status == 200 for status, _ in results)
    [sizes] = call_replicas("pneumonia", "recent_batch_sizes")
    assert max(sizes) > 1, sizes


def _predict_many(server: str, count: int) -> dict:
    """One multipart /predict of ``count`` copies of one small X-ray-like image."""
    data, boundary = _png(np.full((48, 48), 90, np.uint8)), "manyboundary"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n"
    status, answer = request(f"{server}/predict", part * count + f"--{boundary}--\r\n".encode(),
                             f"multipart/form-data; boundary={boundary}")
    assert status == 200 and len(answer["predictions"]) == count, answer
    return answer


def test_custom_metrics_reach_rays_prometheus_export(server, ray_cluster):
    """Predictions by label, batch sizes, inference latency, probabilities and the drift gauge, as
    a Prometheus scrape sees them."""
    import time

    port = ray_cluster.metrics_export_port
    if not port:
        pytest.skip("this Ray exports no metrics")
    for value in (0, 255):
        assert request(f"{server}/predict", _png(np.full((40, 40), value, np.uint8)), "image/png")[0] == 200
    _predict_many(server, 300)  # past MIN_WINDOW (200) and one gauge update (every 50) more
    wanted = ("ray_pneumonia_predictions_total", "ray_pneumonia_batch_size_bucket", "ray_pneumonia_inference_ms_bucket",
              "ray_pneumonia_probability_bucket", "ray_pneumonia_drift_psi{")
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
    psi = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ray_pneumonia_drift_psi{")]
    assert psi and all(value > 0.25 for value in psi), psi  # the test model's band against a spread reference


def test_model_shows_the_drift_of_this_replicas_recent_images(server):
    """GET /model: the artifact's metadata and, under `drift`, the PSI of the replica's window."""
    from pneumonia.metrics.drift import PSI_RECALIBRATE

    _predict_many(server, 300)
    status, card = request(f"{server}/model")
    assert status == 200 and card["drift_reference"] == SPREAD_REFERENCE
    drift = card["drift"]
    assert drift["statistic"] == "psi" and drift["reference"] == "validation" and drift["reference_images"] == 500
    assert drift["window"] == {"scope": "replica", "capacity": 1000}
    assert 300 <= drift["images"] <= 1000  # this replica's classified images (the only replica here)
    assert drift["level"] == "recalibrate" and drift["value"] > PSI_RECALIBRATE


def test_health_model_and_v2_protocol(server):
    assert request(f"{server}/healthz")[0] == 200
    status, metadata = request(f"{server}/model")
    assert status == 200 and metadata["threshold"] == 0.5 and metadata["input"]["image_size"] == 64
    assert metadata["drift"]["statistic"] == "psi" and metadata["drift"]["reference"] == "validation"
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


def test_explain_draws_the_heatmap_over_the_xray_that_was_sent(server):
    """The map is the model's (64 px square); the overlay is the sent X-ray, its aspect kept,
    512 px on its longest side (this one is 90 x 60 and is enlarged to 512 x 341)."""
    body = _png(np.random.default_rng(1).integers(0, 256, (60, 90), dtype=np.uint8))
    status, answer = request(f"{server}/explain", body, "image/png")
    assert status == 200, answer
    heatmap = np.asarray(answer["heatmap"])
    assert heatmap.shape == (64, 64) and 0 <= heatmap.min() and heatmap.max() <= 1
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"])))
    assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.size == (512, 341)
    assert "warning" not in answer  # this artifact does not say it was trained on synthetic data


def test_explain_layers_rebuild_the_overlay_at_any_opacity(server):
    """?layers=true adds the grey X-ray and the colour heatmap at the overlay's size: the heatmap
    over the X-ray at the overlay's alpha is the overlay (what the review page's slider shows)."""
    body = _png(np.random.default_rng(2).integers(0, 256, (60, 90), dtype=np.uint8))
    status, plain = request(f"{server}/explain", body, "image/png")
    assert status == 200 and "image_png" not in plain and "heatmap_png" not in plain
    status, answer = request(f"{server}/explain?layers=true", body, "image/png")
    assert status == 200, answer

    def picture(key: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer[key]))), np.float32)

    gray, heatmap, overlay = picture("image_png"), picture("heatmap_png"), picture("overlay_png")
    assert gray.shape == (341, 512) and heatmap.shape == overlay.shape == (341, 512, 3)
    alpha = answer["overlay_alpha"]
    rebuilt = (1 - alpha) * gray[:, :, None] + alpha * heatmap
    assert np.abs(rebuilt - overlay).max() <= 1.0  # rounding only
    assert answer["label"] == plain["label"] and answer["probability"] == pytest.approx(plain["probability"])


def _get(url: str, method: str = "GET"):
    """(status, headers (case-insensitive), body) of a request without a body."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_the_review_page_and_its_assets_come_from_the_app_itself(server):
    """GET / is the page; its style and script come from the package under the same origin, and
    the Content-Security-Policy forbids every other origin (nothing fetched, nothing sent away)."""
    status, headers, body = _get(f"{server}/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    page = body.decode()
    assert 'src="static/page.js"' in page and 'href="static/page.css"' in page
    assert "http://" not in page and "https://" not in page  # no CDN, no external font
    for name, kind in (("page.js", "text/javascript"), ("page.css", "text/css")):
        status, headers, body = _get(f"{server}/static/{name}")
        assert status == 200 and headers["content-type"].startswith(kind) and body
        assert b"http://" not in body and b"https://" not in body
    status, _, body = _get(f"{server}/static/app.py")  # a file beside the assets: never served
    assert status == 404 and "no such page asset" in json.loads(body)["error"]
    status, headers, body = _get(f"{server}/", method="HEAD")  # an uptime check's way of asking
    assert status == 200 and headers["Content-Type"].startswith("text/html") and body == b""


@pytest.mark.parametrize("path, method, body, content_type, status, fragment", [
    ("/nothing-here", "GET", None, None, 404, "no such route: GET /nothing-here"),
    ("/predict", "GET", None, None, 405, "GET is not allowed on /predict; use POST"),
    ("/healthz", "DELETE", None, None, 405, "use GET"),
    ("/predict", "POST", b"--x\r\n", "multipart/form-data", 400, "boundary"),
])
def test_every_error_has_the_same_json_shape(server, path, method, body, content_type, status, fragment):
    """FastAPI's own 404/405 (and Starlette's 400 for a multipart body without a boundary) answer
    {"error": ...} like ours, never FastAPI's {"detail": ...}."""
    got, answer = request(f"{server}{path}", body, content_type, method=method)
    assert got == status, answer
    assert list(answer) == ["error"] and fragment in answer["error"], answer


def test_serves_own_overload_answer_is_plain_text_with_retry_after(server, artifact):
    """The one overload answer that no handler of ours can shape (README "Serving"): past
    max_ongoing_requests + max_queued_requests on a replica, Serve answers before our code runs,
    503 text/plain, with the Retry-After our deployment asks for. Requests whose bodies never end
    take the one slot and the one queue place here; the first of them to get an answer got Serve's."""
    import http.client
    import select
    import socket

    from ray import serve

    from pneumonia.serving import Classifier

    port = int(server.rsplit(":", 1)[1])
    serve.run(Classifier.options(max_ongoing_requests=1, max_queued_requests=1,
                                 autoscaling_config={"min_replicas": 1, "max_replicas": 1})
              .bind(str(artifact.path)), name="tight", route_prefix="/tight")
    held: list[socket.socket] = []
    try:
        answered = []
        while not answered:
            assert len(held) < 20, "no request was turned away"
            held.append(socket.create_connection(("127.0.0.1", port), timeout=60))
            held[-1].sendall(b"POST /tight/predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
                             b"Content-Length: 1000\r\n\r\n\x89PNG")
            answered = select.select(held, [], [], 5)[0]  # one still waiting holds a slot or a place
        response = http.client.HTTPResponse(answered[0])
        response.begin()
        assert response.status == 503, response.status
        assert response.getheader("Content-Type").startswith("text/plain") and response.getheader("Retry-After") == "1"
        assert response.read() == b"Request dropped due to backpressure"
    finally:
        for connection in held:
            connection.close()
        serve.delete("tight")


def test_an_artifact_trained_on_synthetic_data_says_so_in_every_answer(server, artifact, tmp_path):
    """Predictions (single, multipart, v2) and explanations carry the warning, and so does /model."""
    import shutil

    from ray import serve

    from pneumonia.artifacts.publish import export_artifact
    from pneumonia.artifacts.registry import SYNTHETIC_WARNING
    from pneumonia.serving import Classifier

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(Path(artifact.metadata["source_checkpoint"]), checkpoint)
    synthetic = export_artifact(str(checkpoint), tmp_path / "registry", threshold=0.5, target_recall=0.95,
                                validation_metrics={}, training_config=artifact.metadata["training_config"],
                                training_data={"synthetic": True, "roots": ["/somewhere/synthetic"]})
    serve.run(Classifier.bind(str(synthetic.path)), name="synthetic", route_prefix="/synthetic")
    try:
        base, image = f"{server}/synthetic", _png(np.full((40, 30), 90, np.uint8))
        answers = [request(f"{base}/predict", image, "image/png"), request(f"{base}/explain", image, "image/png")]
        boundary = "b0"
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
        status, multipart = request(f"{base}/predict", form, f"multipart/form-data; boundary={boundary}")
        answers += [(status, prediction) for prediction in multipart["predictions"]]
        payload = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                               "data": [base64.b64encode(image).decode()]}]}
        status, inferred = request(f"{base}/v2/models/pneumonia-cnn/infer", json.dumps(payload).encode(),
                                   "application/json")
        answers += [(status, inferred["parameters"]), request(f"{base}/model")]
        for status, answer in answers:
            assert status == 200 and answer["warning"] == SYNTHETIC_WARNING, answer
        assert answers[-1][1]["training_data"]["synthetic"] is True
    finally:
        serve.delete("synthetic")


def test_serve_config_is_a_valid_serve_deploy_config():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    root = Path(__file__).resolve().parents[2]
    config = ServeDeploySchema.parse_obj(yaml.safe_load((root / "serve_config.yaml").read_text()))
    app = config.applications[0]
    assert app.import_path == "serve_app:build_app"
    assert [d.name for d in app.deployments] == ["Classifier"]
    assert app.deployments[0].autoscaling_config["max_replicas"] > app.deployments[0].autoscaling_config["min_replicas"]


def test_importing_serve_app_needs_no_artifact():
    import importlib

    module = importlib.import_module("serve_app")
    assert callable(module.build_app)
