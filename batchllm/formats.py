"""JSONL in and out: both input forms (OpenAI Batch and short), validation, and OpenAI Batch output lines.

Input is streamed line by line with line numbers; every line becomes either a ``ParsedRequest`` or a
``LineError`` so that nothing is silently dropped. Output lines follow the OpenAI Batch API file format.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable, Iterator
from typing import IO, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator

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
    "max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
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


_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def iter_lines(stream: IO[bytes], max_line_bytes: int) -> Iterator[InputLine]:
    """Stream a JSONL file line by line, keeping 1-based line numbers; memory stays flat.

    Strips a UTF-8 BOM (at the start of any line, so concatenated files work) and CRLF endings,
    yields blank lines as ``InputLine`` with neither text nor error (the caller counts them), and
    turns undecodable, binary (NUL bytes, UTF-16) or oversized lines into errors.

    Args:
        stream: a binary file object.
        max_line_bytes: longer lines are not parsed (and not held in memory beyond this size).
    """
    for line_no, text, error in iter_raw_lines(stream, max_line_bytes):
        if error is not None:
            yield InputLine(line_no=line_no, error=error)
        else:
            yield InputLine(line_no=line_no, text=text)


def iter_raw_lines(stream: IO[bytes], max_line_bytes: int) -> Iterator[tuple[int, str | None, LineError | None]]:
    """``iter_lines`` as plain ``(line_no, text, error)`` tuples: the same rules without a model per line.

    The submit hot path uses this (a pydantic object per line costs more than reading the line).
    A blank line is ``(n, None, None)``.
    """
    line_no = 0
    readline = stream.readline
    limit = max_line_bytes + 1
    while True:
        raw = readline(limit)
        if not raw:
            return
        line_no += 1
        if raw.startswith(_BOM):
            raw = raw[3:]
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            size = len(raw)
            while True:  # discard the rest of the oversized line without keeping it
                more = readline(1 << 20)
                size += len(more)
                if not more or more.endswith(b"\n"):
                    break
            msg = f"line is {size / 1e6:.1f} MB, over the {max_line_bytes / 1e6:.1f} MB limit (BATCHLLM_MAX_LINE_BYTES)"
            yield line_no, None, _read_error(line_no, "line_too_long", msg)
            continue
        stripped = raw.strip()
        if not stripped:
            yield line_no, None, None  # blank: text None, error None
            continue
        if stripped.startswith(_UTF16_BOMS):
            msg = "the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8"
            yield line_no, None, _read_error(line_no, "invalid_encoding", msg)
            continue
        nul = stripped.find(b"\x00")
        if nul >= 0:  # never valid in JSON text; the sign of a binary or UTF-16 file
            msg = f"NUL byte (0x00) at column {nul + 1}: binary or UTF-16 data, not JSON text; save the file as UTF-8 JSONL"
            yield line_no, None, _read_error(line_no, "invalid_encoding", msg)
            continue
        try:
            text = stripped.decode("utf-8")
        except UnicodeDecodeError as e:
            msg = f"not valid UTF-8 (byte 0x{stripped[e.start]:02x} at column {e.start + 1}); save the file as UTF-8"
            yield line_no, None, _read_error(line_no, "invalid_encoding", msg)
            continue
        yield line_no, text, None


def _read_error(line_no: int, code: str, message: str) -> LineError:
    """The error of a line that could not be read as text (its id is ``line-<n>``)."""
    return LineError(line_no=line_no, custom_id=f"line-{line_no}", code=code, message=message)


_TYPE_WORDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _printable(value: Any) -> str:
    """JSON-escaped text with any remaining unprintable character (bidi overrides, line separators) escaped too."""
    escaped = json.dumps(value, ensure_ascii=False, default=str)
    if escaped.isprintable():
        return escaped
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}" for c in escaped)


def _show(value: str, limit: int = 60) -> str:
    """Quote user text for a one-line message: escaped (no raw newlines or control chars) and shortened."""
    inner = _printable(value)[1:-1]
    return f"'{inner[:limit]}…'" if len(inner) > limit else f"'{inner}'"


def _got(value: Any) -> str:
    """`` (got ...)`` for a message: the value itself when short, else its JSON type."""
    if isinstance(value, dict):
        return " (got an object)"
    if isinstance(value, list):
        return " (got a list)"
    shown = _printable(value)
    return f" (got {shown[:60]}…)" if len(shown) > 60 else f" (got {shown})"


def _clean_loc(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a dotted field path (``messages.0.content``)."""
    # Union members add tags such as 'str', 'list[str]' or 'constrained-str' to the location; drop them.
    parts = [
        str(p) for p in loc if isinstance(p, int) or not ("[" in p or "-" in p or p in ("str", "int", "float", "bool", "none"))
    ]
    return ".".join(parts)


