"""Unit tests of ``batchllm.formats``: the reader, the line parser, output lines and the Batch object.

No database, no Redis, no vLLM. Models are checked with a stand-in for the catalog, so these tests pin the
parser's own behaviour; tests/test_formats_corpus.py runs the bad-input corpus through the same code, and
tests/test_bad_input.py through the real submit path. Output lines are checked with the ``openai`` SDK's types.
"""

from __future__ import annotations

import ast
import io
import json
import random
import string
from pathlib import Path
from typing import Any

import msgspec
import pytest
from openai.types import Batch as SdkBatch
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.shared import ErrorObject

from batchllm.formats import (
    Batch,
    BatchErrors,
    BatchFileError,
    BatchRequestCounts,
    LineError,
    OutputLine,
    Parsed,
    encode_batch,
    error_body,
    iter_raw_lines,
    output_line,
    parse_line,
    request_id_for,
    unix,
    usage,
)
from batchllm.status import BatchStatus, Endpoint

MODEL = "smollm2-135m-instruct"
LIMIT = 4 * 1024 * 1024
CODES = {"invalid_json", "invalid_encoding", "line_too_long", "unsupported_url", "unsupported_parameter", "invalid_request",
         "unknown_field", "missing_prompt", "missing_model", "model_not_found"}  # fmt: skip
CHAT, COMPLETIONS, EMBEDDINGS = (e.value for e in Endpoint)


def check_model(name: str) -> str | None:
    """Stand-in for the catalog: only ``MODEL`` and its alias ``smollm2`` exist.

    Args:
        name: the model name a line gives.
    """
    return None if name in (MODEL, "smollm2") else f"unknown model '{name}'"


def parse(text: str | bytes, default_model: str | None = MODEL, line_no: int = 7) -> Parsed | LineError:
    """Parse one line with the stand-in catalog.

    Args:
        text: the line.
        default_model: the ``--model`` default.
        line_no: its 1-based line number.
    """
    return parse_line(line_no, text, default_model, check_model)


def ok(text: str | bytes, **kw: Any) -> Parsed:
    """Parse a line that must be valid; the same line as text and as bytes must give the same result.

    Args:
        text: the line.
        **kw: passed to ``parse``.
    """
    result = parse(text, **kw)
    assert isinstance(result, Parsed), result
    other = parse(text.encode() if isinstance(text, str) else text.decode(), **kw)
    assert other == result
    json.loads(result.body)  # always a JSON object the worker can read
    return result


def bad(text: str | bytes, **kw: Any) -> LineError:
    """Parse a line that must be invalid, and check its message is one clean line.

    Args:
        text: the line.
        **kw: passed to ``parse``.
    """
    result = parse(text, **kw)
    assert isinstance(result, LineError), result
    assert result.code in CODES
    assert_clean_message(result.message)
    return result


def assert_clean_message(message: str) -> None:
    """One short printable line with no Python or msgspec internals.

    Args:
        message: an error message.
    """
    assert message and "\n" not in message and message.isprintable(), repr(message)
    assert len(message) <= 200, message
    for marker in ("Traceback", "ValidationError", "msgspec", "Expected `", "$.", "<class", "object at 0x"):
        assert marker not in message, message


def line(url: str = CHAT, cid: str = "c1", **body: Any) -> str:
    """An OpenAI Batch line; ``body`` sets body keys (chat messages / a prompt / an input by default).

    Args:
        url: its url.
        cid: its custom_id.
        **body: body keys.
    """
    default: dict[str, Any] = {CHAT: {"messages": [{"role": "user", "content": "Hi"}]}, COMPLETIONS: {"prompt": "Once"},
                               EMBEDDINGS: {"input": "a sentence"}}.get(url, {})  # fmt: skip
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": {"model": MODEL, **default, **body}})


