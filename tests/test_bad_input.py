"""The bad-input corpus (tests/data/bad, described by its MANIFEST.json) through the real submit path.

Fast: SQLite in a temporary directory, no Redis, no vLLM (``submit_file`` stores without
dispatching). For every corpus file: each non-blank line is accounted for exactly once (a valid request
row or an error row), each error row names its line and says what is wrong in one short line, the valid
lines are stored, and ``strict=True`` rejects the file naming ``file:line`` while storing nothing.
"""

from __future__ import annotations

import io
import json
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from batchllm.catalog import load_catalog
from batchllm.errors import InputError
from batchllm.services.submit import submit_file
from batchllm.settings import Settings
from batchllm.status import Endpoint
from batchllm.store.db import session_scope, upgrade
from batchllm.store.models import Batch, Request

CORPUS = Path(__file__).resolve().parent / "data" / "bad"
MANIFEST: dict[str, Any] = json.loads((CORPUS / "MANIFEST.json").read_text(encoding="utf-8"))
FILES: dict[str, dict[str, Any]] = MANIFEST["files"]
MODEL = "smollm2-135m-instruct"
MAX_MESSAGE = 200
# The catalog's unknown-model message lists every known model, so it runs longer than the others.
MAX_MODEL_NOT_FOUND_MESSAGE = 400
KNOWN_CODES = {
    "mismatched_endpoint",
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
    "duplicate_custom_id",
}
# What a user must never see in an error message.
NOT_IN_MESSAGES = re.compile(r"Traceback|File \"|<class |object at 0x|ValidationError|pydantic|errors\.pydantic\.dev|\bNone\b")


# ----------------------------------------------------------------------------- generated corpus files


def make_long_line(path: Path) -> None:
    """Write a valid line, a ~10 MB line (one huge prompt), and another valid line.

    Args:
        path: where to write the file.
    """
    with path.open("wb") as f:
        f.write(json.dumps({"id": "before", "prompt": "Say hi."}).encode() + b"\n")
        f.write(b'{"id": "huge", "prompt": "' + b"x" * 10_000_000 + b'"}\n')
        f.write(json.dumps({"id": "after", "prompt": "Say hi."}).encode() + b"\n")


def make_binary(path: Path) -> None:
    """Write 64 KiB of random bytes from a fixed seed (the same file on every run).

    Args:
        path: where to write the file.
    """
    path.write_bytes(random.Random(20240611).randbytes(64 * 1024))


GENERATORS = {"long_line": make_long_line, "binary": make_binary}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every corpus file by name: committed ones in place, generated ones written once per module."""
    gen_dir = tmp_path_factory.mktemp("generated")
    paths: dict[str, Path] = {}
    for name, entry in FILES.items():
        if entry.get("generated"):
            paths[name] = gen_dir / name
            GENERATORS[entry["generated"]](paths[name])
        else:
            paths[name] = CORPUS / name
    return paths


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings on a fresh, migrated SQLite database shared by this module's tests."""
    tmp = tmp_path_factory.mktemp("db")
    # OpenAI's and vLLM's example files name their own models: a user maps them onto local ones in a models file.
    names = sorted({m for e in FILES.values() for m in e.get("models", [])})
    models = tmp / "models.toml"
    models.write_text("".join(f'[models."{n}"]\nbase = "{MODEL}"\n\n' for n in names), encoding="utf-8")
    s = Settings(database_url=f"sqlite:///{tmp}/t.db", data_dir=tmp, models_file=models)
    upgrade(s.database_url)
    return s


# ----------------------------------------------------------------------------- helpers


def physical_lines(data: bytes) -> list[bytes]:
    """Split file bytes into lines the way a JSONL reader numbers them (``\\n`` ends a line).

    Args:
        data: the whole file.

    Returns:
        The lines without their ``\\n``; a final line without newline counts, an empty tail does not.
    """
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def non_blank_line_numbers(data: bytes) -> list[int]:
    """1-based numbers of the lines that are not blank (whitespace only, a BOM counts as nothing).

    Args:
        data: the whole file.
    """
    return [n for n, line in enumerate(physical_lines(data), start=1) if line.removeprefix(b"\xef\xbb\xbf").strip()]


def table_counts(settings: Settings) -> tuple[int, int]:
    """How many batches and request rows the database holds.

    Args:
        settings: points at the database.
    """
    with session_scope(settings.database_url) as s:
        return s.scalar(select(func.count()).select_from(Batch)) or 0, s.scalar(select(func.count()).select_from(Request)) or 0


