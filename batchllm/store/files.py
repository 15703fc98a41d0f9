"""Files of the HTTP API: uploads stored in ~1 MiB parts, read back part by part; tombstones of deleted outputs.

An upload is written as it arrives: :func:`begin_upload` makes an invisible ``uploading`` row, each part is its
own short transaction (:func:`append_part`, so a slow client never holds SQLite's write lock), and
:func:`finish_upload` makes the file visible. A failed upload is removed by :func:`discard`; one whose process
died is removed by :func:`sweep_uploads` once idle. Nothing but ``processed`` files is ever read, so a file is
either whole or absent. Memory stays at one part whatever the file's size.

``owner`` is an API key id; ``owner=None`` in a lookup means "any owner" (a server running without auth).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update

from batchllm.errors import InputError, NotFound
from batchllm.store.clock import db_now
from batchllm.store.db import after_row, rowcount, session_scope
from batchllm.store.models import File, FilePart

UPLOADING = "uploading"
PROCESSED = "processed"
DELETED = "deleted"  # the tombstone of a deleted output/error file


@dataclass(frozen=True)
class FileRecord:
    """A stored file as data."""

    id: str
    owner: str | None
    filename: str
    purpose: str
    status: str
    size: int
    parts: int
    created_at: float
    expires_at: float | None


def _record(f: File) -> FileRecord:
    return FileRecord(f.id, f.owner, f.filename, f.purpose, f.status, int(f.size or 0), int(f.parts or 0),
                      float(f.created_at), f.expires_at)


def new_file_id() -> str:
    """A fresh file id in OpenAI's style (``file-`` and 24 hex digits)."""
    return f"file-{uuid.uuid4().hex[:24]}"


def _not_found(file_id: str) -> NotFound:
    return NotFound(f"No such File object: {file_id}")


def _visible(owner: str | None) -> Any:
    cond = (File.status == PROCESSED) & (File.expires_at.is_(None) | (File.expires_at > db_now()))
    return cond if owner is None else cond & (File.owner == owner)


# ------------------------------------------------------------------------------------------------ upload


def begin_upload(url: str, owner: str | None, filename: str) -> str:
    """Start an upload: an invisible ``uploading`` row; returns the new file id."""
    file_id = new_file_id()
    with session_scope(url) as s:
        s.execute(insert(File).values(id=file_id, owner=owner, filename=filename, purpose="", status=UPLOADING, size=0,
                                      parts=0, created_at=db_now(), updated_at=db_now()))
    return file_id


def append_part(url: str, file_id: str, seq: int, data: bytes) -> None:
    """Store part ``seq`` of an upload (one short transaction).

    Raises:
        NotFound: the upload was discarded or swept meanwhile.
    """
    with session_scope(url) as s:
        res = s.execute(update(File).where(File.id == file_id, File.status == UPLOADING).values(updated_at=db_now()))
        if rowcount(res) != 1:
            raise _not_found(file_id)
        s.execute(insert(FilePart).values(file_id=file_id, seq=seq, data=data))


def finish_upload(url: str, file_id: str, purpose: str, size: int, parts: int, expires_after_s: float | None) -> FileRecord:
    """Make a complete upload visible.

    Raises:
        NotFound: the upload was discarded or swept meanwhile.
    """
    with session_scope(url) as s:
        values: dict[str, Any] = {"status": PROCESSED, "purpose": purpose, "size": size, "parts": parts,
                                  "created_at": db_now(), "updated_at": db_now()}
        if expires_after_s is not None:
            values["expires_at"] = db_now() + expires_after_s
        res = s.execute(update(File).where(File.id == file_id, File.status == UPLOADING).values(**values))
        if rowcount(res) != 1:
            raise _not_found(file_id)
        f = s.get(File, file_id, populate_existing=True)
        assert f is not None
        return _record(f)


def discard(url: str, file_id: str) -> None:
    """Remove an upload that did not finish, with its parts."""
    with session_scope(url) as s:
        s.execute(delete(FilePart).where(FilePart.file_id == file_id))
        s.execute(delete(File).where(File.id == file_id, File.status == UPLOADING))


def sweep_uploads(url: str, idle_s: float) -> int:
    """Remove uploads no part was written to for ``idle_s`` seconds (their process died); returns how many."""
    return _delete_files(url, (File.status == UPLOADING) & (File.updated_at < db_now() - idle_s))


def purge_expired(url: str) -> int:
    """Remove files past their ``expires_at``; returns how many."""
    return _delete_files(url, (File.status == PROCESSED) & (File.expires_at < db_now()))


