"""Input lines: both JSONL forms as msgspec Structs, and ``parse_line``, which turns a line into a request or an error.

Submit checks only what it must: the line is a JSON object in one of the two forms, the id and model can be
stored, the url is an endpoint we serve, and the body has the right shape for its endpoint with no obviously
wrong types. The body itself is kept byte for byte; the worker hands it to vLLM's own request models, which
check ranges and semantics per request (a request they reject fails alone, with vLLM's message).

Valid lines take one typed msgspec decode (two for the OpenAI form: envelope, then body) and never build a
dict; invalid ones go through ``diagnose`` for a message that says what is wrong and how to fix it.
"""

from collections.abc import Callable
from typing import Any, Literal

import msgspec

from batchllm.formats import diagnose
from batchllm.status import Endpoint

MAX_ID = 512  # the store's custom_id column width
MAX_MODEL_NAME = 200  # the store's model column width

Prompt = str | list[str | int | list[int]]
"""A completions prompt or embeddings input: text, a list of texts, token ids, or lists of token ids."""


class Parsed(msgspec.Struct, gc=False):
    """A valid input line, ready to store."""

    line_no: int
    custom_id: str
    model: str
    endpoint: Endpoint
    body: bytes


class LineError(msgspec.Struct):
    """An invalid input line; it becomes an error record (a 400 response) in the batch's error file."""

    line_no: int
    custom_id: str
    code: str
    message: str
    param: str | None = None
    model: str | None = None


# ----------------------------------------------------------------------------- the wire structs


class Message(msgspec.Struct, gc=False):
    """A chat message as far as submit checks it (other keys are kept in the stored body, unchecked)."""

    role: str
    content: str | list[Any] | None = None


class _Body(msgspec.Struct, gc=False):
    """What every request body is checked for; unknown keys are ignored here and kept in the stored body."""

    model: str | None = None


class _Sampling(_Body):
    """Generation parameters with their JSON types (ranges are vLLM's to check)."""

    stream: bool | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    seed: int | None = None
    top_logprobs: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None


class ChatBody(_Sampling):
    """``body`` of a ``/v1/chat/completions`` line."""

    messages: list[Message] | None = None
    logprobs: bool | None = None


class CompletionBody(_Sampling):
    """``body`` of a ``/v1/completions`` line."""

    prompt: Prompt | None = None
    logprobs: int | None = None


class EmbeddingBody(_Body):
    """``body`` of a ``/v1/embeddings`` line."""

    input: Prompt | None = None
    encoding_format: str | None = None
    dimensions: int | None = None


