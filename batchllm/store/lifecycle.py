"""Batch lifecycle inside a transaction: finalize, seal, and error records for requests that will not run.

Shared by the lease writes (the worker finishing a batch's last chunk), the scheduler's lifecycle step and
the CLI's waiting loop: whoever sees a batch done first moves it on; every move is a conditional UPDATE, so
racing movers cannot both succeed.

``in_progress → finalizing``: every chunk is done and every request has its record. ``finalizing → completed``
(or ``cancelling → cancelled``): the counts and token usage are computed once and stored ("sealed"), so a
finished batch's numbers never change and reading them costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, case, func, insert, literal, select, update
from sqlalchemy.orm import Session

from batchllm.status import BatchStatus, ChunkStatus
from batchllm.store.clock import db_now
from batchllm.store.db import rowcount
from batchllm.store.models import Batch, Chunk, Request, Result

OPEN_CHUNKS = (ChunkStatus.QUEUED, ChunkStatus.LEASED)


@dataclass(frozen=True)
class Counts:
    """OpenAI's request counts and token usage; ``completed + failed + pending == total`` always."""

    total: int
    completed: int
    failed: int
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def pending(self) -> int:
        """Requests with no record yet."""
        return max(0, self.total - self.completed - self.failed)


def live_counts(s: Session, batch_id: str, total: int, invalid: int) -> Counts:
    """Counts from the results table (one indexed aggregate)."""
    n, ok, ptok, ctok = s.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((Result.ok.is_(True), 1), else_=0)), 0),
            func.coalesce(func.sum(Result.prompt_tokens), 0),
            func.coalesce(func.sum(Result.completion_tokens), 0),
        ).where(Result.batch_id == batch_id)
    ).one()
    return Counts(total=total, completed=int(ok), failed=invalid + int(n) - int(ok), input_tokens=int(ptok),
                  output_tokens=int(ctok))


def counts_of(s: Session, b: Batch) -> Counts:
    """Sealed counts of a finished batch, live ones otherwise."""
    if b.completed_count is not None and b.failed_count is not None:
        return Counts(b.total, b.completed_count, b.failed_count, int(b.input_tokens or 0), int(b.output_tokens or 0))
    return live_counts(s, b.id, b.total, b.invalid)


def open_chunk_count(s: Session, batch_id: str, statuses: tuple[str, ...] = OPEN_CHUNKS) -> int:
    """Chunks of a batch still queued or leased."""
    return int(s.scalar(select(func.count()).where(Chunk.batch_id == batch_id, Chunk.status.in_(statuses))) or 0)


#: ``(code, message)`` of a request that got no response, by the status its batch ended in. Written as its record
#: when the batch ends; an export of a batch that ended before that shows the same.
NO_RESPONSE: dict[BatchStatus, tuple[str, str]] = {
    BatchStatus.EXPIRED: ("batch_expired", "the batch expired (past its completion window) before this request ran"),
    BatchStatus.CANCELLED: ("batch_cancelled", "the batch was cancelled before this request ran"),
    BatchStatus.FAILED: ("batch_failed", "the batch failed validation, so no request ran; see the batch's errors"),
    BatchStatus.COMPLETED: ("request_lost", "no result was recorded for this request; `batchllm retry` runs it again"),
}


def begin_finalizing(s: Session, batch_id: str) -> bool:
    """``in_progress → finalizing`` once nothing is open; True if this call moved it."""
    if open_chunk_count(s, batch_id):
        return False
    b = s.get(Batch, batch_id, populate_existing=True)
    if b is None or b.status != BatchStatus.IN_PROGRESS:
        return False
    if live_counts(s, batch_id, b.total, b.invalid).pending:
        # Every chunk ended, yet some request has no record (a chunk failed as a whole): say so, never hang.
        error_results(s, (Request.batch_id == batch_id), *NO_RESPONSE[BatchStatus.COMPLETED], status_code=500)
    res = s.execute(
        update(Batch).where(Batch.id == batch_id, Batch.status == BatchStatus.IN_PROGRESS)
        .values(status=BatchStatus.FINALIZING, finalizing_at=db_now())
    )
    return rowcount(res) == 1


