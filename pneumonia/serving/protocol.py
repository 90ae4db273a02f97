"""The Open Inference Protocol (KServe v2) on the wire: request parsing and response shapes.

Kept apart from the routes (:mod:`pneumonia.serving.app`) as KServe keeps its ``protocol``
apart from its ``Model``: what a standard inference client sends and receives is defined here,
in plain functions of JSON values, testable without Serve. Two input kinds are accepted, both
in the first input tensor: ``BYTES`` (base64-encoded image files, decoded by the shared
preprocessing) and ``UINT8`` (pixels already prepared to the model's input shape).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

from pneumonia.serving.errors import HTTPError


def model_metadata(name: str, version: str, shape: Sequence[int]) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the model's inputs and outputs (``shape`` is one image's)."""
    return {
        "name": name,
        "versions": [version],
        "platform": "tensorflow_savedmodel",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, *shape]},
        ],
        "outputs": [
            {"name": "probability", "datatype": "FP32", "shape": [-1]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
    }


def request_images(payload: Any, shape: Sequence[int]) -> list[tuple[str, bytes | np.ndarray]]:
    """Named images from an inference request: encoded files ("BYTES", base64) or decoded
    pixels ("UINT8", each of ``shape``); HTTPError 400 saying what is wrong otherwise."""
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list) or not payload["inputs"]:
        raise HTTPError(400, "expected {\"inputs\": [{\"name\", \"datatype\", \"shape\", \"data\"}]}")
    tensor = payload["inputs"][0]
    if not isinstance(tensor, dict):
        raise HTTPError(400, "each input must be an object")
    datatype, data = tensor.get("datatype"), tensor.get("data")
    if not isinstance(data, list) or not data:
        raise HTTPError(400, "input 'data' must be a non-empty list")
    if datatype == "BYTES":
        encoded = []
        for index, item in enumerate(data):
            try:
                raw = base64.b64decode(item, validate=True) if isinstance(item, str) else None
            except ValueError:
                raw = None
            if raw is None:
                raise HTTPError(400, f"input {index}: BYTES data must be base64-encoded image files")
            encoded.append((f"input {index}", raw))
        return encoded
    if datatype == "UINT8":
        expected = list(shape)
        tensor_shape = tensor.get("shape")
        try:
            pixels = np.asarray(data, dtype=np.int64)
        except (TypeError, ValueError):
            raise HTTPError(400, "UINT8 data must be integers") from None
        if not isinstance(tensor_shape, list) or len(tensor_shape) != 4 or tensor_shape[1:] != expected:
            raise HTTPError(400, f"UINT8 input must have shape [n, {', '.join(map(str, expected))}]")
        if pixels.size != int(np.prod(tensor_shape)) or pixels.min() < 0 or pixels.max() > 255:
            raise HTTPError(400, "UINT8 data does not match its shape or is outside 0..255")
        return [(f"input {index}", image) for index, image in enumerate(pixels.reshape(tensor_shape).astype(np.uint8))]
    raise HTTPError(400, f"unsupported datatype {datatype!r}: use BYTES (encoded images) or UINT8 (pixels)")


def infer_response(name: str, version: str, payload: Any, probabilities: list[float | None], labels: list[str | None],
                   parameters: dict[str, Any], ood_scores: list[float] | None = None) -> dict[str, Any]:
    """``POST /v2/models/{name}/infer``'s answer: one output tensor per field, the request's id echoed."""
    n = len(labels)
    return {
        "model_name": name,
        "model_version": version,
        "id": payload.get("id") if isinstance(payload, dict) else None,
        "parameters": parameters,
        "outputs": [
            {"name": "probability", "datatype": "FP32", "shape": [n], "data": probabilities},
            {"name": "label", "datatype": "BYTES", "shape": [n], "data": labels},
            *([{"name": "ood_score", "datatype": "FP32", "shape": [n], "data": ood_scores}]
              if ood_scores is not None else []),
        ],
    }