class OpenAILine(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """An OpenAI Batch line; ``body`` stays raw JSON bytes, stored untouched."""

    url: Endpoint
    body: msgspec.Raw
    custom_id: str | None = None
    method: Literal["POST"] = "POST"


class ShortLine(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """batchllm's short form. Field names are OpenAI's, so the line minus ``id`` encodes as the OpenAI body."""

    id: str | int | msgspec.UnsetType | None = msgspec.UNSET
    model: str | None = None
    prompt: Prompt | None = None
    messages: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET  # kept raw: every key of every message is kept
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None


_ENVELOPE_FIELDS: tuple[str, ...] = OpenAILine.__struct_fields__
_SHORT_FIELDS: tuple[str, ...] = ShortLine.__struct_fields__


_decode_openai = msgspec.json.Decoder(OpenAILine).decode
_decode_short = msgspec.json.Decoder(ShortLine).decode
_decode_messages = msgspec.json.Decoder(list[Message]).decode
_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
_BODY_DECODERS: dict[Endpoint, Callable[[Any], ChatBody | CompletionBody | EmbeddingBody]] = {
    Endpoint.CHAT: msgspec.json.Decoder(ChatBody).decode,
    Endpoint.COMPLETIONS: msgspec.json.Decoder(CompletionBody).decode,
    Endpoint.EMBEDDINGS: msgspec.json.Decoder(EmbeddingBody).decode,
}
_NULL = msgspec.Raw(b"null")
_STREAMING = ("unsupported_parameter", "body.stream: batch output cannot stream; remove it or set it to false", "body.stream")


class _Invalid(Exception):
    """A problem found on the fast path, raised to ``parse_line`` (which makes the ``LineError``)."""

    def __init__(self, problem: diagnose.Problem, custom_id: str | None = None, model: str | None = None) -> None:
        super().__init__(problem[1])
        self.problem, self.custom_id, self.model = problem, custom_id, model


def parse_line(
    line_no: int, text: str | bytes, default_model: str | None, check_model: Callable[[str], str | None]
) -> Parsed | LineError:
    """Check one JSONL line in either form. Never raises, whatever the input.

    Args:
        line_no: 1-based line number: the default id ``line-<n>``, and the error's line.
        text: the line as ``iter_raw_lines`` yields it (bytes, no BOM, no line ending), or text.
        default_model: ``--model``, for lines that name none.
        check_model: an error message for an unknown model name, else None.

    Returns:
        ``Parsed``, or a ``LineError`` that says in one line what is wrong and how to fix it.
    """
    try:
        if isinstance(text, str):
            raw = text.encode("utf-8")  # raises for a lone surrogate character
        else:
            raw = text
            if not raw.isascii():
                raw.decode("utf-8")  # Raw bodies are not checked by msgspec, and must be storable text
    except UnicodeError as exc:
        return _error(line_no, _encoding_problem(text, exc))
    try:
        try:
            # A cheap guess at the form (the two have no key in common); a wrong one fails and _slow sorts it out.
            if raw.startswith(b'{"custom_id"') or (not raw.startswith(b'{"id"') and b'"body"' in raw):
                return _openai(line_no, _decode_openai(raw), default_model, check_model)
            return _short(line_no, _decode_short(raw), default_model, check_model)
        except (msgspec.MsgspecError, RecursionError):
            return _slow(line_no, raw, default_model, check_model)
    except _Invalid as bad:
        return _error(line_no, bad.problem, bad.custom_id, bad.model)


def _openai(line_no: int, line: OpenAILine, default_model: str | None, check_model: Callable[[str], str | None]) -> Parsed:
    """An OpenAI Batch line whose envelope decoded: check the id, the body's shape and the model."""
    cid = _custom_id(line_no, line.custom_id, "custom_id")
    endpoint = line.url
    try:
        body = _BODY_DECODERS[endpoint](line.body)
    except (msgspec.ValidationError, RecursionError) as exc:
        raise _Invalid(_body_type_error(exc, line.body), cid) from None
    if isinstance(body, ChatBody):
        if not body.messages:
            raise _Invalid(_nothing_to_run("body.messages", body.messages, line.body), cid)
    elif isinstance(body, CompletionBody):
        if not body.prompt:
            raise _Invalid(_nothing_to_run("body.prompt", body.prompt, line.body), cid)
    elif not body.input:
        raise _Invalid(_nothing_to_run("body.input", body.input, line.body), cid)
    if isinstance(body, _Sampling) and body.stream:
        raise _Invalid(_STREAMING, cid)
    model = _model(body.model or default_model, "body.model", cid, check_model)
    return Parsed(line_no, cid, model, endpoint, bytes(line.body))


def _short(line_no: int, line: ShortLine, default_model: str | None, check_model: Callable[[str], str | None]) -> Parsed:
    """A short-form line that decoded: check id, prompt or messages and model; build the OpenAI body."""
    raw_id = line.id
    cid = _custom_id(line_no, str(raw_id) if isinstance(raw_id, int) else raw_id, "id")
    messages = line.messages if isinstance(line.messages, msgspec.Raw) and line.messages != _NULL else None
    if messages is not None:
        if line.prompt is not None:
            raise _Invalid(("missing_prompt", "line has both 'prompt' and 'messages'; give exactly one", "prompt"), cid)
        try:
            checked = _decode_messages(messages)
        except (msgspec.ValidationError, RecursionError) as exc:
            raise _Invalid(_messages_type_error(exc, messages), cid) from None
        if not checked:
            raise _Invalid(("missing_prompt", "messages is empty; give at least one message", "messages"), cid)
        endpoint = Endpoint.CHAT
    elif line.prompt is None:
        raise _Invalid(("missing_prompt", "line has no 'prompt' or 'messages'; give exactly one", "prompt"), cid)
    elif not line.prompt:
        raise _Invalid(("missing_prompt", "prompt is empty", "prompt"), cid)
    else:
        endpoint = Endpoint.COMPLETIONS
    model = _model(line.model or default_model, "model", cid, check_model)
    line.id = msgspec.UNSET  # the rest of the line is the OpenAI body (omit_defaults drops the unset fields)
    if messages is None:
        line.messages = msgspec.UNSET  # "messages": null beside a prompt
    return Parsed(line_no, cid, model, endpoint, _encode(line))


def _custom_id(line_no: int, cid: str | msgspec.UnsetType | None, field: str) -> str:
    """The id a line gives (checked: storable, 1..512 characters), or ``line-<n>``."""
    if cid is None or cid is msgspec.UNSET:
        return f"line-{line_no}"
    assert isinstance(cid, str)
    if not 0 < len(cid) <= MAX_ID:
        raise _Invalid(("invalid_request", f"{field}: should be 1 to {MAX_ID} characters (got {len(cid)})", field))
    if "\x00" in cid:
        raise _Invalid(("invalid_encoding", f"{field} contains a NUL character (\\u0000), which cannot be stored", field))
    return cid


def _model(model: str | None, param: str, cid: str, check_model: Callable[[str], str | None]) -> str:
    """The model name a line runs on, checked against the catalog."""
    if not model:
        raise _Invalid(("missing_model", "no model: name one in the line or pass --model", param), cid)
    if len(model) > MAX_MODEL_NAME:
        message = f"{param}: the name is {len(model)} characters long; at most {MAX_MODEL_NAME}"
        raise _Invalid(("invalid_request", message, param), cid)
    if "\x00" in model:
        raise _Invalid(("invalid_encoding", f"{param} contains a NUL character (\\u0000), which cannot be stored", param), cid)
    try:
        problem = check_model(model)
    except (OSError, ValueError) as e:  # e.g. a name too long for a path lookup
        problem = f"cannot look up model {diagnose.show(model)}: {getattr(e, 'strerror', None) or type(e).__name__}"
    if problem:
        raise _Invalid(("model_not_found", " ".join(problem.split()), param), cid, model)
    return model


def _slow(line_no: int, raw: bytes, default_model: str | None, check_model: Callable[[str], str | None]) -> Parsed:
    """A line the fast path could not decode: find its real form and the first thing wrong with it.

    Raises:
        _Invalid: with the problem (the common case here).
    """
    if raw.startswith(b"\xef\xbb\xbf"):  # a BOM the reader did not strip (parse_line called on its own)
        raw = raw[3:]
    problem, obj = diagnose.syntax(raw.decode("utf-8"))
    if problem is not None:
        raise _Invalid(problem)
    openai = any(k in obj for k in _ENVELOPE_FIELDS)
    raw_id = obj.get("custom_id") if openai else obj.get("id")
    valid_id = isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_ID and "\x00" not in raw_id
    cid = raw_id if valid_id else str(raw_id) if type(raw_id) is int and not openai else None
    problem = diagnose.unknown_field(obj, openai, _ENVELOPE_FIELDS, _SHORT_FIELDS)
    if problem is not None:
        raise _Invalid(problem, cid)
    try:
        if openai:
            return _openai(line_no, _decode_openai(raw), default_model, check_model)
        return _short(line_no, _decode_short(raw), default_model, check_model)
    except (msgspec.ValidationError, RecursionError) as exc:
        raise _Invalid(_type_error(exc, obj, ""), cid) from None
    except msgspec.DecodeError as exc:  # JSON the standard library reads and msgspec does not (none known)
        raise _Invalid(("invalid_json", f"invalid JSON: {exc}", None), cid) from None


def _body_type_error(exc: Exception, body: msgspec.Raw) -> diagnose.Problem:
    """A type error inside ``body``."""
    return _type_error(exc, _generic(body), "body")


def _messages_type_error(exc: Exception, messages: msgspec.Raw) -> diagnose.Problem:
    """A type error inside a short-form ``messages``."""
    return _type_error(exc, _generic(messages), "messages")


def _type_error(exc: Exception, doc: Any, prefix: str) -> diagnose.Problem:
    """A validation (or nesting) error below ``prefix`` as our problem."""
    if isinstance(exc, RecursionError):
        return "invalid_json", "invalid JSON: nested too deeply", None
    assert isinstance(exc, msgspec.ValidationError)
    return diagnose.type_error(exc, doc, prefix)


def _nothing_to_run(param: str, value: Any, body: msgspec.Raw) -> diagnose.Problem:
    """``missing_prompt`` for a body without its prompt, messages or input (with a hint for the wrong url)."""
    if value is not None:
        return "missing_prompt", f"{param} is empty", param
    doc = _generic(body)
    keys = doc if isinstance(doc, dict) else {}
    for other, url in (("messages", Endpoint.CHAT), ("prompt", Endpoint.COMPLETIONS), ("input", Endpoint.EMBEDDINGS)):
        if keys.get(other) is not None and param != f"body.{other}":
            return "missing_prompt", f"{param} is missing; body.{other} belongs to url {url.value}: change the url", param
    return "missing_prompt", f"{param} is missing", param


def _generic(raw: msgspec.Raw) -> Any:
    """A raw JSON value decoded without types (to quote it in a message), or ``diagnose.UNKNOWN``."""
    try:
        return _decode_any(raw)
    except (msgspec.MsgspecError, RecursionError):
        return diagnose.UNKNOWN


def _encoding_problem(text: str | bytes, exc: UnicodeError) -> diagnose.Problem:
    """Bytes that are not UTF-8, or text with a lone surrogate character."""
    if isinstance(text, bytes) and isinstance(exc, UnicodeDecodeError):
        return diagnose.not_utf8(text, exc)
    return "invalid_encoding", "the line holds an unpaired surrogate character, which is not valid Unicode", None


def _error(line_no: int, problem: diagnose.Problem, custom_id: str | None = None, model: str | None = None) -> LineError:
    """The ``LineError`` of a problem (its id is ``line-<n>`` when the line's own cannot be used)."""
    code, message, param = problem
    return LineError(line_no, custom_id or f"line-{line_no}", code, message, param, model)
