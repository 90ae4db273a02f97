"""Ray Serve deployment: one FastAPI ingress that decodes images and batches them through the model.

This module is the HTTP surface (routes, admission, batching, metrics); what the model answers is
the model core's (:class:`pneumonia.serving.model.ServedModel`), the Open Inference Protocol's
request and response shapes are :mod:`pneumonia.serving.protocol`, and the review page's routes
are :mod:`pneumonia.serving.page`.

Why one deployment: decoding a full-resolution X-ray costs more CPU than the CNN (see
docs/BENCHMARKS.md), and every hop between Serve processes costs about as much again. So each
replica decodes in a thread pool (Pillow releases the GIL) and gathers concurrent requests into
one compiled forward pass (``@serve.batch``); replicas autoscale together. Each replica takes a
bounded number of requests (``max_pending``) and answers the rest at once with a JSON 503, so
overload never becomes a growing queue. Run under Serve's throughput-optimised mode (see
:mod:`pneumonia.serving.local_service`), HTTP goes from HAProxy straight to the replica.

Serving imports only the preprocessing function and the registry (never train or tune code), and
applies the same ``decode_image`` that training used: no training/serving skew.

Every error the application answers has one shape, ``{"error": "<message>"}`` (FastAPI's own 404,
405 and 422 included, see :func:`pneumonia.serving.errors.json_errors`), and every answer of an artifact trained on
synthetic images carries a ``warning`` (``registry.artifact_warning``), so that nobody takes its
calls on real X-rays for a diagnosis.

Who may call and what is kept of it (docs/security-serving.md): every request passes the
:class:`~pneumonia.serving.gate.Gate` first, which gives it its request id, checks its bearer
token (:mod:`pneumonia.serving.auth`) and, on the prediction routes, writes its audit line
(:mod:`pneumonia.serving.audit`); the routes only add what they learnt of the images.

Drift (docs/monitoring.md): each replica keeps the probabilities of its last
:data:`~pneumonia.metrics.drift.DEFAULT_WINDOW` classified images (not those the guard refused or
flagged: they get no answer, and their scores are not the model's view of an X-ray) in a
:class:`~pneumonia.metrics.drift.DriftWindow`. ``GET /model`` reports the window's PSI against the
artifact's ``drift_reference``, and the ``pneumonia_drift_psi`` gauge is updated every
:data:`DRIFT_EVERY_IMAGES` classified images. The window is per replica: replicas share traffic
evenly, so each sees the same distribution, and no state crosses processes.
"""

# No `from __future__ import annotations` here: FastAPI must see real types (Request) in the
# signatures of the class-based routes that Serve wraps.
import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from pneumonia.artifacts.registry import refusal_hint, resolve_artifact
from pneumonia.data.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError
from pneumonia.metrics.drift import (
    DEFAULT_WINDOW,
    PSI_RECALIBRATE,
    PSI_WATCH,
    DriftWindow,
    drift_status,
)
from pneumonia.models.ood import NOT_AN_XRAY, POLICIES, Scored
from pneumonia.runtime import RAY_ENV
from pneumonia.serving import protocol
from pneumonia.serving.audit import DEFAULT_BACKUPS, AuditLog, replica_path
from pneumonia.serving.audit import DEFAULT_MAX_BYTES as DEFAULT_AUDIT_MAX_BYTES
from pneumonia.serving.auth import Authenticator, resolve_tokens, token_digests
from pneumonia.serving.errors import HTTPError, json_error, json_errors
from pneumonia.serving.gate import Gate, GateSettings, Note, note_of
from pneumonia.serving.model import ClientPixels, ServedModel
from pneumonia.serving.page import add_page

IMAGE_TYPES = {"image/jpeg", "image/jpg", "image/png", "application/dicom", "image/dicom", "application/octet-stream"}
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PENDING = 128  # per replica: four full batches
# Batches decoded and scored side by side, each in its own worker thread (Pillow and TensorFlow
# release the GIL). Measured with bench/serve_load.py on 2 cores at concurrency 32: 1 batch in
# flight ~250 req/s, 3 in flight 306-335 req/s, 4 no better; more cores may want more.
BATCHES_IN_FLIGHT = 3