def read(data: bytes, limit: int = LIMIT) -> list[tuple[int, bytes | None, str | None]]:
    """``(line_no, line, error code)`` for every line ``iter_raw_lines`` yields.

    Args:
        data: file bytes.
        limit: ``max_line_bytes``.
    """
    return [(n, raw, err.code if err else None) for n, raw, err in iter_raw_lines(io.BytesIO(data), limit)]


# ----------------------------------------------------------------------------- iter_raw_lines


def test_reader_numbers_every_physical_line_and_marks_blanks() -> None:
    assert read(b'{"a": 1}\n\n   \n{"b": 2}\r\n\t\r\n{"c": 3}') == [
        (1, b'{"a": 1}', None), (2, None, None), (3, None, None), (4, b'{"b": 2}', None), (5, None, None), (6, b'{"c": 3}', None),
    ]  # fmt: skip
    assert read(b"") == []


def test_reader_strips_bom_on_first_and_later_lines() -> None:
    assert [raw for _, raw, _ in read(b'\xef\xbb\xbf{"a": 1}\n\xef\xbb\xbf{"b": 2}\n')] == [b'{"a": 1}', b'{"b": 2}']


def test_reader_reports_nul_bytes_and_utf16() -> None:
    utf16 = list(iter_raw_lines(io.BytesIO('{"id": "a"}\n{"id": "b"}\n'.encode("utf-16")), LIMIT))
    assert [err.code if err else None for _, _, err in utf16] == ["invalid_encoding"] * 3
    assert utf16[0][2] is not None and "UTF-16" in utf16[0][2].message
    ((_, _, nul),) = iter_raw_lines(io.BytesIO(b'{"p": "a\x00b"}\n'), LIMIT)
    assert nul is not None and nul.code == "invalid_encoding" and "NUL" in nul.message and nul.custom_id == "line-1"


def test_reader_line_limit_boundary_and_oversized_last_line() -> None:
    exact = b"x" * 1024
    assert read(exact + b"\n" + b"y" * 1025 + b"\nz\n", 1024) == [(1, exact, None), (2, None, "line_too_long"), (3, b"z", None)]
    assert read(b"a\n" + b"b" * 5000, 1024) == [(1, b"a", None), (2, None, "line_too_long")]


def test_reader_ten_megabyte_line_is_reported_not_kept() -> None:
    big = b'{"id": "big", "prompt": "' + b"x" * 10_000_000 + b'"}'
    lines = list(iter_raw_lines(io.BytesIO(b'{"id": "a"}\n' + big + b'\n{"id": "b"}\n'), LIMIT))
    assert [(n, err.code if err else None) for n, _, err in lines] == [(1, None), (2, "line_too_long"), (3, None)]
    assert lines[1][1] is None and lines[1][2] is not None and "10.0 MB" in lines[1][2].message


# ----------------------------------------------------------------------------- parse_line: the short form


def test_short_prompt_becomes_an_openai_completions_body() -> None:
    r = ok('{"id": "a1", "prompt": "Hello", "max_tokens": 16, "temperature": 0, "stop": ["\\n"], "seed": 3}')
    assert (r.line_no, r.custom_id, r.model, r.endpoint) == (7, "a1", MODEL, Endpoint.COMPLETIONS)
    assert json.loads(r.body) == {"prompt": "Hello", "max_tokens": 16, "temperature": 0.0, "stop": ["\n"], "seed": 3}


def test_short_messages_become_a_chat_body_with_every_message_key_kept() -> None:
    messages = [{"role": "system", "content": "Be brief.", "name": "rules"}, {"role": "user", "content": "Hi"}]
    r = ok(json.dumps({"id": 5, "model": "smollm2", "messages": messages, "top_p": 0.5, "n": 2}))
    assert (r.custom_id, r.model, r.endpoint) == ("5", "smollm2", Endpoint.CHAT)
    assert json.loads(r.body) == {"model": "smollm2", "messages": messages, "top_p": 0.5, "n": 2}


