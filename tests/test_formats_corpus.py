"""The bad-input corpus (tests/data/bad, described by its MANIFEST.json) through ``iter_raw_lines`` + ``parse_line``.

No database: this pins what the parser says about each line of each file, exactly as the manifest records
it (the error code per line, the valid and blank counts), including OpenAI's and vLLM's documentation
examples, which must parse as they are. tests/test_bad_input.py runs the same corpus through submit.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pytest

from batchllm.formats import LineError, Parsed, iter_raw_lines, parse_line

CORPUS = Path(__file__).resolve().parent / "data" / "bad"
MANIFEST: dict[str, Any] = json.loads((CORPUS / "MANIFEST.json").read_text(encoding="utf-8"))
FILES: dict[str, dict[str, Any]] = MANIFEST["files"]
MODEL = "smollm2-135m-instruct"
LIMIT = 4 * 1024 * 1024  # BATCHLLM_MAX_LINE_BYTES' default


def generated(kind: str) -> bytes:
    """The bytes of a generated corpus file (the same on every run).

    Args:
        kind: ``long_line`` (a ~10 MB line between two valid lines) or ``binary`` (64 KiB of random bytes).
    """
    if kind == "long_line":
        return b'{"id": "before", "prompt": "Say hi."}\n{"id": "huge", "prompt": "' + b"x" * 10_000_000 + b'"}\n' \
            b'{"id": "after", "prompt": "Say hi."}\n'  # fmt: skip
    assert kind == "binary", kind
    return random.Random(20240611).randbytes(64 * 1024)


def run(data: bytes, entry: dict[str, Any]) -> tuple[dict[str, str], int, int, list[LineError]]:
    """Read and parse a file as submit does, without storing anything.

    Submit's own rule for duplicates is applied too: an id counts once its line is valid, and a later
    valid line with the same id becomes ``duplicate_custom_id``.

    Args:
        data: the file.
        entry: its manifest entry (``default_model``, ``models``).

    Returns:
        ``({line: code}, valid, blank, errors)``.
    """
    known = {MODEL, *entry.get("models", [])}

    def check_model(name: str) -> str | None:
        return None if name in known else f"unknown model '{name}'"

    codes: dict[str, str] = {}
    errors: list[LineError] = []
    seen: set[str] = set()
    valid = blank = 0
    for line_no, raw, error in iter_raw_lines(io.BytesIO(data), LIMIT):
        if raw is None and error is None:
            blank += 1
            continue
        result = error or parse_line(line_no, raw or b"", entry["default_model"], check_model)
        if isinstance(result, Parsed):
            if result.custom_id in seen:
                codes[str(line_no)] = "duplicate_custom_id"
                continue
            seen.add(result.custom_id)
            valid += 1
        else:
            codes[str(line_no)] = result.code
            errors.append(result)
    return codes, valid, blank, errors


@pytest.mark.parametrize("name", sorted(FILES))
def test_corpus_file(name: str) -> None:
    entry = FILES[name]
    data = generated(entry["generated"]) if entry.get("generated") else (CORPUS / name).read_bytes()
    codes, valid, blank, errors = run(data, entry)
    if entry["errors"] == "all":
        assert valid == 0 and set(codes.values()) <= set(entry["error_codes"]), codes
    else:
        assert codes == entry["errors"]
    assert valid == entry["valid"]
    if entry["blank"] is not None:
        assert blank == entry["blank"]
    for err in errors:
        assert err.message and "\n" not in err.message and err.message.isprintable(), err
        assert err.custom_id and (err.param is None or err.param.strip()), err
    for line_no in entry.get("fails_at_worker", {}):
        assert line_no not in codes, f"line {line_no} is for the worker to reject, not submit"
    if entry.get("submit_error"):
        assert valid == 0


def test_manifest_lists_every_corpus_file() -> None:
    on_disk = {p.name for p in CORPUS.iterdir() if p.name not in ("MANIFEST.json", ".gitattributes")}
    committed = {name for name, entry in FILES.items() if not entry.get("generated")}
    assert on_disk == committed


def test_documentation_examples_record_where_they_come_from() -> None:
    docs = [entry for name, entry in FILES.items() if name.startswith(("openai_guide", "vllm_"))]
    assert len(docs) >= 4 and all(entry["source"].startswith("https://") for entry in docs)
    runnable = [entry for entry in docs if not entry["errors"]]
    assert len(runnable) >= 3 and all(entry["valid"] > 0 for entry in runnable)
