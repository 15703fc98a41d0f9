"""Which chunks need a Celery message: never sent, or sent but (apparently) lost.

Queued chunks carry ``dispatched_at`` (database time): NULL until a message is sent. The store is the
source of truth, so a submit whose broker failed after the commit, a Redis restart or a missing scheduler
never lose work: whoever dispatches next finds the chunks here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select, update

from batchllm.status import BatchStatus, ChunkStatus
from batchllm.store.clock import db_now
from batchllm.store.db import session_scope
from batchllm.store.models import Batch, Chunk


def _of_batch(column: Any) -> Any:
    """``column`` of the chunk's batch, as a correlated lookup by primary key.

    A scalar subquery on the key alone, not a join: PostgreSQL cannot flatten it, so each candidate chunk
    costs one primary-key lookup whatever the statistics say. Joined (or filtered on the batch's status
    inside the subquery), tables that autovacuum has not analyzed yet — right after a burst of submits —
    are estimated at one row, and the plan becomes a loop over every batch per queued chunk (400 ms a
    scheduler tick at 1,000 batches).
    """
    return select(column).where(Batch.id == Chunk.batch_id).scalar_subquery()


_OPEN = (Chunk.status == ChunkStatus.QUEUED, _of_batch(Batch.status) == BatchStatus.IN_PROGRESS)


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """What a message needs: ids, model, queue, size, priority."""

    id: str
    batch_id: str
    model: str
    queue: str
    size: int
    priority: int


@dataclass(frozen=True, slots=True)
class QueueBacklog:
    """Chunks of one queue that were sent and are still queued; ``stale`` of them were sent long ago."""

    queue: str
    model: str
    waiting: int
    stale: int


_REF_COLUMNS = (Chunk.id, Chunk.batch_id, Chunk.model, Chunk.queue, Chunk.size, Chunk.priority)


def unsent(url: str, grace_s: float, limit: int = 10_000) -> list[ChunkRef]:
    """Queued chunks of running batches never sent (older than ``grace_s``): most urgent, then interleaved
    by chunk number across batches (A1 B1 A2 B2 …) so batches of equal priority share the workers."""
    with session_scope(url) as s:
        rows = s.execute(
            select(*_REF_COLUMNS)
            .where(*_OPEN, Chunk.dispatched_at.is_(None), _of_batch(Batch.in_progress_at) < db_now() - grace_s)
            .order_by(Chunk.priority.desc(), Chunk.seq, Chunk.created_at)
            .limit(limit)
        ).all()
    return [ChunkRef(*r) for r in rows]


def backlog(url: str, resend_after_s: float) -> list[QueueBacklog]:
    """Per queue: chunks sent and still waiting, and how many of those were sent over ``resend_after_s`` ago."""
    with session_scope(url) as s:
        rows = s.execute(
            select(Chunk.queue, Chunk.model, func.count(),
                   func.sum(case((Chunk.dispatched_at < db_now() - resend_after_s, 1), else_=0)))
            .where(*_OPEN, Chunk.dispatched_at.is_not(None))
            .group_by(Chunk.queue, Chunk.model)
        ).all()
    return [QueueBacklog(q, m, int(n), int(stale or 0)) for q, m, n, stale in rows]


def to_resend(url: str, queues: Sequence[str], resend_after_s: float) -> list[ChunkRef]:
    """Chunks of ``queues`` sent over ``resend_after_s`` ago and still queued (their message looks lost)."""
    if not queues:
        return []
    with session_scope(url) as s:
        rows = s.execute(
            select(*_REF_COLUMNS)
            .where(*_OPEN, Chunk.queue.in_(list(queues)), Chunk.dispatched_at < db_now() - resend_after_s)
            .order_by(Chunk.priority.desc(), Chunk.created_at, Chunk.seq)
        ).all()
    return [ChunkRef(*r) for r in rows]


def of_batch(url: str, batch_id: str, limit: int | None = None, only_unsent: bool = True) -> list[ChunkRef]:
    """A batch's queued chunks in sequence order (the first ``limit``), for a submit that sends its own."""
    q = select(*_REF_COLUMNS).where(Chunk.batch_id == batch_id, Chunk.status == ChunkStatus.QUEUED).order_by(Chunk.seq)
    if only_unsent:
        q = q.where(Chunk.dispatched_at.is_(None))
    if limit is not None:
        q = q.limit(limit)
    with session_scope(url) as s:
        return [ChunkRef(*r) for r in s.execute(q).all()]


def mark_sent(url: str, chunk_ids: Sequence[str]) -> None:
    """Record (database time) that messages were sent, so lost ones can be told apart from waiting ones."""
    ids = list(chunk_ids)
    with session_scope(url) as s:
        for i in range(0, len(ids), 1000):  # bounded IN lists
            s.execute(update(Chunk).where(Chunk.id.in_(ids[i : i + 1000])).values(dispatched_at=db_now()))
