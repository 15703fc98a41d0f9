"""Streaming reader: JSONL bytes → numbered lines, with BOM, CRLF, binary data and oversized lines handled."""

from collections.abc import Iterator
from typing import IO

from batchllm.formats.request import LineError

_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def iter_raw_lines(stream: IO[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None, LineError | None]]:
    """Stream a JSONL file line by line with 1-based line numbers; memory stays flat.

    Strips a UTF-8 BOM at the start of any line (so concatenated files work) and surrounding whitespace
    (CRLF endings). A blank line is ``(n, None, None)``: the caller counts it. Binary data (NUL bytes, UTF-16)
    and lines over the limit become errors. Lines are not decoded here: ``parse_line`` checks UTF-8 once.

    Args:
        stream: a binary file object.
        max_line_bytes: longer lines are reported, never held in memory beyond this size.

    Yields:
        ``(line_no, line, None)``, ``(line_no, None, error)`` or ``(line_no, None, None)`` for a blank line.
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
            yield line_no, None, None
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
        yield line_no, stripped, None


def _read_error(line_no: int, code: str, message: str) -> LineError:
    """The error of a line that could not be read (its id is ``line-<n>``)."""
    return LineError(line_no, f"line-{line_no}", code, message)