def stored_rows(settings: Settings, batch_id: str) -> list[Request]:
    """The request rows of one batch, in line order.

    Args:
        settings: points at the database.
        batch_id: the batch.
    """
    with session_scope(settings.database_url) as s:
        return list(s.scalars(select(Request).where(Request.batch_id == batch_id).order_by(Request.line_no)))


def check_message(line_no: int, code: str, stored: str) -> None:
    """Assert an error message names its line and says what is wrong in one short, clean line.

    Args:
        line_no: the line the error is for.
        code: its error code (the catalog's unknown-model text may be longer than the rest).
        stored: the message as stored on the request row (``line <n>: <what is wrong>``).
    """
    prefix = f"line {line_no}: "
    assert stored.startswith(prefix), stored
    message = stored.removeprefix(prefix)
    assert message.strip(), f"line {line_no}: empty message"
    assert "\n" not in message and "\r" not in message, f"multi-line message: {message!r}"
    limit = MAX_MODEL_NOT_FOUND_MESSAGE if code == "model_not_found" else MAX_MESSAGE
    assert len(message) <= limit, f"{len(message)}-char message: {message}"
    assert not NOT_IN_MESSAGES.search(message), f"internal detail in message: {message}"
    assert message.isprintable(), f"unprintable characters in message: {message!r}"


def expected_errors(entry: dict[str, Any]) -> dict[int, str] | None:
    """The manifest's ``{line: code}`` for a file, or None when every non-blank line is an error.

    Args:
        entry: the file's manifest entry.
    """
    if entry["errors"] == "all":
        return None
    return {int(k): v for k, v in entry["errors"].items()}


# ----------------------------------------------------------------------------- the manifest itself


def test_manifest_lists_every_corpus_file() -> None:
    on_disk = {p.name for p in CORPUS.iterdir() if p.name not in ("MANIFEST.json", ".gitattributes")}
    committed = {name for name, entry in FILES.items() if not entry.get("generated")}
    assert on_disk == committed
    assert len(FILES) >= 25


@pytest.mark.parametrize("name", sorted(FILES))
def test_manifest_entry_is_complete(name: str) -> None:
    entry = FILES[name]
    assert entry["description"].strip()
    assert isinstance(entry["valid"], int) and entry["valid"] >= 0
    if entry["errors"] != "all":
        assert all(code in KNOWN_CODES for code in entry["errors"].values()), entry["errors"]
        assert all(int(n) >= 1 for n in entry["errors"])
    else:
        assert set(entry["error_codes"]) <= KNOWN_CODES
    assert entry.get("default_model", MODEL) in (MODEL, None)


@pytest.mark.parametrize("name", sorted(n for n, e in FILES.items() if not e.get("generated")))
def test_committed_files_are_small(name: str) -> None:
    assert (CORPUS / name).stat().st_size <= 128 * 1024


def test_manifest_line_numbers_exist(corpus: dict[str, Path]) -> None:
    for name, entry in FILES.items():
        data = corpus[name].read_bytes()
        nonblank = set(non_blank_line_numbers(data))
        errors = expected_errors(entry) or {}
        assert set(errors) <= nonblank, f"{name}: manifest names blank or missing lines {set(errors) - nonblank}"
        if "submit_error" not in entry:
            assert entry["valid"] + len(errors) == len(nonblank) or entry["errors"] == "all", name
        if entry.get("blank") is not None:
            assert len(physical_lines(data)) - len(nonblank) == entry["blank"], name


# ----------------------------------------------------------------------------- submit: every line accounted for


