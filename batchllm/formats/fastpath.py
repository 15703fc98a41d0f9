"""A fast path for common well-formed lines; anything unusual goes to the full pydantic validation."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from batchllm.formats.models import CHAT_URL, COMPLETIONS_URL, ROLES, SAMPLING_FIELDS, Sampling
from batchllm.formats.validate import (
    CHAT_BODY_FIELDS,
    COMPLETION_BODY_FIELDS,
    IGNORED_BODY_FIELDS,
    MAX_MODEL_NAME,
    OPENAI_FIELDS,
    SHORT_FIELDS,
    UNSUPPORTED_BODY_FIELDS,
    _is_default,
    _unstorable,
)

_orjson: Any
try:  # optional accelerator: ~4x faster loads/dumps on the submit hot path; the stdlib is the fallback
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

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
    if (
        (ge is not None and not v >= ge)
        or (gt is not None and not v > gt)
        or (le is not None and not v <= le)
        or (lt is not None and not v < lt)
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
