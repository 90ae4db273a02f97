"""The Open Inference Protocol (KServe v2) on the wire: request parsing and response shapes.

Kept apart from the routes (:mod:`pneumonia.serving.app`) as KServe keeps its ``protocol``
apart from its ``Model``: what a standard inference client sends and receives is defined here,
in plain functions of JSON values and bytes, testable without Serve. Two input kinds are
accepted, both in the first input tensor: ``BYTES`` (image files, decoded by the shared
preprocessing) and ``UINT8`` (grey 0-255 pixels already resized to the model's input shape; the
model core still applies the model's intensity normalisation, see :func:`model_metadata`).

Both travel in JSON (``BYTES`` elements base64-encoded, ``UINT8`` as a flat list of integers) or
with the **binary tensor extension** that Triton's and KServe's clients use by default: the body
is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw tensors, in
input order, each input saying its size in ``parameters.binary_data_size``; a ``BYTES`` tensor's
elements are each a 4-byte little-endian length then the bytes, a ``UINT8`` tensor is its raw
bytes. Outputs asked for with ``parameters.binary_data: true`` (per output, or for all of them
with the request's ``parameters.binary_data_output``) come back the same way
(:func:`encode_response`).
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from pneumonia.serving.errors import HTTPError

HEADER_LENGTH = "Inference-Header-Content-Length"
"""The HTTP header giving the JSON header's length in a binary-extension body (request or response)."""

OUTPUT_DTYPES = {"probability": "FP32", "label": "BYTES", "ood_score": "FP32"}
_NUMPY = {"FP32": "<f4", "UINT8": "u1"}