def _pydantic_msg(e: ValidationError, prefix: str = "") -> str:
    """The first problem of a validation error as one line: ``field.path: what is wrong (got value)``."""
    errors = e.errors(include_url=False)
    loc = _clean_loc(errors[0]["loc"])
    same = [err for err in errors if _clean_loc(err["loc"]) == loc]
    deeper = [err for err in errors if _clean_loc(err["loc"]).startswith(f"{loc}.")]
    if deeper and all(err["type"] in _TYPE_WORDS for err in same):
        # One union member took the value's type (e.g. a list) and failed inside it: that is the real problem.
        loc = _clean_loc(deeper[0]["loc"])
        same = [err for err in errors if _clean_loc(err["loc"]) == loc]
    where = f"{prefix}{loc}" if loc else prefix.rstrip(".")
    # A union reports one error per member: prefer a constraint error, else list the types it accepts.
    specific = [err for err in same if err["type"] not in _TYPE_WORDS]
    err = specific[0] if specific else same[0]
    if err["type"] == "extra_forbidden":
        return f"unknown field '{where}'"
    if err["type"] == "missing":
        return f"missing field '{where}'"
    if err["type"] in _TYPE_WORDS:
        words = list(dict.fromkeys(_TYPE_WORDS[x["type"]] for x in same))
        msg = f"should be {' or '.join(words)}"
    else:
        msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "should be").replace(" after validation", "")
    value = err.get("input")
    # The type of a wrong-typed value helps; "(got a list)" after a constraint error on a list is noise.
    got = _got(value) if err["type"] in _TYPE_WORDS or not isinstance(value, (dict, list)) else ""
    return f"{where}: {msg}{got}" if where else f"{msg}{got}"