def _delete_files(url: str, where: Any) -> int:
    """Delete the files matching ``where``, parts first; returns how many."""
    with session_scope(url) as s:
        ids = list(s.scalars(select(File.id).where(where)))
        for file_id in ids:
            s.execute(delete(FilePart).where(FilePart.file_id == file_id))
            s.execute(delete(File).where(File.id == file_id))
        return len(ids)


def count_incomplete(url: str) -> int:
    """Uploads not finished (tests check that a failed upload leaves none)."""
    with session_scope(url) as s:
        return int(s.scalar(select(func.count()).select_from(File).where(File.status == UPLOADING)) or 0)


def count_parts(url: str) -> int:
    """Every stored part (tests check that nothing is left half-way)."""
    with session_scope(url) as s:
        return int(s.scalar(select(func.count()).select_from(FilePart)) or 0)


# ------------------------------------------------------------------------------------------------ reading


def get(url: str, file_id: str, owner: str | None) -> FileRecord:
    """A complete, unexpired file of ``owner``.

    Raises:
        NotFound: no such file (or another owner's, or not complete, or expired).
    """
    with session_scope(url) as s:
        f = s.scalar(select(File).where(File.id == file_id, _visible(owner)))
        if f is None:
            raise _not_found(file_id)
        return _record(f)


def listing(url: str, owner: str | None, purpose: str | None = None, limit: int = 10_000, after: str | None = None,
            ascending: bool = False) -> list[FileRecord]:
    """An owner's complete files, newest first (or oldest first); ``after`` pages on from that file id."""
    key = (File.created_at.asc(), File.id.asc()) if ascending else (File.created_at.desc(), File.id.desc())
    q = select(File).where(_visible(owner)).order_by(*key).limit(limit)
    if purpose is not None:
        q = q.where(File.purpose == purpose)
    with session_scope(url) as s:
        if after is not None:
            ref = s.get(File, after)
            if ref is not None:
                q = q.where(after_row(File, ref, ascending))
        return [_record(f) for f in s.scalars(q)]


def delete_file(url: str, file_id: str, owner: str | None) -> None:
    """Delete a complete file of ``owner`` and its parts.

    Raises:
        NotFound: no such file (or another owner's).
    """
    with session_scope(url) as s:
        f = s.scalar(select(File).where(File.id == file_id, _visible(owner)))
        if f is None:
            raise _not_found(file_id)
        s.execute(delete(FilePart).where(FilePart.file_id == file_id))
        s.execute(delete(File).where(File.id == file_id))


def read_part(url: str, file_id: str, seq: int) -> bytes | None:
    """Part ``seq`` of a file (None past the last part)."""
    with session_scope(url) as s:
        data = s.scalar(select(FilePart.data).where(FilePart.file_id == file_id, FilePart.seq == seq))
        return None if data is None else bytes(data)


def iter_content(url: str, record: FileRecord) -> Iterator[bytes]:
    """A file's bytes, one part (~1 MiB) at a time.

    Raises:
        InputError: the file was deleted while it was being read.
    """
    for seq in range(record.parts):
        data = read_part(url, record.id, seq)
        if data is None:
            raise InputError(f"file {record.id} was deleted while it was being read")
        yield data


class PartReader(io.RawIOBase):
    """A file as a binary stream (what ``services.submit.submit_file`` reads), one part in memory at a time.

    Args:
        url: database URL.
        record: the file (from :func:`get`).
    """

    def __init__(self, url: str, record: FileRecord) -> None:
        super().__init__()
        self.name = record.filename
        self._parts = iter_content(url, record)
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        """Always True."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the current part, fetching the next one when it is used up."""
        while not self._buf:
            nxt = next(self._parts, None)
            if nxt is None:
                return 0
            self._buf = memoryview(nxt)
        n = min(len(buffer), len(self._buf))
        buffer[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


# ------------------------------------------------------------------------------------------------ tombstones


def tombstone(url: str, file_id: str, owner: str | None, filename: str, purpose: str) -> None:
    """Mark an output/error file (read from results, never stored) as deleted; idempotent."""
    with session_scope(url) as s:
        if s.get(File, file_id) is None:
            s.execute(insert(File).values(id=file_id, owner=owner, filename=filename, purpose=purpose, status=DELETED,
                                          size=0, parts=0, created_at=db_now(), updated_at=db_now()))


def is_tombstoned(url: str, file_id: str) -> bool:
    """Whether an output/error file was deleted."""
    with session_scope(url) as s:
        return s.scalar(select(File.id).where(File.id == file_id, File.status == DELETED)) is not None
