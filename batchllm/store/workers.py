"""Worker heartbeat rows: what each worker has, runs and when it was last seen."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from batchllm.store.models import Worker


def heartbeat(session: Session, row: dict[str, Any]) -> None:
    """Insert or refresh a worker's row (``row`` holds Worker columns; ``name`` is the key).

    ``assigned_model`` belongs to the scheduler and is only written on first insert.
    """
    row = {**row, "last_heartbeat": time.time()}
    dialect = session.get_bind().dialect.name
    ins: Any = (postgresql if dialect == "postgresql" else sqlite).insert(Worker).values(**row)
    keep = {"name", "started_at", "assigned_model"}
    stmt = ins.on_conflict_do_update(
        index_elements=[Worker.name],
        set_={k: getattr(ins.excluded, k) for k in row if k not in keep},
    )
    session.execute(stmt)


def live_workers(session: Session, timeout: float) -> list[Worker]:
    """Workers whose heartbeat is fresher than ``timeout`` seconds and that have not stopped."""
    cutoff = time.time() - timeout
    return list(
        session.scalars(
            select(Worker).where(Worker.last_heartbeat >= cutoff, Worker.state != "stopped").order_by(Worker.name)
        )
    )


def all_workers(session: Session) -> list[Worker]:
    """Every worker ever seen, newest heartbeat first."""
    return list(session.scalars(select(Worker).order_by(Worker.last_heartbeat.desc())))


def assign(session: Session, name: str, model_ref: str | None) -> None:
    """The scheduler's instruction: the worker should load ``model_ref`` (name@variant)."""
    session.execute(update(Worker).where(Worker.name == name).values(assigned_model=model_ref))


def assigned_model(session: Session, name: str) -> str | None:
    """What the scheduler asked this worker to run."""
    return session.scalar(select(Worker.assigned_model).where(Worker.name == name))


def add_usage(session: Session, name: str, tokens: int, requests: int) -> None:
    """Count generated tokens and finished requests (for metrics and `batchllm workers`)."""
    session.execute(
        update(Worker)
        .where(Worker.name == name)
        .values(tokens_generated=Worker.tokens_generated + tokens, requests_done=Worker.requests_done + requests)
    )
