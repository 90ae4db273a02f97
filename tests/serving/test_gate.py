"""The gate in front of every route: tokens, request ids and audit lines, called in-process
through ASGI (no Ray: a small app with the gate and stand-in routes; tests/serving/test_local_service.py
checks the real service end to end)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pneumonia.serving import json_errors
from pneumonia.serving.audit import AuditLog
from pneumonia.serving.auth import Authenticator, parse_tokens, token_digests
from pneumonia.serving.gate import Gate, GateSettings, note_of

TOKEN = "ward-7-" + "s3cr3t" * 4
OTHER = "radiology-" + "x" * 20
MODEL = {"model": "pneumonia-cnn", "version": "v0003", "site": "st-elsewhere", "threshold": 0.4}
XRAY = b"\x89PNG pretend x-ray bytes"


class Scored(SimpleNamespace):
    def label(self, threshold):
        return None if self.out_of_distribution else ("PNEUMONIA" if self.probability >= threshold else "NORMAL")


def make_app(settings: GateSettings) -> FastAPI:
    app = json_errors(FastAPI())
    app.add_middleware(Gate, settings=lambda: settings)

    @app.post("/predict")
    async def predict(request: Request):
        note = note_of(request.scope.get("state"))
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            uploads = (await request.form()).getlist("file")
            items = [(await upload.read(), upload.content_type) for upload in uploads]
        else:
            items = [(await request.body(), content_type)]
        await note.inputs(items)
        if items[0][0] == b"boom":
            raise RuntimeError("unexpected")
        outside = items[0][0] == b"a holiday photo"
        scored = [Scored(probability=0.7, ood_score=99.0 if outside else 1.5, out_of_distribution=outside)
                  for _ in items]
        note.results(scored, MODEL["threshold"])
        if outside:
            return JSONResponse({"error": "does not look like a chest X-ray"}, status_code=422)
        return {"label": scored[0].label(MODEL["threshold"])}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/model")
    async def model():
        return MODEL

    @app.get("/static/page.js")
    async def script():
        return {"script": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": True}

    return app


def call(app, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
         root_path: str = ""):
    """(status, headers, JSON body) of one request through the ASGI app."""
    messages: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        messages.append(message)

    raw = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    raw.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": root_path + path, "raw_path": (root_path + path).encode(), "query_string": b"",
             "root_path": root_path, "headers": raw, "client": ("10.0.0.9", 5151), "server": ("127.0.0.1", 80)}
    try:
        asyncio.run(app(scope, receive, send))
    except RuntimeError:  # Starlette answers a 500 and then re-raises for the server to log
        pass
    start = next(message for message in messages if message["type"] == "http.response.start")
    text = b"".join(message.get("body", b"") for message in messages if message["type"] == "http.response.body")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, json.loads(text)


@pytest.fixture
def secured(tmp_path):
    refused: list[str] = []
    audit = AuditLog(tmp_path / "audit.jsonl")
    settings = GateSettings(Authenticator(token_digests(parse_tokens(f"ward-7:{TOKEN}\n{OTHER}", "t"))), audit,
                            MODEL, refused.append)
    yield SimpleNamespace(app=make_app(settings), audit=audit, refused=refused, path=tmp_path / "audit.jsonl")
    audit.close()


def lines(service) -> list[dict]:
    assert service.audit.flush()
    return [json.loads(line) for line in service.path.read_text().splitlines()] if service.path.exists() else []


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_no_token_or_a_wrong_one_is_a_json_401_and_counted(secured):
    for headers in ({}, bearer(TOKEN + "x"), {"Authorization": TOKEN}):
        status, answer_headers, answer = call(secured.app, "POST", "/predict", XRAY, {"Content-Type": "image/png", **headers})
        assert status == 401 and list(answer) == ["error"] and "Bearer" in answer["error"], answer
        assert answer_headers["www-authenticate"] == "Bearer"
    assert secured.refused == ["missing", "invalid", "missing"]
    assert call(secured.app, "GET", "/model")[0] == 401


def test_the_right_token_passes_and_open_routes_need_none(secured):
    status, _, answer = call(secured.app, "POST", "/predict", XRAY, {"Content-Type": "image/png", **bearer(TOKEN)})
    assert status == 200 and answer == {"label": "PNEUMONIA"}
    assert call(secured.app, "GET", "/model", headers=bearer(OTHER))[0] == 200
    for path in ("/healthz", "/static/page.js", "/v2/health/ready"):
        assert call(secured.app, "GET", path)[0] == 200, path
    assert secured.refused == []


def test_under_a_route_prefix_the_same_routes_are_open_or_closed(secured):
    assert call(secured.app, "GET", "/healthz", root_path="/ops")[0] == 200
    assert call(secured.app, "GET", "/model", root_path="/ops")[0] == 401


def test_every_answer_has_a_request_id_and_the_audit_line_has_the_same(secured):
    _, refused_headers, _ = call(secured.app, "POST", "/predict", XRAY, {"Content-Type": "image/png"})
    _, ok_headers, _ = call(secured.app, "POST", "/predict", XRAY, {"Content-Type": "image/png", **bearer(TOKEN)})
    _, open_headers, _ = call(secured.app, "GET", "/healthz")
    assert len({refused_headers["x-request-id"], ok_headers["x-request-id"], open_headers["x-request-id"]}) == 3
    refused, ok = lines(secured)  # /healthz is not a prediction route: no line
    assert refused["request_id"] == refused_headers["x-request-id"] and refused["status"] == 401
    assert refused["token"] is None and refused["images"] == []
    assert ok["request_id"] == ok_headers["x-request-id"] and ok["status"] == 200
    assert ok["token"] == "ward-7" and ok["client"] == "10.0.0.9" and ok["route"] == "/predict"
    assert {key: ok[key] for key in MODEL} == MODEL
    assert ok["images"] == [{"sha256": hashlib.sha256(XRAY).hexdigest(), "bytes": len(XRAY), "content_type": "image/png",
                             "probability": 0.7, "label": "PNEUMONIA", "ood_score": 1.5, "out_of_distribution": False}]
    assert ok["time"].endswith("Z") and ok["latency_ms"] >= 0


def test_a_clients_own_request_id_is_kept_and_a_malformed_one_refused(secured):
    headers = {"Content-Type": "image/png", **bearer(TOKEN)}
    assert call(secured.app, "POST", "/predict", XRAY, {**headers, "X-Request-ID": "pacs-2024:0001"})[0] == 200
    status, _, answer = call(secured.app, "POST", "/predict", XRAY, {**headers, "X-Request-ID": "no spaces\"{}"})
    assert status == 400 and "X-Request-ID" in answer["error"]
    kept, malformed = lines(secured)
    assert kept["request_id"] == "pacs-2024:0001" and malformed["request_id"] is None and malformed["status"] == 400


def test_refusals_and_failures_get_their_line_and_nothing_names_the_token_or_the_file(secured):
    boundary = "b0undary"
    multipart = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
        + data + b"\r\n" for name, data in (("Doe_Jane_1970-01-01.jpeg", XRAY), ("second.jpeg", XRAY[::-1]))
    ) + f"--{boundary}--\r\n".encode()
    headers = bearer(TOKEN)
    assert call(secured.app, "POST", "/predict", multipart,
                {"Content-Type": f"multipart/form-data; boundary={boundary}", **headers})[0] == 200
    assert call(secured.app, "POST", "/predict", b"a holiday photo", {"Content-Type": "image/jpeg", **headers})[0] == 422
    assert call(secured.app, "POST", "/predict", b"boom", {"Content-Type": "image/jpeg", **headers})[0] == 500
    assert call(secured.app, "POST", "/predict", XRAY, {"Content-Type": "image/png", **bearer(OTHER)})[0] == 200
    text = secured.path.read_text() if lines(secured) else ""
    multi, outside, boom, other = (json.loads(line) for line in text.splitlines())
    assert [image["content_type"] for image in multi["images"]] == ["image/jpeg", "image/jpeg"]
    assert [image["bytes"] for image in multi["images"]] == [len(XRAY)] * 2
    assert outside["status"] == 422 and outside["images"][0]["out_of_distribution"] is True
    assert outside["images"][0]["label"] is None
    assert boom["status"] == 500 and "probability" not in boom["images"][0]
    assert other["token"] == parse_tokens(OTHER, "t")[0].name and other["token"].startswith("sha256:")
    for secret in (TOKEN, OTHER, "Doe_Jane", "second.jpeg", "holiday", "pretend"):
        assert secret not in text


def test_an_audit_log_that_cannot_be_written_never_fails_a_request(tmp_path):
    (tmp_path / "a_file").write_text("in the way")
    audit = AuditLog(tmp_path / "a_file" / "audit.jsonl")
    app = make_app(GateSettings(None, audit, MODEL))
    try:
        for _ in range(3):
            assert call(app, "POST", "/predict", XRAY, {"Content-Type": "image/png"})[0] == 200
        assert audit.flush() and audit.errors == 3
    finally:
        audit.close()


def test_without_tokens_every_route_is_open_and_the_line_says_no_token(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    app = make_app(GateSettings(None, audit, MODEL))
    try:
        assert call(app, "POST", "/predict", XRAY, {"Content-Type": "image/png"})[0] == 200
        assert call(app, "GET", "/model")[0] == 200
        assert audit.flush()
    finally:
        audit.close()
    (line,) = (json.loads(text) for text in (tmp_path / "audit.jsonl").read_text().splitlines())
    assert line["token"] is None and line["status"] == 200
