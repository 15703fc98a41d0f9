"""Streaming reader: JSONL bytes → numbered lines, with BOM/CRLF/encoding/size problems as errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

from batchllm.formats.models import InputLine, LineError

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
