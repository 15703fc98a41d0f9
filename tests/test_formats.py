"""Unit tests of ``batchllm.formats``: the streaming reader, the line parser and the output builders.

No database, no Redis, no vLLM. Models are checked with a stand-in for the catalog, so these tests pin
the parser's own behaviour; tests/test_bad_input.py runs the same code through the real submit path.
"""

from __future__ import annotations

import io
import json
import random
import string
from collections.abc import Callable
from typing import Any

import pytest

from batchllm.formats import (
    CHAT_URL,
    COMPLETIONS_URL,
    InputLine,
    LineError,
    OutputLine,
    ParsedRequest,
    completion_body,
    iter_lines,
    output_line,
    parse_line,
    request_id_for,
)

MODEL = "smollm2-135m-instruct"
LIMIT = 4 * 1024 * 1024
PARSE_CODES = {
    "invalid_json",
    "invalid_encoding",
    "line_too_long",
    "unsupported_url",
    "unsupported_parameter",
    "invalid_request",
    "unknown_field",
    "missing_prompt",
    "missing_model",
    "model_not_found",
}


def check_model(name: str) -> str | None:
    """Stand-in for the catalog check: only ``MODEL`` (and its alias ``smollm2``) exist.

    Args:
        name: the model name a line gives.

    Returns:
        None when known, else a one-line message as the catalog would give.
    """
    return None if name in (MODEL, "smollm2") else f"unknown model '{name}'"


def parse(text: str, default_model: str | None = MODEL, line_no: int = 7) -> ParsedRequest | LineError:
    """Parse one line with the stand-in catalog.

    Args:
        text: the line.
        default_model: the ``--model`` default.
        line_no: its 1-based line number.
    """
    return parse_line(line_no, text, default_model, check_model)


def ok(text: str, **kw: Any) -> ParsedRequest:
    """Parse a line that must be valid.

    Args:
        text: the line.
        **kw: passed to ``parse``.
    """
    result = parse(text, **kw)
    assert isinstance(result, ParsedRequest), result
    return result


def bad(text: str, **kw: Any) -> LineError:
    """Parse a line that must be invalid, and check its message is one clean line.

    Args:
        text: the line.
        **kw: passed to ``parse``.
    """
    result = parse(text, **kw)
    assert isinstance(result, LineError), result
    assert_clean_message(result.message)
    return result


def assert_clean_message(message: str) -> None:
    """One short printable line with no Python internals.

    Args:
        message: an error message.
    """
    assert message and "\n" not in message and message.isprintable(), repr(message)
    assert len(message) <= 200, message
    for marker in ("Traceback", "ValidationError", "pydantic", "<class", "object at 0x"):
        assert marker not in message, message


def read(data: bytes, limit: int = LIMIT) -> list[InputLine]:
    """All lines ``iter_lines`` yields for ``data``.

    Args:
        data: file bytes.
        limit: ``max_line_bytes``.
    """
    return list(iter_lines(io.BytesIO(data), limit))


def chat_line(cid: str = "c1", **body: Any) -> str:
    """An OpenAI Batch chat line; ``body`` adds or overrides body keys.

    Args:
        cid: its custom_id.
        **body: body keys.
    """
    b: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    b.update(body)
    return json.dumps({"custom_id": cid, "method": "POST", "url": CHAT_URL, "body": b}, ensure_ascii=False)


# ----------------------------------------------------------------------------- iter_lines


def test_iter_lines_numbers_every_physical_line_and_marks_blanks() -> None:
    lines = read(b'{"a": 1}\n\n   \n{"b": 2}\r\n\t\r\n{"c": 3}')
    assert [(x.line_no, x.text, x.error) for x in lines] == [
        (1, '{"a": 1}', None),
        (2, None, None),
        (3, None, None),
        (4, '{"b": 2}', None),
        (5, None, None),
        (6, '{"c": 3}', None),
    ]


def test_iter_lines_empty_stream_yields_nothing() -> None:
    assert read(b"") == []


def test_iter_lines_strips_bom_on_first_and_later_lines() -> None:
    lines = read(b'\xef\xbb\xbf{"a": 1}\n\xef\xbb\xbf{"b": 2}\n')
    assert [x.text for x in lines] == ['{"a": 1}', '{"b": 2}']


def test_iter_lines_reports_non_utf8_with_column() -> None:
    (line,) = read(b'{"p": "caf\xe9"}\n')
    assert line.text is None and line.error is not None
    assert line.error.code == "invalid_encoding" and line.error.custom_id == "line-1"
    assert "0xe9" in line.error.message and "column 11" in line.error.message