def _suggest(field: str, known: tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` when a known field name is close to ``field``."""
    close = difflib.get_close_matches(field, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _json_msg(e: json.JSONDecodeError, text: str) -> str:
    """A JSON syntax error as one line with its column and, where it helps, the likely cause."""
    if e.msg.startswith("Invalid control character"):
        char = ord(text[e.pos]) if e.pos < len(text) else 0
        return (
            f"invalid JSON at column {e.colno}: raw control character 0x{char:02x} inside a string; escape it (\\n, \\t, \\u00XX)"
        )
    if e.msg == "Extra data":
        return f"invalid JSON at column {e.colno}: extra data after the object (one JSON object per line)"
    if e.msg.startswith("Unterminated string"):
        return f"invalid JSON: unterminated string starting at column {e.colno}; the line ends early (truncated?)"
    if e.pos >= len(text):
        return f"invalid JSON at column {e.colno}: {e.msg}; the line ends early (truncated?)"
    return f"invalid JSON at column {e.colno}: {e.msg}"


def _kind(value: Any) -> str:
    """The JSON type of a value, in words."""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "a number"


def _unstorable(obj: Any) -> str | None:
    """Why a decoded line cannot be stored or tokenized: a NUL character or an unpaired surrogate.

    ``json`` accepts ``\\u0000`` and lone ``\\ud800`` escapes; PostgreSQL text cannot hold NUL, and a lone
    surrogate cannot be encoded as UTF-8 (the database driver raises, failing the whole file).
    """
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                stack.append((f"{path}.{k}" if path else str(k), v))
                stack.append((path or "(a key)", k))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", v) for i, v in enumerate(value))
        elif isinstance(value, str):
            where = _show(path, 40)
            if "\x00" in value:
                return f"{where} contains a NUL character (\\u0000), which cannot be stored; remove it"
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return (
                    f"{where} contains an unpaired surrogate escape (\\u{ord(value[exc.start]):04x}), which is not valid Unicode"
                )
    return None


SHORT_FIELDS = ("id", "model", "prompt", "messages", *SAMPLING_FIELDS, "max_completion_tokens", "n")
OPENAI_FIELDS = ("custom_id", "method", "url", "body")
CHAT_BODY_FIELDS = ("model", "messages", *SAMPLING_FIELDS, "max_completion_tokens", "n")
COMPLETION_BODY_FIELDS = ("model", "prompt", *SAMPLING_FIELDS, "max_completion_tokens", "n")
# OpenAI parameters that change nothing for batch inference: accepted and ignored.
IGNORED_BODY_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
# OpenAI parameters batchllm cannot honour: rejected unless they hold their default (null, false, empty).
UNSUPPORTED_BODY_FIELDS = (
    *BODY_UNSUPPORTED, "stream", "stream_options", "logprobs", "top_logprobs", "logit_bias", "echo", "suffix",
    "best_of", "response_format", "modalities", "audio", "prediction", "reasoning_effort", "web_search_options",
)  # fmt: skip
MAX_MODEL_NAME = 200  # the store's column width


def _is_default(key: str, value: Any) -> bool:
    """True when an unsupported OpenAI parameter holds a value that asks for nothing (null, false, empty)."""
    if value is None or value is False or value == [] or value == {}:
        return True
    return (key == "best_of" and value == 1) or (key == "response_format" and value == {"type": "text"})


def _body_problem(body: dict[str, Any], url: str) -> tuple[str, str] | None:
    """An unknown or unsupported key in an OpenAI ``body``, as (code, message); None when all are fine."""
    known = CHAT_BODY_FIELDS if url == CHAT_URL else COMPLETION_BODY_FIELDS
    for key, value in body.items():
        if key in known or key in IGNORED_BODY_FIELDS:
            continue
        if key in UNSUPPORTED_BODY_FIELDS:
            if _is_default(key, value):
                continue
            return "unsupported_parameter", f"body.{key} is not supported by batch inference"
        if key in ("prompt", "messages"):
            other = COMPLETIONS_URL if key == "prompt" else CHAT_URL
            return (
                "unknown_field",
                f"body.{key} belongs to {other}, not {url}; change url or use {'messages' if key == 'prompt' else 'prompt'}",
            )
        return "unknown_field", f"unknown field {_show('body.' + key)}{_suggest(key, known)}"
    return None


def parse_line(
    line_no: int,
    text: str,
    default_model: str | None,
    check_model: Callable[[str], str | None],
) -> ParsedRequest | LineError:
    """Validate one JSONL line in either form. Never raises for any input text.

    Args:
        line_no: 1-based line number, used for the default id ``line-<n>`` and in messages.
        text: the decoded line.
        default_model: ``--model``, for lines that name none.
        check_model: returns an error message for an unknown model name, else None.

    Returns:
        A ``ParsedRequest``, or a ``LineError`` that says in one line what is wrong and how to fix it.
    """
    fast = _parse_fast(text, default_model, check_model)
    if fast is not None:
        cid, model, kind, messages, prompt, params = fast
        return ParsedRequest(line_no=line_no, custom_id=cid or f"line-{line_no}", model=model, kind=kind, messages=messages,
                             prompt=prompt, params=params)
    return _parse_line_checked(line_no, text, default_model, check_model)


def parse_line_record(
    line_no: int,
    text: str,
    default_model: str | None,
    check_model: Callable[[str], str | None],
) -> tuple[str, str, str, str] | LineError:
    """``parse_line`` for the submit hot path: ``(custom_id, model, kind, body_json)`` or the ``LineError``.

    Same rules and the same results as ``parse_line`` (the stored body is ``ParsedRequest.body_json()``),
    without building a pydantic object per line.
    """
    fast = _parse_fast(text, default_model, check_model)
    if fast is not None:
        cid, model, kind, messages, prompt, params = fast
        return cid or f"line-{line_no}", model, kind, dump_body(messages, prompt, params)
    parsed = _parse_line_checked(line_no, text, default_model, check_model)
    if isinstance(parsed, LineError):
        return parsed
    return parsed.custom_id, parsed.model, parsed.kind, parsed.body_json()


# ------------------------------------------------------------- the fast path for common well-formed lines
#
# Most lines of a real file are plain: a string id, a prompt or a list of {role, content} string messages,
# a few numeric sampling parameters. ``_parse_fast`` accepts exactly those, checking every rule the
# pydantic models check (types, ranges, unknown fields, unstorable text, the model name), and returns
# what the full path would. Anything else — any doubt at all — returns None, and the full path
# (``_parse_line_checked``) decides and writes the error message. So the fast path can only ever say
# "valid" for a line the full path also accepts, with the same result.

def _loads_std(text: str) -> Any:
    text.encode("utf-8")  # a lone surrogate raises here (orjson refuses it too); pydantic would reject it later
    return json.loads(text)


_loads_fast: Callable[[str], Any] = _orjson.loads if _orjson is not None else _loads_std
_ROLE_SET = frozenset(ROLES)
_NO = object()


def _sampling_rules() -> dict[str, tuple[type, Any, Any, Any, Any]]:
    """``{field: (int|float, ge, gt, le, lt)}`` read off ``Sampling``'s strict numeric fields."""
    import typing

    import annotated_types as at

    rules: dict[str, tuple[type, Any, Any, Any, Any]] = {}
    for name, info in Sampling.model_fields.items():
        args = typing.get_args(info.annotation)
        if len(args) != 2 or args[1] is not type(None) or typing.get_origin(args[0]) is not typing.Annotated:
            continue
        base, *extra = typing.get_args(args[0])
        if base not in (int, float) or not any(getattr(x, "strict", False) for x in extra):
            continue
        bounds: dict[str, Any] = {}
        for m in info.metadata:
            kind = {at.Ge: "ge", at.Gt: "gt", at.Le: "le", at.Lt: "lt"}.get(type(m))
            if kind is None:
                break  # a constraint the fast path does not know: leave the field to pydantic
            bounds[kind] = getattr(m, kind)
        else:
            rules[name] = (base, bounds.get("ge"), bounds.get("gt"), bounds.get("le"), bounds.get("lt"))
    return rules


_NUM_RULES = _sampling_rules()
# ``stop`` (str | list[str], at most 4: ``Sampling._stop``) is checked by hand; other fields go to pydantic.
_FAST_SAMPLING = frozenset(_NUM_RULES) | ({"stop"} if "stop" in Sampling.model_fields else set())
_FAST_SHORT_KEYS = frozenset(k for k in SHORT_FIELDS if k in ("id", "model", "prompt", "messages") or k in _FAST_SAMPLING)
_FAST_CHAT_KEYS = frozenset(k for k in CHAT_BODY_FIELDS if k in ("model", "messages") or k in _FAST_SAMPLING)
_FAST_COMPLETION_KEYS = frozenset(k for k in COMPLETION_BODY_FIELDS if k in ("model", "prompt") or k in _FAST_SAMPLING)
_OPENAI_KEYS = frozenset(OPENAI_FIELDS)
_IGNORED_KEYS = frozenset(IGNORED_BODY_FIELDS)
_UNSUPPORTED_KEYS = frozenset(UNSUPPORTED_BODY_FIELDS)
_PARAM_ORDER = tuple(k for k in SAMPLING_FIELDS if k in _FAST_SAMPLING)
_ORDER_CACHE: dict[tuple[str, ...], tuple[str, ...]] = {}  # the keys a line gave → the same keys in _PARAM_ORDER


def _fast_number(v: Any, rule: tuple[type, Any, Any, Any, Any]) -> Any:
    """A strict int/float field's value as pydantic returns it, or ``_NO``."""
    base, ge, gt, le, lt = rule
    t = type(v)
    if base is int:
        if t is not int:
            return _NO
    elif t is int:  # strict float accepts an int and returns a float
        if not -(2**53) <= v <= 2**53:
            return _NO
        v = float(v)
    elif t is not float:
        return _NO
    if (ge is not None and not v >= ge) or (gt is not None and not v > gt) or (le is not None and not v <= le) or (
        lt is not None and not v < lt
    ):
        return _NO
    return v


def _fast_params(src: dict[str, Any]) -> dict[str, Any] | None:
    """``Sampling.params()`` of ``src`` (whose keys are already known), or None when a value needs pydantic."""
    values: dict[str, Any] = {}
    for key, v in src.items():
        if v is None or key in ("model", "prompt", "messages", "id"):
            continue
        rule = _NUM_RULES.get(key)
        if rule is not None:
            v = _fast_number(v, rule)
            if v is _NO:
                return None
        elif key == "stop":
            if type(v) is list:
                if len(v) > 4 or any(type(x) is not str for x in v):
                    return None
                v = list(v)
            elif type(v) is not str:
                return None
        else:  # an ignored or default-valued unsupported body field
            continue
        values[key] = v
    keys = tuple(values)
    order = _ORDER_CACHE.get(keys)
    if order is None:
        order = tuple(k for k in _PARAM_ORDER if k in values)
        if len(_ORDER_CACHE) < 512:  # a handful of orders in practice; bounded whatever the file holds
            _ORDER_CACHE[keys] = order
    out = values if order == keys else {k: values[k] for k in order}
    if "max_tokens" not in out and "max_completion_tokens" in values:
        out["max_tokens"] = values["max_completion_tokens"]
    return out


def _fast_messages(value: Any) -> list[dict[str, Any]] | None:
    """``[m.model_dump(exclude_none=True)]`` for plain string messages, or None."""
    if type(value) is not list or not value:
        return None
    out = []
    for m in value:
        if type(m) is not dict:
            return None
        role, content = m.get("role"), m.get("content")
        if type(content) is not str or type(role) is not str or role not in _ROLE_SET:
            return None
        if len(m) == 2:
            out.append({"role": role, "content": content})
        elif len(m) == 3 and "name" in m and (m["name"] is None or type(m["name"]) is str):
            name = m["name"]
            out.append({"role": role, "content": content} if name is None else {"role": role, "content": content, "name": name})
        else:
            return None
    return out


def _parse_fast(
    text: str, default_model: str | None, check_model: Callable[[str], str | None]
) -> tuple[str | None, str, Literal["chat", "completion"], list[dict[str, Any]] | None, str | None, dict[str, Any]] | None:
    """``(custom_id or None for line-<n>, model, kind, messages, prompt, params)`` of a plain valid line, else None."""
    try:
        obj = _loads_fast(text)
    except Exception:  # the full path reports it
        return None
    if type(obj) is not dict:
        return None
    if "\\u" in text and _unstorable(obj) is not None:
        return None
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    if "custom_id" in obj or "url" in obj or "body" in obj or "method" in obj:
        for k in obj:
            if k not in _OPENAI_KEYS:
                return None
        cid = obj.get("custom_id")
        if cid is not None and (type(cid) is not str or not 0 < len(cid) <= 512):
            return None
        if "method" in obj and obj["method"] != "POST":
            return None
        url, src = obj.get("url"), obj.get("body")
        if type(src) is not dict:
            return None
        if url == CHAT_URL:
            known = _FAST_CHAT_KEYS
        elif url == COMPLETIONS_URL:
            known = _FAST_COMPLETION_KEYS
        else:
            return None
        for key, value in src.items():
            if key not in known and key not in _IGNORED_KEYS and not (key in _UNSUPPORTED_KEYS and _is_default(key, value)):
                return None
        if url == CHAT_URL:
            kind: Literal["chat", "completion"] = "chat"
            messages = _fast_messages(src.get("messages"))
            if messages is None:
                return None
        else:
            kind = "completion"
            prompt = src.get("prompt")
            if type(prompt) is not str or not prompt:
                return None
    else:
        for k in obj:
            if k not in _FAST_SHORT_KEYS:
                return None
        raw_id = obj.get("id")
        if raw_id is None:
            cid = None
        elif type(raw_id) is str:
            if not 0 < len(raw_id) <= 512:
                return None
            cid = raw_id
        elif type(raw_id) is int and -(10**18) < raw_id < 10**18:
            cid = str(raw_id)
        else:
            return None
        src = obj
        prompt, raw_messages = obj.get("prompt"), obj.get("messages")
        if raw_messages is None:
            if type(prompt) is not str or not prompt:
                return None
            kind = "completion"
        else:
            if prompt is not None:
                return None
            messages = _fast_messages(raw_messages)
            if messages is None:
                return None
            kind = "chat"
    params = _fast_params(src)
    if params is None:
        return None
    model = src.get("model")
    if model is None or model == "":
        model = default_model
    elif type(model) is not str:
        return None
    if not model or len(model) > MAX_MODEL_NAME:
        return None
    try:
        if check_model(model) is not None:
            return None
    except Exception:
        return None
    return cid, model, kind, messages, prompt, params


def _parse_line_checked(
    line_no: int,
    text: str,
    default_model: str | None,
    check_model: Callable[[str], str | None],
) -> ParsedRequest | LineError:
    """The full validation of one line (pydantic models, every error message); see ``parse_line``."""
    fallback_id = f"line-{line_no}"

    def err(code: str, message: str, cid: str = fallback_id, model: str | None = None) -> LineError:
        return LineError(line_no=line_no, custom_id=cid, code=code, message=message, model=model)

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return err("invalid_json", _json_msg(e, text))
    except RecursionError:
        return err("invalid_json", "invalid JSON: nested too deeply")
    except ValueError:  # Python's 4300-digit limit on integers
        return err("invalid_json", "invalid JSON: a number has too many digits")
    if not isinstance(obj, dict):
        return err("invalid_json", f"expected a JSON object {{...}}, got {_kind(obj)}")
    if "\\u" in text:  # only escapes can smuggle in NUL or lone surrogates: skip the walk otherwise
        problem = _unstorable(obj)
        if problem:
            return err("invalid_encoding", problem)
    raw_id = obj.get("custom_id", obj.get("id"))
    cid = fallback_id
    if isinstance(raw_id, str) and 0 < len(raw_id) <= 512:
        cid = raw_id
    elif isinstance(raw_id, int) and not isinstance(raw_id, bool) and len(str(raw_id)) <= 512:
        cid = str(raw_id)
    openai_form = any(k in obj for k in OPENAI_FIELDS)
    prefix = ""
    try:
        if openai_form:
            extra = [k for k in obj if k not in OPENAI_FIELDS]
            if extra:
                if extra[0] == "id":
                    hint = "; the OpenAI Batch form (custom_id, method, url, body) names its id custom_id"
                elif extra[0] in SHORT_FIELDS:
                    hint = "; in the OpenAI Batch form (custom_id, method, url, body) it goes inside body"
                else:
                    hint = _suggest(extra[0], OPENAI_FIELDS)
                return err("unknown_field", f"unknown field {_show(extra[0])}{hint}", cid)
            line = OpenAILine.model_validate(obj)
            if line.url not in (CHAT_URL, COMPLETIONS_URL):
                return err("unsupported_url", f"url {_show(line.url)} is not supported; use {CHAT_URL} or {COMPLETIONS_URL}", cid)
            bad = _body_problem(line.body, line.url)
            if bad:
                return err(bad[0], bad[1], cid)
            prefix = "body."
            if line.url == CHAT_URL:
                body: ChatBody | CompletionBody = ChatBody.model_validate(line.body)
            else:
                body = CompletionBody.model_validate(line.body)
            model = body.model or default_model
            kind: Literal["chat", "completion"] = "chat" if isinstance(body, ChatBody) else "completion"
            messages = [m.model_dump(exclude_none=True) for m in body.messages] if isinstance(body, ChatBody) else None
            prompt = None
            if isinstance(body, CompletionBody):
                prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
            params = body.params()
        else:
            extra = [k for k in obj if k not in SHORT_FIELDS]
            if extra:
                return err("unknown_field", f"unknown field {_show(extra[0])}{_suggest(extra[0], SHORT_FIELDS)}", cid)
            short = ShortLine.model_validate(obj)
            if (short.prompt is None) == (short.messages is None):
                what = "both 'prompt' and 'messages'" if short.prompt is not None else "no 'prompt' or 'messages'"
                return err("missing_prompt", f"line has {what}; give exactly one", cid)
            model = short.model or default_model
            kind = "chat" if short.messages is not None else "completion"
            messages = [m.model_dump(exclude_none=True) for m in short.messages] if short.messages else None
            prompt = short.prompt
            params = short.params()
    except ValidationError as e:
        return err("invalid_request", _pydantic_msg(e, prefix), cid)
    if kind == "completion" and not prompt:
        return err("missing_prompt", "prompt is empty", cid)
    if not model:
        return err("missing_model", "no model: name one in the line or pass --model", cid)
    if len(model) > MAX_MODEL_NAME:
        return err("invalid_request", f"model name is {len(model)} characters long; at most {MAX_MODEL_NAME}", cid)
    try:
        problem = check_model(model)
    except (OSError, ValueError) as e:  # e.g. a name too long for a path lookup
        problem = f"cannot look up model {_show(model)}: {getattr(e, 'strerror', None) or type(e).__name__}"
    if problem:
        return err("model_not_found", " ".join(problem.split()), cid, model)
    return ParsedRequest(line_no=line_no, custom_id=cid, model=model, kind=kind, messages=messages, prompt=prompt, params=params)


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
