"""The Open Inference Protocol's wire format, without Serve: what a standard client sends and gets."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from pneumonia.serving.errors import HTTPError
from pneumonia.serving.protocol import infer_response, model_metadata, request_images

SHAPE = (64, 64, 1)


def test_metadata_names_both_input_kinds_with_the_models_shape():
    metadata = model_metadata("pneumonia-cnn", "v0003", SHAPE)
    assert metadata["versions"] == ["v0003"]
    assert {i["name"]: i["shape"] for i in metadata["inputs"]} == {"image": [-1], "pixels": [-1, 64, 64, 1]}


def test_encoded_files_and_pixels_are_parsed_in_order():
    files = request_images({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                        "data": [base64.b64encode(b"one").decode(), base64.b64encode(b"two").decode()]}]},
                           SHAPE)
    assert files == [("input 0", b"one"), ("input 1", b"two")]
    pixels = np.arange(2 * 64 * 64).reshape(2, 64, 64, 1) % 256
    parsed = request_images({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 64, 64, 1],
                                         "data": pixels.flatten().tolist()}]}, SHAPE)
    assert [name for name, _ in parsed] == ["input 0", "input 1"]
    assert parsed[1][1].dtype == np.uint8 and np.array_equal(parsed[1][1], pixels[1])


@pytest.mark.parametrize("payload, message", [
    ([], "expected {\"inputs\""),
    ({"inputs": ["x"]}, "each input must be an object"),
    ({"inputs": [{"datatype": "BYTES", "data": []}]}, "non-empty list"),
    ({"inputs": [{"datatype": "BYTES", "data": ["not base64!"]}]}, "input 0: BYTES data must be base64"),
    ({"inputs": [{"datatype": "UINT8", "shape": [1, 32, 32, 1], "data": [0] * 1024}]}, "shape [n, 64, 64, 1]"),
    ({"inputs": [{"datatype": "UINT8", "shape": [1, 64, 64, 1], "data": [300] * 4096}]}, "outside 0..255"),
    ({"inputs": [{"datatype": "FP32", "data": [0.5]}]}, "unsupported datatype 'FP32'"),
])
def test_a_malformed_request_is_a_400_that_says_what_is_wrong(payload, message):
    with pytest.raises(HTTPError) as raised:
        request_images(payload, SHAPE)
    assert raised.value.status == 400 and message in str(raised.value)


def test_the_response_echoes_the_id_and_adds_the_guard_only_when_there_is_one():
    answer = infer_response("m", "v1", {"id": "r-7"}, [0.9, None], ["PNEUMONIA", None], {"threshold": 0.4})
    assert answer["id"] == "r-7" and [o["name"] for o in answer["outputs"]] == ["probability", "label"]
    guarded = infer_response("m", "v1", {}, [0.9], ["PNEUMONIA"], {}, ood_scores=[12.5])
    assert guarded["id"] is None and guarded["outputs"][2] == {
        "name": "ood_score", "datatype": "FP32", "shape": [1], "data": [12.5]}
