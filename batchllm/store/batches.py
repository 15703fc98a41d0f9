"""Batch-level queries: counts, finalization, cancel, retry, expiry."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, delete, func, insert, select, update
from sqlalchemy.orm import Session

from batchllm.errors import NotFound
from batchllm.status import TERMINAL_BATCH, BatchStatus, ChunkStatus
from batchllm.store.db import rowcount
from batchllm.store.models import Batch, Chunk, Request, Result


def new_batch_id() -> str:
    """A fresh batch id in OpenAI's style."""
    return f"batch_{uuid.uuid4().hex[:24]}"


def new_chunk_id() -> str:
    """A fresh chunk id."""
    return f"ck_{uuid.uuid4().hex[:20]}"


@dataclass(frozen=True)
class Counts:
    """OpenAI's request counts; ``completed + failed + pending == total`` always."""

    total: int
    completed: int
    failed: int

    @property
    def pending(self) -> int:
        """Requests with no result yet."""
        return max(0, self.total - self.completed - self.failed)


def get_batch(session: Session, batch_id: str) -> Batch:
    """Load a batch or raise ``NotFound`` (exit 2) with a hint."""
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise NotFound(f"no batch '{batch_id}'; `batchllm status` lists batches")
    return batch


def counts(session: Session, batch: Batch) -> Counts:
    """Count results of a batch (one indexed aggregate query)."""
    row = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((Result.ok.is_(True), 1), else_=0)), 0),
        ).where(Result.batch_id == batch.id)
    ).one()
    n_results, n_ok = int(row[0]), int(row[1])
    return Counts(total=batch.total, completed=n_ok, failed=batch.invalid + (n_results - n_ok))


def maybe_finalize(session: Session, batch_id: str) -> str | None:
    """Move a batch to its end state once nothing is pending; safe to call from anyone, any time.

    Returns:
        The new status if it changed, else None.
    """
    batch = session.get(Batch, batch_id, with_for_update=False)
    if batch is None or BatchStatus(batch.status) in TERMINAL_BATCH:
        return None
    c = counts(session, batch)
    open_chunks = session.scalar(
        select(func.count()).where(Chunk.batch_id == batch_id, Chunk.status.in_([ChunkStatus.QUEUED, ChunkStatus.LEASED]))
    )
    now = time.time()
    if batch.status == BatchStatus.CANCELLING:
        leased = session.scalar(select(func.count()).where(Chunk.batch_id == batch_id, Chunk.status == ChunkStatus.LEASED))
        if leased:
            return None
        _fill_missing(session, batch_id, "batch_cancelled", "the batch was cancelled before this request ran")
        new = BatchStatus.CANCELLED
    elif c.pending == 0 and not open_chunks:
        new = BatchStatus.COMPLETED
    else:
        return None
    res = session.execute(
        update(Batch).where(Batch.id == batch_id, Batch.status == batch.status).values(status=new, finished_at=now)
    )
    return new if rowcount(res) else None


def _fill_missing(session: Session, batch_id: str, code: str, message: str) -> int:
    """Give every request without a result an error result, so counts add up after cancel/expiry."""
    return _error_results(session, Request.batch_id == batch_id, code, message, status_code=0)


def _error_results(session: Session, scope: Any, code: str, message: str, status_code: int) -> int:
    """Insert an error result for each request in ``scope`` that passed validation and has no result yet."""
    missing = (
        select(Request.id, Request.batch_id, Request.model)
        .outerjoin(Result, Result.request_id == Request.id)
        .where(scope, Request.error_code.is_(None), Result.request_id.is_(None))
    )
    now = time.time()
    rows = [
        {
            "request_id": rid,
            "batch_id": bid,
            "ok": False,
            "status_code": status_code,
            "error_code": code,
            "error_message": message,
            "model": model,
            "created_at": now,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "attempt": 0,
        }
        for rid, bid, model in session.execute(missing)
    ]
    if rows:
        session.execute(insert(Result), rows)
    return len(rows)


