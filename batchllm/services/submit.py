"""``batchllm submit``: stream a JSONL file into SQL, split it into chunks per model, dispatch the chunks."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from celery import Celery
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from batchllm.catalog import Catalog, load_catalog
from batchllm.errors import InputError, ModelNotFound
from batchllm.formats import LineError, iter_raw_lines, parse_line_record
from batchllm.queue import ChunkMessage, dispatch, queue_name, scheduler_alive
from batchllm.settings import Settings
from batchllm.status import BatchStatus, ChunkStatus
from batchllm.store import leases
from batchllm.store.batches import new_batch_id, new_chunk_id
from batchllm.store.db import session_scope
from batchllm.store.ingest import RequestWriter
from batchllm.store.models import Batch, Chunk

log = logging.getLogger(__name__)
_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")


def parse_window(text: str) -> float:
    """``24h`` / ``30m`` / ``7d`` / ``90s`` → seconds."""
    m = _WINDOW.match(text)
    if not m:
        raise InputError(f"completion window '{text}' is not like 24h, 30m, 7d or 90s")
    return float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


@dataclass
class SubmitResult:
    """What a submit did."""

    batch_id: str
    existing: bool = False
    total: int = 0
    valid: int = 0
    invalid: int = 0
    blank: int = 0
    chunks: int = 0
    dispatched: int = 0
    models: dict[str, str] = field(default_factory=dict)
    errors: list[LineError] = field(default_factory=list)  # the first few, for the summary


class _Hashing(io.RawIOBase):
    """Wraps a binary stream to hash what is read, so stdin can be fingerprinted while streamed.

    Used under an ``io.BufferedReader``: the hash is updated once per 1 MiB block read, and
    ``readline`` stays the buffered reader's C implementation.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self.raw = raw
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha.update(data)
        return n


def _hashing_reader(raw: IO[bytes]) -> tuple[io.BufferedReader, _Hashing]:
    hashing = _Hashing(raw)
    return io.BufferedReader(hashing, buffer_size=1 << 20), hashing


def file_sha256(path: Path) -> str:
    """Hash a file in 1 MiB blocks (used by `batchllm run` to find the batch to resume)."""
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def open_input(source: str | Path) -> tuple[IO[bytes], str]:
    """Open a path or ``-`` (stdin) for binary streaming; clear error when the file is missing."""
    if str(source) == "-":
        return sys.stdin.buffer, "<stdin>"
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file; give a JSONL file path or - for stdin")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give a JSONL file")
    return path.open("rb"), str(path)


def _model_checker(catalog: Catalog) -> Callable[[str], str | None]:
    cache: dict[str, str | None] = {}

    def check(name: str) -> str | None:
        if name not in cache:
            try:
                catalog.resolve(name)
                cache[name] = None
            except ModelNotFound as e:
                cache[name] = str(e)
        return cache[name]

    return check


