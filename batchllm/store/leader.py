"""The scheduler's leader lease: exactly one ``batchllm scheduler`` acts at a time.

Row 1 of ``scheduler_lease`` names the active scheduler and when its lease ends (database time). A scheduler
renews it every tick; another one takes it over only once it has lapsed, and each change of holder bumps
``term``. Every write a scheduler makes passes its ``LeaderFence``: inside the write's own transaction the
row is checked (and locked) first, so a scheduler that was frozen past its lease can never act once another
took over — not even in the middle of a tick.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from batchllm.errors import NotLeader
from batchllm.store.clock import db_now
from batchllm.store.db import rowcount, session_scope
from batchllm.store.models import SchedulerLease

_ROW = 1
_IDLE_TX_MS = 2000  # well under any sensible lease (default 10 s)


@dataclass(frozen=True)
class LeaderFence:
    """Proof of leadership: the holder's id and the term it was granted."""

    owner: str
    term: int


@dataclass(frozen=True)
class LeaderInfo:
    """Who holds the lease, for `batchllm workers` / `status`."""

    owner: str | None
    host: str | None
    pid: int | None
    term: int
    acquired_at: float | None
    expires_in: float | None  # seconds left (negative: lapsed)

    @property
    def active(self) -> bool:
        """Whether the lease is held now."""
        return self.owner is not None and self.expires_in is not None and self.expires_in > 0


def acquire(url: str, owner: str, host: str, pid: int, ttl: float) -> LeaderFence | None:
    """Take or renew the lease; None while another scheduler holds it.

    Args:
        url: database URL.
        owner: this scheduler process's unique id.
        host: host name, shown to people.
        pid: process id, shown to people.
        ttl: seconds the lease lasts without renewal (several ticks).
    """
    with session_scope(url) as s:
        _ensure_row(s)
        row = s.execute(
            update(SchedulerLease)
            .where(SchedulerLease.id == _ROW, SchedulerLease.owner == owner, SchedulerLease.expires_at > db_now())
            .values(expires_at=db_now() + ttl)
            .returning(SchedulerLease.term)
        ).first()
        if row is not None:
            return LeaderFence(owner, int(row[0]))
        # Take over a lapsed (or never held) lease; the term grows, so the old holder's fence is void.
        lapsed = (SchedulerLease.owner.is_(None)) | (SchedulerLease.expires_at <= db_now()) | (SchedulerLease.owner == owner)
        row = s.execute(
            update(SchedulerLease)
            .where(SchedulerLease.id == _ROW, lapsed)
            .values(owner=owner, host=host, pid=pid, term=SchedulerLease.term + 1, acquired_at=db_now(),
                    expires_at=db_now() + ttl)
            .returning(SchedulerLease.term)
        ).first()
        return LeaderFence(owner, int(row[0])) if row is not None else None


def resign(url: str, fence: LeaderFence) -> None:
    """Give the lease up at once (a clean shutdown), so a standby takes over on its next tick."""
    with session_scope(url) as s:
        s.execute(
            update(SchedulerLease)
            .where(SchedulerLease.id == _ROW, SchedulerLease.owner == fence.owner, SchedulerLease.term == fence.term)
            .values(expires_at=db_now())
        )


def current(url: str) -> LeaderInfo | None:
    """The lease as it stands (None when no scheduler ever ran)."""
    with session_scope(url) as s:
        row = s.execute(
            select(SchedulerLease.owner, SchedulerLease.host, SchedulerLease.pid, SchedulerLease.term,
                   SchedulerLease.acquired_at, SchedulerLease.expires_at - db_now())
            .where(SchedulerLease.id == _ROW)
        ).first()
    if row is None:
        return None
    return LeaderInfo(row[0], row[1], row[2], int(row[3] or 0), row[4], None if row[5] is None else float(row[5]))


def guard(session: Session, fence: LeaderFence | None) -> None:
    """Inside a write's transaction: check (and lock) the lease; raise ``NotLeader`` if ``fence`` is void.

    ``None`` means the caller is not a scheduler (a CLI waiting on its batch, the embedded runner), whose
    writes are all conditional on their own state and need no leadership.
    """
    if fence is None:
        return
    if session.get_bind().dialect.name == "postgresql":
        # The row lock taken below is held until commit. A scheduler frozen inside this transaction (SIGSTOP, a
        # paused VM) would make the standby's takeover wait for it; PostgreSQL ends such an idle transaction
        # instead, which releases the lock, and the frozen scheduler's commit then fails.
        session.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = {_IDLE_TX_MS}"))
    res = session.execute(
        update(SchedulerLease)
        .where(SchedulerLease.id == _ROW, SchedulerLease.owner == fence.owner, SchedulerLease.term == fence.term,
               SchedulerLease.expires_at > db_now())
        .values(owner=fence.owner)  # a no-op write: it takes the row lock until this transaction ends
    )
    if rowcount(res) != 1:
        raise NotLeader(f"scheduler {fence.owner} (term {fence.term}) is no longer the active scheduler")


def _ensure_row(s: Session) -> None:
    if s.get(SchedulerLease, _ROW) is not None:
        return
    try:
        with s.begin_nested():
            s.execute(insert(SchedulerLease).values(id=_ROW, term=0))
    except IntegrityError:  # another scheduler inserted it first
        pass
