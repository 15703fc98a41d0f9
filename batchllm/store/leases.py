"""Chunk leases: the SQL store, not Redis, decides who runs a chunk — and fences everyone else out.

A worker claims a chunk with one atomic UPDATE (queued, or leased with a lapsed lease → leased to me, attempt
+1) and gets a ``Lease``: the fencing token ``(owner, attempt)``. Renewing, releasing, writing results and
finishing are all conditional on that token (see ``store.results.write_results``), so a worker that lost its
lease — frozen, partitioned, skewed — can never write again, whatever it still believes. Lease times are
the database's clock. A redelivered Celery message for a chunk that is done or leased by a live worker
finds nothing to claim and is acked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from batchllm.status import BatchStatus, ChunkStatus, Endpoint
from batchllm.store import lifecycle
from batchllm.store.clock import db_now
from batchllm.store.db import rowcount, session_scope
from batchllm.store.leader import LeaderFence, guard
from batchllm.store.models import Batch, Chunk, Request, Result, Worker
from batchllm.store.workers import alive, mark_lost

_STOPPED_BATCH = (BatchStatus.CANCELLING, BatchStatus.CANCELLED, BatchStatus.EXPIRED, BatchStatus.FAILED)


class ClaimOutcome(StrEnum):
    """What a claim found."""

    CLAIMED = "claimed"  # ours now: run ``Claim.requests``
    TAKEN = "taken"  # done, or leased by someone whose lease is live: nothing to do
    CANCELLED = "cancelled"  # its batch was cancelled or expired: the chunk is closed
    EMPTY = "empty"  # every request already has a record (a re-run after a crash): the chunk is closed


@dataclass(frozen=True)
class Lease:
    """The fencing token of one claim."""

    chunk_id: str
    batch_id: str
    owner: str
    attempt: int
    model: str

    @property
    def key(self) -> str:
        """A name unique to this claim (an engine group)."""
        return f"{self.chunk_id}#{self.attempt}"


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """A request of a claimed chunk that has no record yet."""

    id: int
    endpoint: Endpoint
    body: bytes


@dataclass(frozen=True)
class Claim:
    """The outcome of a claim: the lease and the requests to run when ``CLAIMED``."""

    outcome: ClaimOutcome
    lease: Lease | None = None
    requests: tuple[PendingRequest, ...] = ()


def claim(url: str, chunk_id: str, owner: str, ttl: float) -> Claim:
    """Lease ``chunk_id`` to ``owner`` for ``ttl`` seconds if it is free (see the module docstring)."""
    with session_scope(url) as s:
        free = (Chunk.status == ChunkStatus.QUEUED) | ((Chunk.status == ChunkStatus.LEASED) & (Chunk.lease_expires_at < db_now()))
        row = s.execute(
            update(Chunk)
            .where(Chunk.id == chunk_id, free)
            .values(status=ChunkStatus.LEASED, lease_owner=owner, lease_expires_at=db_now() + ttl, attempt=Chunk.attempt + 1)
            .returning(Chunk.batch_id, Chunk.attempt, Chunk.model)
        ).first()
        if row is None:
            return Claim(ClaimOutcome.TAKEN)
        lease = Lease(chunk_id, row[0], owner, int(row[1]), row[2])
        if s.scalar(select(Batch.status).where(Batch.id == lease.batch_id)) in _STOPPED_BATCH:
            close(s, lease, ChunkStatus.CANCELLED)
            return Claim(ClaimOutcome.CANCELLED, lease)
        requests = _pending(s, chunk_id)
        if not requests:
            close(s, lease, ChunkStatus.DONE)
            return Claim(ClaimOutcome.EMPTY, lease)
        return Claim(ClaimOutcome.CLAIMED, lease, requests)


def _pending(s: Session, chunk_id: str) -> tuple[PendingRequest, ...]:
    rows = s.execute(
        select(Request.id, Request.endpoint, Request.body)
        .outerjoin(Result, Result.request_id == Request.id)
        .where(Request.chunk_id == chunk_id, Result.request_id.is_(None), Request.error_code.is_(None))
        .order_by(Request.line_no)
    ).all()
    return tuple(PendingRequest(rid, Endpoint(ep or Endpoint.CHAT), (body or "{}").encode()) for rid, ep, body in rows)


def close(s: Session, lease: Lease, status: ChunkStatus) -> BatchStatus | None:
    """Inside a fenced transaction: end the lease's chunk with ``status`` and move its batch on if that was the
    last; returns the batch's new status, if it moved."""
    s.execute(
        update(Chunk).where(Chunk.id == lease.chunk_id, Chunk.attempt == lease.attempt)
        .values(status=status, finished_at=db_now(), lease_expires_at=None)
    )
    s.flush()
    return lifecycle.finalize(s, lease.batch_id)


