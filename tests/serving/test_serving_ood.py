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


def export_guarded(root):
    """A small model's artifact whose guard passes INSIDE and refuses OUTSIDE (made to order)."""
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
                           validation_metrics={}, training_config=ExperimentConfig().model_dump(), guard=guard)


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

    # Every guard score goes into pneumonia_ood_score (buckets at multiples of the guard's threshold);
    # only the one image classified (INSIDE) into the drift window; this artifact has no reference.
    while "ray_pneumonia_ood_score_bucket{" not in _metrics() and time.monotonic() < deadline:
        time.sleep(2)
    threshold = artifact.metadata["out_of_distribution"]["threshold"]
    buckets = {float(line.split('le="')[1].split('"')[0]) for line in _metrics().splitlines()
               if line.startswith("ray_pneumonia_ood_score_bucket{")}
    assert any(bound == pytest.approx(threshold, rel=1e-6) for bound in buckets), (threshold, buckets)
    drift = json.loads(urllib.request.urlopen(f"{url}/model", timeout=60).read())["drift"]
    assert drift["images"] == 1 and drift["level"] == "no reference" and drift["value"] is None


def test_pneumonia_predict_shows_a_flagged_image_as_not_a_chest_xray():
    from pneumonia.serving.client import format_predictions

    table = format_predictions([{"file": "holiday.jpeg", "out_of_distribution": True, "ood_score": 812.4,
                                 "ood_threshold": 301.2, "model": "m", "version": "v0001"}])
    assert "not a chest X-ray (out-of-distribution score 812.4 > 301.2)" in table
