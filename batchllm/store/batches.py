"""Batches: creation (streamed ingest), reading, and the state-checked actions cancel, retry and expire."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from batchllm.errors import InputError, NotFound, StateError
from batchllm.status import TERMINAL_BATCH, BatchStatus, ChunkStatus
from batchllm.store import lifecycle
from batchllm.store.clock import db_now
from batchllm.store.db import after_row, session_scope
from batchllm.store.ingest import RequestWriter
from batchllm.store.leader import LeaderFence, guard
from batchllm.store.lifecycle import Counts
from batchllm.store.models import Batch, Chunk, Request, Result


def new_batch_id() -> str:
    """A fresh batch id in OpenAI's style."""
    return f"batch_{uuid.uuid4().hex[:24]}"


def new_chunk_id() -> str:
    """A fresh chunk id."""
    return f"ck_{uuid.uuid4().hex[:20]}"


@dataclass(frozen=True)
class BatchRecord:
    """A batch row as data, with its counts (sealed when finished)."""

    id: str
    name: str | None
    status: str
    endpoint: str | None
    model: str | None
    priority: int
    idempotency_key: str | None
    owner: str | None
    input_file_id: str | None
    input_name: str | None
    input_sha256: str | None
    on_invalid: str
    total: int
    invalid: int
    blank_lines: int
    models: dict[str, str]
    completion_window: str
    meta: dict[str, str] | None
    errors: list[dict[str, Any]] | None
    created_at: float
    in_progress_at: float | None
    finalizing_at: float | None
    completed_at: float | None
    failed_at: float | None
    cancelling_at: float | None
    cancelled_at: float | None
    expired_at: float | None
    expires_at: float | None
    counts: Counts

    @property
    def terminal(self) -> bool:
        """True once the batch will not change any more."""
        return BatchStatus(self.status).terminal


_RECORD_FIELDS = [f.name for f in fields(BatchRecord) if f.name != "counts"]


def _record(s: Any, b: Batch) -> BatchRecord:
    data = {k: getattr(b, k) for k in _RECORD_FIELDS}
    data["models"] = dict(b.models or {})
    return BatchRecord(**data, counts=lifecycle.counts_of(s, b))


# ------------------------------------------------------------------------------------------------ creation


@dataclass
class NewBatch:
    """What a submit knows before reading the file."""

    name: str | None
    model: str | None
    priority: int
    idempotency_key: str | None
    input_name: str
    completion_window: str
    window_s: float
    meta: dict[str, str] | None = None
    owner: str | None = None
    input_file_id: str | None = None
    on_invalid: str = "run_valid"
    endpoint: str | None = None


@dataclass(frozen=True)
class NewChunk:
    """A chunk of the batch being created."""

    id: str
    model: str  # name@variant
    queue: str
    seq: int
    size: int


class BatchIngest:
    """A batch being stored: request rows stream in through :meth:`add`; :meth:`finish` ends it (one transaction)."""

    def __init__(self, session: Any, batch_id: str, spec: NewBatch) -> None:
        self.batch_id = batch_id
        self._s = session
        self._spec = spec
        self.writer = RequestWriter(session)
        self.add = self.writer.add

    def finish(self, chunks: Sequence[NewChunk], total: int, invalid: int, blank: int, models: dict[str, str],
               input_sha256: str | None, status: BatchStatus, errors: list[dict[str, Any]] | None = None,
               endpoint: str | None = None) -> None:
        """Write the last rows and the chunks, and set the batch's totals and status."""
        self.writer.flush()
        if chunks:
            self._s.execute(insert(Chunk), [
                {"id": c.id, "batch_id": self.batch_id, "model": c.model, "queue": c.queue, "seq": c.seq, "size": c.size,
                 "priority": self._spec.priority, "status": ChunkStatus.QUEUED, "created_at": 0.0, "attempt": 0}
                for c in chunks
            ])
            self._s.execute(update(Chunk).where(Chunk.batch_id == self.batch_id).values(created_at=db_now()))
        stamp = {BatchStatus.IN_PROGRESS: "in_progress_at", BatchStatus.FAILED: "failed_at",
                 BatchStatus.COMPLETED: "completed_at"}[status]
        values: dict[str, Any] = {"total": total, "invalid": invalid, "blank_lines": blank, "models": models,
                                  "input_sha256": input_sha256, "status": status, "errors": errors,
                                  "endpoint": endpoint or self._spec.endpoint, stamp: db_now()}
        if status != BatchStatus.IN_PROGRESS:  # nothing will run: the numbers are final now
            values.update(completed_count=0, failed_count=total, input_tokens=0, output_tokens=0)
        self._s.execute(update(Batch).where(Batch.id == self.batch_id).values(**values))