def submit_file(
    settings: Settings,
    source: str | Path,
    *,
    app: Celery | None,
    model: str | None = None,
    name: str | None = None,
    priority: int = 0,
    strict: bool = False,
    idempotency_key: str | None = None,
    queue_anyway: bool = False,
    completion_window: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> SubmitResult:
    """Validate and store a JSONL batch, then dispatch its chunks.

    Args:
        settings: settings (database URL, chunk size, line size limit).
        source: file path or ``-``.
        app: Celery app to dispatch with; None stores the batch without sending (the embedded runner sends).
        model: default model for lines that name none.
        name: a label for the batch.
        priority: 0-9, 9 most urgent.
        strict: reject the whole file (exit 2) if any line is invalid.
        idempotency_key: same key → the existing batch is returned, nothing is stored twice.
        queue_anyway: queue work even if no known worker can host its model.
        completion_window: e.g. ``24h``; the batch expires after it.
        on_progress: called with the number of lines read so far (every few thousand lines).

    Raises:
        InputError: empty file, --strict with invalid lines, no valid lines, unknown flags' values.
        NoCapacity: a model no known worker can host (unless ``queue_anyway``).
        ServiceUnavailable: database or broker down.
    """
    if not 0 <= priority <= 9:
        raise InputError(f"--priority must be 0-9 (got {priority})")
    window = parse_window(completion_window or settings.completion_window)
    url = settings.database_url
    if idempotency_key:
        with session_scope(url) as s:
            existing = s.scalar(select(Batch).where(Batch.idempotency_key == idempotency_key))
            if existing is not None:
                return SubmitResult(batch_id=existing.id, existing=True, total=existing.total, invalid=existing.invalid)
    catalog = load_catalog(settings)
    check = _model_checker(catalog)
    stream, input_name = open_input(source)
    reader, hashing = _hashing_reader(stream)
    batch_id = new_batch_id()
    now = time.time()
    result = SubmitResult(batch_id=batch_id)
    try:
        with session_scope(url) as s:
            s.add(Batch(id=batch_id, name=name, status=BatchStatus.VALIDATING, model=model, priority=priority,
                        idempotency_key=idempotency_key, input_name=input_name, created_at=now, expires_at=now + window))
            s.flush()
            writer = RequestWriter(s)
            try:
                chunks, names = _ingest(settings, batch_id, reader, writer, result, model, check, on_progress)
                writer.flush()
            except BaseException:
                writer.abort()  # the COPY thread must let go of the connection before the rollback
                raise
            _check_file_level(result, input_name, strict, hashing.sha.hexdigest())
            refs = _resolve(settings, catalog, names, queue_anyway)
            result.models = refs
            if chunks:
                s.execute(insert(Chunk), [
                    {"id": ck_id, "batch_id": batch_id, "model": refs[model_name], "queue": queue_name(refs[model_name]),
                     "seq": seq, "size": size, "priority": priority, "status": ChunkStatus.QUEUED, "created_at": now,
                     "attempts": 0}
                    for seq, (ck_id, model_name, size) in enumerate(chunks, start=1)
                ])
            batch = s.get(Batch, batch_id)
            assert batch is not None
            batch.total = result.total
            batch.invalid = result.invalid
            batch.blank_lines = result.blank
            batch.models = refs
            batch.input_sha256 = hashing.sha.hexdigest()
            batch.status = BatchStatus.IN_PROGRESS if result.valid else BatchStatus.COMPLETED
            batch.started_at = time.time()
            if not result.valid:
                batch.finished_at = time.time()
            result.chunks = len(chunks)
    except IntegrityError as e:
        if idempotency_key:  # lost a race with a concurrent submit of the same key
            with session_scope(url) as s:
                existing = s.scalar(select(Batch).where(Batch.idempotency_key == idempotency_key))
                if existing is not None:
                    return SubmitResult(batch_id=existing.id, existing=True, total=existing.total)
        raise InputError(f"could not store the batch: {str(e.orig).splitlines()[0]}") from e
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    if app is not None and result.chunks:
        # With a scheduler running, it meters the rest out fairly (priority, then round-robin across batches);
        # without one, every chunk is sent now so the batch runs on workers alone.
        limit = FAIR_HEAD_CHUNKS if scheduler_alive(app) else None
        result.dispatched = dispatch_batch(settings, app, batch_id, limit=limit)
    return result


def _ingest(
    settings: Settings,
    batch_id: str,
    reader: IO[bytes],
    writer: RequestWriter,
    result: SubmitResult,
    model: str | None,
    check: Callable[[str], str | None],
    on_progress: Callable[[int], None] | None,
) -> tuple[list[tuple[str, str, int]], dict[str, int]]:
    """Validate every line and hand its request row to ``writer``; the hot loop of a submit.

    Returns:
        The chunks in sequence order as ``(chunk id, model name, size)``, and the valid lines per model name.
    """
    chunk_size = settings.chunk_size
    add = writer.add
    seen: set[str] = set()
    chunks: list[tuple[str, str, int]] = []
    # per model name: [chunk id, index in ``chunks``, rows so far]; chunk sizes are written into ``chunks`` when full
    open_chunk: dict[str, list[Any]] = {}
    valid = invalid = total = 0
    for line_no, text, error in iter_raw_lines(reader, settings.max_line_bytes):
        if on_progress and line_no % 5000 == 0:
            on_progress(line_no)
        if text is None:
            if error is None:
                result.blank += 1
                continue
            parsed: tuple[str, str, str, str] | LineError = error
        else:
            parsed = parse_line_record(line_no, text, model, check)
        total += 1
        if type(parsed) is tuple:
            cid, model_name, kind, body = parsed
            if cid in seen:
                parsed = LineError(line_no=line_no, custom_id=cid, code="duplicate_custom_id",
                                   message=f"custom_id {json.dumps(cid, ensure_ascii=False)[:80]} is used by an earlier line; "
                                   "ids must be unique in a batch")
            else:
                seen.add(cid)
                valid += 1
                oc = open_chunk.get(model_name)
                if oc is None or oc[2] >= chunk_size:
                    if oc is not None:
                        chunks[oc[1]] = (oc[0], model_name, oc[2])
                    oc = open_chunk[model_name] = [new_chunk_id(), len(chunks), 0]
                    chunks.append((oc[0], model_name, 0))
                oc[2] += 1
                add((batch_id, line_no, cid, model_name, kind, oc[0], body, None, None))
                continue
        assert isinstance(parsed, LineError)
        invalid += 1
        if len(result.errors) < 20:
            result.errors.append(parsed)
        add((batch_id, parsed.line_no, parsed.custom_id, parsed.model, None, None, None, parsed.code,
             f"line {parsed.line_no}: {parsed.message}"))
    for model_name, (ck_id, idx, size) in open_chunk.items():
        chunks[idx] = (ck_id, model_name, size)
    names: dict[str, int] = {}  # in order of each model's first valid line
    for _ck_id, model_name, size in chunks:
        names[model_name] = names.get(model_name, 0) + size
    result.total, result.valid, result.invalid = total, valid, invalid
    return chunks, names


def _check_file_level(result: SubmitResult, input_name: str, strict: bool, sha: str) -> None:
    if result.total == 0:
        raise InputError(f"{input_name}: no requests (the file is empty or has only blank lines)")
    if strict and result.invalid:
        first = result.errors[0]
        raise InputError(
            f"{input_name}:{first.line_no}: {first.message} "
            f"({result.invalid} invalid line(s); --strict rejects the file, nothing was stored)"
        )


def _resolve(settings: Settings, catalog: Catalog, names: dict[str, int], queue_anyway: bool) -> dict[str, str]:
    from batchllm.scheduler.placement import resolve_refs

    return resolve_refs(settings, catalog, list(names), queue_anyway=queue_anyway)


FAIR_HEAD_CHUNKS = 2  # chunks a submit sends itself while a scheduler meters out the rest


def dispatch_batch(
    settings: Settings, app: Celery, batch_id: str, only_undispatched: bool = True, limit: int | None = None
) -> int:
    """Send a message for the queued chunks of a batch (in seq order, the first ``limit`` or all) and record it."""
    with session_scope(settings.database_url) as s:
        q = (select(Chunk.id, Chunk.batch_id, Chunk.model, Chunk.size, Chunk.queue, Chunk.priority)
             .where(Chunk.batch_id == batch_id, Chunk.status == ChunkStatus.QUEUED).order_by(Chunk.seq))
        if only_undispatched:
            q = q.where(Chunk.dispatched_at.is_(None))
        if limit is not None:
            q = q.limit(limit)
        chunks = s.execute(q).all()
    msgs = [(ChunkMessage(chunk_id=c.id, batch_id=c.batch_id, model=c.model, size=c.size), c.queue, c.priority) for c in chunks]
    sent = dispatch(app, msgs)
    with session_scope(settings.database_url) as s:
        leases.mark_dispatched(s, [c.id for c in chunks])
    return sent