def seal(s: Session, batch_id: str) -> BatchStatus | None:
    """``finalizing → completed`` or ``cancelling → cancelled`` (once no chunk is leased): store counts and usage."""
    b = s.get(Batch, batch_id, populate_existing=True)
    if b is None:
        return None
    status = BatchStatus(b.status)
    if status == BatchStatus.CANCELLING:
        if open_chunk_count(s, batch_id, (ChunkStatus.LEASED,)):
            return None
        error_results(s, (Request.batch_id == batch_id), *NO_RESPONSE[BatchStatus.CANCELLED])
        new, stamp = BatchStatus.CANCELLED, Batch.cancelled_at
    elif status == BatchStatus.FINALIZING:
        new, stamp = BatchStatus.COMPLETED, Batch.completed_at
    else:
        return None
    return new if _seal_as(s, b, status, new, stamp) else None


def _seal_as(s: Session, b: Batch, old: BatchStatus, new: BatchStatus, stamp: Any) -> bool:
    c = live_counts(s, b.id, b.total, b.invalid)
    res = s.execute(
        update(Batch).where(Batch.id == b.id, Batch.status == old)
        .values({stamp: db_now(), Batch.status: new, Batch.completed_count: c.completed, Batch.failed_count: c.failed,
                 Batch.input_tokens: c.input_tokens, Batch.output_tokens: c.output_tokens})
    )
    return rowcount(res) == 1


def finalize(s: Session, batch_id: str) -> BatchStatus | None:
    """Move a batch as far as it can go now (one transaction); returns its new status if it changed."""
    moved = begin_finalizing(s, batch_id)
    s.flush()
    sealed = seal(s, batch_id)
    return sealed or (BatchStatus.FINALIZING if moved else None)


def expire(s: Session, batch_id: str) -> bool:
    """Expire a batch past its window: stop its chunks and give every request without a record a
    ``batch_expired`` error (no response). Leased chunks' later writes are then refused by fencing."""
    res = s.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.in_([BatchStatus.IN_PROGRESS, BatchStatus.VALIDATING]))
        .values(status=BatchStatus.EXPIRED, expired_at=db_now())
    )
    if rowcount(res) != 1:
        return False
    s.execute(
        update(Chunk).where(Chunk.batch_id == batch_id, Chunk.status.in_(OPEN_CHUNKS))
        .values(status=ChunkStatus.CANCELLED, finished_at=db_now(), lease_expires_at=None)
    )
    error_results(s, (Request.batch_id == batch_id), *NO_RESPONSE[BatchStatus.EXPIRED])
    b = s.get(Batch, batch_id, populate_existing=True)
    assert b is not None
    c = live_counts(s, batch_id, b.total, b.invalid)
    s.execute(update(Batch).where(Batch.id == batch_id).values(
        completed_count=c.completed, failed_count=c.failed, input_tokens=c.input_tokens, output_tokens=c.output_tokens))
    return True


def error_results(s: Session, scope: Any, code: str, message: str, status_code: int | None = None) -> int:
    """Insert an error record for each request in ``scope`` that passed validation and has no record yet.

    ``status_code`` None: the request never got a response (expired, cancelled); else an HTTP-level failure.
    """
    src = (
        select(Request.id, Request.batch_id, literal(False), literal(status_code, Integer), literal(code),
               literal(message), Request.model, db_now(), literal(0), literal(0), literal(0))
        .outerjoin(Result, Result.request_id == Request.id)
        .where(scope, Request.error_code.is_(None), Result.request_id.is_(None))
    )
    cols = ["request_id", "batch_id", "ok", "status_code", "error_code", "error_message", "model", "created_at",
            "prompt_tokens", "completion_tokens", "attempt"]
    return rowcount(s.execute(insert(Result).from_select(cols, src)))