@pytest.mark.parametrize("name", sorted(n for n, e in FILES.items() if "submit_error" not in e))
def test_every_line_is_accounted_for_once(name: str, corpus: dict[str, Path], settings: Settings) -> None:
    entry = FILES[name]
    data = corpus[name].read_bytes()
    nonblank = non_blank_line_numbers(data)
    result = submit_file(settings, corpus[name], model=entry.get("default_model", MODEL))

    rows = stored_rows(settings, result.batch_id)
    assert [r.line_no for r in rows] == nonblank, "each non-blank line must have exactly one row"
    valid = [r for r in rows if r.error_code is None]
    invalid = [r for r in rows if r.error_code is not None]
    assert result.total == len(nonblank) == len(valid) + len(invalid)
    assert (result.valid, result.invalid) == (len(valid), len(invalid))
    assert result.blank == len(physical_lines(data)) - len(nonblank)

    expected = expected_errors(entry)
    got = {r.line_no: r.error_code for r in invalid}
    if expected is None:  # a binary file: every line is an error, of one of the listed kinds
        assert not valid
        assert set(got.values()) <= set(entry["error_codes"])
    else:
        assert got == expected
    assert len(valid) == entry["valid"]

    for r in invalid:
        assert r.error_code in KNOWN_CODES
        assert r.body is None and r.chunk_id is None
        check_message(r.line_no, r.error_code, r.error_message or "")
    for r in valid:  # stored as the OpenAI request body, ready for a worker
        assert r.endpoint in {e.value for e in Endpoint} and r.chunk_id and r.model
        body = json.loads(r.body or "")
        key = {Endpoint.CHAT: "messages", Endpoint.COMPLETIONS: "prompt", Endpoint.EMBEDDINGS: "input"}[Endpoint(r.endpoint)]
        assert body[key], body
    assert len({r.custom_id for r in valid}) == len(valid), "valid custom_ids must be unique"

    with session_scope(settings.database_url) as s:
        batch = s.get(Batch, result.batch_id)
        assert batch is not None
        assert (batch.total, batch.invalid, batch.blank_lines) == (result.total, result.invalid, result.blank)


@pytest.mark.parametrize("name", sorted(n for n, e in FILES.items() if "submit_error" in e))
def test_files_without_requests_are_rejected(name: str, corpus: dict[str, Path], settings: Settings) -> None:
    before = table_counts(settings)
    with pytest.raises(InputError, match=FILES[name]["submit_error"]) as info:
        submit_file(settings, corpus[name], model=MODEL)
    assert str(corpus[name]) in str(info.value)
    assert info.value.exit_code == 2
    assert table_counts(settings) == before


def test_empty_and_blank_only_are_in_the_corpus() -> None:
    assert FILES["empty.jsonl"]["submit_error"] and FILES["only_blank.jsonl"]["submit_error"]
    assert (CORPUS / "empty.jsonl").read_bytes() == b""
    assert not (CORPUS / "only_blank.jsonl").read_bytes().strip()


# ----------------------------------------------------------------------------- --strict


def _first_bad_line(name: str, data: bytes) -> int | None:
    """The line ``--strict`` must name: the first bad line per the manifest (None: the file is clean).

    Args:
        name: the corpus file.
        data: its bytes.
    """
    entry = FILES[name]
    expected = expected_errors(entry)
    if expected is None:
        return non_blank_line_numbers(data)[0]
    return min(expected) if expected else None


@pytest.mark.parametrize("name", sorted(n for n, e in FILES.items() if "submit_error" not in e))
def test_strict_rejects_whole_file_and_stores_nothing(name: str, corpus: dict[str, Path], settings: Settings) -> None:
    entry = FILES[name]
    data = corpus[name].read_bytes()
    first = _first_bad_line(name, data)
    before = table_counts(settings)
    if first is None:  # a file with no bad line passes --strict
        result = submit_file(settings, corpus[name], model=entry.get("default_model", MODEL), strict=True)
        assert result.invalid == 0 and result.valid == entry["valid"]
        return
    with pytest.raises(InputError) as info:
        submit_file(settings, corpus[name], model=entry.get("default_model", MODEL), strict=True)
    message = str(info.value)
    assert message.startswith(f"{corpus[name]}:{first}: "), message
    assert "\n" not in message and "nothing was stored" in message
    assert info.value.exit_code == 2
    assert table_counts(settings) == before, "--strict must store no batch and no request rows"


# ----------------------------------------------------------------------------- specific kinds


def test_prompt_beyond_context_is_valid_at_submit(corpus: dict[str, Path], settings: Settings) -> None:
    entry = FILES["prompt_beyond_context.jsonl"]
    spec, _ = load_catalog(settings).resolve(MODEL)
    result = submit_file(settings, corpus["prompt_beyond_context.jsonl"], model=MODEL)
    rows = {r.line_no: r for r in stored_rows(settings, result.batch_id)}
    for line, code in entry["fails_at_worker"].items():
        row = rows[int(line)]
        assert row.error_code is None and code == "context_length_exceeded"
        prompt = json.loads(row.body or "")["prompt"]
        # ~4.5 characters per token for this English text; even at a generous 6 it is beyond the context.
        assert len(prompt) / 6 > spec.max_model_len


