"""What every request passes before a route sees it: its request id, its token, its audit line.

One ASGI middleware (:class:`Gate`) on the application, so that nothing can forget it: FastAPI's
own answers (an unknown route, a request that fails validation) are behind it too.

- **Request id**: the request's ``X-Request-ID`` as Serve set it: a uuid4 when the client sent
  none, else the client's own (Serve keeps it, and so may a caller that correlates its logs with
  ours) when it is 1-128 letters, digits and ``.-_:``; anything else is a 400, logged with a null
  id. Serve returns the id as the answer's ``X-Request-ID``, on every answer; run without Serve
  (tests), the gate makes a uuid4 and returns it itself.
- **Token**: every route but :data:`OPEN_ROUTES` (liveness and readiness, which probes call
  without credentials, and the review page's static shell, which asks for the token itself)
  needs ``Authorization: Bearer <token>`` when tokens are configured; a missing or wrong one is
  a JSON 401 with ``WWW-Authenticate: Bearer``, counted by reason ("missing", "invalid").
- **Audit**: a request on a prediction route (:data:`PREDICTION_ROUTE`) gets one line once it is
  answered, whatever the answer (a 401, a 4xx, a 422 out-of-distribution refusal, a 503, a 500);
  the route adds what it learnt of the images to the request's :class:`Note`.

The gate gets a replica's settings (:class:`GateSettings`) from a callable, because Serve copies
the application when the deployment is declared, before any replica exists.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pneumonia.serving.audit import HASH_IN_THREAD_BYTES, AuditLog, input_fields, result_fields, utc_now
from pneumonia.serving.auth import Authenticator
from pneumonia.serving.errors import json_error

OPEN_ROUTES = frozenset({"/healthz", "/", "/v2/health/live", "/v2/health/ready"})
OPEN_PREFIXES = ("/static/",)
PREDICTION_ROUTE = re.compile(r"^/(predict|explain|v2/models/[^/]+/infer)/?$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
REQUEST_ID_HEADER = "x-request-id"
UNAUTHORIZED = {"missing": "this route needs a token: send Authorization: Bearer <token>",
                "invalid": "the token is not valid (Authorization: Bearer <token>)"}
NOTE_KEY = "pneumonia_audit_note"


@dataclass
class GateSettings:
    """One replica's gate: who may call (None: anyone), where audit lines go (None: nowhere),
    what every line says of the model, and what counts a refused token."""

    authenticator: Authenticator | None = None
    audit: AuditLog | None = None
    model: dict[str, Any] = field(default_factory=dict)
    on_unauthorized: Callable[[str], None] = lambda reason: None


class Note:
    """What a prediction route learnt of its request's images, for the audit line: one entry per
    input (hash, size, content type), then the model's answer for each scored one."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.images: list[dict[str, Any]] = []

    async def inputs(self, items: list[tuple[Any, str | None]]) -> None:
        """(data, content type) of each input, in order (large ones hashed off the event loop)."""
        if not self.enabled:
            return
        if sum(getattr(data, "nbytes", None) or len(data) for data, _ in items) >= HASH_IN_THREAD_BYTES:
            fields = await asyncio.to_thread(lambda: [input_fields(data, kind) for data, kind in items])
        else:
            fields = [input_fields(data, kind) for data, kind in items]
        self.images = fields

    def results(self, results: list[Any], threshold: float) -> None:
        """The scored results of the inputs, in the same order (an undecodable one: no score fields;
        the route adds each image's own ``status``)."""
        if not self.enabled:
            return
        for entry, result in zip(self.images, results):
            if hasattr(result, "probability"):
                entry.update(result_fields(result, threshold))


def note_of(scope_state: Any) -> Note:
    """The request's Note (a disabled one when no gate made one)."""
    note = scope_state.get(NOTE_KEY) if isinstance(scope_state, dict) else None
    return note if isinstance(note, Note) else Note(enabled=False)


def route_path(scope: Scope) -> str:
    """The request's path under the application's route prefix (Serve's ``root_path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


class Gate:
    """The ASGI middleware of the module docstring; ``settings()`` returns the replica's settings."""

    def __init__(self, app: ASGIApp, settings: Callable[[], GateSettings]):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, arrived = time.perf_counter(), utc_now()
        settings = self.settings()
        path = route_path(scope)
        headers = Headers(scope=scope)
        request_id: str | None = headers.get(REQUEST_ID_HEADER)
        echo = False
        if request_id is None:
            request_id, echo = str(uuid.uuid4()), True
            MutableHeaders(scope=scope).append(REQUEST_ID_HEADER, request_id)
        audited = settings.audit is not None and PREDICTION_ROUTE.match(path) is not None
        note = Note(enabled=audited)
        scope.setdefault("state", {})[NOTE_KEY] = note
        status = 500  # unless an answer starts

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if echo:
                    MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        identity = None
        try:
            if not REQUEST_ID.match(request_id):
                request_id = None  # logged as null: Serve returns the malformed id as it came
                await json_error(400, "X-Request-ID must be 1-128 letters, digits, '.', '_', ':' or '-'")(
                    scope, receive, answer)
                return
            if settings.authenticator is not None and not _open(path):
                identity, reason = settings.authenticator.identify(headers.get("authorization"))
                if identity is None:
                    settings.on_unauthorized(reason)
                    await json_error(401, UNAUTHORIZED[reason], headers={"WWW-Authenticate": "Bearer"})(
                        scope, receive, answer)
                    return
            await self.app(scope, receive, answer)
        finally:
            if audited:
                settings.audit.write({
                    "time": arrived, "request_id": request_id, "client": (scope.get("client") or [None])[0],
                    "forwarded_for": headers.get("x-forwarded-for", "")[:256] or None, "token": identity,
                    "method": scope.get("method"), "route": path, "status": status, **settings.model,
                    "images": note.images, "latency_ms": round((time.perf_counter() - started) * 1000, 2)})


def _open(path: str) -> bool:
    return path in OPEN_ROUTES or path.startswith(OPEN_PREFIXES)