# Prometheus metrics beside the batch and latency ones (Ray exports them with a `ray_` prefix:
# ray_pneumonia_drift_psi, ray_pneumonia_probability_bucket, ...; cluster/kuberay/drift-alert.yaml).
DRIFT_GAUGE = "pneumonia_drift_psi"
PROBABILITY_HISTOGRAM = "pneumonia_probability"
OOD_RATIO_HISTOGRAM = "pneumonia_ood_score_ratio"
# Denser towards 0 and 1, where a trained model's probabilities pile up.
PROBABILITY_BOUNDARIES = [0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999]
# Guard scores over the guard's threshold (squared Mahalanobis distances, whose scale is the
# number of features, so a ratio reads alike for every artifact): below 1 the images it passes (a
# growing share near 1 is data moving towards the edge), above 1 what it refuses (near-misses to
# photos and blank frames, 16 and more). Fixed boundaries, not multiples of one artifact's
# threshold: Ray keeps the first boundaries a metric name was registered with for the whole
# cluster session, so a rollout to a version with another threshold would keep the old buckets.
OOD_RATIO_BOUNDARIES = [0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4, 8, 16]
UNAUTHORIZED_COUNTER = "pneumonia_unauthorized"
AUDIT_ERRORS_COUNTER = "pneumonia_audit_write_errors"
DRIFT_EVERY_IMAGES = 50
"""Classified images between two updates of the drift gauge: 5% of the window, so the value
cannot move much in between, and the PSI (~0.1 ms over 1000 images) is never computed per request;
observing one value into a histogram costs ~1 µs."""

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the service

# Above the class: Serve captures the deployment class (and what it calls) when it is decorated.
def _undecodable(name: str, error: ImageDecodeError) -> HTTPError:
    """413 for an image above the pixel limit, 400 for one that cannot be decoded."""
    return HTTPError(413 if isinstance(error, ImageTooLargeError) else 400, f"{name}: {error}")


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == "multipart/form-data"


PART_OUTCOMES = ("classified", "flagged", "refused", "failed")


def parts_answer(names: list[str], outcomes: list[Any], answer) -> JSONResponse:
    """A multipart /predict's answer, one entry per part in the order sent: ``index``, ``file``,
    ``status`` (what the single-image path answers for that image alone) and ``outcome``:

    - ``classified`` (200): the model's answer (``answer(scored)``: label, probability, ...);
    - ``flagged`` (200): the guard says it is not a chest X-ray, policy ``flag`` (no label);
    - ``refused`` (422): the guard says it is not a chest X-ray, policy ``reject``: ``error``
      (the 422 reason), ``out_of_distribution``, ``ood_score``, ``ood_threshold``;
    - ``failed`` (400 undecodable, 413 too large): ``error``, the reason.

    The request answers 200 with ``{"predictions": [...], "counts": {...}}`` when at least one
    part was classified or flagged. When none was, it answers in the error shape,
    ``{"error": ..., "predictions": [...], "counts": {...}}``, with the status the single-image
    path would give: the parts' own status when they all share it (all undecodable: 400, all too
    large: 413, all refused: 422); else 422 when some part was refused (the request was read, its
    images are not chest X-rays), else 400.
    """
    parts = []
    for index, (name, outcome) in enumerate(zip(names, outcomes)):
        if isinstance(outcome, HTTPError):
            kind = "refused" if outcome.status == 422 else "failed"
            parts.append({"index": index, "file": name, "status": outcome.status, "outcome": kind,
                          "error": outcome.message, **outcome.fields})
        else:
            kind = "flagged" if outcome.out_of_distribution else "classified"
            parts.append({"index": index, "file": name, "status": 200, "outcome": kind, **answer(outcome)})
    counts = {kind: sum(part["outcome"] == kind for part in parts) for kind in PART_OUTCOMES}
    statuses = [part["status"] for part in parts]
    if 200 in statuses:
        return JSONResponse({"predictions": parts, "counts": counts})
    status = statuses[0] if len(set(statuses)) == 1 else (422 if 422 in statuses else 400)
    reasons = "; ".join(part["error"] for part in parts[:3]) + (f"; and {len(parts) - 3} more" if len(parts) > 3 else "")
    return json_error(status, f"none of the {len(parts)} files could be classified: {reasons}",
                      predictions=parts, counts=counts)


