"""``batchllm results``: write a batch's output and error lines in input order, streaming."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import IO, Any

from batchllm.formats import output_line
from batchllm.settings import Settings
from batchllm.store.batches import get_batch
from batchllm.store.db import session_scope
from batchllm.store.results import ExportRow, iter_export


@dataclass
class ExportCounts:
    """What an export wrote."""

    outputs: int = 0
    errors: int = 0
    pending: int = 0


def row_to_line(row: ExportRow, meta: bool = False) -> dict[str, Any]:
    """One OpenAI Batch output/error line (``meta`` adds worker, device, model and latency)."""
    line = output_line(
        row_id=row.row_id, custom_id=row.custom_id, kind=row.kind, ok=row.ok, status_code=row.status_code,
        model=row.model, created=row.created, text=row.text, finish_reason=row.finish_reason,
        prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
        error_code=row.error_code, error_message=row.error_message,
    )
    if meta:
        line["meta"] = {"line": row.line_no, "worker": row.worker, "device": row.device, "model": row.model,
                        "latency_ms": None if row.latency_ms is None else round(row.latency_ms, 1)}
    return line


def export(settings: Settings, batch_id: str, out: IO[str], errors: IO[str] | None = None, meta: bool = False) -> ExportCounts:
    """Write finished lines of a batch in input order.

    Args:
        settings: settings.
        batch_id: the batch.
        out: where output lines go (and error lines too, when ``errors`` is None, so every line has a record).
        errors: where error lines go, if separate.
        meta: add a ``meta`` object per line.
    """
    counts = ExportCounts()
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": ")).encode
    with session_scope(settings.database_url) as s:
        get_batch(s, batch_id)
        buf_out: list[str] = []
        buf_err: list[str] = []
        for row in iter_export(s, batch_id):
            if not row.done:
                counts.pending += 1
                continue
            text = dumps(row_to_line(row, meta))
            if row.ok or errors is None:
                buf_out.append(text)
            else:
                buf_err.append(text)
            if row.ok:
                counts.outputs += 1
            else:
                counts.errors += 1
            if len(buf_out) >= 2000:
                out.write("\n".join(buf_out) + "\n")
                buf_out.clear()
            if len(buf_err) >= 2000 and errors is not None:
                errors.write("\n".join(buf_err) + "\n")
                buf_err.clear()
        if buf_out:
            out.write("\n".join(buf_out) + "\n")
        if buf_err and errors is not None:
            errors.write("\n".join(buf_err) + "\n")
    return counts