def model_metadata(name: str, version: str, shape: Sequence[int], normalize: str = "none") -> dict[str, Any]:
    """``GET /v2/models/{name}``: the model's inputs and outputs (``shape`` is one image's), and
    what a ``pixels`` tensor must hold (``parameters.pixels``)."""
    height, width, channels = shape
    grey = "grey" if channels == 1 else "RGB"
    return {
        "name": name,
        "versions": [version],
        "platform": "tensorflow_savedmodel",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1],
             "parameters": {"content": "image files (JPEG, PNG, DICOM, ...): base64 strings in JSON, raw with "
                                       "the binary extension; decoded and resized by the server"}},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, *shape],
             "parameters": {"content": f"{grey} pixels 0-255, resized to {height}x{width} (not normalised: the "
                                       f"server applies the model's intensity normalisation, {normalize!r})"}},
        ],
        "outputs": [
            {"name": "probability", "datatype": "FP32", "shape": [-1]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {"pixels": {"shape": [height, width, channels], "datatype": "UINT8", "range": [0, 255],
                                  "channels": grey, "normalised_by_server": normalize}},
    }


# ----------------------------------------------------------------------------- requests


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """(the JSON header, the binary tensors after it) of a request body; without
    ``Inference-Header-Content-Length`` the whole body is JSON and there is no binary part. The
    binary part is a view of ``body``: each tensor is copied once, when it is cut out."""
    view = memoryview(body)
    if header_length is None:
        header, binary = body, view[len(body):]
    else:
        text = header_length.strip()
        if not text.isdigit():
            raise HTTPError(400, f"{HEADER_LENGTH} must be a whole number of bytes, not {header_length!r}")
        length = int(text)
        if length == 0 or length > len(body):
            raise HTTPError(400, f"{HEADER_LENGTH} is {length:,} but the body has {len(body):,} bytes")
        header, binary = body[:length], view[length:]
    try:
        payload = json.loads(header)
    except (ValueError, UnicodeDecodeError):
        where = (f"the JSON header (the first {len(header):,} bytes, {HEADER_LENGTH}) is" if header_length is not None
                 else "the body is")
        raise HTTPError(400, f"{where} not valid JSON") from None
    return payload, binary


def _binary_parts(inputs: list, binary: bytes | memoryview) -> list[memoryview | None]:
    """Each input's binary data (None: its data is in the JSON), cut from ``binary`` in input order;
    the declared sizes must add up to exactly what follows the header."""
    binary = memoryview(binary)
    parts: list[memoryview | None] = []
    offset = 0
    for index, tensor in enumerate(inputs):
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is None:
            parts.append(None)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise HTTPError(400, f"input {index}: binary_data_size must be a whole number of bytes")
        if offset + size > len(binary):
            raise HTTPError(400, f"input {index}: binary_data_size {size:,} goes past the end of the binary data "
                                 f"({len(binary) - offset:,} bytes left)")
        parts.append(binary[offset:offset + size])
        offset += size
    if offset != len(binary):
        raise HTTPError(400, f"the inputs' binary_data_size add up to {offset:,} bytes but {len(binary):,} "
                             "follow the JSON header")
    return parts


def _binary_bytes(raw: memoryview, count: int | None) -> list[bytes]:
    """The elements of a binary BYTES tensor: each a 4-byte little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise HTTPError(400, "binary BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise HTTPError(400, f"binary BYTES element {len(items)} claims {length:,} bytes; "
                                 f"{len(raw) - offset:,} are left")
        items.append(bytes(raw[offset:offset + length]))
        offset += length
    if count is not None and len(items) != count:
        raise HTTPError(400, f"binary BYTES data holds {len(items)} elements; the shape says {count}")
    return items


def _element_count(shape: Any) -> int | None:
    if isinstance(shape, list) and shape and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                  for n in shape):
        return int(np.prod(shape))
    return None


def request_images(payload: Any, shape: Sequence[int],
                   binary: bytes | memoryview = b"") -> list[tuple[str, bytes | np.ndarray]]:
    """Named images from an inference request: encoded files ("BYTES") or pixels ("UINT8", each
    of ``shape``), from the JSON or from ``binary`` (the bytes after the header, see
    :func:`split_body`); HTTPError 400 saying what is wrong otherwise."""
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list) or not payload["inputs"]:
        raise HTTPError(400, "expected {\"inputs\": [{\"name\", \"datatype\", \"shape\", \"data\"}]}")
    if not all(isinstance(tensor, dict) for tensor in payload["inputs"]):
        raise HTTPError(400, "each input must be an object")
    raw = _binary_parts(payload["inputs"], binary)[0]
    tensor = payload["inputs"][0]
    datatype, data, tensor_shape = tensor.get("datatype"), tensor.get("data"), tensor.get("shape")
    if datatype not in ("BYTES", "UINT8"):
        raise HTTPError(400, f"unsupported datatype {datatype!r}: use BYTES (encoded images) or UINT8 (pixels)")
    if raw is None and (not isinstance(data, list) or not data):
        raise HTTPError(400, "input 'data' must be a non-empty list (or binary data with binary_data_size)")
    if datatype == "BYTES":
        if raw is not None:
            encoded = _binary_bytes(raw, _element_count(tensor_shape))
            if not encoded:
                raise HTTPError(400, "binary BYTES input holds no elements")
            return [(f"input {index}", item) for index, item in enumerate(encoded)]
        files = []
        for index, item in enumerate(data):
            try:
                decoded = base64.b64decode(item, validate=True) if isinstance(item, str) else None
            except ValueError:
                decoded = None
            if decoded is None:
                raise HTTPError(400, f"input {index}: BYTES data in JSON must be base64-encoded image files")
            files.append((f"input {index}", decoded))
        return files
    expected = list(shape)
    if not isinstance(tensor_shape, list) or len(tensor_shape) != 4 or tensor_shape[1:] != expected \
            or _element_count(tensor_shape) in (None, 0):
        raise HTTPError(400, f"UINT8 input must have shape [n, {', '.join(map(str, expected))}] with n >= 1")
    if raw is not None:
        if len(raw) != _element_count(tensor_shape):
            raise HTTPError(400, f"binary UINT8 data is {len(raw):,} bytes; shape {tensor_shape} needs "
                                 f"{_element_count(tensor_shape):,}")
        pixels = np.frombuffer(raw, np.uint8).reshape(tensor_shape).copy()  # its own memory, not the body's
    else:
        try:
            values = np.asarray(data, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise HTTPError(400, "UINT8 data must be integers") from None
        if values.size != _element_count(tensor_shape) or values.min() < 0 or values.max() > 255:
            raise HTTPError(400, "UINT8 data does not match its shape or is outside 0..255")
        pixels = values.reshape(tensor_shape).astype(np.uint8)
    return [(f"input {index}", image) for index, image in enumerate(pixels)]


# ----------------------------------------------------------------------------- responses


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


def binary_outputs(payload: Any) -> set[str]:
    """The outputs the request asks for in binary: those of its ``outputs`` with
    ``parameters.binary_data: true``, or every output with ``parameters.binary_data_output: true``."""
    if not isinstance(payload, dict):
        return set()
    parameters = payload.get("parameters")
    everything = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    requested = payload.get("outputs")
    if not isinstance(requested, list):
        return set(OUTPUT_DTYPES) if everything else set()
    chosen = set()
    for output in requested:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise HTTPError(400, "each requested output must be an object with a 'name'")
        flag = (output.get("parameters") or {}).get("binary_data") if isinstance(output.get("parameters"), dict) else None
        if flag is True or (flag is None and everything):
            chosen.add(output["name"])
    return chosen


def requested_outputs(payload: Any) -> list[str] | None:
    """The output names the request lists (None: all of them); an unknown name is a 400."""
    requested = payload.get("outputs") if isinstance(payload, dict) else None
    if requested is None:
        return None
    if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                  for o in requested):
        raise HTTPError(400, "'outputs' must be a list of objects with a 'name'")
    names = [output["name"] for output in requested]
    unknown = sorted(set(names) - set(OUTPUT_DTYPES))
    if unknown:
        raise HTTPError(400, f"unknown output {', '.join(map(repr, unknown))}; this model has "
                             f"{', '.join(OUTPUT_DTYPES)}")
    return names


def _to_binary(datatype: str, data: list) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in data:
            raw = b"" if item is None else str(item).encode()
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    # A missing number (a flagged image has no probability) is NaN in binary, null in JSON.
    return np.asarray([np.nan if value is None else value for value in data], dtype=_NUMPY[datatype]).tobytes()


def encode_response(response: dict[str, Any], payload: Any) -> tuple[bytes, dict[str, str]]:
    """The body and headers of an infer answer: JSON, keeping only the requested outputs; with the
    binary extension (:func:`binary_outputs`) the chosen outputs' data follow the JSON header, each
    with ``parameters.binary_data_size``, in output order, and ``Inference-Header-Content-Length``
    says where the header ends."""
    names = requested_outputs(payload)
    outputs = response["outputs"]
    if names is not None:
        by_name = {output["name"]: output for output in outputs}
        outputs = [by_name[name] for name in names if name in by_name]
    binary = binary_outputs(payload)
    tails: list[bytes] = []
    shaped = []
    for output in outputs:
        if output["name"] in binary:
            raw = _to_binary(output["datatype"], output["data"])
            tails.append(raw)
            output = {key: value for key, value in output.items() if key != "data"}
            output["parameters"] = {**output.get("parameters", {}), "binary_data_size": len(raw)}
        shaped.append(output)
    header = json.dumps({**response, "outputs": shaped}, separators=(",", ":")).encode()
    if not tails:
        return header, {"content-type": "application/json"}
    return header + b"".join(tails), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