def _replica_gate() -> GateSettings:
    """The gate settings of the replica this process runs (Serve copies ``api`` before replicas
    exist, so the gate asks for them per request; outside a replica this fails: no route answers)."""
    return serve.get_replica_context().servable_object.gate


api = add_page(json_errors(FastAPI(title="pneumonia", description="Chest X-ray pneumonia classifier")))
api.add_middleware(Gate, settings=_replica_gate)  # before @serve.ingress copies the app


@serve.deployment(
    name="Classifier",
    # Above max_pending the replica itself answers a JSON 503 at once; Serve's own bounds sit
    # above it (their 503 is plain text that no handler of ours can reshape, README "Serving"),
    # so they only catch what the replica cannot; theirs at least says when to retry, as ours does.
    max_ongoing_requests=192,
    max_queued_requests=64,
    backpressure_config={"retry_after_s": 1},
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 32,  # a full batch waiting per replica
        "upscale_delay_s": 5,
        "downscale_delay_s": 30,
    },
    ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": RAY_ENV}},
)
@serve.ingress(api)
class Classifier:
    """One replica's HTTP surface: validates requests, batches their images through the model
    core (:class:`~pneumonia.serving.model.ServedModel`), answers JSON; the review page is `GET /`.

    Decoding and inference share a process so that a request costs one hop (ingress to replica),
    not two: on a small machine the hop costs as much CPU as the forward pass.
    """

    def __init__(self, artifact: str, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.0,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_pending: int = DEFAULT_MAX_PENDING, ood_policy: str | None = None,
                 tokens: dict[str, str] | None = None, audit_log: str | None = None,
                 audit_max_bytes: int = DEFAULT_AUDIT_MAX_BYTES, audit_backups: int = DEFAULT_BACKUPS):
        from ray.serve import metrics

        self.model = ServedModel(artifact, max_pixels=max_pixels, ood_policy=ood_policy)
        self.gate = self._gate(metrics, tokens, audit_log, audit_max_bytes, audit_backups)
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        self._pending = 0  # requests in the prediction routes now (one event loop: no lock)
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._batch_sizes = metrics.Histogram(
            "pneumonia_batch_size", description="images per forward pass",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self._latency = metrics.Histogram(
            "pneumonia_inference_ms", description="forward pass time per batch (ms)",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000])
        self._predictions = metrics.Counter(
            "pneumonia_predictions", description="predictions by label", tag_keys=("label",))
        self._refusals = metrics.Counter(
            "pneumonia_out_of_distribution", description="images the guard said are not chest X-rays "
            "(refused or flagged, by the artifact's policy)")
        self._probabilities = metrics.Histogram(
            PROBABILITY_HISTOGRAM, description="probability of pneumonia of each classified image",
            boundaries=PROBABILITY_BOUNDARIES)
        self._ood_ratios = None
        self._ood_threshold = None
        if self.model.guard is not None:
            threshold = float(self.model.guard["threshold"])
            self._ood_threshold = threshold if threshold > 0 else 1.0
            self._ood_ratios = metrics.Histogram(
                OOD_RATIO_HISTOGRAM, description="out-of-distribution score of each image over the guard's threshold "
                "(the guard refuses above 1)", boundaries=OOD_RATIO_BOUNDARIES)
        self._drift_psi = metrics.Gauge(
            DRIFT_GAUGE, description=f"PSI of this replica's last {DEFAULT_WINDOW} classified images' probabilities "
            f"against the artifact's drift reference ({PSI_WATCH:g} watch, {PSI_RECALIBRATE:g} re-calibrate)")
        self.drift_reference = self.model.metadata.get("drift_reference")  # checked when the artifact loaded
        self.drift_window = DriftWindow(DEFAULT_WINDOW)
        self._drift_measured_at = 0  # drift_window.total when the gauge was last updated
        self._drift_lock = threading.Lock()
        self.last_batch_sizes: list[int] = []  # the recent batch sizes, for tests and operators
        self.model.score(np.zeros((1, *self.model.spec.shape), np.uint8))  # compile before traffic

    def _gate(self, metrics, tokens, audit_log, audit_max_bytes, audit_backups) -> GateSettings:
        """Who may call this replica (``tokens``: name -> SHA-256, none: anyone) and its own audit file."""
        unauthorized = metrics.Counter(
            UNAUTHORIZED_COUNTER, description="requests refused for a missing or invalid token", tag_keys=("reason",))
        audit = None
        if audit_log:
            errors = metrics.Counter(AUDIT_ERRORS_COUNTER, description="audit lines lost (a write error, a full queue)")
            audit = AuditLog(replica_path(audit_log), audit_max_bytes, audit_backups, on_error=lambda n: errors.inc(n))
        return GateSettings(
            authenticator=Authenticator(tokens) if tokens else None, audit=audit,
            model={"model": self.model.name, "version": self.model.version, "site": self.model.calibration["site"],
                   "threshold": self.model.threshold},
            on_unauthorized=lambda reason: unauthorized.inc(tags={"reason": reason}))

    def __del__(self):
        """Write the queued audit lines before the replica goes."""
        gate = getattr(self, "gate", None)
        if gate is not None and gate.audit is not None:
            gate.audit.close(timeout_s=5)

    # -- inference

    def _run_batch(self, items: list[bytes | np.ndarray]) -> list[Scored | ImageDecodeError]:
        """Decode and score one batch in this worker thread; an undecodable image gets its error
        back. Batches run side by side (BATCHES_IN_FLIGHT), so decoding uses every core."""
        results: list = [self.model.decode(item) for item in items]
        good = [index for index, result in enumerate(results) if isinstance(result, np.ndarray)]
        if good:
            scored, elapsed_ms = self.model.score(np.stack([results[index] for index in good]))
            self._latency.observe(elapsed_ms)
            for index, answer in zip(good, scored):
                results[index] = answer
            labels = [label for label in (answer.label(self.model.threshold) for answer in scored) if label]
            for label in set(labels):
                self._predictions.inc(labels.count(label), tags={"label": label})
            refused = sum(answer.out_of_distribution for answer in scored)
            if refused:
                self._refusals.inc(refused)
            self._observe(scored)
        return results

    def _observe(self, scored: list[Scored]) -> None:
        """Distribution metrics of a scored batch: every guard score, and the probability of every
        image that was classified (into the drift window; the gauge every DRIFT_EVERY_IMAGES)."""
        if self._ood_ratios is not None:
            for answer in scored:
                if answer.ood_score is not None:
                    self._ood_ratios.observe(answer.ood_score / self._ood_threshold)
        classified = [answer.probability for answer in scored if not answer.out_of_distribution]
        for probability in classified:
            self._probabilities.observe(probability)
        total = self.drift_window.add(classified)
        if self.drift_reference is None:
            return
        with self._drift_lock:
            if total - self._drift_measured_at < DRIFT_EVERY_IMAGES:
                return
            self._drift_measured_at = total
        value = self.drift()["value"]
        if value is not None:
            self._drift_psi.set(value)

    def drift(self) -> dict[str, Any]:
        """This replica's drift status (:func:`pneumonia.metrics.drift.drift_status`) and its window."""
        status = drift_status(self.drift_reference, self.drift_window.values())
        return {**status, "window": {"scope": "replica", "capacity": self.drift_window.capacity}}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, max_concurrent_batches=BATCHES_IN_FLIGHT)
    async def predict_batch(self, items: list[bytes | np.ndarray]) -> list[Scored | ImageDecodeError]:
        """Concurrent requests' images (encoded, or decoded pixels) through one forward pass.

        Decoding happens here, not per request, so a batch costs one hand-off to a worker thread
        instead of two per image. With no batch wait a lone request runs at once, and requests
        that arrive meanwhile form the next batch.
        """
        self._batch_sizes.observe(len(items))
        self.last_batch_sizes = (self.last_batch_sizes + [len(items)])[-256:]
        return await asyncio.to_thread(self._run_batch, items)

    def recent_batch_sizes(self) -> list[int]:
        return list(self.last_batch_sizes)

    def process_id(self) -> int:
        """This replica's PID (operations and failure tests)."""
        return os.getpid()

    # -- helpers

    async def _body_images(self, request: Request) -> list[tuple[str, bytes]]:
        """(name, bytes) of every image in the request: a raw body or multipart `file` fields."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise HTTPError(413, f"request body of {int(length):,} bytes is above the limit of {self.max_bytes:,}")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            form = await request.form()
            files = form.getlist("file")
            if not files:
                raise HTTPError(400, "multipart request has no 'file' fields")
            items, kinds = [], []
            for upload in files:
                if isinstance(upload, str):
                    raise HTTPError(400, "'file' fields must be files, not text")
                data = await upload.read()
                items.append((upload.filename or f"file{len(items)}", data))
                kinds.append(upload.content_type)
            await note_of(request.scope.get("state")).inputs([(data, kind) for (_, data), kind in zip(items, kinds)])
            return items
        if content_type not in IMAGE_TYPES:
            raise HTTPError(415, f"unsupported media type {content_type or '(none)'}; send image/jpeg, "
                                 "image/png, application/dicom or multipart/form-data")
        body = await request.body()
        if len(body) > self.max_bytes:
            raise HTTPError(413, f"request body of {len(body):,} bytes is above the limit of {self.max_bytes:,}")
        if not body:
            raise HTTPError(400, "empty request body")
        await note_of(request.scope.get("state")).inputs([(body, content_type)])
        return [("body", body)]

    def _check_size(self, name: str, data: bytes | np.ndarray) -> None:
        error = self._size_error(name, data)
        if error is not None:
            raise error

    def _size_error(self, name: str, data: bytes | np.ndarray) -> HTTPError | None:
        if isinstance(data, bytes) and len(data) > self.max_bytes:
            return HTTPError(413, f"{name}: {len(data):,} bytes is above the limit of {self.max_bytes:,}")
        return None

    async def _decode(self, name: str, data: bytes) -> np.ndarray:
        """One image's model input, decoded outside the batch queue (/explain needs the pixels)."""
        self._check_size(name, data)
        image = await asyncio.to_thread(self.model.decode, data)
        if isinstance(image, ImageDecodeError):
            raise _undecodable(name, image)
        return image

    async def _classify(self, items: list[tuple[str, bytes | np.ndarray]], note: Note) -> list[Scored]:
        """Probabilities for named images (encoded bytes or decoded pixels), via the batch queue;
        the first image that cannot be classified answers for the request (its HTTPError)."""
        outcomes = await self._classify_each(items, note)
        for outcome in outcomes:
            if isinstance(outcome, HTTPError):
                raise outcome
        return outcomes

    async def _classify_each(self, items: list[tuple[str, bytes | np.ndarray]], note: Note) -> list[Scored | HTTPError]:
        """Each named image's Scored, or the HTTPError its image alone would be answered with: 413
        too large, 400 undecodable, 422 refused by the guard. One bad image never stops the others.
        ``note`` keeps the results and each image's own ``status`` for the request's audit line."""
        outcomes: list = [self._size_error(name, data) for name, data in items]
        todo = [index for index, outcome in enumerate(outcomes) if outcome is None]
        results = await asyncio.gather(*(self.predict_batch(items[index][1]) for index in todo))
        for index, result in zip(todo, results):
            outcomes[index] = result
        note.results(outcomes, self.model.threshold)
        for index, ((name, _), outcome) in enumerate(zip(items, outcomes)):
            if isinstance(outcome, ImageDecodeError):
                outcomes[index] = _undecodable(name, outcome)
            elif isinstance(outcome, Scored) and outcome.out_of_distribution and outcome.refused:
                outcomes[index] = self._refusal(name, outcome)
        for entry, outcome in zip(note.images, outcomes):  # empty when the request is not audited
            entry["status"] = outcome.status if isinstance(outcome, HTTPError) else 200
        return outcomes

    def _refusal(self, name: str, scored: Scored) -> HTTPError:
        """The 422 of an image the guard refuses; an artifact trained on synthetic images says
        that this is why a real X-ray is refused, and how to get a model that answers it."""
        hint = refusal_hint(self.model.metadata)
        return HTTPError(422, f"{name}: {NOT_AN_XRAY}; it was not classified" + (f". {hint}" if hint else ""),
                         out_of_distribution=True, **scored.guard_fields(), **self.model.warned())

    async def _guarded(self, work):
        """Run a prediction route's work: admission first (overload is a quick JSON 503, not a
        growing queue), then HTTPError -> its JSON answer."""
        if self._pending >= self.max_pending:
            work.close()
            return JSONResponse({"error": f"overloaded: {self._pending} requests in progress on this replica, "
                                          "retry shortly"}, status_code=503, headers={"Retry-After": "1"})
        self._pending += 1
        try:
            return await work
        except HTTPError as error:
            return json_error(error.status, error.message, **error.fields)
        finally:
            self._pending -= 1

    # -- routes

    @api.post("/predict")
    async def predict(self, request: Request):
        """One image as the raw body: its answer (200), or its error (400, 413, 422) for the
        request. Several as multipart ``file`` fields: each part's answer or error side by side,
        in the order sent (:func:`parts_answer`: 200 when any part was classified or flagged)."""
        async def work():
            items = await self._body_images(request)
            note = note_of(request.scope.get("state"))
            if not _is_multipart(request):  # one image: its answer, or its error for the request
                scored = await self._classify(items, note)
                return JSONResponse(self.model.answer(scored[0]))  # plain JSON types: skips FastAPI's encoder
            # Several: each part's own answer or error, side by side (parts_answer has the statuses).
            outcomes = await self._classify_each(items, note)
            return parts_answer([name for name, _ in items], outcomes, self.model.answer)

        return await self._guarded(work())

    @api.post("/explain")
    async def explain(self, request: Request, layers: bool = False):
        """Prediction and Grad-CAM of one image; ``?layers=true`` adds the grey X-ray and the
        heatmap as separate pictures (the review page's opacity control)."""
        async def work():
            items = await self._body_images(request)
            if len(items) != 1:
                raise HTTPError(400, "/explain takes one image")
            name, data = items[0]
            image = await self._decode(name, data)
            scored = (await self._classify([(name, image)], note_of(request.scope.get("state"))))[0]  # the guard first
            if scored.out_of_distribution:
                return self.model.answer(scored)
            result = await asyncio.to_thread(self.model.explain, data, image, layers)
            return {**self.model.answer(scored), **result}

        return await self._guarded(work())

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "model": self.model.name, "version": self.model.version}

    @api.get("/model")
    async def model_card(self):
        """The model card, with this replica's drift of recent probabilities (``drift``)."""
        return {**self.model.card(), "drift": self.drift()}

    # -- Open Inference Protocol (KServe v2)

    @api.get("/v2/health/live")
    async def live(self):
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready(self):
        return {"ready": True}

    @api.get("/v2/models/{name}")
    async def model_metadata(self, name: str):
        if name != self.model.name:
            return json_error(404, f"unknown model {name!r}; this server has {self.model.name!r}")
        return protocol.model_metadata(name, self.model.version, self.model.spec.shape, self.model.spec.normalize)

    @api.get("/v2/models/{name}/ready")
    async def model_ready(self, name: str):
        if name != self.model.name:
            return json_error(404, f"unknown model {name!r}")
        return {"name": name, "ready": True}

    @api.post("/v2/models/{name}/infer")
    async def infer(self, name: str, request: Request):
        async def work():
            if name != self.model.name:
                raise HTTPError(404, f"unknown model {name!r}; this server has {self.model.name!r}")
            body = await request.body()
            if len(body) > self.max_bytes:
                raise HTTPError(413, f"request body of {len(body):,} bytes is above the limit of {self.max_bytes:,}")
            # JSON, or the binary tensor extension: a JSON header, then the raw tensors.
            payload, binary = protocol.split_body(body, request.headers.get(protocol.HEADER_LENGTH))
            images = protocol.request_images(payload, self.model.spec.shape, binary)
            protocol.requested_outputs(payload)  # a wrong output name is a 400 before any work
            note = note_of(request.scope.get("state"))
            await note.inputs([(data, payload["inputs"][0].get("datatype")) for _, data in images])
            # A client's pixels still get the model's intensity normalisation (ServedModel.decode).
            scored = await self._classify([(item_name, ClientPixels(data) if isinstance(data, np.ndarray) else data)
                                           for item_name, data in images], note)
            content, headers = protocol.encode_response(protocol.infer_response(
                name, self.model.version, payload,
                probabilities=[None if s.out_of_distribution else s.probability for s in scored],
                labels=[s.label(self.model.threshold) for s in scored],
                parameters={"threshold": self.model.threshold, **self.model.warned(),
                            **({"site": self.model.calibration["site"]} if self.model.calibration["site"] else {})},
                ood_scores=[s.ood_score for s in scored] if self.model.guard else None,
            ), payload)
            return Response(content, headers=headers)

        return await self._guarded(work())


