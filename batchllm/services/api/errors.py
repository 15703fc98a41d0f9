"""OpenAI's error shape for every 4xx/5xx: ``{"error": {"message", "type", "param", "code"}}``.

Handlers map batchllm's errors (``NotFound`` → 404, ``InputError`` → 400, ``ServiceUnavailable`` → 503), FastAPI's
validation errors (422 → 400, as OpenAI answers a malformed body), Starlette's own errors (unknown route, wrong
method) and anything unexpected (500, details only in the server's log) to that shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from batchllm.errors import BatchLLMError, InputError, NotFound, ServiceUnavailable

log = logging.getLogger("batchllm.api")

INVALID_REQUEST = "invalid_request_error"


class ApiError(Exception):
    """An error answered in OpenAI's shape.

    Args:
        status: the HTTP status.
        message: what went wrong, in one line.
        type: OpenAI's error type.
        param: the parameter at fault.
        code: a short machine-readable code.
        headers: extra response headers (``WWW-Authenticate`` on 401).
    """

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(status: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI error response."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    """A 400 about one parameter."""
    return ApiError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None) -> ApiError:
    """A 404 (also what another key's ids answer)."""
    return ApiError(404, message, param=param)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


async def _batchllm_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BatchLLMError)
    if isinstance(exc, NotFound):
        return error_response(404, exc.message)
    if isinstance(exc, ServiceUnavailable):
        log.warning("%s", exc.message)
        return error_response(503, f"the {exc.service} is unavailable; try again shortly", "server_error",
                              code="service_unavailable")
    if isinstance(exc, InputError):
        return error_response(400, exc.message)
    log.error("request failed: %s", exc.message)
    return error_response(500, exc.message, "server_error")


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    param = _param(tuple(first.get("loc") or ()))
    kind = str(first.get("type", ""))
    if kind == "json_invalid":
        message = "We could not parse the JSON body of your request: it is not valid JSON."
        return error_response(400, message, code=None)
    if kind == "missing":
        return error_response(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    return error_response(400, f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param=param,
                          code="invalid_value")


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    messages = {404: "Not found: no such route; this server speaks OpenAI's /v1/files, /v1/batches and /v1/models.",
                405: "Method not allowed on this route."}
    message = messages.get(exc.status_code, str(exc.detail))
    kind = INVALID_REQUEST if exc.status_code < 500 else "server_error"
    return error_response(exc.status_code, message, kind, headers=getattr(exc, "headers", None))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error: %s: %s", type(exc).__name__, str(exc)[:300], exc_info=exc)
    return error_response(500, "The server had an error while processing your request.", "server_error")


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(BatchLLMError, _batchllm_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
