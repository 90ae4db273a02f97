"""One error shape for every answer of the application: ``{"error": "<message>", ...}``.

FastAPI's and Starlette's own errors (404, 405, 422, a malformed multipart body, an unexpected
exception) are reshaped by :func:`json_errors`, so that a client, a script or the review page reads
every refusal the same way.
"""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class HTTPError(Exception):
    """A client error with its status code; answered as {"error": message, **fields}."""

    def __init__(self, status: int, message: str, **fields: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.fields = fields


def json_error(status: int, message: str, headers: dict[str, str] | None = None, **fields: Any) -> JSONResponse:
    return JSONResponse({"error": message, **fields}, status_code=status, headers=headers)


def json_errors(app: FastAPI) -> FastAPI:
    """Answer the errors FastAPI and Starlette raise themselves in our shape, ``{"error": ...}``,
    instead of their ``{"detail": ...}``: an unknown path (404), a wrong method (405, with its
    ``Allow`` header), a request that fails validation (422), a malformed multipart body (400)
    and an unexpected exception (500, no internals in the message)."""

    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        method, path = request.method, request.url.path
        if error.status_code == 404 and error.detail == "Not Found":
            message = f"no such route: {method} {path}"
        elif error.status_code == 405:
            message = f"{method} is not allowed on {path}; use {(error.headers or {}).get('Allow', 'another method')}"
        else:
            message = str(error.detail)
        return json_error(error.status_code, message, error.headers)

    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, problem.get('loc', ())))}: {problem.get('msg', 'invalid')}"
                             for problem in error.errors())
        return json_error(422, f"invalid request: {problems or 'see the API'}")

    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return json_error(500, f"internal error ({type(error).__name__}); the service logs have the details")

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, unexpected)
    return app
