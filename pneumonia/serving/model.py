"""The served model's core: load an artifact, decode, score and explain; no HTTP here.

As KServe's ``Model`` separates load / preprocess / predict from its protocol servers, this class
holds everything a replica knows about the model, and :mod:`pneumonia.serving.app` only turns
requests into calls and results into JSON. Batch jobs, tests and the review page's routes all see
the same answers, because there is one place that builds them (:meth:`ServedModel.answer`).

Decoding is the same ``decode_image`` that training used (no training/serving skew); the
out-of-distribution guard's verdict comes from the same forward pass as the probability.
"""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pneumonia.artifacts.registry import artifact_warning, calibration_of, load_artifact
from pneumonia.data.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    open_image,
    prepare_pixels,
)
from pneumonia.models.explain import DEFAULT_ALPHA, DISPLAY_SIDE, GradCam
from pneumonia.models.ood import Scored, judge


@dataclass(frozen=True, eq=False)
class ClientPixels:
    """Pixels a client resized to the model's input shape itself (the protocol's ``pixels``
    tensor): not yet the model's input, since the model's intensity normalisation still applies."""

    array: np.ndarray


class ServedModel:
    """One loaded artifact with its preprocessing, threshold and out-of-distribution guard.

    ``ood_policy`` (reject / flag) overrides the artifact's own guard policy; ``max_pixels``
    bounds what a decoder may allocate for one image. Thread-safe: replicas call it from their
    decode threads side by side.
    """

    def __init__(self, artifact: str, max_pixels: int = DEFAULT_MAX_PIXELS, ood_policy: str | None = None):
        self.artifact = load_artifact(artifact)
        self.metadata = self.artifact.metadata
        self.name, self.version = self.artifact.name, self.artifact.version
        self.warning = artifact_warning(self.metadata)  # in every answer when set
        self.calibration = calibration_of(self.metadata)  # in every answer: whose threshold this is
        self.spec = self.artifact.preprocess
        self.threshold = float(self.artifact.threshold)
        self.max_pixels = max_pixels
        # The out-of-distribution guard's metadata (None without one).
        self.guard = self.artifact.ood
        if self.guard is not None and ood_policy is not None:
            self.guard = {**self.guard, "policy": ood_policy}
        self._explainer = None
        self._explainer_lock = threading.Lock()  # built once: tracing Grad-CAM takes seconds

    # -- load / preprocess / predict

    def decode(self, item: bytes | ClientPixels | np.ndarray) -> np.ndarray | ImageDecodeError:
        """Model input pixels of an encoded image, or of a client's pixels (:class:`ClientPixels`:
        the same last step, ``prepare_pixels``, as a decoded file); a model input already decoded
        here (an ``np.ndarray``) passes through. What cannot be decoded returns its error, so that
        one bad image never fails a batch."""
        if isinstance(item, np.ndarray):
            return item
        try:
            if isinstance(item, ClientPixels):
                return prepare_pixels(item.array, self.spec)
            return decode_image(item, self.spec, self.max_pixels)
        except ImageDecodeError as error:  # ImageTooLargeError included
            return error

    def score(self, images: np.ndarray) -> tuple[list[Scored], float]:
        """(one Scored per image, forward pass time in ms): probability and guard verdict from
        one pass through the exported signature."""
        started = time.perf_counter()
        probabilities, ood_scores = self.artifact.predict_scored(images)
        elapsed_ms = (time.perf_counter() - started) * 1000
        return judge(probabilities, ood_scores, self.guard), elapsed_ms

    def explain(self, data: bytes, image: np.ndarray, layers: bool = False) -> dict[str, Any]:
        """Grad-CAM of the model input ``image``, drawn over the X-ray ``data`` as it was sent
        (its aspect ratio, longest side 512 px: see pneumonia.models.explain).

        ``layers`` adds the two pictures the overlay is made of, at the same size: the X-ray in
        grey (``image_png``) and the colour-mapped heatmap (``heatmap_png``); a viewer that puts
        the heatmap over the X-ray at opacity a shows exactly the overlay blended at a.
        """
        with self._explainer_lock:
            if self._explainer is None:
                self._explainer = GradCam(self.artifact.keras_model())
        explanation = self._explainer.explain(image)
        original = open_image(data, PreprocessSpec(DISPLAY_SIDE, self.spec.channels), self.max_pixels)
        answer = {"layer": explanation.layer, "overlay_alpha": DEFAULT_ALPHA,
                  "heatmap": np.round(explanation.heatmap, 3).tolist()}
        if layers:
            overlay_png, gray_png, heatmap_png = explanation.layers_on(original, self.spec.resize)
            answer.update(image_png=_b64(gray_png), heatmap_png=_b64(heatmap_png))
        else:
            overlay_png = explanation.overlay_on(original, self.spec.resize)
        return {**answer, "overlay_png": _b64(overlay_png)}

    # -- answers

    def answer(self, scored: Scored) -> dict[str, Any]:
        """A prediction's JSON; for an image the guard flags (policy ``flag``) no label at all."""
        model = {"model": self.name, "version": self.version, "calibration": self.calibration, **self.warned()}
        if scored.out_of_distribution:
            return {"out_of_distribution": True, **scored.guard_fields(), **model}
        return {
            "label": scored.label(self.threshold),
            "probability": scored.probability,
            "threshold": self.threshold,
            **({"out_of_distribution": False, **scored.guard_fields()} if self.guard else {}),
            **model,
        }

    def warned(self) -> dict[str, str]:
        """``{"warning": ...}`` for an artifact that must say so in every answer, else nothing."""
        return {"warning": self.warning} if self.warning else {}

    def card(self) -> dict[str, Any]:
        """The artifact's metadata as /model serves it (the review page's model card), with the
        out-of-distribution guard these replicas apply: the app's ``ood_policy`` may override the
        exported one, and a guard the signature cannot score is no guard. ``calibration`` says whose
        threshold it applies (a site's, from ``pneumonia calibrate``, or the shipped one); the
        whole ``site`` block, when there is one, is the metadata's."""
        return {**self.metadata, "out_of_distribution": self.guard, "calibration": self.calibration, **self.warned()}


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode()
