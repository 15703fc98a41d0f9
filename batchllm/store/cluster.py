"""Aggregate reads of the whole cluster for the scheduler: open work per model, and the metrics snapshot.

Every query here is one aggregate, so a scheduler tick costs the same number of statements whether the
cluster runs one batch or a thousand, one worker or a hundred.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select

from batchllm.status import BatchStatus, ChunkStatus
from batchllm.store.clock import db_now
from batchllm.store.db import session_scope
from batchllm.store.models import Batch, Chunk, Request, Result, Worker


@dataclass(frozen=True)
class OpenWork:
    """Open chunks of one model ref, per status and priority: ``requests`` in them, the oldest's age (s)."""

    model: str
    status: str
    priority: int
    chunks: int
    requests: int
    oldest_age: float


def open_work(url: str) -> list[OpenWork]:
    """Queued and leased chunks of running batches, grouped by model ref, status and priority."""
    with session_scope(url) as s:
        rows = s.execute(
            select(Chunk.model, Chunk.status, Chunk.priority, func.count(), func.sum(Chunk.size),
                   db_now() - func.min(Chunk.created_at))
            .join(Batch, Batch.id == Chunk.batch_id)
            .where(Chunk.status.in_([ChunkStatus.QUEUED, ChunkStatus.LEASED]), Batch.status == BatchStatus.IN_PROGRESS)
            .group_by(Chunk.model, Chunk.status, Chunk.priority)
        ).all()
    return [OpenWork(m, st, int(p or 0), int(n), int(size or 0), max(0.0, float(age or 0.0))) for m, st, p, n, size, age in rows]


@dataclass
class MetricsRead:
    """What the metrics endpoint shows, read in one go."""

    batches: dict[str, int] = field(default_factory=dict)
    open_chunks: dict[tuple[str, str], int] = field(default_factory=dict)  # (model ref, status) → n
    # worker → (model, state, tokens, requests, stale writes, heartbeat age s)
    workers: dict[str, tuple[str, str, int, int, int, float]] = field(default_factory=dict)
    requests: dict[tuple[str, str], int] | None = None  # (model, completed|failed) → n, when asked for
    tokens_by_model: dict[str, int] | None = None


def metrics(url: str, forget_workers_after: float, with_results: bool) -> MetricsRead:
    """Batches by status, open chunks, recent workers and (``with_results``: a heavier aggregate) result totals."""
    out = MetricsRead()
    with session_scope(url) as s:
        out.batches = {str(st): int(n) for st, n in s.execute(select(Batch.status, func.count()).group_by(Batch.status))}
        out.open_chunks = {(m, st): int(n) for m, st, n in s.execute(
            select(Chunk.model, Chunk.status, func.count())
            .where(Chunk.status.in_([ChunkStatus.QUEUED, ChunkStatus.LEASED])).group_by(Chunk.model, Chunk.status))}
        for name, model, state, tokens, done, stale, age in s.execute(
            select(Worker.name, Worker.model, Worker.state, Worker.tokens_generated, Worker.requests_done,
                   Worker.stale_writes, db_now() - Worker.last_heartbeat)
            .where(Worker.last_heartbeat >= db_now() - forget_workers_after)
        ):
            out.workers[name] = (model or "", state or "", int(tokens or 0), int(done or 0), int(stale or 0),
                                 max(0.0, float(age or 0.0)))
        if with_results:
            out.requests, out.tokens_by_model = {}, {}
            for model, ok, n, ctok in s.execute(
                select(Result.model, Result.ok, func.count(), func.coalesce(func.sum(Result.completion_tokens), 0))
                .group_by(Result.model, Result.ok)
            ):
                key = (model or "unknown", "completed" if ok else "failed")
                out.requests[key] = out.requests.get(key, 0) + int(n)
                out.tokens_by_model[model or "unknown"] = out.tokens_by_model.get(model or "unknown", 0) + int(ctok)
            # Lines rejected at validation never get a result row but are failed requests all the same.
            for model, n in s.execute(
                select(Request.model, func.count()).where(Request.error_code.is_not(None)).group_by(Request.model)
            ):
                key = (model or "unknown", "failed")
                out.requests[key] = out.requests.get(key, 0) + int(n)
    return out