def test_iter_lines_reports_nul_bytes_and_utf16() -> None:
    utf16 = read('{"id": "a"}\n{"id": "b"}\n'.encode("utf-16"))
    assert [x.error.code if x.error else None for x in utf16] == ["invalid_encoding"] * 3
    assert utf16[0].error is not None and "UTF-16" in utf16[0].error.message
    (nul,) = read(b'{"p": "a\x00b"}\n')
    assert nul.error is not None and nul.error.code == "invalid_encoding" and "NUL" in nul.error.message


def test_iter_lines_line_limit_boundary() -> None:
    limit = 1024
    exact = b"x" * limit
    lines = read(exact + b"\n" + b"y" * (limit + 1) + b"\n" + b"z\n", limit)
    assert lines[0].text == exact.decode()
    assert lines[1].error is not None and lines[1].error.code == "line_too_long" and lines[1].line_no == 2
    assert lines[2].text == "z" and lines[2].line_no == 3


def test_iter_lines_oversized_last_line_without_newline() -> None:
    lines = read(b"a\n" + b"b" * 5000, 1024)
    assert [x.line_no for x in lines] == [1, 2]
    assert lines[1].error is not None and lines[1].error.code == "line_too_long"


def test_iter_lines_ten_megabyte_line_is_reported_not_kept() -> None:
    big = b'{"id": "big", "prompt": "' + b"x" * 10_000_000 + b'"}'
    lines = read(b'{"id": "a"}\n' + big + b'\n{"id": "b"}\n')
    assert [(x.line_no, x.error.code if x.error else None) for x in lines] == [(1, None), (2, "line_too_long"), (3, None)]
    assert lines[1].error is not None and "10.0 MB" in lines[1].error.message
    assert lines[1].text is None


# ----------------------------------------------------------------------------- parse_line: valid lines


def test_short_form_prompt() -> None:
    r = ok('{"id": "a1", "prompt": "Hello", "max_tokens": 16, "temperature": 0, "stop": ["\\n"], "seed": 3}')
    assert (r.custom_id, r.model, r.kind, r.prompt, r.messages, r.line_no) == ("a1", MODEL, "completion", "Hello", None, 7)
    assert r.params == {"max_tokens": 16, "temperature": 0, "stop": ["\n"], "seed": 3}


def test_short_form_messages_and_model() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = ok(json.dumps({"id": 5, "model": "smollm2", "messages": messages}))
    assert (r.custom_id, r.model, r.kind) == ("5", "smollm2", "chat")
    assert r.messages == messages


def test_line_without_id_gets_line_number_id() -> None:
    assert ok('{"prompt": "x"}', line_no=12).custom_id == "line-12"


def test_openai_chat_line() -> None:
    r = ok(chat_line("req-1", max_completion_tokens=9, top_p=0.5, user="u1", stream=False))
    assert (r.custom_id, r.kind, r.model) == ("req-1", "chat", MODEL)
    assert r.params == {"max_tokens": 9, "top_p": 0.5}


def test_openai_completion_line_accepts_one_prompt_in_a_list() -> None:
    line = {"custom_id": "c", "url": COMPLETIONS_URL, "body": {"prompt": ["Once"], "max_tokens": 4}}
    r = ok(json.dumps(line))
    assert (r.kind, r.prompt, r.model, r.params) == ("completion", "Once", MODEL, {"max_tokens": 4})


def test_text_content_parts_are_accepted() -> None:
    r = ok(chat_line(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]))
    assert r.messages is not None and r.messages[0]["content"][1]["text"] == "b"


def test_body_json_round_trips_korean_and_emoji() -> None:
    text = "안녕하세요 👋🏽 — 한국어와 이모지 🚀"
    r = ok(json.dumps({"id": "ko", "messages": [{"role": "user", "content": text}]}))
    stored = r.body_json()
    assert text in stored  # stored as text, not \\u escapes
    assert json.loads(stored)["messages"][0]["content"] == text
    stored.encode("utf-8")  # storable
    r2 = ok(json.dumps({"id": "ko2", "prompt": text}, ensure_ascii=True))  # escaped input, same text
    assert json.loads(r2.body_json())["prompt"] == text


def test_surrogate_pair_escape_is_fine() -> None:
    r = ok('{"id": "e", "prompt": "\\ud83d\\ude00"}')
    assert r.prompt == "😀"


