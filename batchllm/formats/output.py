"""OpenAI Batch output lines (the output and error files) and OpenAI's error body, as msgspec Structs.

The response body a worker stored (a chat.completion, a text_completion, an embedding list, or an error
object) is already JSON; it is spliced into the line as ``msgspec.Raw``, never parsed again.
"""

from typing import Any

import msgspec


class BatchError(msgspec.Struct, gc=False):
    """``error`` of a line that got no HTTP response (the batch expired or was cancelled first)."""

    code: str
    message: str


class Response(msgspec.Struct, gc=False):
    """``response`` of a line that ran: the HTTP status and the endpoint's response body."""

    status_code: int
    request_id: str
    body: msgspec.Raw


class OutputLine(msgspec.Struct, omit_defaults=True, gc=False):
    """One line of a batch's output or error file (``meta`` only with ``results --meta``)."""

    id: str
    custom_id: str
    response: Response | None
    error: BatchError | None
    meta: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class ErrorDetail(msgspec.Struct):
    """OpenAI's error object: what went wrong, its type, the parameter at fault and a code."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    """The body of a 4xx/5xx response: ``{"error": {...}}``."""

    error: ErrorDetail


_encode = msgspec.json.Encoder().encode
_NULL = msgspec.Raw(b"null")


def request_id_for(row_id: int) -> str:
    """The public id of a request row, OpenAI's ``batch_req_...``.

    Args:
        row_id: the request's store row id.
    """
    return f"batch_req_{row_id:012d}"


def output_line(
    public_id: str,
    custom_id: str,
    status_code: int | None,
    body: bytes | str | None,
    error: tuple[str, str] | None,
    meta: dict[str, Any] | None = None,
) -> bytes:
    """One output or error file line as JSON, without the newline.

    Args:
        public_id: ``request_id_for(row_id)``; it is the line's ``id`` and the response's ``request_id``.
        custom_id: the line's id from the input.
        status_code: the HTTP status of the response (200, or 4xx/5xx); None when the request never ran.
        body: the stored response body JSON (spliced in raw, so it must be valid JSON), with ``status_code``.
        error: ``(code, message)`` of a request that never ran (e.g. ``batch_expired``), with no status code.
        meta: ``results --meta``'s ``{"line", "worker", "device", "model", "latency_ms"}``, appended as ``meta``.
    """
    response = None
    if status_code is not None:
        response = Response(status_code, public_id, _NULL if body is None else msgspec.Raw(body))
    line = OutputLine(public_id, custom_id, response, None if error is None else BatchError(*error))
    if meta is not None:
        line.meta = meta
    return _encode(line)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> bytes:
    """OpenAI's error response body ``{"error": {"message", "type", "param", "code"}}`` as JSON.

    For example the 400 of a line rejected at submit: type ``invalid_request_error``, code the line's error
    code (``invalid_json``, ``model_not_found``, ...), param the field at fault.

    Args:
        message: what went wrong, in one line.
        type: OpenAI's error type (``invalid_request_error``, ``server_error``, ...).
        param: the parameter at fault, a dotted path, or None.
        code: a short machine-readable code, or None.
    """
    return _encode(ErrorBody(ErrorDetail(message, type, param, code)))
