"""OpenAI Batch output and error lines."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel

# ---------------------------------------------------------------- output (OpenAI Batch output file format)


class ErrorBody(BaseModel):
    """``error`` of an output line."""

    code: str
    message: str


class ResponseEnvelope(BaseModel):
    """``response`` of an output line."""

    status_code: int
    request_id: str
    body: dict[str, Any]


class OutputLine(BaseModel):
    """One OpenAI Batch output (or error) line."""

    id: str
    custom_id: str
    response: ResponseEnvelope | None
    error: ErrorBody | None


def completion_body(
    kind: str,
    request_id: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """A ``chat.completion`` or ``text_completion`` object, as the OpenAI API returns it."""
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        return {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def request_id_for(row_id: int) -> str:
    """The public id of a request row (OpenAI's ``batch_req_...``)."""
    return f"batch_req_{row_id:012d}"


def output_line(
    *,
    row_id: int,
    custom_id: str,
    kind: str | None,
    ok: bool,
    status_code: int | None,
    model: str | None,
    created: float | None,
    text: str | None = None,
    finish_reason: str | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    error_code: str | None = None,
    error_message: str | None = None,
) -> dict[str, Any]:
    """Build one output line as a plain dict (the fast path; its shape is ``OutputLine``)."""
    rid = request_id_for(row_id)
    if ok:
        body = completion_body(
            kind or "chat",
            rid,
            (model or "").split("@", 1)[0],  # the name the user asked for; the variant is in --meta
            int(created or time.time()),
            text or "",
            finish_reason,
            prompt_tokens,
            completion_tokens,
        )
        return {
            "id": rid,
            "custom_id": custom_id,
            "response": {"status_code": status_code or 200, "request_id": rid, "body": body},
            "error": None,
        }
    code = error_code or "error"
    message = error_message or "request failed"
    response = None
    if status_code:
        err_type = "invalid_request_error" if status_code == 400 else "server_error"
        response = {
            "status_code": status_code,
            "request_id": rid,
            "body": {"error": {"message": message, "type": err_type, "code": code}},
        }
    return {"id": rid, "custom_id": custom_id, "response": response, "error": {"code": code, "message": message}}
