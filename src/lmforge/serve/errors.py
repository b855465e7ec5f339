"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure.

`OpenAIError` is raised by the routes; the handlers installed by `install_error_handlers` turn
it, `LmforgeError` (bad input: 400), FastAPI's validation errors (400 naming the field),
Starlette's HTTP errors (unknown route 404, wrong method 405) and anything unexpected (500,
logged, with no internals in the message) into that shape. `ClientDisconnected` (499) ends a
request whose client went away; its answer is never read, but its bill says "cancelled".
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}


class ClientDisconnected(OpenAIError):
    """The client went away before its response was ready (nginx's 499; nobody reads it)."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the request", type_="client_closed_request")


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(error: OpenAIError) -> JSONResponse:
    body = error_body(error.message, error.type, error.param, error.code)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def _param_of(error: LmforgeError) -> str | None:
    """The field a SamplingParams error names ("temperature must be …" → "temperature",
    "logit_bias: …" → "logit_bias")."""
    first = str(error).split(" ", 1)[0].removesuffix(":")
    return first if first.isidentifier() else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(LmforgeError)
    async def _lmforge(_: Request, exc: LmforgeError) -> JSONResponse:
        return error_response(OpenAIError(400, str(exc), param=_param_of(exc)))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(OpenAIError(400, "the request body is not valid JSON"))
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        message = f"{where}: {first.get('msg', 'invalid value')}"
        return error_response(OpenAIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = "no such route"
        status = 400 if exc.status_code == 422 else exc.status_code
        return error_response(OpenAIError(status, message, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(OpenAIError(500, "internal server error"))
