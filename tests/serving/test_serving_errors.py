"""The one error shape, {"error": ...}, for what FastAPI and Starlette answer themselves (no Ray).

The same handlers serve the Classifier over HTTP (tests/serving/test_serving.py checks 404 and 405 there);
here a small app with the routes that provoke the rest (a validation error, an unexpected
exception) is called in-process through ASGI.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, HTTPException, Request

from pneumonia.serving import json_errors


def app() -> FastAPI:
    application = json_errors(FastAPI())

    @application.get("/items/{number}")
    async def item(number: int):
        return {"number": number}

    @application.post("/form")
    async def form(request: Request):
        return {"fields": len(await request.form())}

    @application.get("/teapot")
    async def teapot():
        raise HTTPException(418, "short and stout", headers={"X-Why": "tea"})

    @application.get("/boom")
    async def boom():
        raise RuntimeError("secret internals")

    return application


def call(method: str, path: str, body: bytes = b"", content_type: str | None = None):
    """(status, headers, JSON body) of one request through the ASGI app."""
    messages: list[dict] = []
    path, _, query = path.partition("?")

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        messages.append(message)

    headers = [(b"content-type", content_type.encode())] if content_type else []
    headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    try:
        asyncio.run(app()(scope, receive, send))
    except RuntimeError:  # Starlette answers a 500 and then re-raises for the server to log
        pass
    start = next(message for message in messages if message["type"] == "http.response.start")
    text = b"".join(message.get("body", b"") for message in messages if message["type"] == "http.response.body")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, json.loads(text)


@pytest.mark.parametrize("method, path, body, content_type, status, message", [
    ("GET", "/nope", b"", None, 404, "no such route: GET /nope"),
    ("POST", "/items/3", b"", None, 405, "POST is not allowed on /items/3; use GET"),
    ("GET", "/items/three", b"", None, 422, "invalid request: path.number: "),
    ("GET", "/teapot", b"", None, 418, "short and stout"),
    ("GET", "/boom", b"", None, 500, "internal error (RuntimeError)"),
    ("POST", "/form", b"--b\r\n", "multipart/form-data", 400, "Missing boundary"),
])
def test_errors_fastapi_and_starlette_raise_answer_in_our_shape(method, path, body, content_type, status, message):
    got, headers, answer = call(method, path, body, content_type)
    assert got == status and headers["content-type"] == "application/json", answer
    assert list(answer) == ["error"] and answer["error"].startswith(message), answer
    assert "secret" not in answer["error"]  # a 500 names the exception type, not its text


def test_headers_of_the_error_are_kept():
    assert call("POST", "/items/3")[1]["allow"] == "GET"  # 405 says what is allowed
    assert call("GET", "/teapot")[1]["x-why"] == "tea"


@pytest.mark.parametrize("statuses, expected", [
    ([400, 400], 400),  # all undecodable
    ([413, 413], 413),  # all too large
    ([422, 422], 422),  # all refused by the guard
    ([400, 422], 422),  # read, and not chest X-rays
    ([413, 400], 400),
    ([400, 200, 422], 200),  # one classified: the request succeeded, each part says what became of it
])
def test_a_multipart_answers_status_follows_its_parts(statuses, expected):
    """pneumonia.serving.app.parts_answer's rules (issue 24), with stand-in outcomes."""
    from types import SimpleNamespace

    from pneumonia.serving.app import parts_answer
    from pneumonia.serving.errors import HTTPError

    outcomes = [SimpleNamespace(out_of_distribution=False) if status == 200 else
                HTTPError(status, f"f{index}: reason {status}", **({"out_of_distribution": True} if status == 422 else {}))
                for index, status in enumerate(statuses)]
    response = parts_answer([f"f{index}" for index in range(len(statuses))], outcomes, lambda scored: {"label": "NORMAL"})
    body = json.loads(response.body)
    assert response.status_code == expected
    assert [(part["index"], part["file"], part["status"]) for part in body["predictions"]] == [
        (index, f"f{index}", status) for index, status in enumerate(statuses)]
    assert ("error" in body) == (expected != 200)
    if expected != 200:
        assert body["error"].startswith(f"none of the {len(statuses)} files could be classified: f0: reason ")