def fail_chunks(session: Session, ref: str, code: str, message: str, status_code: int = 503) -> list[str]:
    """Fail the queued chunks of ``ref`` (a model nobody can load): every request without a result gets an error.

    Used by the scheduler when the only workers that could host ``ref`` failed to load it, so the batch
    ends with a clear message instead of waiting forever. Leased chunks are left to their worker.

    Returns:
        The ids of the batches touched (the caller runs ``maybe_finalize`` on each).
    """
    chunk_ids = list(session.scalars(select(Chunk.id).where(Chunk.model == ref, Chunk.status == ChunkStatus.QUEUED)))
    now = time.time()
    batch_ids: set[str] = set()
    for i in range(0, len(chunk_ids), 500):  # bounded IN lists
        # Flip the chunks first: only those still queued (not claimed meanwhile) get error results.
        done = session.execute(
            update(Chunk)
            .where(Chunk.id.in_(chunk_ids[i : i + 500]), Chunk.status == ChunkStatus.QUEUED)
            .values(status=ChunkStatus.DONE, finished_at=now, lease_expires_at=None)
            .returning(Chunk.id, Chunk.batch_id)
            .execution_options(synchronize_session=False)
        ).all()
        if not done:
            continue
        batch_ids.update(bid for _, bid in done)
        _error_results(session, Request.chunk_id.in_([cid for cid, _ in done]), code, message, status_code)
    return sorted(batch_ids)


def cancel(session: Session, batch_id: str) -> str:
    """Stop dispatch at once: queued chunks are cancelled; leased ones finish what is in the engine."""
    batch = get_batch(session, batch_id)
    if BatchStatus(batch.status) in TERMINAL_BATCH:
        return batch.status
    session.execute(
        update(Chunk)
        .where(Chunk.batch_id == batch_id, Chunk.status == ChunkStatus.QUEUED)
        .values(status=ChunkStatus.CANCELLED, finished_at=time.time())
    )
    session.execute(update(Batch).where(Batch.id == batch_id).values(status=BatchStatus.CANCELLING))
    session.flush()
    return maybe_finalize(session, batch_id) or BatchStatus.CANCELLING


def expire(session: Session, batch_id: str) -> bool:
    """Expire a batch past its completion window: stop its work and fail what did not run."""
    res = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.in_([BatchStatus.IN_PROGRESS, BatchStatus.VALIDATING]))
        .values(status=BatchStatus.EXPIRED, finished_at=time.time())
    )
    if not rowcount(res):
        return False
    session.execute(
        update(Chunk)
        .where(Chunk.batch_id == batch_id, Chunk.status.in_([ChunkStatus.QUEUED, ChunkStatus.LEASED]))
        .values(status=ChunkStatus.CANCELLED, finished_at=time.time())
    )
    _fill_missing(session, batch_id, "batch_expired", "the batch expired (past its completion window) before this request ran")
    return True


def retry_failed(session: Session, batch_id: str, chunk_size: int) -> list[Chunk]:
    """Queue the failed requests of a batch again (validation failures excepted: they would fail again).

    Returns:
        The new chunks, to be dispatched by the caller after commit.
    """
    batch = get_batch(session, batch_id)
    failed = session.execute(
        select(Request.id, Request.model, Chunk.model, Chunk.queue)
        .join(Result, Result.request_id == Request.id)
        .join(Chunk, Chunk.id == Request.chunk_id)
        .where(Request.batch_id == batch_id, Result.ok.is_(False))
        .order_by(Request.line_no)
    ).all()
    if not failed:
        return []
    by_model: dict[tuple[str, str], list[int]] = {}
    for rid, _name, ref, queue in failed:
        by_model.setdefault((ref, queue), []).append(rid)
    now = time.time()
    chunks: list[Chunk] = []
    seq = int(session.scalar(select(func.coalesce(func.max(Chunk.seq), 0)).where(Chunk.batch_id == batch_id)) or 0)
    for (ref, queue), ids in by_model.items():
        for i in range(0, len(ids), chunk_size):
            part = ids[i : i + chunk_size]
            seq += 1
            ck = Chunk(
                id=new_chunk_id(),
                batch_id=batch_id,
                model=ref,
                queue=queue,
                seq=seq,
                size=len(part),
                priority=batch.priority,
                status=ChunkStatus.QUEUED,
                created_at=now,
                attempts=0,
            )
            session.add(ck)
            session.flush()
            session.execute(update(Request).where(Request.id.in_(part)).values(chunk_id=ck.id))
            session.execute(delete(Result).where(and_(Result.request_id.in_(part))))
            chunks.append(ck)
    session.execute(update(Batch).where(Batch.id == batch_id).values(status=BatchStatus.IN_PROGRESS, finished_at=None))
    return chunks


def list_batches(session: Session, limit: int = 20, active_only: bool = False) -> list[Batch]:
    """Most recent batches first."""
    q = select(Batch).order_by(Batch.created_at.desc()).limit(limit)
    if active_only:
        q = q.where(Batch.status.not_in(list(TERMINAL_BATCH)))
    return list(session.scalars(q))
