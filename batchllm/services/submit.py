"""``batchllm submit``: stream a JSONL file into SQL, split it into chunks per model, dispatch the chunks."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from celery import Celery
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from batchllm.catalog import Catalog, load_catalog
from batchllm.errors import InputError, ModelNotFound
from batchllm.formats import LineError, ParsedRequest, iter_lines, parse_line
from batchllm.queue import ChunkMessage, dispatch, queue_name
from batchllm.settings import Settings
from batchllm.status import BatchStatus, ChunkStatus
from batchllm.store import leases
from batchllm.store.batches import new_batch_id, new_chunk_id
from batchllm.store.db import session_scope
from batchllm.store.ingest import RequestWriter
from batchllm.store.models import Batch, Chunk

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


class _Hashing:
    """Wraps a binary stream to hash what is read, so stdin can be fingerprinted while streamed."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()

    def readline(self, limit: int = -1) -> bytes:
        data = self.raw.readline(limit)
        self.sha.update(data)
        return data


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
    hashing = _Hashing(stream)
    batch_id = new_batch_id()
    now = time.time()
    result = SubmitResult(batch_id=batch_id)
    seen: set[str] = set()
    # per resolved model name → (current chunk id, rows in it); chunk rows are written at the end
    open_chunk: dict[str, tuple[str, int]] = {}
    chunk_sizes: dict[str, list] = {}  # chunk id → [model, size], insertion-ordered = seq order
    names: dict[str, int] = {}
    try:
        with session_scope(url) as s:
            s.add(Batch(id=batch_id, name=name, status=BatchStatus.VALIDATING, model=model, priority=priority,
                        idempotency_key=idempotency_key, input_name=input_name, created_at=now, expires_at=now + window))
            s.flush()
            writer = RequestWriter(s)
            for item in iter_lines(hashing, settings.max_line_bytes):  # type: ignore[arg-type]
                if on_progress and item.line_no % 5000 == 0:
                    on_progress(item.line_no)
                if item.text is None and item.error is None:
                    result.blank += 1
                    continue
                parsed: ParsedRequest | LineError
                parsed = item.error if item.error else parse_line(item.line_no, item.text or "", model, check)
                if isinstance(parsed, ParsedRequest) and parsed.custom_id in seen:
                    parsed = LineError(line_no=parsed.line_no, custom_id=parsed.custom_id, code="duplicate_custom_id",
                                       message=f"custom_id {json.dumps(parsed.custom_id, ensure_ascii=False)[:80]} is used by an earlier line; "
                                       "ids must be unique in a batch")
                result.total += 1
                if isinstance(parsed, LineError):
                    result.invalid += 1
                    if len(result.errors) < 20:
                        result.errors.append(parsed)
                    writer.add((batch_id, parsed.line_no, parsed.custom_id, parsed.model, None, None, None,
                                parsed.code, f"line {parsed.line_no}: {parsed.message}"))
                    continue
                seen.add(parsed.custom_id)
                result.valid += 1
                names[parsed.model] = names.get(parsed.model, 0) + 1
                ck, n = open_chunk.get(parsed.model, ("", settings.chunk_size))
                if n >= settings.chunk_size:
                    ck, n = new_chunk_id(), 0
                    chunk_sizes[ck] = [parsed.model, 0]
                open_chunk[parsed.model] = (ck, n + 1)
                chunk_sizes[ck][1] += 1
                writer.add((batch_id, parsed.line_no, parsed.custom_id, parsed.model, parsed.kind, ck,
                            parsed.body_json(), None, None))
            writer.flush()
            _check_file_level(result, input_name, strict, hashing.sha.hexdigest())
            refs = _resolve(settings, catalog, names, queue_anyway)
            result.models = refs
            for seq, (ck_id, (model_name, size)) in enumerate(chunk_sizes.items(), start=1):
                ref = refs[model_name]
                s.add(Chunk(id=ck_id, batch_id=batch_id, model=ref, queue=queue_name(ref), seq=seq,
                            size=size, priority=priority, status=ChunkStatus.QUEUED, created_at=now, attempts=0))
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
            result.chunks = len(chunk_sizes)
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
        result.dispatched = dispatch_batch(settings, app, batch_id)
    return result


def _check_file_level(result: SubmitResult, input_name: str, strict: bool, sha: str) -> None:
    if result.total == 0:
        raise InputError(f"{input_name}: no requests (the file is empty or has only blank lines)")
    if strict and result.invalid:
        first = result.errors[0]
        raise InputError(
            f"{input_name}:{first.line_no}: {first.message} ({result.invalid} invalid line(s); --strict rejects the file, nothing was stored)"
        )


def _resolve(settings: Settings, catalog: Catalog, names: dict[str, int], queue_anyway: bool) -> dict[str, str]:
    from batchllm.scheduler.placement import resolve_refs

    return resolve_refs(settings, catalog, list(names), queue_anyway=queue_anyway)


def dispatch_batch(settings: Settings, app: Celery, batch_id: str, only_undispatched: bool = True) -> int:
    """Send a message for every queued chunk of a batch (in seq order) and record the time sent."""
    with session_scope(settings.database_url) as s:
        q = select(Chunk).where(Chunk.batch_id == batch_id, Chunk.status == ChunkStatus.QUEUED).order_by(Chunk.seq)
        if only_undispatched:
            q = q.where(Chunk.dispatched_at.is_(None))
        chunks = list(s.scalars(q))
    msgs = [(ChunkMessage(chunk_id=c.id, batch_id=c.batch_id, model=c.model, size=c.size), c.queue, c.priority) for c in chunks]
    sent = dispatch(app, msgs)
    with session_scope(settings.database_url) as s:
        leases.mark_dispatched(s, [c.id for c in chunks])
    return sent