# ----------------------------------------------------------------------------- parse_line: invalid lines

CASES: list[tuple[str, str, str]] = [
    # (line, code, a piece of the message)
    ('{"id": "a", "prompt": "x"', "invalid_json", "truncated"),
    ("{'id': 'a'}", "invalid_json", "double quotes"),
    ('{"id": "a"}{"id": "b"}', "invalid_json", "one JSON object per line"),
    ('[{"id": "a", "prompt": "x"}]', "invalid_json", "got an array"),
    ("null", "invalid_json", "got null"),
    ('{"id": "a", "prompt": "x", "max_tokens": 1' + "0" * 5000 + "}", "invalid_json", "too many digits"),
    ('{"id": "a", "prompt": "x", "stop": ' + "[" * 5000 + "]" * 5000 + "}", "invalid_json", "nested too deeply"),
    ('{"id": "a", "prompt": "tab\there"}', "invalid_json", "control character 0x09"),
    ('{"id": "a\\u0000", "prompt": "x"}', "invalid_encoding", "NUL"),
    ('{"id": "a", "prompt": "\\u0000"}', "invalid_encoding", "'prompt'"),
    ('{"id": "a", "prompt": "\\udc00 lone"}', "invalid_encoding", "surrogate"),
    ('{"id": "a", "prompt": "x", "max_tokens": "ten"}', "invalid_request", 'max_tokens: should be an integer (got "ten")'),
    ('{"id": "a", "prompt": "x", "max_tokens": true}', "invalid_request", "max_tokens"),
    ('{"id": "a", "prompt": "x", "temperature": "hot"}', "invalid_request", "temperature: should be a number"),
    ('{"id": "a", "messages": "hi"}', "invalid_request", "messages: should be a list"),
    ('{"id": "a", "prompt": "x", "max_tokens": -3}', "invalid_request", "greater than or equal to 1"),
    ('{"id": "a", "prompt": "x", "max_tokens": 1000000000000}', "invalid_request", "less than or equal to 1000000"),
    ('{"id": "a", "prompt": "x", "temperature": 3}', "invalid_request", "temperature"),
    ('{"id": "a", "prompt": "x", "top_p": 0}', "invalid_request", "top_p"),
    ('{"id": "a", "prompt": "x", "n": 2}', "invalid_request", "n: should be less than or equal to 1"),
    ('{"id": "a", "messages": []}', "invalid_request", "at least 1 item"),
    ('{"id": "a", "messages": [{"role": "wizard", "content": "x"}]}', "invalid_request", "messages.0.role"),
    ('{"id": "a", "messages": [{"role": "user", "content": 5}]}', "invalid_request", "messages.0.content"),
    ('{"id": {"k": 1}, "prompt": "x"}', "invalid_request", "id: should be a string or an integer (got an object)"),
    ('{"id": "a", "prompt": "x", "max_token": 5}', "unknown_field", "did you mean 'max_tokens'"),
    ('{"id": "a"}', "missing_prompt", "no 'prompt' or 'messages'"),
    ('{"id": "a", "prompt": ""}', "missing_prompt", "empty"),
    ('{"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}', "missing_prompt", "both"),
    ('{"id": "a", "prompt": "x", "model": "gpt-4"}', "model_not_found", "gpt-4"),
    ('{"id": "a", "prompt": "x", "model": "' + "m" * 300 + '"}', "invalid_request", "at most 200"),
    ('{"custom_id": "a", "url": "/v1/embeddings", "body": {"input": "x"}}', "unsupported_url", "/v1/embeddings"),
    ('{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}', "invalid_request", "method"),
    ('{"custom_id": "a", "url": "/v1/completions"}', "invalid_request", "missing field 'body'"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x"}, "prompt": "x"}', "unknown_field", "inside body"),
    (chat_line(tools=[{"type": "function"}]), "unsupported_parameter", "body.tools"),
    (chat_line(logprobs=True), "unsupported_parameter", "body.logprobs"),
    (chat_line(max_token=3), "unknown_field", "'body.max_token' (did you mean 'max_tokens'?)"),
    (chat_line(temperature=9), "invalid_request", "body.temperature"),
]


@pytest.mark.parametrize(("line", "code", "piece"), CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_invalid_line(line: str, code: str, piece: str) -> None:
    err = bad(line)
    assert (err.code, err.line_no) == (code, 7)
    assert piece in err.message


def test_missing_model_without_default() -> None:
    err = bad('{"id": "a", "prompt": "x"}', default_model=None)
    assert err.code == "missing_model" and "--model" in err.message


def test_error_keeps_the_lines_id_or_falls_back() -> None:
    assert bad('{"id": "mine", "prompt": "x", "top_p": 9}').custom_id == "mine"
    assert bad('{"custom_id": "c9", "url": "/v1/x", "body": {}}').custom_id == "c9"
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


# ----------------------------------------------------------------------------- output builders


def _validate(line: dict[str, Any]) -> OutputLine:
    """Serialize an output line as the exporter does and validate it against ``OutputLine``.

    Args:
        line: what ``output_line`` built.
    """
    text = json.dumps(line, ensure_ascii=False)
    assert "\n" not in text
    return OutputLine.model_validate_json(text)


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_output_line_success(kind: str) -> None:
    line = output_line(
        row_id=42,
        custom_id="a1",
        kind=kind,
        ok=True,
        status_code=200,
        model=MODEL,
        created=1_700_000_000.5,
        text="안녕 🚀",
        finish_reason="stop",
        prompt_tokens=5,
        completion_tokens=3,
    )
    out = _validate(line)
    assert out.id == request_id_for(42) == "batch_req_000000000042"
    assert out.custom_id == "a1" and out.error is None and out.response is not None
    assert out.response.status_code == 200 and out.response.request_id == out.id
    body = out.response.body
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert body["model"] == MODEL and body["created"] == 1_700_000_000
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    if kind == "chat":
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        assert choice["message"] == {"role": "assistant", "content": "안녕 🚀"}
    else:
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert choice["text"] == "안녕 🚀"


@pytest.mark.parametrize(("status", "err_type"), [(400, "invalid_request_error"), (500, "server_error")])
def test_output_line_error_with_response(status: int, err_type: str) -> None:
    line = output_line(
        row_id=7,
        custom_id="bad",
        kind=None,
        ok=False,
        status_code=status,
        model=None,
        created=None,
        error_code="invalid_json",
        error_message="line 3: invalid JSON at column 5: Expecting value",
    )
    out = _validate(line)
    assert out.error is not None and out.error.code == "invalid_json"
    assert out.response is not None and out.response.status_code == status
    assert out.response.body["error"] == {"message": out.error.message, "type": err_type, "code": "invalid_json"}


def test_output_line_error_without_response() -> None:
    out = _validate(
        output_line(
            row_id=1, custom_id="x", kind="chat", ok=False, status_code=None, model=MODEL, created=None, error_code="cancelled"
        )
    )
    assert out.response is None and out.error is not None
    assert (out.error.code, out.error.message) == ("cancelled", "request failed")


def test_completion_body_matches_output_shape() -> None:
    body = completion_body("chat", "batch_req_000000000001", MODEL, 1, "hi", "length", 2, 0)
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["total_tokens"] == 2
    assert body["choices"][0]["logprobs"] is None


def test_parse_errors_become_valid_output_lines() -> None:
    err = bad('{"id": "q", "prompt": "x", "temperature": "hot"}')
    out = _validate(
        output_line(
            row_id=3,
            custom_id=err.custom_id,
            kind=None,
            ok=False,
            status_code=400,
            model=None,
            created=None,
            error_code=err.code,
            error_message=f"line {err.line_no}: {err.message}",
        )
    )
    assert out.custom_id == "q" and out.error is not None and out.error.message.startswith("line 7: temperature")


# ----------------------------------------------------------------------------- property-style: garbage never raises

GOOD_LINES = [
    '{"id": "a", "prompt": "Say hi.", "max_tokens": 8}',
    '{"id": 3, "messages": [{"role": "user", "content": "안녕 🚀"}], "temperature": 0.5, "stop": ["\\n"]}',
    chat_line("c", max_tokens=4, top_p=0.9, seed=1),
    json.dumps({"custom_id": "d", "method": "POST", "url": COMPLETIONS_URL, "body": {"model": MODEL, "prompt": "x"}}),
]
FIELD_NAMES = ["id", "custom_id", "prompt", "messages", "model", "max_tokens", "temperature", "top_p", "stop", "seed", "n",
               "url", "method", "body", "role", "content", "tools", "max_token"]  # fmt: skip


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, biased towards the fields and types a request line uses.

    Args:
        rng: the seeded generator.
        depth: current nesting depth (bounded at 4).
    """
    pick = rng.randrange(10 if depth < 4 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, 1, -1, 2**63, 10**30, rng.randint(-(10**6), 10**6)])
    if pick == 3:
        return rng.choice([0.0, -0.5, 1.5, 1e308, float("nan"), float("inf"), rng.random()])
    if pick in (4, 5):
        alphabet = string.printable + "안녕🚀\u0000\ud800\u202e"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
    if pick in (6, 7):
        return {rng.choice(FIELD_NAMES): _random_value(rng, depth + 1) for _ in range(rng.randrange(5))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _mutate(rng: random.Random, line: str) -> str:
    """Damage a valid line: delete, insert, replace or swap a few characters.

    Args:
        rng: the seeded generator.
        line: a valid JSONL line.
    """
    chars = list(line)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(chars) + 1)
        op = rng.randrange(4)
        if op == 0 and chars:
            del chars[min(i, len(chars) - 1)]
        elif op == 1:
            chars.insert(i, rng.choice('{}[]":,\\ntu0-1e.' + "\x00\x01é🚀"))
        elif op == 2 and chars:
            chars[min(i, len(chars) - 1)] = rng.choice(string.printable)
        elif chars:
            j = rng.randrange(len(chars))
            k = min(i, len(chars) - 1)
            chars[j], chars[k] = chars[k], chars[j]
    return "".join(chars)


def _garbage_lines(seed: int, count: int) -> list[bytes]:
    """``count`` lines of random bytes, damaged valid lines and random JSON, without newlines.

    Args:
        seed: fixed seed, so failures reproduce.
        count: how many lines.
    """
    rng = random.Random(seed)
    out: list[bytes] = []
    for _ in range(count):
        kind = rng.randrange(4)
        if kind == 0:
            raw = rng.randbytes(rng.randrange(1, 200))
        elif kind == 1:
            raw = _mutate(rng, rng.choice(GOOD_LINES)).encode("utf-8", "surrogatepass")
        elif kind == 2:
            raw = json.dumps(_random_value(rng), ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
        else:
            obj = json.loads(rng.choice(GOOD_LINES))
            obj[rng.choice(FIELD_NAMES)] = _random_value(rng)
            raw = json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
        out.append(raw.replace(b"\n", b" "))
    return out


def _run(lines: list[bytes], checker: Callable[[str], str | None] = check_model) -> list[ParsedRequest | LineError]:
    """Read and parse a file of ``lines`` exactly as submit does, checking the accounting.

    Args:
        lines: physical lines without their newlines.
        checker: the model check.

    Returns:
        One result per non-blank line, in order.
    """
    results: list[ParsedRequest | LineError] = []
    seen_numbers = []
    for item in iter_lines(io.BytesIO(b"\n".join(lines) + b"\n"), 4096):
        seen_numbers.append(item.line_no)
        if item.text is None and item.error is None:
            continue
        assert (item.text is None) != (item.error is None)
        results.append(item.error or parse_line(item.line_no, item.text or "", MODEL, checker))
    assert seen_numbers == list(range(1, len(lines) + 1)), "every physical line is numbered once"
    return results


def test_random_garbage_never_raises() -> None:
    lines = _garbage_lines(seed=1234, count=2000)
    results = _run(lines)
    assert len(results) == sum(1 for raw in lines if raw.removeprefix(b"\xef\xbb\xbf").strip())
    kinds = {"valid": 0, "invalid": 0}
    for r in results:
        if isinstance(r, LineError):
            kinds["invalid"] += 1
            assert r.code in PARSE_CODES
            assert_clean_message(r.message)
            r.custom_id.encode("utf-8")  # storable
        else:
            kinds["valid"] += 1
            r.body_json().encode("utf-8")  # storable: no lone surrogates
            assert "\x00" not in r.custom_id and len(r.custom_id) <= 512
    assert kinds["valid"] > 20 and kinds["invalid"] > 1000, kinds  # the generator exercises both paths


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_bytes_files_never_raise(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(20_000)
    results = []
    for item in iter_lines(io.BytesIO(data), 1024):
        if item.error is None and item.text is not None:
            results.append(parse_line(item.line_no, item.text, MODEL, check_model))
        elif item.error is not None:
            results.append(item.error)
    assert all(isinstance(r, LineError | ParsedRequest) for r in results)
    assert sum(1 for r in results if isinstance(r, ParsedRequest)) == 0


def test_parse_is_deterministic() -> None:
    lines = _garbage_lines(seed=99, count=300)
    first = [r.model_dump() for r in _run(lines)]
    assert first == [r.model_dump() for r in _run(lines)]