def test_ten_megabyte_line_is_skipped_not_loaded(corpus: dict[str, Path], settings: Settings) -> None:
    result = submit_file(settings, corpus["long_line.jsonl"], model=MODEL)
    rows = stored_rows(settings, result.batch_id)
    assert [(r.line_no, r.custom_id, r.error_code) for r in rows] == [
        (1, "before", None),
        (2, "line-2", "line_too_long"),
        (3, "after", None),
    ]
    assert "MB" in (rows[1].error_message or "") and "BATCHLLM_MAX_LINE_BYTES" in (rows[1].error_message or "")


def test_smaller_line_limit_applies(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path}/t.db", data_dir=tmp_path, max_line_bytes=1024)
    upgrade(settings.database_url)
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"id": "a", "prompt": "x" * 900}) + "\n" + json.dumps({"id": "b", "prompt": "x" * 1100}) + "\n",
        encoding="utf-8",
    )
    result = submit_file(settings, src, model=MODEL)
    assert [(r.line_no, r.error_code) for r in stored_rows(settings, result.batch_id)] == [(1, None), (2, "line_too_long")]


def test_korean_and_emoji_round_trip_through_the_store(corpus: dict[str, Path], settings: Settings) -> None:
    result = submit_file(settings, corpus["good_mixed.jsonl"], model=MODEL)
    rows = {r.custom_id: r for r in stored_rows(settings, result.batch_id)}
    assert json.loads(rows["ko"].body or "")["prompt"] == "안녕하세요, 한 문장으로 자기소개를 해 주세요."
    assert json.loads(rows["emoji"].body or "")["messages"][0]["content"] == "Explain 🚀 and 👩‍🔬 in one line."
    assert json.loads(rows["ar"].body or "")["messages"][0]["content"] == "مرحبا"
    assert rows["42"].endpoint == Endpoint.COMPLETIONS


def test_invalid_line_keeps_its_own_id_when_it_has_one(corpus: dict[str, Path], settings: Settings) -> None:
    result = submit_file(settings, corpus["wrong_types.jsonl"], model=MODEL)
    rows = stored_rows(settings, result.batch_id)
    assert [r.custom_id for r in rows] == list("abcdefghijk")


def test_errors_summary_names_lines(corpus: dict[str, Path], settings: Settings) -> None:
    result = submit_file(settings, corpus["unknown_field.jsonl"], model=MODEL)
    assert [e.line_no for e in result.errors] == [2, 3, 5, 6, 9]  # body.max_token (line 4) is left to vLLM
    assert "did you mean 'max_tokens'" in result.errors[0].message


# ----------------------------------------------------------------------------- stdin


class _Stdin(io.TextIOWrapper):
    """A text stdin over bytes, like the real one: ``.buffer`` is the binary stream submit reads."""


@pytest.fixture
def fake_stdin(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Returns a function that replaces ``sys.stdin`` with one that yields the given bytes."""

    def feed(data: bytes) -> io.TextIOWrapper:
        stdin = _Stdin(io.BytesIO(data), encoding="utf-8")
        monkeypatch.setattr(sys, "stdin", stdin)
        return stdin

    yield feed


def test_stdin_dash_reads_standard_input(fake_stdin: Any, settings: Settings) -> None:
    lines = [
        json.dumps({"id": "a", "prompt": "하나"}, ensure_ascii=False),
        "",
        json.dumps({"custom_id": "b", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "🙂"}]}}),
        "{not json",
    ]
    fake_stdin(("\n".join(lines) + "\n").encode("utf-8"))
    result = submit_file(settings, "-", model=MODEL)
    assert (result.total, result.valid, result.invalid, result.blank) == (3, 2, 1, 1)
    rows = stored_rows(settings, result.batch_id)
    assert [(r.line_no, r.custom_id, r.error_code) for r in rows] == [
        (1, "a", None),
        (3, "b", None),
        (4, "line-4", "invalid_json"),
    ]
    assert json.loads(rows[0].body or "")["prompt"] == "하나"
    with session_scope(settings.database_url) as s:
        batch = s.get(Batch, result.batch_id)
        assert batch is not None and batch.input_name == "<stdin>" and batch.input_sha256


def test_stdin_strict_names_stdin(fake_stdin: Any, settings: Settings) -> None:
    fake_stdin(b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "x", "max_tokens": "12"}\n')
    before = table_counts(settings)
    with pytest.raises(InputError, match=r"^<stdin>:2: max_tokens"):
        submit_file(settings, "-", model=MODEL, strict=True)
    assert table_counts(settings) == before


def test_empty_stdin_is_rejected(fake_stdin: Any, settings: Settings) -> None:
    fake_stdin(b"")
    with pytest.raises(InputError, match="no requests"):
        submit_file(settings, "-", model=MODEL)
