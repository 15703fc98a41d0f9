"""The error path of input parsing: why a line failed, as ``(code, message, param)`` in one user-facing line.

Only invalid lines come here, so clarity wins over speed: the standard library's JSON parser is used for its
column numbers and wording, and msgspec's ``Expected `int`, got `str` - at `$.body.max_tokens``` is rewritten
as ``body.max_tokens: should be an integer (got '12')``.
"""

import difflib
import json
import math
import re
from collections.abc import Iterable
from typing import Any

import msgspec

from batchllm.status import Endpoint

Problem = tuple[str, str, str | None]
"""``(code, message, param)`` of an invalid line; ``param`` is a dotted path such as ``body.messages.0.role``."""

URLS = ", ".join(e.value for e in Endpoint)

_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "array": "a list",
    "object": "an object",
    "null": "null",
}
_MSGSPEC_ERROR = re.compile(r"^(?P<what>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.DOTALL)
_EXPECTED = re.compile(r"^Expected `(?P<want>[^`]*)`, got `(?P<got>[^`]*)`$")
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
UNKNOWN: Any = object()
"""Stands for a JSON value that could not be looked up (so a message quotes nothing)."""


def show(value: str, limit: int = 60) -> str:
    """Quote user text for a one-line message: escaped (no raw newlines or control characters) and shortened.

    Args:
        value: the text.
        limit: longest quoted part kept, in characters.
    """
    inner = _printable(value)[1:-1]
    return f"'{inner[:limit]}…'" if len(inner) > limit else f"'{inner}'"


def got(value: Any) -> str:
    """`` (got ...)`` for a message: a short rendering of a JSON value.

    Args:
        value: the offending value as decoded.
    """
    if isinstance(value, dict):
        return " (got an object)"
    if isinstance(value, list):
        return " (got a list)"
    if isinstance(value, str):
        return f" (got {show(value, 40)})"
    return f" (got {_printable(value)[:40]})"


def suggest(field: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a known field name is close to ``field``.

    Args:
        field: the unknown name.
        known: the names that exist there.
    """
    close = difflib.get_close_matches(field, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def not_utf8(raw: bytes, exc: UnicodeDecodeError) -> Problem:
    """A line whose bytes are not UTF-8.

    Args:
        raw: the line.
        exc: the decode error.
    """
    column = len(raw[: exc.start].decode("utf-8", "replace")) + 1
    return "invalid_encoding", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); save the file as UTF-8", None


def syntax(text: str) -> tuple[Problem | None, Any]:
    """Parse a line msgspec refused with the standard library: its error, or the object when it is valid JSON.

    Args:
        text: the decoded line.

    Returns:
        ``(problem, None)`` for JSON that is broken or not an object (or holds what msgspec refuses: NaN,
        Infinity, an unpaired surrogate), else ``(None, obj)``.
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return ("invalid_json", _json_message(e, text), None), None
    except RecursionError:
        return ("invalid_json", "invalid JSON: nested too deeply", None), None
    except ValueError:  # Python's 4300-digit limit on integers
        return ("invalid_json", "invalid JSON: a number has too many digits", None), None
    if not isinstance(obj, dict):
        return ("invalid_json", f"expected a JSON object {{...}}, got {_kind(obj)}", None), None
    return _unrepresentable(obj), obj


def unknown_field(obj: dict[str, Any], openai: bool, envelope: tuple[str, ...],
                  short: tuple[str, ...]) -> Problem | None:
    """The first top-level key that the line's form does not have, with a hint.

    Args:
        obj: the decoded line.
        openai: True for the OpenAI Batch form (custom_id, method, url, body), False for the short form.
        envelope: the OpenAI Batch form's fields (the struct that parses it defines them).
        short: the short form's fields.
    """
    known = envelope if openai else short
    for key in obj:
        if key in known:
            continue
        if not openai:
            hint = suggest(key, known) or "; for other OpenAI fields use the OpenAI Batch form (custom_id, method, url, body)"
        elif key == "id":
            hint = "; the OpenAI Batch form (custom_id, method, url, body) names its id custom_id"
        elif key in short:
            hint = "; in the OpenAI Batch form (custom_id, method, url, body) it goes inside body"
        else:
            hint = suggest(key, known)
        return "unknown_field", f"unknown field {show(key)}{hint}", key
    return None


def type_error(exc: msgspec.ValidationError, doc: Any, prefix: str) -> Problem:
    """A msgspec validation error as our problem, e.g. ``body.max_tokens: should be an integer (got '12')``.

    Args:
        exc: msgspec's error (one message with a ``$.a[0].b`` path).
        doc: the same JSON decoded without types (to quote the offending value), or ``UNKNOWN``.
        prefix: where the decoded document sits in the line (``"body"``, ``"messages"`` or ``""``).
    """
    m = _MSGSPEC_ERROR.match(str(exc))
    assert m is not None  # the pattern matches any text
    what, path = m["what"], m["path"] or "$"
    parts: list[str | int] = [prefix] if prefix else []
    for key, index in _PATH_PART.findall(path):
        parts.append(key or (int(index) if index.isdigit() else "…"))
    missing = re.match(r"^Object missing required field `(.*)`$", what)
    if missing:
        param = ".".join(map(str, [*parts, missing[1]]))
        hint = f" (the OpenAI Batch form needs url and body; url is one of {URLS})" if param in ("url", "body") else ""
        return "invalid_request", f"missing field '{param}'{hint}", param
    param = ".".join(map(str, parts))
    value = _lookup(doc, parts[1:] if prefix else parts)
    if param == "url" and what.startswith("Invalid enum value"):
        return "unsupported_url", f"url {show(str(value))} is not supported; use one of {URLS}", param
    if param == "method" and what.startswith("Invalid enum value"):
        return "invalid_request", f"method: should be POST{got(value)}", param
    expected = _EXPECTED.match(what)
    if expected:
        types = [t.strip() for t in expected["want"].split("|")]
        if len(types) > 1 and "null" in types:  # null means "not given" for our optional fields: not worth saying
            types.remove("null")
        words = [_TYPE_WORDS.get(t, t) for t in types]
        want = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
        message = f"should be {want}"
    elif "out of range" in what:
        message = "number out of range"
    else:
        message = what[:1].lower() + what[1:]
    shown = got(value) if value is not UNKNOWN else ""
    return "invalid_request", f"{param}: {message}{shown}" if param else f"{message}{shown}", param or None


def _lookup(doc: Any, parts: list[str | int]) -> Any:
    """The value at a path in a generically decoded document, or ``UNKNOWN``."""
    for part in parts:
        in_dict = isinstance(doc, dict) and isinstance(part, str) and part in doc
        in_list = isinstance(doc, list) and isinstance(part, int) and part < len(doc)
        if not (in_dict or in_list):
            return UNKNOWN
        doc = doc[part]
    return doc


def _unrepresentable(obj: Any) -> Problem | None:
    """What the standard library accepts but msgspec (and so batchllm) refuses: NaN/Infinity, lone surrogates.

    A lone surrogate (``\\ud800``) cannot be encoded as UTF-8, so no worker could tokenize it and no database
    text column could hold it.
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
        elif isinstance(value, float) and not math.isfinite(value):
            return "invalid_json", f"invalid JSON: {path}: NaN, Infinity and numbers this large are not JSON numbers", path
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                char = f"\\u{ord(value[exc.start]):04x}"
                message = f"{show(path, 40)} contains an unpaired surrogate escape ({char}), not valid Unicode"
                return "invalid_encoding", message, path
    return None


def _json_message(e: json.JSONDecodeError, text: str) -> str:
    """A JSON syntax error as one line with its column and, where it helps, the likely cause."""
    if e.msg.startswith("Invalid control character"):
        char = ord(text[e.pos]) if e.pos < len(text) else 0
        return f"invalid JSON at column {e.colno}: raw control character 0x{char:02x} in a string; escape it (\\n, \\t, \\u00XX)"
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


def _printable(value: Any) -> str:
    """JSON text of a value with any unprintable character left (bidi overrides, line separators) escaped too."""
    escaped = json.dumps(value, ensure_ascii=False, default=str)
    if escaped.isprintable():
        return escaped
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}" for c in escaped)
