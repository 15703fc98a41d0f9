"""Schedule rows (nightly runs): what to submit when, and which of its batches still need their output written."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from batchllm.errors import InputError, NotFound
from batchllm.status import TERMINAL_BATCH
from batchllm.store.clock import db_now
from batchllm.store.db import session_scope
from batchllm.store.leader import LeaderFence, guard
from batchllm.store.models import Batch, Schedule


@dataclass(frozen=True)
class ScheduleRecord:
    """A schedule row as data; ``pending`` entries are ``{"batch_id", "output", "input"}``."""

    name: str
    cron: str
    input_glob: str
    model: str
    output_dir: str
    enabled: bool
    last_fired_at: float | None
    last_batch_id: str | None
    pending: list[dict[str, str]]
    created_at: float


def _record(r: Schedule) -> ScheduleRecord:
    pending = [e for e in r.pending_batches or [] if isinstance(e, dict) and "batch_id" in e]
    return ScheduleRecord(r.name, r.cron, r.input_glob, r.model, r.output_dir, r.enabled, r.last_fired_at,
                          r.last_batch_id, pending, r.created_at)


def add(url: str, name: str, cron: str, input_glob: str, model: str, output_dir: str) -> ScheduleRecord:
    """Store a new schedule.

    Raises:
        InputError: a schedule of that name exists.
    """
    try:
        with session_scope(url) as s:
            s.execute(insert(Schedule).values(name=name, cron=cron, input_glob=input_glob, model=model,
                                              output_dir=output_dir, enabled=True, created_at=db_now(),
                                              pending_batches=[]))
    except IntegrityError as e:
        raise InputError(f"schedule {name!r} exists; `batchllm schedule remove {name}` first") from e
    return get(url, name)


def get(url: str, name: str) -> ScheduleRecord:
    """One schedule.

    Raises:
        NotFound: no such schedule.
    """
    with session_scope(url) as s:
        row = s.get(Schedule, name)
        if row is None:
            raise NotFound(f"no schedule {name!r}; `batchllm schedule list` shows them")
        return _record(row)


def remove(url: str, name: str) -> None:
    """Delete a schedule (its batches and written files stay).

    Raises:
        NotFound: no such schedule.
    """
    with session_scope(url) as s:
        row = s.get(Schedule, name)
        if row is None:
            raise NotFound(f"no schedule {name!r}; `batchllm schedule list` shows them")
        s.delete(row)


def listing(url: str, enabled_only: bool = False) -> list[ScheduleRecord]:
    """Every schedule, by name."""
    q = select(Schedule).order_by(Schedule.name)
    if enabled_only:
        q = q.where(Schedule.enabled.is_(True))
    with session_scope(url) as s:
        return [_record(r) for r in s.scalars(q)]


def record_firing(url: str, name: str, fire_time: float, entries: list[dict[str, str]], fence: LeaderFence | None) -> None:
    """Note that ``name`` fired for ``fire_time`` and which batches it made (added to its pending list once)."""
    with session_scope(url) as s:
        guard(s, fence)
        row = s.get(Schedule, name, with_for_update=True)
        if row is None:
            return
        pending = [e for e in row.pending_batches or [] if isinstance(e, dict)]
        known = {e.get("batch_id") for e in pending}
        row.pending_batches = pending + [e for e in entries if e["batch_id"] not in known]
        row.last_fired_at = max(row.last_fired_at or 0.0, fire_time)
        if entries:
            row.last_batch_id = entries[-1]["batch_id"]


def ended_pending(url: str) -> list[tuple[ScheduleRecord, dict[str, str], bool]]:
    """Pending entries whose batch has ended (or no longer exists: the bool is False then)."""
    out: list[tuple[ScheduleRecord, dict[str, str], bool]] = []
    with session_scope(url) as s:
        for row in s.scalars(select(Schedule)):
            rec = _record(row)
            ids = [e["batch_id"] for e in rec.pending]
            if not ids:
                continue
            status: dict[str, Any] = dict(s.execute(select(Batch.id, Batch.status).where(Batch.id.in_(ids))).all())
            for e in rec.pending:
                st = status.get(e["batch_id"])
                if st is None or st in TERMINAL_BATCH:
                    out.append((rec, e, st is not None))
    return out


def drop_pending(url: str, done: dict[str, Iterable[str]], fence: LeaderFence | None) -> None:
    """Remove written entries (schedule name → batch ids) from their pending lists."""
    if not done:
        return
    with session_scope(url) as s:
        guard(s, fence)
        for name, ids in done.items():
            row = s.get(Schedule, name, with_for_update=True)
            if row is not None:
                gone = set(ids)
                row.pending_batches = [e for e in row.pending_batches or []
                                       if not (isinstance(e, dict) and e.get("batch_id") in gone)]
