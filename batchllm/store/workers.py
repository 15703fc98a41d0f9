"""Worker rows: unique names, heartbeats, assignments and load failures.

A worker process has a random ``instance`` id; it owns its chunk leases under that id and holds its ``name``
only while it heartbeats. Registering a name succeeds when the row is free, stopped, or its heartbeat has
lapsed; a name a live worker holds is refused. A process whose name was taken over (it was presumed dead,
e.g. after a network partition) finds its heartbeat refused and must stop: it no longer owns anything.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from batchllm.status import WorkerState
from batchllm.store.clock import db_now
from batchllm.store.db import session_scope
from batchllm.store.leader import LeaderFence, guard
from batchllm.store.models import Worker

# Columns a worker describes itself with (the rest belong to the scheduler or are counters).
IDENTITY_COLUMNS = ("host", "pid", "kind", "devices", "memory_total_bytes", "memory_free_bytes", "advertised_bytes",
                    "tensor_parallel", "pinned")  # fmt: skip


@dataclass(frozen=True)
class WorkerInfo:
    """A worker row as data, with its heartbeat age on the database's clock."""

    name: str
    instance: str | None
    host: str
    pid: int | None
    kind: str
    devices: list[dict[str, Any]]
    memory_total_bytes: int
    memory_free_bytes: int
    advertised_bytes: int | None
    tensor_parallel: int
    model: str | None
    assigned_model: str | None
    pinned: bool
    state: str
    error: str | None
    load_failed_ref: str | None
    tokens_generated: int
    requests_done: int
    stale_writes: int
    heartbeat_age: float

    def live(self, timeout: float) -> bool:
        """Heartbeat fresher than ``timeout`` and not stopped or lost."""
        return self.heartbeat_age <= timeout and self.state not in (WorkerState.STOPPED, WorkerState.LOST)


@dataclass(frozen=True)
class Beat:
    """What a heartbeat learns: the scheduler's assignment, and whether this process still holds its name."""

    registered: bool
    assigned_model: str | None


_INFO_COLUMNS = [getattr(Worker, f.name) for f in fields(WorkerInfo) if f.name != "heartbeat_age"]


def _info(row: Any) -> WorkerInfo:
    *values, age = row
    data = dict(zip([f.name for f in fields(WorkerInfo) if f.name != "heartbeat_age"], values, strict=True))
    data["devices"] = list(data["devices"] or [])
    for k in ("tokens_generated", "requests_done", "stale_writes"):
        data[k] = int(data[k] or 0)
    return WorkerInfo(**data, heartbeat_age=max(0.0, float(age or 0.0)))


def _select() -> Any:
    return select(*_INFO_COLUMNS, db_now() - Worker.last_heartbeat)


def register(url: str, name: str, instance: str, identity: dict[str, Any], state: WorkerState, timeout: float) -> bool:
    """Claim ``name`` for the process ``instance``; False when a live worker holds it.

    Args:
        url: database URL.
        name: the worker name.
        instance: this process's unique id.
        identity: ``IDENTITY_COLUMNS`` values.
        state: the state to show.
        timeout: a holder whose heartbeat is older than this is presumed dead (the name is free).
    """
    values = {**identity, "name": name, "instance": instance, "state": str(state), "error": None,
              "load_failed_ref": None, "model": None, "started_at": db_now(), "last_heartbeat": db_now()}
    with session_scope(url) as s:
        ins: Any = _dialect(s).insert(Worker).values(**values)
        free = ((Worker.last_heartbeat < db_now() - timeout) | Worker.state.in_([WorkerState.STOPPED, WorkerState.LOST])
                | (Worker.instance == instance))
        # Taking over a name resets the row, but keeps the scheduler's assignment and the lifetime counters.
        keep = {"name", "assigned_model", "tokens_generated", "requests_done", "stale_writes"}
        stmt = ins.on_conflict_do_update(
            index_elements=[Worker.name],
            set_={k: getattr(ins.excluded, k) for k in values if k not in keep},
            where=free,
        ).returning(Worker.instance)
        row = s.execute(stmt).first()
        return row is not None and row[0] == instance


def heartbeat(url: str, instance: str, **changes: Any) -> Beat:
    """Refresh this process's row (``changes``: state, model, error, memory_free_bytes …).

    Returns:
        Whether the row is still ours, and the model the scheduler assigned.
    """
    with session_scope(url) as s:
        row = s.execute(
            update(Worker)
            .where(Worker.instance == instance)
            .values(**changes, last_heartbeat=db_now())
            .returning(Worker.assigned_model)
        ).first()
    return Beat(registered=row is not None, assigned_model=row[0] if row is not None else None)


def record_load_failure(url: str, instance: str, ref: str, message: str) -> None:
    """The worker could not load ``ref``: say so for people, and tell the scheduler not to give it ``ref`` again."""
    with session_scope(url) as s:
        s.execute(
            update(Worker)
            .where(Worker.instance == instance)
            .values(state=WorkerState.ERROR, error=message, load_failed_ref=ref, model=None, last_heartbeat=db_now(),
                    assigned_model=None)
        )


def mark_stopped(url: str, instance: str) -> None:
    """A clean exit: the name is free at once."""
    with session_scope(url) as s:
        s.execute(update(Worker).where(Worker.instance == instance).values(state=WorkerState.STOPPED, last_heartbeat=db_now()))


def add_stale_writes(url: str, instance: str, n: int) -> None:
    """Count result writes refused by fencing (for `batchllm workers` and the metrics)."""
    with session_scope(url) as s:
        s.execute(update(Worker).where(Worker.instance == instance).values(stale_writes=Worker.stale_writes + n))


def alive(timeout: float) -> tuple[Any, Any]:
    """The conditions of a live worker row: heartbeat fresher than ``timeout`` seconds (database time), and
    neither stopped nor lost (the one definition of liveness)."""
    return Worker.last_heartbeat >= db_now() - timeout, Worker.state.not_in([WorkerState.STOPPED, WorkerState.LOST])


def live_workers(url: str, timeout: float) -> list[WorkerInfo]:
    """Workers whose heartbeat is fresher than ``timeout`` seconds and that have not stopped or been lost."""
    with session_scope(url) as s:
        rows = s.execute(_select().where(*alive(timeout)).order_by(Worker.name)).all()
    return [_info(r) for r in rows]


def all_workers(url: str, seen_within: float | None = None) -> list[WorkerInfo]:
    """Every worker ever seen (or seen within ``seen_within`` seconds), newest heartbeat first."""
    q = _select().order_by(Worker.last_heartbeat.desc())
    if seen_within is not None:
        q = q.where(Worker.last_heartbeat >= db_now() - seen_within)
    with session_scope(url) as s:
        return [_info(r) for r in s.execute(q).all()]


def mark_lost(s: Session, timeout: float) -> list[str]:
    """Within a scheduler transaction: workers whose heartbeat lapsed become ``lost``; returns their names."""
    lapsed = (Worker.last_heartbeat < db_now() - timeout, Worker.state.not_in([WorkerState.STOPPED, WorkerState.LOST]))
    return list(s.scalars(update(Worker).where(*lapsed).values(state=WorkerState.LOST).returning(Worker.name)))


def apply_assignments(url: str, changes: list[tuple[str, str | None]], fence: LeaderFence | None) -> None:
    """The scheduler's decisions: worker ``name`` should load ``ref`` (None: nothing)."""
    if not changes:
        return
    with session_scope(url) as s:
        guard(s, fence)
        for name, ref in changes:
            s.execute(update(Worker).where(Worker.name == name).values(assigned_model=ref))


def _dialect(s: Session) -> Any:
    return postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
