"""CLI helpers (no services): passwords in service URLs, and where the error file goes by default."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from sqlalchemy.engine import make_url

from batchllm.cli.common import errors_path, quote_password
from batchllm.errors import mask_url


@pytest.mark.parametrize(("raw", "password"), [
    ("redis://:s3/cr@t:pw@10.0.0.5:6379/0", "s3/cr@t:pw"),
    ("postgresql://batchllm:p/w@d:x@db.lab:5432/batchllm", "p/w@d:x"),
    ("postgresql+psycopg://u:a#b?c@[::1]:5432/x", "a#b?c"),
    ("rediss://user:ab+cd/ef==@redis.lab:6380/1", "ab+cd/ef=="),
])
def test_reserved_characters_in_passwords_are_encoded(raw: str, password: str) -> None:
    url = quote_password(raw)
    assert urlsplit(url).password is not None
    parsed = make_url(url) if url.startswith("postgresql") else None
    if parsed is not None:
        assert parsed.password == password  # what the driver gets is what the user wrote
    else:
        from kombu.utils.url import url_to_parts

        assert url_to_parts(url).password == password
    assert password not in mask_url(url) and ":***@" in mask_url(url)
    assert quote_password(url) == url  # idempotent


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0",
    "redis://:plain-secret@127.0.0.1:6379/0",
    "redis://:a%2Fb@h:6379/0",  # already encoded
    "postgresql://host:5432/db?options=a@b",  # an '@' in the query, no password
    "sqlite:////data/run@night.db",
    "memory://",
])
def test_other_urls_are_left_alone(url: str) -> None:
    assert quote_password(url) == url


def test_error_file_defaults_beside_the_output() -> None:
    assert errors_path("out/res.jsonl", None, False) == "out/res.errors.jsonl"
    assert errors_path("res.json", None, False) == "res.errors.jsonl"
    assert errors_path("res.jsonl", "e.jsonl", False) == "e.jsonl"
    assert errors_path("res.jsonl", None, True) is None  # --combined: failures go into the output
    assert errors_path(None, None, False) is None and errors_path("-", None, False) is None  # stdout: say, don't guess
