"""Input models of both JSONL forms, their constants, and the records a line becomes."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator

_orjson: Any
try:  # optional accelerator: ~4x faster loads/dumps on the submit hot path; the stdlib is the fallback
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None


CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
ROLES = ("system", "user", "assistant", "developer", "tool")
# OpenAI's sampling names plus the vLLM extensions that `vllm run-batch` files use (top_k, min_p, repetition_penalty).
SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
)
MAX_TOKENS_LIMIT = 1_000_000
BODY_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call")


class Message(BaseModel):
    """One chat message; content is text or a list of text parts."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(v, list):
            for part in v:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError('only text content parts ({"type": "text", "text": "..."}) are supported')
        return v

    def text(self) -> str:
        """The message content as plain text (text parts joined)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p["text"]) for p in self.content)


class Sampling(BaseModel):
    """Sampling parameters, OpenAI names, checked against OpenAI's ranges."""

    model_config = ConfigDict(extra="ignore")
    # Strict types: JSON true is not 1 token and "0.5" is not a temperature (OpenAI rejects both too).
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, gt=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=-1)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**64)
    presence_penalty: StrictFloat | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: StrictFloat | None = Field(default=None, ge=-2, le=2)
    n: StrictInt | None = Field(default=None, ge=1, le=1)
    min_p: StrictFloat | None = Field(default=None, ge=0, le=1)
    repetition_penalty: StrictFloat | None = Field(default=None, gt=0, le=10)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def params(self) -> dict[str, Any]:
        """The non-empty sampling parameters, with ``max_completion_tokens`` folded into ``max_tokens``."""
        out = {k: getattr(self, k) for k in SAMPLING_FIELDS if getattr(self, k) is not None}
        if "max_tokens" not in out and self.max_completion_tokens is not None:
            out["max_tokens"] = self.max_completion_tokens
        return out


class ChatBody(Sampling):
    """``body`` of a ``/v1/chat/completions`` line."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)


class CompletionBody(Sampling):
    """``body`` of a ``/v1/completions`` line."""

    model: str | None = None
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per line (a string)")
        return v


class OpenAILine(BaseModel):
    """An OpenAI Batch API input line."""

    model_config = ConfigDict(extra="forbid")
    custom_id: str | None = Field(default=None, min_length=1, max_length=512)
    method: Literal["POST"] = "POST"
    url: str
    body: dict[str, Any]


class ShortLine(Sampling):
    """The short form: ``{"id": ..., "prompt" | "messages": ..., "model"?, sampling...}``."""

    model_config = ConfigDict(extra="forbid")
    id: Annotated[StrictStr, Field(min_length=1, max_length=512)] | StrictInt | None = None
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1)


class ParsedRequest(BaseModel):
    """A valid input line, normalized."""

    line_no: int
    custom_id: str
    model: str
    kind: Literal["chat", "completion"]
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    def body_json(self) -> str:
        """What the store keeps for the worker: prompt or messages plus sampling params."""
        return dump_body(self.messages, self.prompt, self.params)


def _dump_json_std(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


if _orjson is not None:
    _orjson_dumps = _orjson.dumps

    def _dump_json(obj: Any) -> str:
        try:
            return _orjson_dumps(obj).decode("utf-8")
        except TypeError:  # e.g. an integer beyond 64 bits (never in a validated body); the stdlib handles it
            return _dump_json_std(obj)

else:  # pragma: no cover - depends on the environment
    _dump_json = _dump_json_std


def dump_body(messages: list[dict[str, Any]] | None, prompt: str | None, params: dict[str, Any]) -> str:
    """The stored ``body`` JSON text of a request (UTF-8 text, not ``\\u`` escapes; read back with ``json.loads``)."""
    return _dump_json({"messages": messages, "prompt": prompt, "params": params})


class LineError(BaseModel):
    """An input line that cannot run; becomes an error record (status 400) in the output."""

    line_no: int
    custom_id: str
    code: str
    message: str
    model: str | None = None


class InputLine(BaseModel):
    """What the reader yields for one non-blank line: raw bytes or a reason they could not be read."""

    line_no: int
    text: str | None = None
    error: LineError | None = None