def test_short_form_defaults_id_and_model() -> None:
    r = ok('{"prompt": "x"}', line_no=12)
    assert (r.custom_id, r.model) == ("line-12", MODEL)
    assert ok('{"id": null, "prompt": "x", "messages": null}').custom_id == "line-7"
    assert json.loads(ok('{"prompt": "x", "messages": null}').body) == {"prompt": "x"}


def test_short_form_keeps_unicode_as_text() -> None:
    text = "안녕하세요 👋🏽 — 한국어와 이모지 🚀 \u202e"
    r = ok(json.dumps({"id": "ko", "messages": [{"role": "user", "content": text}]}, ensure_ascii=False))
    assert text.encode() in r.body and json.loads(r.body)["messages"][0]["content"] == text
    r2 = ok(json.dumps({"id": "ko2", "prompt": text}))  # \u escapes in, text out
    assert json.loads(r2.body)["prompt"] == text and r2.body.decode().isascii() is False


# ----------------------------------------------------------------------------- parse_line: the OpenAI form


@pytest.mark.parametrize(
    "text",
    [
        line(CHAT, max_completion_tokens=9, top_p=0.5, user="u1", stream=False, n=2, seed=1, stop=["\n"], logprobs=True,
             top_logprobs=3, presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={"50256": -100},
             response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
             tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}], tool_choice="auto"),
        line(CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]},
                             {"role": "assistant", "content": None, "tool_calls": []}, {"role": "wizard", "content": "x"}]),
        line(COMPLETIONS, prompt=["a", "b"], echo=True, logprobs=2, best_of=3, suffix="!", temperature=5),
        line(COMPLETIONS, prompt=[1, 2, 3]),
        line(COMPLETIONS, prompt=[[1, 2], [3]], max_tokens=10**12),
        line(EMBEDDINGS, input=["one", "two"], encoding_format="base64", dimensions=64),
        line(EMBEDDINGS, input=[[1, 2, 3]]),
    ],
    ids=["chat-every-field", "chat-any-message", "completions-list", "token-ids", "token-id-lists", "embeddings", "embed-ids"],
)  # fmt: skip
def test_openai_lines_that_vllm_accepts_are_valid(text: str) -> None:
    r = ok(text)
    obj = json.loads(text)
    assert (r.custom_id, r.model, r.endpoint.value) == ("c1", MODEL, obj["url"])
    assert json.loads(r.body) == obj["body"]


def test_openai_body_is_stored_byte_for_byte() -> None:
    body = '{ "temperature" :0.10, "messages":[{"role":"user","content":"caf\\u00e9 ☕","x-extra":[1,{}]}], "zz": null }'
    r = ok('{"custom_id": "k", "url": "/v1/chat/completions", "body": ' + body + "}  ")
    assert r.body == body.encode()
    assert r.model == MODEL  # the body names none: --model


def test_openai_line_without_custom_id_or_method() -> None:
    r = ok('{"url": "/v1/completions", "body": {"prompt": "x", "model": "smollm2"}}', line_no=3)
    assert (r.custom_id, r.model, r.endpoint) == ("line-3", "smollm2", Endpoint.COMPLETIONS)


def test_crlf_bom_and_padding_around_a_line() -> None:
    assert ok(b'\t{"id": "a", "prompt": "x"}\r\n').custom_id == "a"
    assert parse(b'\xef\xbb\xbf{"id": "a", "prompt": "x"}') == parse(b'{"id": "a", "prompt": "x"}')


def test_form_is_found_whatever_the_key_order() -> None:
    sorted_keys = json.dumps(json.loads(line(COMPLETIONS)), sort_keys=True)  # "body" comes first
    assert ok(sorted_keys).endpoint == Endpoint.COMPLETIONS
    nested = '{"prompt": "x", "id": "a", "stop": "\\"body\\""}'  # the form guess is fooled; the answer is not
    assert ok(nested).custom_id == "a"
    img = '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u", "body": 1}}]}]}'
    assert ok(img).endpoint == Endpoint.CHAT


