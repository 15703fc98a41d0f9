"""``batchllm results``: a batch's output and error lines in input order, as OpenAI writes them, streaming.

Successes go to the output file and failures to the error file (never mixed unless asked): a 400 for a line
rejected at submit and any 4xx/5xx of a request carry ``response`` with OpenAI's error body and
``error: null``; a request that never got a response (expired, cancelled, failed batch) carries
``response: null`` and ``error: {code, message}``. Lines are encoded by ``formats.output_line``, the one
definition of the line, with the stored response body spliced in as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Any

from batchllm.errors import StateError
from batchllm.formats import error_body, output_line, request_id_for
from batchllm.settings import Settings
from batchllm.status import BatchStatus
from batchllm.store import batches
from batchllm.store.lifecycle import NO_RESPONSE
from batchllm.store.results import iter_export

_FLUSH = 1 << 20  # bytes buffered per file before a write


@dataclass
class ExportCounts:
    """What an export wrote."""

    outputs: int = 0
    errors: int = 0
    pending: int = 0


def check_finished(settings: Settings, batch_id: str, partial: bool, owner: str | None = None) -> batches.BatchRecord:
    """The batch, if its results may be written now.

    Raises:
        StateError: the batch is still running and ``partial`` was not asked for.
    """
    b = batches.refresh(settings.database_url, batch_id) if owner is None else batches.get(settings.database_url, batch_id, owner)
    if not b.terminal and not partial:
        c = b.counts
        raise StateError(f"batch {batch_id} is {b.status} ({c.completed + c.failed} of {c.total} requests done); wait "
                         f"for it (`batchllm status {batch_id} --watch`) or pass --partial for what is done so far")
    return b


def export(settings: Settings, batch_id: str, out: IO[bytes] | None, errors: IO[bytes] | None, meta: bool = False,
           combined: bool = False) -> ExportCounts:
    """Write a batch's finished lines in input order.

    Args:
        settings: settings.
        batch_id: the batch.
        out: where successes go (None: nowhere — counted only).
        errors: where failures go (None: nowhere, unless ``combined``).
        meta: add ``meta`` (line, worker, device, model, latency) to each line.
        combined: failures go to ``out`` too, in input order.
    """
    b = batches.get(settings.database_url, batch_id)
    ended = NO_RESPONSE.get(BatchStatus(b.status))
    counts = ExportCounts()
    buf_out: list[bytes] = []
    buf_err: list[bytes] = []
    size_out = size_err = 0
    err_sink = out if combined else errors
    for page in iter_export(settings.database_url, batch_id):
        for t in page:
            ok = _outcome(t, ended)
            if ok is None:
                counts.pending += 1
                continue
            if ok:
                counts.outputs += 1
            else:
                counts.errors += 1
            if (out if ok else err_sink) is None:
                continue  # counted only: a line nobody receives is not formatted
            line = _line(t, ended, meta)
            if ok or combined:
                buf_out.append(line)
                size_out += len(line)
            else:
                buf_err.append(line)
                size_err += len(line)
        if size_out >= _FLUSH:
            _write(out, buf_out)
            size_out = 0
        if size_err >= _FLUSH:
            _write(err_sink, buf_err)
            size_err = 0
    _write(out, buf_out)
    _write(err_sink, buf_err)
    return counts


def _write(sink: IO[bytes] | None, lines: list[bytes]) -> None:
    if lines and sink is not None:
        lines.append(b"")
        sink.write(b"\n".join(lines))
    lines.clear()


def _outcome(t: Any, ended: tuple[str, str] | None) -> bool | None:
    """Whether an export tuple is a success (True), a failure (False) or has no line yet (None)."""
    if t[5] is not None:  # rejected at submit
        return False
    if t[8] is None:  # no record yet: a failure only once the batch ended
        return None if ended is None else False
    return bool(t[9])


def _line(t: Any, ended: tuple[str, str] | None, meta: bool) -> bytes:
    """One export tuple (``store.results.EXPORT_COLUMNS``) that ``_outcome`` gave a line, as that line."""
    rid = request_id_for(t[0])
    extra = _meta(t) if meta else None
    if t[5] is not None:  # rejected at submit: a 400 with OpenAI's error body
        body = error_body(t[6] or "invalid request", "invalid_request_error", t[7], t[5])
        return output_line(rid, t[2], 400, body, None, extra)
    if t[8] is None:  # no record, and the batch ended
        return output_line(rid, t[2], None, None, ended, extra)
    if t[9]:
        return output_line(rid, t[2], t[10] or 200, t[11], None, extra)
    if t[10] is None:  # never got a response
        return output_line(rid, t[2], None, None, (t[12] or "error", t[13] or "request failed"), extra)
    body = t[11] or error_body(t[13] or "request failed", "invalid_request_error" if t[10] < 500 else "server_error",
                               None, t[12])
    return output_line(rid, t[2], t[10], body, None, extra)


def _meta(t: Any) -> dict[str, Any]:
    return {"line": t[1], "worker": t[15], "device": t[16], "model": t[14] or t[4],
            "latency_ms": None if t[17] is None else round(t[17], 1)}