def _requeue(s: Session, *where: Any) -> int:
    """Queue the matching chunks again, lease cleared and message unsent; returns how many."""
    return rowcount(s.execute(update(Chunk).where(*where).values(
        status=ChunkStatus.QUEUED, lease_owner=None, lease_expires_at=None, dispatched_at=None)))


def holds(s: Session, lease: Lease, ttl: float) -> bool:
    """Inside a write's transaction: renew the lease and lock its row; False when it is no longer ours."""
    res = s.execute(
        update(Chunk)
        .where(Chunk.id == lease.chunk_id, Chunk.lease_owner == lease.owner, Chunk.attempt == lease.attempt,
               Chunk.status == ChunkStatus.LEASED)
        .values(lease_expires_at=db_now() + ttl)
    )
    return rowcount(res) == 1


def renew(url: str, leases: Sequence[Lease], ttl: float) -> set[str]:
    """Extend exactly the given leases (the heartbeat); returns the keys of those still held."""
    if not leases:
        return set()
    owner = leases[0].owner
    with session_scope(url) as s:
        rows = s.execute(
            update(Chunk)
            .where(Chunk.id.in_([le.chunk_id for le in leases]), Chunk.lease_owner == owner,
                   Chunk.status == ChunkStatus.LEASED)
            .values(lease_expires_at=db_now() + ttl)
            .returning(Chunk.id, Chunk.attempt)
        ).all()
    return {f"{cid}#{attempt}" for cid, attempt in rows}


def release(url: str, lease: Lease) -> bool:
    """Give a lease back (a worker stopping, a write that could not be made): the chunk is queued again."""
    with session_scope(url) as s:
        return _requeue(s, Chunk.id == lease.chunk_id, Chunk.lease_owner == lease.owner,
                        Chunk.attempt == lease.attempt, Chunk.status == ChunkStatus.LEASED) == 1


def release_owner(url: str, owner: str) -> int:
    """Re-queue every chunk a (dead) process instance holds; returns how many."""
    with session_scope(url) as s:
        return _requeue(s, Chunk.status == ChunkStatus.LEASED, Chunk.lease_owner == owner)


def release_all(url: str) -> int:
    """Re-queue every leased chunk, whoever held it (the embedded runner, which owns its database file)."""
    with session_scope(url) as s:
        return _requeue(s, Chunk.status == ChunkStatus.LEASED)


@dataclass(frozen=True)
class Reaped:
    """What one recovery pass did."""

    lost_workers: list[str]
    requeued: int


def reap(url: str, heartbeat_timeout: float, fence: LeaderFence | None) -> Reaped:
    """Workers whose heartbeat lapsed become ``lost``; chunks whose lease lapsed, or whose owner is not a live
    worker, are queued again (their messages are re-sent by dispatch). One transaction, two statements."""
    with session_scope(url) as s:
        guard(s, fence)
        lost = mark_lost(s, heartbeat_timeout)
        live = select(Worker.instance).where(Worker.instance.is_not(None), *alive(heartbeat_timeout))
        requeued = _requeue(s, Chunk.status == ChunkStatus.LEASED,
                            (Chunk.lease_expires_at < db_now()) | Chunk.lease_owner.is_(None)
                            | Chunk.lease_owner.not_in(live))
        return Reaped(lost, requeued)
