"""Serving honours the out-of-distribution guard: reject (422) or flag (200, no label), on
/predict, /explain and OIP v2, counted in pneumonia_out_of_distribution_total.

The artifact's guard is made to order: its mean is the features of one image (a dark frame), so
that image passes and a bright noise frame is far outside; the guard's fitting on real X-rays is
tested in test_ood_real.py.
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

from pneumonia.models.ood import NOT_AN_XRAY
from tests.serving.test_serving_ops import serve_port  # noqa: F401  (Serve started on a free port, per module)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


INSIDE = _png(np.full((64, 64), 40, np.uint8))
OUTSIDE = _png(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))


def _post(url: str, body: bytes, content_type: str = "image/png") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return export_guarded(tmp_path_factory.mktemp("serving-ood"))


def export_guarded(root, training_data: dict | None = None):
    """A small model's artifact whose guard passes INSIDE and refuses OUTSIDE (made to order);
    ``training_data`` as export records it (``{"synthetic": True, ...}``: the demo's kind of model)."""
    from pneumonia.artifacts.publish import export_artifact
    from pneumonia.config import ExperimentConfig, ModelConfig
    from pneumonia.data.preprocess import PreprocessSpec, decode_image
    from pneumonia.models.architectures import build_model, compile_model
    from pneumonia.models.checkpoint import CheckpointInfo, save_checkpoint
    from pneumonia.models.ood import Guard, features_and_probabilities, model_with_features

    spec = PreprocessSpec(64, 1)
    model = build_model(ModelConfig(name="xraynet", width=8), spec.shape)
    compile_model(model, "adam", 1e-3)
    save_checkpoint(root / "ckpt", model, CheckpointInfo(epoch=1, config=ExperimentConfig().model_dump(),
                                                         preprocess=spec, metrics={}))
    images = np.stack([decode_image(INSIDE, spec), decode_image(OUTSIDE, spec)])
    features, _ = features_and_probabilities(model_with_features(model), images)
    distance = float(np.sum((features[1] - features[0]) ** 2))
    assert distance > 0
    guard = Guard(means=features[:1].astype(np.float64), precision=np.eye(features.shape[1]),
                  threshold=distance / 2, pass_rate=0.99, fitted_on=1, calibrated_on=1, validation_pass_rate=1.0)
    return export_artifact(str(root / "ckpt"), root / "registry", threshold=0.5, target_recall=0.95,
                           validation_metrics={}, training_config=ExperimentConfig().model_dump(), guard=guard,
                           training_data=training_data)


def _deploy(artifact, port: int, **args) -> str:
    from ray import serve

    from pneumonia.serving import build_app

    serve.run(build_app({"artifact": str(artifact.path), **args}), name="ood", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def _metrics() -> str:
    """What a Prometheus scrape of this Ray's metrics sees."""
    import ray

    return urllib.request.urlopen(f"http://127.0.0.1:{ray.metrics_export_port}/metrics", timeout=10).read().decode()


def _refusals() -> float:
    """pneumonia_out_of_distribution_total as Ray exports it (0 before the first refusal)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in _metrics().splitlines()
               if line.startswith("ray_pneumonia_out_of_distribution_total{"))


def test_reject_answers_422_with_the_score_and_classifies_what_passes(artifact, serve_port):
    url = _deploy(artifact, serve_port)
    status, answer = _post(f"{url}/predict", INSIDE)
    assert status == 200 and answer["label"] in ("NORMAL", "PNEUMONIA") and answer["out_of_distribution"] is False
    assert answer["ood_score"] < answer["ood_threshold"]

    status, answer = _post(f"{url}/predict", OUTSIDE)
    assert status == 422, answer
    assert "does not look like a pediatric chest X-ray" in answer["error"] and answer["out_of_distribution"] is True
    assert answer["ood_score"] > answer["ood_threshold"] and "label" not in answer

    status, answer = _post(f"{url}/explain", OUTSIDE)  # no heatmap for what is not an X-ray
    assert status == 422 and "overlay_png" not in answer

    infer = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                         "data": [base64.b64encode(OUTSIDE).decode()]}]}
    status, answer = _post(f"{url}/v2/models/{artifact.metadata['name']}/infer", json.dumps(infer).encode(),
                           "application/json")
    assert status == 422 and answer["out_of_distribution"] is True

    model = json.loads(urllib.request.urlopen(f"{url}/model", timeout=30).read())
    assert model["out_of_distribution"]["policy"] == "reject"


def test_flag_answers_200_without_a_label_and_every_refusal_is_counted(artifact, serve_port):
    import time

    url = _deploy(artifact, serve_port, ood_policy="flag")
    # The model card (/model, the review page's) states the policy in force, not the exported one.
    assert artifact.metadata["out_of_distribution"]["policy"] == "reject"
    card = json.loads(urllib.request.urlopen(f"{url}/model", timeout=60).read())
    assert card["out_of_distribution"]["policy"] == "flag"
    status, answer = _post(f"{url}/predict", OUTSIDE)
    assert status == 200 and answer["out_of_distribution"] is True
    assert "label" not in answer and "probability" not in answer

    status, answer = _post(f"{url}/explain", OUTSIDE)
    assert status == 200 and answer["out_of_distribution"] is True and "overlay_png" not in answer

    infer = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                         "data": [base64.b64encode(OUTSIDE).decode(), base64.b64encode(INSIDE).decode()]}]}
    status, answer = _post(f"{url}/v2/models/{artifact.metadata['name']}/infer", json.dumps(infer).encode(),
                           "application/json")
    outputs = {output["name"]: output["data"] for output in answer["outputs"]}
    assert status == 200 and outputs["label"][0] is None and outputs["label"][1] in ("NORMAL", "PNEUMONIA")
    assert outputs["probability"][0] is None and outputs["ood_score"][0] > outputs["ood_score"][1]

    deadline = time.monotonic() + 120  # Ray exports metrics every few seconds
    while _refusals() < 3 and time.monotonic() < deadline:
        time.sleep(2)
    assert _refusals() >= 3  # the reject test's /predict (and more) plus these three

    # Every guard score goes into pneumonia_ood_score_ratio (over the guard's threshold: the refused
    # ones above 1, the classified one below); only the one image classified (INSIDE) into the drift
    # window; this artifact has no reference.
    while "ray_pneumonia_ood_score_ratio_bucket{" not in _metrics() and time.monotonic() < deadline:
        time.sleep(2)
    counts: dict[float, float] = {}  # cumulative count per upper bound, summed over the replicas' series
    for line in _metrics().splitlines():
        if line.startswith("ray_pneumonia_ood_score_ratio_bucket{"):
            bound = float(line.split('le="')[1].split('"')[0])
            counts[bound] = counts.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    assert 1.0 in counts and counts[1.0] >= 1, counts  # the classified image, at most the threshold
    assert max(counts.values()) - counts[1.0] >= 3, counts  # the refused ones, above it
    drift = json.loads(urllib.request.urlopen(f"{url}/model", timeout=60).read())["drift"]
    assert drift["images"] == 1 and drift["level"] == "no reference" and drift["value"] is None


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "oodboundary") -> tuple[bytes, str]:
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                    "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for name, data in parts)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_a_synthetic_trained_models_refusals_say_why_and_multipart_answers_each_part(tmp_path_factory, tmp_path,
                                                                                    serve_port):
    """The demo's kind of model refuses real X-rays: every refusal (/predict, OIP infer, each refused
    part of a multipart /predict) says it was trained on synthetic data and names `pneumonia demo
    --data DIR`; a multipart request answers classified, refused and failed parts side by side, and
    the audit line gives each image its own status (issue 24)."""
    import time

    from pneumonia.artifacts.registry import SYNTHETIC_REFUSAL, SYNTHETIC_WARNING

    synthetic = export_guarded(tmp_path_factory.mktemp("serving-ood-synthetic"),
                               training_data={"synthetic": True, "roots": ["/data/synthetic"]})
    url = _deploy(synthetic, serve_port, audit_log=str(tmp_path / "audit.jsonl"))

    status, answer = _post(f"{url}/predict", OUTSIDE)
    assert status == 422 and answer["error"] == f"body: {NOT_AN_XRAY}; it was not classified. {SYNTHETIC_REFUSAL}"
    assert "pneumonia demo --data DIR" in answer["error"] and answer["warning"] == SYNTHETIC_WARNING
    infer = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                         "data": [base64.b64encode(OUTSIDE).decode()]}]}
    status, answer = _post(f"{url}/v2/models/{synthetic.metadata['name']}/infer", json.dumps(infer).encode(),
                           "application/json")
    assert status == 422 and SYNTHETIC_REFUSAL in answer["error"], answer

    body, kind = _multipart([("inside.png", INSIDE), ("photo.png", OUTSIDE), ("notes.png", b"not an image")])
    status, answer = _post(f"{url}/predict", body, kind)
    assert status == 200, answer
    inside, photo, notes = answer["predictions"]
    assert (inside["index"], inside["file"], inside["outcome"], inside["status"]) == (0, "inside.png", "classified", 200)
    assert inside["label"] in ("NORMAL", "PNEUMONIA") and inside["warning"] == SYNTHETIC_WARNING
    assert (photo["index"], photo["file"], photo["outcome"], photo["status"]) == (1, "photo.png", "refused", 422)
    assert photo["error"].startswith(f"photo.png: {NOT_AN_XRAY}") and SYNTHETIC_REFUSAL in photo["error"]
    assert photo["out_of_distribution"] is True and photo["ood_score"] > photo["ood_threshold"]
    assert photo["warning"] == SYNTHETIC_WARNING and "label" not in photo
    assert (notes["index"], notes["file"], notes["outcome"], notes["status"]) == (2, "notes.png", "failed", 400)
    assert answer["counts"] == {"classified": 1, "flagged": 0, "refused": 1, "failed": 1}

    # None classified: all refused -> 422; refused and undecodable -> 422 (the request was read).
    for parts in ([("a.png", OUTSIDE), ("b.png", OUTSIDE)], [("a.png", OUTSIDE), ("b.png", b"text")]):
        status, answer = _post(f"{url}/predict", *_multipart(parts))
        assert status == 422 and answer["error"].startswith("none of the 2 files could be classified: a.png: "), answer
        assert [part["file"] for part in answer["predictions"]] == ["a.png", "b.png"]

    deadline, lines = time.monotonic() + 60, []
    while len(lines) < 5 and time.monotonic() < deadline:
        time.sleep(0.5)
        lines = [json.loads(line) for path in tmp_path.glob("audit.*.jsonl") for line in path.read_text().splitlines()]
    mixed = next(line for line in lines if line["route"] == "/predict" and len(line["images"]) == 3)
    assert mixed["status"] == 200 and [image["status"] for image in mixed["images"]] == [200, 422, 400]
    assert mixed["images"][1]["out_of_distribution"] is True and "probability" not in mixed["images"][2]
    assert "photo.png" not in "".join(path.read_text() for path in tmp_path.glob("audit.*.jsonl"))


def test_pneumonia_predict_shows_a_flagged_image_as_not_a_chest_xray():
    from pneumonia.serving.client import format_predictions

    table = format_predictions([{"file": "holiday.jpeg", "out_of_distribution": True, "ood_score": 812.4,
                                 "ood_threshold": 301.2, "model": "m", "version": "v0001"}])
    assert "not a chest X-ray (out-of-distribution score 812.4 > 301.2)" in table