# ----------------------------------------------------------------------------- parse_line: invalid lines

CASES: list[tuple[str | bytes, str, str | None, str]] = [
    # (line, code, param, a piece of the message)
    ('{"id": "a", "prompt": "x"', "invalid_json", None, "truncated"),
    ("{'id': 'a'}", "invalid_json", None, "double quotes"),
    ('{"id": "a"}{"id": "b"}', "invalid_json", None, "one JSON object per line"),
    ('[{"id": "a", "prompt": "x"}]', "invalid_json", None, "got an array"),
    ("null", "invalid_json", None, "got null"),
    ("", "invalid_json", None, "column 1"),
    ('{"id": "a", "prompt": "tab\there"}', "invalid_json", None, "control character 0x09"),
    ('{"id": "a", "prompt": "x", "max_tokens": 1' + "0" * 5000 + "}", "invalid_json", None, "too many digits"),
    ('{"id": "a", "prompt": "x", "stop": ' + "[" * 5000 + "]" * 5000 + "}", "invalid_json", None, "nested too deeply"),
    ('{"id": "a", "prompt": "x", "temperature": NaN}', "invalid_json", "temperature", "NaN"),
    (b'{"id": "a", "prompt": "caf\xe9"}', "invalid_encoding", None, "byte 0xe9 at column 27"),
    ('{"id": "a\\u0000", "prompt": "x"}', "invalid_encoding", "id", "NUL"),
    ('{"id": "a", "prompt": "x", "model": "m\\u0000"}', "invalid_encoding", "model", "NUL"),
    ('{"id": "a", "prompt": "\\udc00 lone"}', "invalid_encoding", "prompt", "unpaired surrogate"),
    ('{"id": "a", "prompt": "\udc00"}', "invalid_encoding", None, "unpaired surrogate"),
    ('{"id": "a", "prompt": "x", "max_tokens": "12"}', "invalid_request", "max_tokens",
     "max_tokens: should be an integer (got '12')"),
    ('{"id": "a", "prompt": "x", "max_tokens": true}', "invalid_request", "max_tokens", "(got true)"),
    ('{"id": "a", "prompt": "x", "seed": 1.5}', "invalid_request", "seed", "should be an integer (got 1.5)"),
    ('{"id": "a", "prompt": "x", "temperature": "hot"}', "invalid_request", "temperature", "should be a number"),
    ('{"id": "a", "prompt": "x", "stop": 5}', "invalid_request", "stop", "should be a string or a list"),
    ('{"id": "a", "prompt": "x", "stop": [["x"]]}', "invalid_request", "stop.0", "should be a string (got a list)"),
    ('{"id": "a", "prompt": {"text": "x"}}', "invalid_request", "prompt", "(got an object)"),
    ('{"id": "a", "prompt": "x", "model": 5}', "invalid_request", "model", "should be a string"),
    ('{"id": "a", "messages": "hi"}', "invalid_request", "messages", "messages: should be a list (got 'hi')"),
    ('{"id": "a", "messages": ["hi"]}', "invalid_request", "messages.0", "should be an object"),
    ('{"id": "a", "messages": [{"content": "x"}]}', "invalid_request", "messages.0.role", "missing field 'messages.0.role'"),
    ('{"id": "a", "messages": [{"role": 1, "content": "x"}]}', "invalid_request", "messages.0.role", "should be a string"),
    ('{"id": "a", "messages": [{"role": "user", "content": 5}]}', "invalid_request", "messages.0.content", "(got 5)"),
    ('{"id": {"k": 1}, "prompt": "x"}', "invalid_request", "id", "(got an object)"),
    ('{"id": "", "prompt": "x"}', "invalid_request", "id", "1 to 512 characters"),
    ('{"id": "a", "prompt": "x", "model": "' + "m" * 300 + '"}', "invalid_request", "model", "at most 200"),
    ('{"id": "a", "prompt": "x", "temprature": 0.5}', "unknown_field", "temprature", "(did you mean 'temperature'?)"),
    ('{"id": "a", "prompt": "x", "logprobs": true}', "unknown_field", "logprobs", "use the OpenAI Batch form"),
    ('{"id": "a"}', "missing_prompt", "prompt", "no 'prompt' or 'messages'"),
    ('{"id": "a", "prompt": ""}', "missing_prompt", "prompt", "empty"),
    ('{"id": "a", "prompt": []}', "missing_prompt", "prompt", "empty"),
    ('{"id": "a", "messages": []}', "missing_prompt", "messages", "empty"),
    ('{"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}', "missing_prompt", "prompt", "both"),
    ('{"id": "a", "prompt": "x", "model": "gpt-4"}', "model_not_found", "model", "gpt-4"),
    (line(CHAT, model="gpt-4o"), "model_not_found", "body.model", "gpt-4o"),
    (line("/v1/responses"), "unsupported_url", "url", "/v1/chat/completions, /v1/completions, /v1/embeddings"),
    (line("v1/chat/completions"), "unsupported_url", "url", "'v1/chat/completions' is not supported"),
    ('{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}', "invalid_request", "method",
     "method: should be POST (got 'GET')"),
    ('{"custom_id": "a", "url": "/v1/completions"}', "invalid_request", "body", "missing field 'body'"),
    ('{"custom_id": "a", "body": {"prompt": "x"}}', "invalid_request", "url", "missing field 'url'"),
    ('{"custom_id": 5, "url": "/v1/completions", "body": {"prompt": "x"}}', "invalid_request", "custom_id",
     "should be a string (got 5)"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": "x"}', "invalid_request", "body",
     "body: should be an object (got 'x')"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": null}', "invalid_request", "body", "(got null)"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x"}, "prompt": "x"}', "unknown_field", "prompt",
     "it goes inside body"),
    ('{"custom_id": "a", "id": "b", "url": "/v1/completions", "body": {"prompt": "x"}}', "unknown_field", "id", "custom_id"),
    (line(CHAT, stream=True), "unsupported_parameter", "body.stream", "cannot stream"),
    (line(CHAT, stream="yes"), "invalid_request", "body.stream", "true or false"),
    (line(CHAT, max_tokens="12"), "invalid_request", "body.max_tokens", "body.max_tokens: should be an integer (got '12')"),
    (line(CHAT, n=1.5), "invalid_request", "body.n", "should be an integer"),
    (line(CHAT, top_logprobs="3"), "invalid_request", "body.top_logprobs", "should be an integer"),
    (line(CHAT, response_format="json"), "invalid_request", "body.response_format", "should be an object"),
    (line(CHAT, logit_bias=[1]), "invalid_request", "body.logit_bias", "should be an object (got a list)"),
    (line(CHAT, messages=[{"role": "user", "content": {"text": "x"}}]), "invalid_request", "body.messages.0.content",
     "should be a string or a list (got an object)"),
    (line(CHAT, messages=[]), "missing_prompt", "body.messages", "empty"),
    (line(CHAT, messages=None, prompt="x"), "missing_prompt", "body.messages", "belongs to url /v1/completions"),
    (line(COMPLETIONS, prompt=""), "missing_prompt", "body.prompt", "empty"),
    (line(COMPLETIONS, prompt=[1.5]), "invalid_request", "body.prompt.0", "(got 1.5)"),
    (line(EMBEDDINGS, input=None), "missing_prompt", "body.input", "missing"),
    (line(EMBEDDINGS, input=5), "invalid_request", "body.input", "should be a string or a list (got 5)"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "code", "param", "piece"), CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_invalid_line(text: str | bytes, code: str, param: str | None, piece: str) -> None:
    err = bad(text)
    assert (err.code, err.param, err.line_no) == (code, param, 7), err
    assert piece in err.message, err.message