@contextlib.contextmanager
def create(url: str, spec: NewBatch) -> Iterator[BatchIngest]:
    """Store a new batch in one transaction: ``with create(url, spec) as ing: ing.add(row) …; ing.finish(…)``.

    An exception inside the block rolls everything back (nothing is stored half-way).

    Raises:
        StateError: the idempotency key belongs to a batch stored meanwhile (the caller returns that batch).
    """
    batch_id = new_batch_id()
    try:
        with session_scope(url) as s:
            s.execute(insert(Batch).values(
                id=batch_id, name=spec.name, status=BatchStatus.VALIDATING, model=spec.model, priority=spec.priority,
                idempotency_key=spec.idempotency_key, owner=spec.owner, input_file_id=spec.input_file_id,
                input_name=spec.input_name, on_invalid=spec.on_invalid, completion_window=spec.completion_window,
                meta=spec.meta, endpoint=spec.endpoint, created_at=db_now(), expires_at=db_now() + spec.window_s,
                total=0, invalid=0, blank_lines=0,
            ))
            ingest = BatchIngest(s, batch_id, spec)
            try:
                yield ingest
            except BaseException:
                ingest.writer.abort()  # the COPY thread must let go of the connection before the rollback
                raise
    except IntegrityError as e:
        if spec.idempotency_key and "idempotency" in str(e.orig).lower():
            raise StateError(f"idempotency key {spec.idempotency_key!r} was used by a concurrent submit") from e
        raise InputError(f"could not store the batch: {str(e.orig).splitlines()[0]}") from e


# ------------------------------------------------------------------------------------------------ reading


def get(url: str, batch_id: str, owner: str | None = None) -> BatchRecord:
    """A batch and its counts; ``owner`` restricts to one API key's batches.

    Raises:
        NotFound: no such batch (or not this owner's).
    """
    with session_scope(url) as s:
        b = s.get(Batch, batch_id)
        if b is None or (owner is not None and b.owner != owner):
            raise NotFound(f"no batch '{batch_id}'; `batchllm status` lists batches")
        return _record(s, b)


def find_by_key(url: str, idempotency_key: str) -> BatchRecord | None:
    """The batch stored under an idempotency key, if any."""
    with session_scope(url) as s:
        b = s.scalar(select(Batch).where(Batch.idempotency_key == idempotency_key))
        return _record(s, b) if b is not None else None


def listing(url: str, limit: int = 20, active_only: bool = False, owner: str | None = None,
            after: str | None = None) -> list[BatchRecord]:
    """Most recent batches first; ``after`` pages on (the batch id the previous page ended with)."""
    q = select(Batch).order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)
    if active_only:
        q = q.where(Batch.status.not_in(list(TERMINAL_BATCH)))
    if owner is not None:
        q = q.where(Batch.owner == owner)
    with session_scope(url) as s:
        if after is not None:
            ref = s.get(Batch, after)
            if ref is not None:
                q = q.where(after_row(Batch, ref))
        return [_record(s, b) for b in s.scalars(q)]


def refresh(url: str, batch_id: str) -> BatchRecord:
    """Move the batch on if it can (so a waiting CLI needs no scheduler), then read it."""
    with session_scope(url) as s:
        lifecycle.finalize(s, batch_id)
    return get(url, batch_id)


# ------------------------------------------------------------------------------------------------ actions


def cancel(url: str, batch_id: str, owner: str | None = None) -> BatchRecord:
    """Stop dispatch at once: queued chunks are cancelled, leased ones finish what is in their engine.

    Raises:
        NotFound: no such batch.
        StateError: the batch already ended.
    """
    with session_scope(url) as s:
        b = s.get(Batch, batch_id, with_for_update=True)
        if b is None or (owner is not None and b.owner != owner):
            raise NotFound(f"no batch '{batch_id}'; `batchllm status` lists batches")
        status = BatchStatus(b.status)
        if status in TERMINAL_BATCH:
            raise StateError(f"batch {batch_id} is already {status}; nothing to cancel")
        if status != BatchStatus.CANCELLING:
            s.execute(update(Chunk).where(Chunk.batch_id == batch_id, Chunk.status == ChunkStatus.QUEUED)
                      .values(status=ChunkStatus.CANCELLED, finished_at=db_now()))
            s.execute(update(Batch).where(Batch.id == batch_id).values(status=BatchStatus.CANCELLING, cancelling_at=db_now()))
            s.flush()
        lifecycle.seal(s, batch_id)
    return get(url, batch_id)


@dataclass(frozen=True)
class Retried:
    """What a retry queued."""

    batch: BatchRecord
    requests: int
    chunks: int


_RETRYABLE = (BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)


