"""Batch views for `status`, `--wait` and `--watch`: counts, progress, and the exit code of a finished batch."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from batchllm.errors import BatchFailed, BatchPartiallyFailed
from batchllm.settings import Settings
from batchllm.status import BatchStatus
from batchllm.store.batches import counts, get_batch, list_batches, maybe_finalize
from batchllm.store.db import session_scope
from batchllm.store.models import Batch


def view(batch: Batch, c: Any) -> dict[str, Any]:
    """A batch as plain JSON (OpenAI-like field names)."""
    return {
        "id": batch.id,
        "name": batch.name,
        "status": batch.status,
        "model": batch.model,
        "models": batch.models or {},
        "priority": batch.priority,
        "input": batch.input_name,
        "request_counts": {"total": c.total, "completed": c.completed, "failed": c.failed},
        "pending": c.pending,
        "created_at": batch.created_at,
        "started_at": batch.started_at,
        "finished_at": batch.finished_at,
        "expires_at": batch.expires_at,
        "idempotency_key": batch.idempotency_key,
    }


def batch_view(settings: Settings, batch_id: str, finalize: bool = True) -> dict[str, Any]:
    """One batch's view; also finalizes it if everything is done (so waiting needs no scheduler)."""
    with session_scope(settings.database_url) as s:
        if finalize:
            maybe_finalize(s, batch_id)
            s.flush()
        batch = get_batch(s, batch_id)
        return view(batch, counts(s, batch))


def recent(settings: Settings, limit: int = 20, active_only: bool = False) -> list[dict[str, Any]]:
    """Recent batches, newest first."""
    with session_scope(settings.database_url) as s:
        return [view(b, counts(s, b)) for b in list_batches(s, limit, active_only)]


def wait(
    settings: Settings,
    batch_id: str,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    poll: float = 1.0,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Poll until the batch reaches a terminal status; returns its final view."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        v = batch_view(settings, batch_id)
        if on_update:
            on_update(v)
        if BatchStatus(v["status"]).terminal:
            return v
        if deadline is not None and time.monotonic() > deadline:
            return v
        time.sleep(poll)


def raise_for_outcome(v: dict[str, Any]) -> None:
    """Exit codes of the spec: 3 if some requests failed, 4 if the batch failed, was cancelled or expired."""
    status = BatchStatus(v["status"])
    if status in (BatchStatus.FAILED, BatchStatus.CANCELLED, BatchStatus.EXPIRED):
        raise BatchFailed(f"batch {v['id']} {status.value}: {_counts(v)}")
    if status == BatchStatus.COMPLETED and v["request_counts"]["failed"]:
        raise BatchPartiallyFailed(f"batch {v['id']} completed with failures: {_counts(v)}")


def _counts(v: dict[str, Any]) -> str:
    c = v["request_counts"]
    return f"{c['completed']} completed, {c['failed']} failed of {c['total']}"