def test_every_code_but_the_readers_is_covered() -> None:
    assert {c[1] for c in CASES} | {"missing_model", "line_too_long"} == CODES


def test_missing_model_without_default() -> None:
    err = bad('{"id": "a", "prompt": "x"}', default_model=None)
    assert (err.code, err.param) == ("missing_model", "model") and "--model" in err.message
    assert bad(line(CHAT, model=None), default_model=None).param == "body.model"


def test_error_keeps_the_lines_id_and_model() -> None:
    assert bad('{"id": "mine", "prompt": "x", "top_p": "9"}').custom_id == "mine"
    assert bad('{"id": 12, "prompt": "x", "top_p": "9"}').custom_id == "12"
    assert bad(line("/v1/x", cid="c9")).custom_id == "c9"
    assert bad(line(CHAT, cid="c8", n="2")).custom_id == "c8"
    assert bad('{"id": {"k": 1}, "prompt": "x"}').custom_id == "line-7"
    assert bad('{"id": "bad\\u0000", "prompt": "x"}').custom_id == "line-7"
    assert bad('{"id": "a", "prompt": "x", "model": "nope"}').model == "nope"


def test_user_text_in_messages_is_escaped_and_shortened() -> None:
    err = bad('{"id": "a", "prompt": "x", "line\\nbreak' + "k" * 200 + '": 1}')
    assert err.code == "unknown_field" and "\\n" in err.message


