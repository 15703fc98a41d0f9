"""Result writes (idempotent upserts by request id) and the streaming export in input order."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from batchllm.store.models import Chunk, Request, Result

_UPDATABLE = (
    "ok", "status_code", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error_code",
    "error_message", "latency_ms", "model", "worker", "device", "attempt", "created_at",
)


def upsert_results(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert results or overwrite the existing row of the same request id, in one statement.

    A chunk that runs twice (redelivery, lease expiry) therefore never leaves two results for a request.
    """
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    ins: Any = (postgresql if dialect == "postgresql" else sqlite).insert(Result)
    stmt = ins.on_conflict_do_update(
        index_elements=[Result.request_id],
        set_={c: getattr(ins.excluded, c) for c in _UPDATABLE},
    )
    session.execute(stmt, list(rows))


@dataclass
class PendingRequest:
    """A request of a chunk that has no result yet, as the worker needs it."""

    id: int
    kind: str
    messages: list[dict[str, Any]] | None
    prompt: str | None
    params: dict[str, Any]


def pending_requests(session: Session, chunk_id: str) -> list[PendingRequest]:
    """The chunk's requests that still need running (resume skips those with a result)."""
    rows = session.execute(
        select(Request.id, Request.kind, Request.body)
        .outerjoin(Result, Result.request_id == Request.id)
        .where(Request.chunk_id == chunk_id, Result.request_id.is_(None), Request.error_code.is_(None))
        .order_by(Request.line_no)
    ).all()
    out = []
    for rid, kind, body in rows:
        data = json.loads(body or "{}")
        out.append(PendingRequest(id=rid, kind=kind or "chat", messages=data.get("messages"), prompt=data.get("prompt"), params=data.get("params") or {}))
    return out


@dataclass(slots=True)
class ExportRow:
    """One line's data for export; ``done`` is False for requests that have not run yet."""

    row_id: int
    line_no: int
    custom_id: str
    kind: str | None
    done: bool
    ok: bool
    status_code: int | None
    model: str | None
    created: float | None
    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error_code: str | None
    error_message: str | None
    worker: str | None
    device: str | None
    latency_ms: float | None


def iter_export(session: Session, batch_id: str, page: int = 5000) -> Iterator[ExportRow]:
    """Stream a batch's lines in input order with their results, with flat memory.

    One query, read ``page`` rows at a time through a server-side cursor (PostgreSQL) or SQLite's lazy
    cursor: the database walks the (batch_id, line_no) index once. (Keyset pages of ``LIMIT page`` were
    quadratic on PostgreSQL right after a bulk load: with stale statistics each page sorted every
    remaining row of the batch.)
    """
    cols = (
        Request.id, Request.line_no, Request.custom_id, Request.kind, Request.model, Request.error_code,
        Request.error_message, Result.request_id, Result.ok, Result.status_code, Result.model, Result.created_at,
        Result.text, Result.finish_reason, Result.prompt_tokens, Result.completion_tokens, Result.error_code,
        Result.error_message, Result.worker, Result.device, Result.latency_ms,
    )
    stmt = (
        select(*cols)
        .outerjoin(Result, Result.request_id == Request.id)
        .where(Request.batch_id == batch_id)
        .order_by(Request.line_no)
        .execution_options(stream_results=True, yield_per=page)
    )
    result = session.connection().execute(stmt)
    try:
        for rows in result.partitions(page):
            for (rid, line_no, cid, kind, req_model, v_code, v_msg, res_id, ok, code, model, created, text, finish,
                 ptok, ctok, e_code, e_msg, worker, device, latency) in rows:
                if v_code is not None:  # rejected at validation
                    yield ExportRow(rid, line_no, cid, kind, True, False, 400, req_model, None, None, None, 0, 0, v_code, v_msg,
                                    None, None, None)
                elif res_id is None:
                    yield ExportRow(rid, line_no, cid, kind, False, False, None, req_model, None, None, None, 0, 0, None, None,
                                    None, None, None)
                else:
                    yield ExportRow(rid, line_no, cid, kind, True, bool(ok), code or None, model or req_model, created, text,
                                    finish, ptok or 0, ctok or 0, e_code, e_msg, worker, device, latency)
    finally:
        result.close()


def chunk_of(session: Session, chunk_id: str) -> Chunk | None:
    """The chunk row, or None."""
    return session.get(Chunk, chunk_id)


def now() -> float:
    """Current epoch seconds (one place, so tests can reason about it)."""
    return time.time()
