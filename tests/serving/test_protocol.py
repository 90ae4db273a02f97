"""The Open Inference Protocol's wire format, without Serve: what a standard client sends and gets."""

from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from pneumonia.data.preprocess import ImageDecodeError, PreprocessSpec, decode_image, prepare_pixels
from pneumonia.serving.errors import HTTPError
from pneumonia.serving.protocol import (
    HEADER_LENGTH,
    encode_response,
    infer_response,
    model_metadata,
    request_images,
    split_body,
)

SHAPE = (64, 64, 1)


def test_metadata_names_both_input_kinds_with_the_models_shape():
    metadata = model_metadata("pneumonia-cnn", "v0003", SHAPE)
    assert metadata["versions"] == ["v0003"]
    assert {i["name"]: i["shape"] for i in metadata["inputs"]} == {"image": [-1], "pixels": [-1, 64, 64, 1]}
    pixels = model_metadata("m", "v1", SHAPE, normalize="equalize")["parameters"]["pixels"]
    assert pixels == {"shape": [64, 64, 1], "datatype": "UINT8", "range": [0, 255], "channels": "grey",
                      "normalised_by_server": "equalize"}


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
    ({"inputs": [{"datatype": "BYTES", "data": ["not base64!"]}]}, "input 0: BYTES data in JSON must be base64"),
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


# ----------------------------------------------------------------------------- binary tensor extension


def binary_request(inputs: list[tuple[dict, bytes]], extra: dict | None = None) -> tuple[bytes, str]:
    """A body as Triton's client builds it: the JSON header, then each input's raw bytes."""
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}
                                    for tensor, raw in inputs], **(extra or {})}).encode()
    return header + b"".join(raw for _, raw in inputs), str(len(header))


def length_prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def test_binary_bytes_and_pixels_are_parsed_like_their_json_forms():
    body, length = binary_request([({"name": "image", "datatype": "BYTES", "shape": [2]}, length_prefixed(b"one", b"two"))])
    payload, binary = split_body(body, length)
    assert request_images(payload, SHAPE, binary) == [("input 0", b"one"), ("input 1", b"two")]

    pixels = (np.arange(2 * 64 * 64) % 256).astype(np.uint8).reshape(2, 64, 64, 1)
    body, length = binary_request([({"name": "pixels", "datatype": "UINT8", "shape": [2, 64, 64, 1]}, pixels.tobytes())])
    payload, binary = split_body(body, length)
    parsed = request_images(payload, SHAPE, binary)
    assert np.array_equal(np.stack([image for _, image in parsed]), pixels)


def test_a_json_body_has_no_binary_part():
    payload, binary = split_body(b'{"inputs": []}', None)
    assert payload == {"inputs": []} and bytes(binary) == b""


@pytest.mark.parametrize("body, length, message", [
    (b'{"inputs": []}', "abc", "must be a whole number of bytes"),
    (b'{"inputs": []}', "500", "is 500 but the body has 14 bytes"),
    (b'{"inputs": []}', "0", "is 0 but the body"),
    (b'{"inputs": [' + b"\x00" * 8, "14", "the JSON header (the first 14 bytes"),
    (b"not json", None, "the body is not valid JSON"),
])
def test_a_bad_header_length_or_header_is_a_400(body, length, message):
    with pytest.raises(HTTPError) as raised:
        split_body(body, length)
    assert raised.value.status == 400 and message in raised.value.message


def _binary_error(tensor: dict, raw: bytes, declared: int | None = None) -> str:
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw) if declared is None
                                                                else declared}}]}).encode()
    payload, binary = split_body(header + raw, str(len(header)))
    with pytest.raises(HTTPError) as raised:
        request_images(payload, SHAPE, binary)
    assert raised.value.status == 400
    return raised.value.message


def test_sizes_that_do_not_add_up_are_a_400_that_says_so():
    image = {"name": "image", "datatype": "BYTES", "shape": [1]}
    assert "add up to 3 bytes but 7 follow" in _binary_error(image, length_prefixed(b"one"), declared=3)
    assert "goes past the end" in _binary_error(image, length_prefixed(b"one"), declared=99)
    assert "ends inside an element's 4-byte length" in _binary_error(image, length_prefixed(b"one") + b"\x01")
    assert "claims 100 bytes" in _binary_error(image, struct.pack("<I", 100) + b"abc")
    assert "holds 2 elements; the shape says 1" in _binary_error(image, length_prefixed(b"a", b"b"))
    assert "must be a whole number" in _binary_error(image, b"", declared=-1)
    pixels = {"name": "pixels", "datatype": "UINT8", "shape": [1, 64, 64, 1]}
    assert "is 10 bytes; shape [1, 64, 64, 1] needs 4,096" in _binary_error(pixels, b"\x00" * 10)


def test_binary_outputs_follow_the_json_header_with_their_sizes():
    response = infer_response("m", "v1", {}, [0.25, None], ["NORMAL", None], {"threshold": 0.5}, ood_scores=[1.5, 9.0])
    request = {"outputs": [{"name": "probability", "parameters": {"binary_data": True}}, {"name": "label"}]}
    body, headers = encode_response(response, request)
    assert headers["content-type"] == "application/octet-stream"
    length = int(headers[HEADER_LENGTH])
    header = json.loads(body[:length])
    assert [o["name"] for o in header["outputs"]] == ["probability", "label"]  # only those asked for
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8} and "data" not in header["outputs"][0]
    assert header["outputs"][1]["data"] == ["NORMAL", None]
    values = np.frombuffer(body[length:], "<f4")
    assert values[0] == np.float32(0.25) and np.isnan(values[1])  # a flagged image has no probability

    body, headers = encode_response(response, {"parameters": {"binary_data_output": True}})
    length = int(headers[HEADER_LENGTH])
    sizes = [o["parameters"]["binary_data_size"] for o in json.loads(body[:length])["outputs"]]
    assert sizes == [8, 4 + 6 + 4, 8] and len(body) == length + sum(sizes)
    assert body[length + 8:length + 22] == length_prefixed(b"NORMAL", b"")


def test_json_stays_json_and_unknown_outputs_are_a_400():
    response = infer_response("m", "v1", {"id": "7"}, [0.5], ["NORMAL"], {})
    body, headers = encode_response(response, {"id": "7"})
    assert headers == {"content-type": "application/json"} and json.loads(body)["id"] == "7"
    with pytest.raises(HTTPError) as raised:
        encode_response(response, {"outputs": [{"name": "logits"}]})
    assert raised.value.status == 400 and "unknown output 'logits'" in raised.value.message


# ----------------------------------------------------------------------------- the pixels contract


@pytest.mark.parametrize("normalize", ["none", "standardize", "equalize"])
def test_pixels_get_the_same_last_step_as_a_decoded_file(normalize):
    """A client that resizes an image to the model's shape and sends the pixels gets exactly the
    model input that sending the file at that size gives (prepare_pixels is decode_image's last step)."""
    spec = PreprocessSpec(64, 1, normalize=normalize)
    grey = (np.linspace(30, 180, 64 * 64).reshape(64, 64) + np.random.default_rng(1).normal(0, 9, (64, 64)))
    grey = grey.clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    assert np.array_equal(prepare_pixels(grey[:, :, None], spec), decode_image(buffer.getvalue(), spec))
    with pytest.raises(ImageDecodeError, match=r"uint8 of shape \[64, 64, 1\]"):
        prepare_pixels(grey[:32, :, None], spec)