def test_model_lookup_errors_become_line_errors() -> None:
    def exploding(name: str) -> str | None:
        raise OSError(36, "File name too long")

    err = parse_line(1, '{"id": "a", "prompt": "x", "model": "some/model"}', None, exploding)
    assert isinstance(err, LineError) and err.code == "model_not_found" and "File name too long" in err.message


# ----------------------------------------------------------------------------- property-style: parse_line never raises

GOOD_LINES = [
    '{"id": "a", "prompt": "Say hi.", "max_tokens": 8}',
    '{"id": 3, "messages": [{"role": "user", "content": "안녕 🚀"}], "temperature": 0.5, "stop": ["\\n"]}',
    line(CHAT, max_tokens=4, top_p=0.9, seed=1, response_format={"type": "json_object"}),
    line(COMPLETIONS, prompt=["a", [1, 2]]),
    line(EMBEDDINGS, input=["x"]),
]
FIELDS = ["id", "custom_id", "prompt", "messages", "model", "max_tokens", "temperature", "top_p", "stop", "seed", "n",
          "url", "method", "body", "role", "content", "stream", "input", "max_token"]  # fmt: skip


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, biased towards the fields and types a request line uses."""
    pick = rng.randrange(10 if depth < 4 else 6)
    if pick == 0:
        return rng.choice([None, True, False, CHAT, EMBEDDINGS, "POST"])
    if pick in (1, 2):
        return rng.choice([0, 1, -1, 2**63, 10**30, 0.5, 1e308, rng.random()])
    if pick in (3, 4, 5):
        return "".join(rng.choice(string.printable + "안녕🚀\u0000\ud800\u202e") for _ in range(rng.randrange(12)))
    if pick in (6, 7):
        return {rng.choice(FIELDS): _random_value(rng, depth + 1) for _ in range(rng.randrange(5))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _mutate(rng: random.Random, text: bytes) -> bytes:
    """Damage a valid line: delete, insert or replace a few bytes."""
    data = bytearray(text)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(data) + 1)
        op = rng.randrange(3)
        if op == 0 and data:
            del data[min(i, len(data) - 1)]
        elif op == 1:
            data[i:i] = bytes([rng.randrange(256)])
        elif data:
            data[min(i, len(data) - 1)] = rng.choice(b'{}[]",:\\ 0a\x00\xff')
    return bytes(data)


def _check_any(result: Parsed | LineError) -> None:
    """Whatever parse_line returned is well-formed and storable."""
    if isinstance(result, Parsed):
        assert isinstance(json.loads(result.body), dict)
        result.body.decode("utf-8")
        for text in (result.custom_id, result.model):
            assert "\x00" not in text and text.encode("utf-8")
    else:
        assert result.code in CODES
        assert_clean_message(result.message)
        result.custom_id.encode("utf-8")


def test_parse_line_never_raises_on_random_input() -> None:
    rng = random.Random(20240611)
    for i in range(3000):
        kind = i % 4
        if kind == 0:
            data: str | bytes = rng.randbytes(rng.randrange(80))
        elif kind == 1:
            data = _mutate(rng, rng.choice(GOOD_LINES).encode())
        elif kind == 2:
            data = json.dumps(_random_value(rng))
        else:
            obj = {rng.choice(FIELDS): _random_value(rng) for _ in range(rng.randrange(6))}
            data = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
        _check_any(parse_line(i + 1, data, rng.choice([MODEL, None]), check_model))


# ----------------------------------------------------------------------------- output lines

RID = request_id_for(42)
EXPIRED = ("batch_expired", "This request could not be executed before the completion window expired.")


def _chat_body(content: str = "안녕 🚀") -> bytes:
    """A chat.completion response body as a worker stores it."""
    body = {"id": f"chatcmpl-{RID}", "object": "chat.completion", "created": 1_700_000_000, "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}  # fmt: skip
    return json.dumps(body, ensure_ascii=False).encode()


def _decode(data: bytes) -> dict[str, Any]:
    """An output line as JSON, checked against our own definition too."""
    assert b"\n" not in data
    msgspec.json.decode(data, type=OutputLine)
    obj: dict[str, Any] = json.loads(data)
    return obj


def test_success_line_splices_the_stored_body_raw_and_validates_as_the_sdk_types() -> None:
    body = _chat_body()
    out = output_line(RID, "a1", 200, body, None)
    assert body in out  # not re-encoded
    obj = _decode(out)
    assert RID == "batch_req_000000000042" and obj["id"] == obj["response"]["request_id"] == RID
    assert (obj["custom_id"], obj["response"]["status_code"], obj["error"]) == ("a1", 200, None)
    ChatCompletion.model_validate(obj["response"]["body"])
    completion = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL,
                  "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length"}]}  # fmt: skip
    Completion.model_validate(_decode(output_line(RID, "a2", 200, json.dumps(completion), None))["response"]["body"])
    embeddings = {"object": "list", "model": MODEL, "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
                  "usage": {"prompt_tokens": 2, "total_tokens": 2}}  # fmt: skip
    CreateEmbeddingResponse.model_validate(_decode(output_line(RID, "e", 200, json.dumps(embeddings), None))["response"]["body"])


def test_error_line_carries_openais_error_object() -> None:
    body = error_body("line 3: body.max_tokens: should be an integer (got '12')", "invalid_request_error", "body.max_tokens",
                      "invalid_request")  # fmt: skip
    obj = _decode(output_line(RID, "bad", 400, body, None))
    assert obj["error"] is None and obj["response"]["status_code"] == 400
    err = ErrorObject.model_validate(obj["response"]["body"]["error"])
    assert (err.type, err.param, err.code) == ("invalid_request_error", "body.max_tokens", "invalid_request")
    assert json.loads(error_body("boom", "server_error")) == {"error": {"message": "boom", "type": "server_error", "param": None,
                                                                        "code": None}}  # fmt: skip


def test_expired_line_is_exactly_openais() -> None:
    ours = output_line("batch_req_123", "request-3", None, None, EXPIRED)
    guide = ('{"id": "batch_req_123", "custom_id": "request-3", "response": null, "error": {"code": "batch_expired", '
             '"message": "This request could not be executed before the completion window expired."}}')  # fmt: skip
    assert json.loads(ours) == json.loads(guide)
    assert _decode(ours)["response"] is None


def test_meta_is_appended() -> None:
    meta = {"line": 4, "worker": "w1", "device": "cuda:0", "model": f"{MODEL}@bf16", "latency_ms": 12.5}
    obj = _decode(output_line(RID, "a1", 200, _chat_body(), None, meta))
    assert list(obj) == ["id", "custom_id", "response", "error", "meta"] and obj["meta"] == meta


def test_openais_own_output_lines_decode_as_our_output_line() -> None:
    guide = ('{"id": "batch_req_456", "custom_id": "request-1", "response": {"status_code": 200, "request_id": "req_789", '
             '"body": {"id": "chatcmpl-abc", "object": "chat.completion", "created": 1711652789, "model": "gpt-3.5-turbo-0125", '
             '"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I assist you today?"}, '
             '"logprobs": null, "finish_reason": "stop"}], "usage": {"prompt_tokens": 20, "completion_tokens": 9, '
             '"total_tokens": 29}, "system_fingerprint": "fp_3ba"}}, "error": null}')  # fmt: skip
    line_ = msgspec.json.decode(guide, type=OutputLine)
    assert line_.response is not None and line_.response.status_code == 200
    again = output_line(line_.id, line_.custom_id, 200, bytes(line_.response.body), None)
    assert json.loads(again)["response"]["body"] == json.loads(guide)["response"]["body"]


# ----------------------------------------------------------------------------- the Batch object


def test_batch_object_validates_as_the_sdks_batch_with_every_field() -> None:
    batch = Batch(id="batch_1", endpoint=CHAT, input_file_id="jobs.jsonl", completion_window="24h",
                  status=BatchStatus.COMPLETED, created_at=unix(1_700_000_000.7) or 0, in_progress_at=unix(1_700_000_001.2),
                  completed_at=unix(1_700_000_100.0), expires_at=unix(1_700_086_400.0), model=MODEL,
                  output_file_id="out.jsonl", error_file_id="out.errors.jsonl",
                  errors=BatchErrors(data=[BatchFileError(code="invalid_json", message="invalid JSON", line=3)]),
                  request_counts=BatchRequestCounts(total=3, completed=2, failed=1), usage=usage(30, 12),
                  metadata={"team": "nlp"})  # fmt: skip
    obj = json.loads(encode_batch(batch))
    assert set(obj) == set(SdkBatch.model_fields)  # exactly the SDK's fields, all present
    sdk = SdkBatch.model_validate(obj)
    assert (sdk.object, sdk.status, sdk.created_at, sdk.in_progress_at) == ("batch", "completed", 1_700_000_000, 1_700_000_001)
    assert sdk.errors is not None and sdk.errors.object == "list" and sdk.errors.data is not None
    assert (sdk.errors.data[0].line, sdk.errors.data[0].param) == (3, None)
    assert sdk.usage is not None and (sdk.usage.total_tokens, sdk.usage.input_tokens_details.cached_tokens) == (42, 0)
    assert sdk.request_counts is not None and sdk.request_counts.total == 3
    assert all(type(obj[k]) is int for k in obj if k.endswith("_at") and obj[k] is not None)


def test_fresh_batch_object_has_nulls_not_gaps() -> None:
    obj = json.loads(encode_batch(Batch(id="b", endpoint=COMPLETIONS, input_file_id="-", completion_window="24h",
                                        status=BatchStatus.VALIDATING, created_at=1)))  # fmt: skip
    assert obj["errors"] is None and obj["metadata"] is None and obj["failed_at"] is None
    assert obj["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    SdkBatch.model_validate(obj)


# ----------------------------------------------------------------------------- layering


def test_formats_imports_only_the_bottom_of_batchllm() -> None:
    allowed = {"batchllm.status", "batchllm.errors", "batchllm.settings"}
    package = Path(__file__).resolve().parent.parent / "batchllm" / "formats"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("batchllm"):
                assert node.module in allowed or node.module.startswith("batchllm.formats"), (path.name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith(("batchllm", "vllm", "torch", "pydantic")) for a in node.names), path.name