def retry(url: str, batch_id: str, chunk_size: int, window_s: float, queue_of: Any) -> Retried:
    """Queue a finished batch's failed requests again (lines rejected at submit excepted: they would fail again).

    An expired or cancelled batch's requests that never ran count as failed; the batch gets a new completion
    window from now.

    Raises:
        NotFound: no such batch.
        StateError: the batch is still running (or being cancelled), or has nothing to retry.
    """
    with session_scope(url) as s:
        b = s.get(Batch, batch_id, with_for_update=True)
        if b is None:
            raise NotFound(f"no batch '{batch_id}'; `batchllm status` lists batches")
        status = BatchStatus(b.status)
        if status not in _RETRYABLE:
            hint = "it failed validation as a whole; fix the file and submit it again" if status == BatchStatus.FAILED else \
                "wait for it to finish (or cancel it) first"
            raise StateError(f"batch {batch_id} is {status}: {hint}")
        failed = s.execute(
            select(Request.id, Chunk.model).join(Result, Result.request_id == Request.id)
            .join(Chunk, Chunk.id == Request.chunk_id)
            .where(Request.batch_id == batch_id, Result.ok.is_(False)).order_by(Request.line_no)
        ).all()
        if not failed:
            raise StateError(f"batch {batch_id} has no failed request to retry"
                             + (f" ({b.invalid} line(s) failed validation at submit)" if b.invalid else ""))
        n_chunks = _requeue(s, b, failed, chunk_size, queue_of)
        s.execute(update(Batch).where(Batch.id == batch_id).values(
            status=BatchStatus.IN_PROGRESS, in_progress_at=db_now(), expires_at=db_now() + window_s,
            finalizing_at=None, completed_at=None, cancelling_at=None, cancelled_at=None, expired_at=None,
            completed_count=None, failed_count=None, input_tokens=None, output_tokens=None))
    return Retried(get(url, batch_id), len(failed), n_chunks)


def _requeue(s: Any, b: Batch, failed: Sequence[Any], chunk_size: int, queue_of: Any) -> int:
    by_ref: dict[str, list[int]] = {}
    for rid, ref in failed:
        by_ref.setdefault(ref, []).append(rid)
    seq = int(s.scalar(select(Chunk.seq).where(Chunk.batch_id == b.id).order_by(Chunk.seq.desc()).limit(1)) or 0)
    n = 0
    for ref, ids in by_ref.items():
        for i in range(0, len(ids), chunk_size):
            part, seq, ck = ids[i : i + chunk_size], seq + 1, new_chunk_id()
            s.execute(insert(Chunk).values(id=ck, batch_id=b.id, model=ref, queue=queue_of(ref), seq=seq, size=len(part),
                                           priority=b.priority, status=ChunkStatus.QUEUED, created_at=db_now(), attempt=0))
            s.execute(update(Request).where(Request.id.in_(part)).values(chunk_id=ck))
            s.execute(delete(Result).where(Result.request_id.in_(part)))
            n += 1
    return n


def expire_due(url: str, fence: LeaderFence | None) -> list[str]:
    """Expire every running batch past its completion window (the scheduler's lifecycle step)."""
    with session_scope(url) as s:
        guard(s, fence)
        due = s.scalars(select(Batch.id).where(
            Batch.status.in_([BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS]), Batch.expires_at < db_now())).all()
        return [b for b in due if lifecycle.expire(s, b)]


def finalize_open(url: str, fence: LeaderFence | None) -> dict[str, str]:
    """Move on every batch that can move (the scheduler's lifecycle step); returns id → new status.

    One query finds the candidates — running batches with no open chunk, cancelling ones with no leased
    chunk, and finalizing ones — so a tick's cost does not grow with the number of running batches.
    """
    def none_in(statuses: tuple[str, ...]) -> Any:
        return ~select(Chunk.id).where(Chunk.batch_id == Batch.id, Chunk.status.in_(statuses)).exists()

    with session_scope(url) as s:
        guard(s, fence)
        ids = s.scalars(select(Batch.id).where(
            ((Batch.status == BatchStatus.IN_PROGRESS) & none_in(lifecycle.OPEN_CHUNKS))
            | ((Batch.status == BatchStatus.CANCELLING) & none_in((ChunkStatus.LEASED,)))
            | (Batch.status == BatchStatus.FINALIZING)
        )).all()
        out: dict[str, str] = {}
        for batch_id in ids:
            new = lifecycle.finalize(s, batch_id)
            if new is not None:
                out[batch_id] = str(new)
        return out


def fail_model(url: str, ref: str, code: str, message: str, fence: LeaderFence | None) -> list[str]:
    """Fail the queued chunks of ``ref`` (a model no live worker can load): each request gets a 503 record.

    Leased chunks are left to their worker. Returns the batches touched.
    """
    with session_scope(url) as s:
        guard(s, fence)
        done = s.execute(
            update(Chunk).where(Chunk.model == ref, Chunk.status == ChunkStatus.QUEUED)
            .values(status=ChunkStatus.DONE, finished_at=db_now(), lease_expires_at=None)
            .returning(Chunk.id, Chunk.batch_id)
        ).all()
        ids = [cid for cid, _ in done]
        for i in range(0, len(ids), 500):
            lifecycle.error_results(s, Request.chunk_id.in_(ids[i : i + 500]), code, message, status_code=503)
        touched = sorted({bid for _, bid in done})
        s.flush()
        for batch_id in touched:
            lifecycle.finalize(s, batch_id)
        return touched
