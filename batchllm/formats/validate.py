"""Validation of one line in either form, with one-line messages that say what is wrong."""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import ValidationError

from batchllm.formats.models import (
    BODY_UNSUPPORTED,
    CHAT_URL,
    COMPLETIONS_URL,
    SAMPLING_FIELDS,
    ChatBody,
    CompletionBody,
    LineError,
    OpenAILine,
    ParsedRequest,
    ShortLine,
    dump_body,
)

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
        return ParsedRequest(
            line_no=line_no,
            custom_id=cid or f"line-{line_no}",
            model=model,
            kind=kind,
            messages=messages,
            prompt=prompt,
            params=params,
        )
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


# The fast path uses this module's field lists, so it is imported once they exist.
from batchllm.formats.fastpath import _parse_fast  # noqa: E402