# ----------------------------------------------------------------------------- application


def default_artifact() -> str:
    return os.environ.get("PNEUMONIA_ARTIFACT", "registry")


def build_app(args: dict[str, Any] | None = None):
    """The Serve application. ``args`` (from `serve run serve_app:build_app key=value` or a serve
    config's `args`): artifact (path to a version folder or a registry; default
    $PNEUMONIA_ARTIFACT or ./registry, resolved to its latest version now, so every replica serves
    the same version), max_batch_size, batch_wait_timeout_s, max_bytes, max_pixels, max_pending,
    ood_policy (reject or flag: overrides the artifact's out-of-distribution policy);
    token_file (bearer tokens, :mod:`pneumonia.serving.auth`; default $PNEUMONIA_TOKEN_FILE, else
    $PNEUMONIA_TOKENS, else none: open), no_auth (true: open on purpose, whatever the environment
    says), audit_log (a path: each replica writes ``<stem>.<host>-<pid><suffix>`` beside it,
    :mod:`pneumonia.serving.audit`), audit_max_bytes (rotation size, default 100 MiB), audit_backups
    (rotated files kept per replica, default 10).

    The token file is read here, once: the replicas get each token's name and SHA-256, never the
    token (the arguments travel through Serve's controller)."""
    args = dict(args or {})
    artifact = str(resolve_artifact(str(Path(args.pop("artifact", default_artifact())).expanduser().resolve())))
    options = {
        "max_batch_size": int(args.pop("max_batch_size", 32)),
        "batch_wait_timeout_s": float(args.pop("batch_wait_timeout_s", 0.0)),
        "max_bytes": int(args.pop("max_bytes", DEFAULT_MAX_BYTES)),
        "max_pixels": int(args.pop("max_pixels", DEFAULT_MAX_PIXELS)),
        "max_pending": int(args.pop("max_pending", DEFAULT_MAX_PENDING)),
        "ood_policy": args.pop("ood_policy", None),
    }
    token_file, no_auth = args.pop("token_file", None), _flag(args.pop("no_auth", False))
    tokens = resolve_tokens(str(Path(token_file).expanduser()) if token_file else None, no_auth)
    if not tokens and not no_auth:
        logger.warning("no tokens (token_file, $PNEUMONIA_TOKEN_FILE or $PNEUMONIA_TOKENS): every route is "
                       "open to whoever reaches the service; say no_auth=true if that is intended")
    options["tokens"] = token_digests(tokens) or None
    audit_log = args.pop("audit_log", None)
    options["audit_log"] = str(Path(audit_log).expanduser().resolve()) if audit_log else None
    options["audit_max_bytes"] = int(args.pop("audit_max_bytes", DEFAULT_AUDIT_MAX_BYTES))
    options["audit_backups"] = int(args.pop("audit_backups", DEFAULT_BACKUPS))
    if options["audit_max_bytes"] < 1024 or options["audit_backups"] < 1:
        raise ValueError("audit_max_bytes must be at least 1024 and audit_backups at least 1")
    if options["ood_policy"] not in (None, *POLICIES):
        raise ValueError(f"ood_policy must be one of {', '.join(POLICIES)}, not {options['ood_policy']!r}")
    if args:
        raise ValueError(f"unknown application arguments: {', '.join(sorted(args))}")
    return Classifier.bind(artifact, **options)


def _flag(value: Any) -> bool:
    """A boolean app argument: true/false as YAML gives it, or as text from `serve run ... no_auth=true`."""
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"no_auth must be true or false, not {value!r}")
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)
