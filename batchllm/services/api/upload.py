"""``POST /v1/files``: a multipart upload streamed into SQL in ~1 MiB parts, with flat memory.

The request body is fed, as it arrives, to python-multipart's streaming parser; the ``file`` part's bytes are
gathered into a 1 MiB buffer and each full buffer is written as one part (``store.files.append_part``, in a
worker thread, so the event loop never waits on the database). Small fields (``purpose``, ``expires_after``)
are kept in memory, capped. The size limit (``BATCHLLM_API_MAX_UPLOAD_BYTES``) is checked against
``Content-Length`` before anything is read and again while streaming. Whatever goes wrong — a malformed body,
a wrong ``purpose``, a client that disconnects, the limit — the partial upload is discarded, so a file is
either whole and visible or not stored at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import anyio
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from batchllm.services.api.config import ApiConfig
from batchllm.services.api.errors import ApiError, bad_request
from batchllm.store import files as file_rows
from batchllm.store.files import FileRecord

PART_BYTES = 1 << 20
MAX_FIELD_BYTES = 64 * 1024
ENVELOPE_SLACK = 64 * 1024  # multipart headers and small fields on top of the file itself
PURPOSES_ACCEPTED = ("batch",)


@dataclass
class _Part:
    """The part being parsed: its headers, then its name and filename."""

    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    value: bytearray = field(default_factory=bytearray)


@dataclass
class _Upload:
    """What the parser callbacks collect between two reads of the body."""

    part: _Part = field(default_factory=_Part)
    fields: dict[str, str] = field(default_factory=dict)
    file_seen: bool = False
    in_file: bool = False
    filename: str = "upload.jsonl"
    buffer: bytearray = field(default_factory=bytearray)
    size: int = 0
    ended: bool = False
    problem: ApiError | None = None

    def callbacks(self) -> Any:
        """python-multipart's callbacks."""
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end, "on_end": self._end}

    def _part_begin(self) -> None:
        self.part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.header_field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self.part.header_value += data[start:end]

    def _header_end(self) -> None:
        self.part.headers[bytes(self.part.header_field).lower()] = bytes(self.part.header_value)
        self.part.header_field, self.part.header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        self.part.name = params.get(b"name", b"").decode("utf-8", "replace")
        raw_filename = params.get(b"filename")
        self.part.filename = None if raw_filename is None else raw_filename.decode("utf-8", "replace")
        if self.part.name == "file":
            if self.file_seen:
                self.problem = self.problem or bad_request("Only one 'file' may be uploaded per request.", "file")
            self.file_seen = self.in_file = True
            self.filename = _clean_filename(self.part.filename)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.buffer += data[start:end]
            self.size += end - start
        elif len(self.part.value) + end - start <= MAX_FIELD_BYTES:
            self.part.value += data[start:end]
        else:
            self.problem = self.problem or bad_request(f"Form field '{self.part.name}' is too long.", self.part.name)

    def _part_end(self) -> None:
        if self.in_file:
            self.in_file = False
        elif self.part.name:
            self.fields[self.part.name] = self.part.value.decode("utf-8", "replace")

    def _end(self) -> None:
        self.ended = True


def _clean_filename(name: str | None) -> str:
    """The base name of a client's file name (no directories), at most 255 characters."""
    if not name:
        return "upload.jsonl"
    base = PureWindowsPath(PurePosixPath(name).name).name.strip().replace("\x00", "")
    return (base or "upload.jsonl")[:255]


def _boundary(request: Request) -> bytes:
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        raise bad_request("Uploads must be multipart/form-data with a 'file' part and a 'purpose' field.",
                          code="invalid_content_type")
    boundary = params.get(b"boundary")
    if not boundary:
        raise bad_request("The multipart Content-Type has no boundary.", code="invalid_content_type")
    return boundary


def _check_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + ENVELOPE_SLACK:
        raise _too_large(limit)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"File too large: the limit is {limit:,} bytes (BATCHLLM_API_MAX_UPLOAD_BYTES).",
                    param="file", code="file_too_large")


def _expires_after(fields: dict[str, str]) -> float | None:
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at" or seconds is None or not seconds.isdigit() or not 3600 <= int(seconds) <= 30 * 86400:
        raise bad_request("expires_after needs anchor 'created_at' and seconds between 3600 and 2592000.", "expires_after")
    return float(seconds)


async def receive(request: Request, cfg: ApiConfig, owner: str | None) -> FileRecord:
    """Stream an upload into the store and return the stored file (see the module docstring).

    Raises:
        ApiError: 400 (malformed multipart, no file, wrong purpose), 413 (over the limit).
    """
    url, limit = cfg.settings.database_url, cfg.settings.api_max_upload_bytes
    boundary = _boundary(request)
    _check_length(request, limit)
    up = _Upload()
    try:
        parser = MultipartParser(boundary, up.callbacks())
    except FormParserError as e:
        raise bad_request(f"Malformed multipart Content-Type: {e}.", code="invalid_content_type") from e
    file_id: str | None = None
    parts = 0
    try:
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except FormParserError as e:
                raise bad_request(f"Malformed multipart body: {e}.", code="invalid_multipart") from e
            if up.problem is not None:
                raise up.problem
            if up.size > limit:
                raise _too_large(limit)
            while len(up.buffer) >= PART_BYTES or (up.file_seen and file_id is None):
                if file_id is None:
                    file_id = await anyio.to_thread.run_sync(file_rows.begin_upload, url, owner, up.filename)
                    continue
                data = bytes(up.buffer[:PART_BYTES])
                del up.buffer[:PART_BYTES]
                await anyio.to_thread.run_sync(file_rows.append_part, url, file_id, parts, data)
                parts += 1
        if not up.ended:
            raise bad_request("Malformed multipart body: it ended before its closing boundary.", code="invalid_multipart")
        purpose = up.fields.get("purpose")
        if purpose is None:
            raise ApiError(400, "Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter")
        if purpose not in PURPOSES_ACCEPTED:
            raise bad_request(f"Invalid value for 'purpose': '{purpose[:40]}'. This server accepts only 'batch' "
                              "(the Batch API's input files).", "purpose")
        if file_id is None:
            raise ApiError(400, "Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
        expires = _expires_after(up.fields)
        if up.buffer:
            await anyio.to_thread.run_sync(file_rows.append_part, url, file_id, parts, bytes(up.buffer))
            parts += 1
            up.buffer.clear()
        return await anyio.to_thread.run_sync(file_rows.finish_upload, url, file_id, purpose, up.size, parts, expires)
    except BaseException as e:
        if file_id is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(file_rows.discard, url, file_id)
        if isinstance(e, ClientDisconnect):
            raise bad_request("The client disconnected before the upload finished.", code="upload_incomplete") from e
        raise
