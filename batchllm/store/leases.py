"""Chunk leases: the SQL store, not Redis, decides who owns a chunk.

A worker claims a chunk with one atomic UPDATE (queued, or leased with an expired lease → leased to me);
its heartbeat extends its leases; the scheduler re-queues chunks whose lease lapsed. A redelivered Celery
message for a chunk that is done or leased by a live worker is therefore acked and skipped.
"""

from __future__ import annotations

import time

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from batchllm.status import ChunkStatus
from batchllm.store.db import rowcount
from batchllm.store.models import Chunk


def claim(session: Session, chunk_id: str, owner: str, ttl: float) -> Chunk | None:
    """Lease a chunk to ``owner`` if it is free; returns the chunk, or None if someone else has it or it is done."""
    now = time.time()
    res = session.execute(
        update(Chunk)
        .where(
            Chunk.id == chunk_id,
            or_(
                Chunk.status == ChunkStatus.QUEUED,
                (Chunk.status == ChunkStatus.LEASED) & (Chunk.lease_expires_at < now),
            ),
        )
        .values(status=ChunkStatus.LEASED, lease_owner=owner, lease_expires_at=now + ttl, attempts=Chunk.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    if rowcount(res) != 1:
        return None
    return session.get(Chunk, chunk_id, populate_existing=True)


def extend(session: Session, owner: str, ttl: float) -> int:
    """Push out every lease ``owner`` holds (called by the worker's heartbeat)."""
    res = session.execute(
        update(Chunk)
        .where(Chunk.lease_owner == owner, Chunk.status == ChunkStatus.LEASED)
        .values(lease_expires_at=time.time() + ttl)
        .execution_options(synchronize_session=False)
    )
    return rowcount(res)


def finish(session: Session, chunk_id: str) -> bool:
    """Mark a chunk done once all its requests have results (whoever finished it)."""
    res = session.execute(
        update(Chunk)
        .where(Chunk.id == chunk_id, Chunk.status.in_([ChunkStatus.LEASED, ChunkStatus.QUEUED]))
        .values(status=ChunkStatus.DONE, finished_at=time.time(), lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return bool(rowcount(res))


def release(session: Session, chunk_id: str, owner: str) -> bool:
    """Give a lease back (worker draining or failing): the chunk is queued again for someone else."""
    res = session.execute(
        update(Chunk)
        .where(Chunk.id == chunk_id, Chunk.lease_owner == owner, Chunk.status == ChunkStatus.LEASED)
        .values(status=ChunkStatus.QUEUED, lease_owner=None, lease_expires_at=None, dispatched_at=None)
        .execution_options(synchronize_session=False)
    )
    return bool(rowcount(res))


def release_owner(session: Session, owner: str) -> list[Chunk]:
    """Re-queue every chunk ``owner`` holds (its heartbeat lapsed, or it said it is stopping)."""
    chunks = list(session.scalars(select(Chunk).where(Chunk.lease_owner == owner, Chunk.status == ChunkStatus.LEASED)))
    for ck in chunks:
        release(session, ck.id, owner)
    return chunks


def reap_expired(session: Session) -> list[Chunk]:
    """Re-queue chunks whose lease has lapsed; the caller re-dispatches them."""
    now = time.time()
    chunks = list(session.scalars(select(Chunk).where(Chunk.status == ChunkStatus.LEASED, Chunk.lease_expires_at < now)))
    out = []
    for ck in chunks:
        res = session.execute(
            update(Chunk)
            .where(Chunk.id == ck.id, Chunk.status == ChunkStatus.LEASED, Chunk.lease_expires_at < now)
            .values(status=ChunkStatus.QUEUED, lease_owner=None, lease_expires_at=None, dispatched_at=None)
            .execution_options(synchronize_session=False)
        )
        if rowcount(res):
            out.append(ck)
    return out


def undispatched(session: Session, older_than: float) -> list[Chunk]:
    """Queued chunks whose message was never sent or may be lost (e.g. Redis restarted without persistence)."""
    cutoff = time.time() - older_than
    return list(
        session.scalars(
            select(Chunk)
            .where(
                Chunk.status == ChunkStatus.QUEUED,
                or_(Chunk.dispatched_at.is_(None), Chunk.dispatched_at < cutoff),
            )
            .order_by(Chunk.priority.desc(), Chunk.created_at)
        )
    )


def mark_dispatched(session: Session, chunk_ids: list[str]) -> None:
    """Record when messages were sent, so lost ones can be told apart from waiting ones."""
    if chunk_ids:
        session.execute(
            update(Chunk)
            .where(Chunk.id.in_(chunk_ids))
            .values(dispatched_at=time.time())
            .execution_options(synchronize_session=False)
        )
