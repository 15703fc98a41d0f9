"""``batchllm results``: write a batch's output and error lines in input order, streaming."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from json.encoder import encode_basestring as _q  # the quoting JSONEncoder(ensure_ascii=False) uses
from typing import IO, Any

from batchllm.formats import output_line, request_id_for
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
    dumps = _DUMPS
    with session_scope(settings.database_url) as s:
        get_batch(s, batch_id)
        buf_out: list[str] = []
        buf_err: list[str] = []
        for row in iter_export(s, batch_id):
            if not row.done:
                counts.pending += 1
                continue
            text = _line_text(row, meta) or dumps(row_to_line(row, meta))
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


_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": ")).encode


def _line_text(row: ExportRow, meta: bool = False) -> str | None:
    """``_DUMPS(row_to_line(row, meta))`` without building the dict: the same text, byte for byte.

    The output line has a fixed shape, so it is written from a template with every value quoted or
    formatted exactly as the JSON encoder would. Returns None for anything unusual (a value of an
    unexpected type): the caller then takes the dict path.
    """
    cid, ptok, ctok = row.custom_id, row.prompt_tokens, row.completion_tokens
    if type(cid) is not str or type(ptok) is not int or type(ctok) is not int or type(row.row_id) is not int:
        return None
    rid = request_id_for(row.row_id)
    if row.ok:
        status, created, text, finish = row.status_code or 200, row.created, row.text or "", row.finish_reason
        if type(status) is not int or type(text) is not str or not (finish is None or type(finish) is str):
            return None
        created = int(created or time.time())
        model = _q((row.model or "").split("@", 1)[0])
        fin = "null" if finish is None else _q(finish)
        usage = f'"usage": {{"prompt_tokens": {ptok}, "completion_tokens": {ctok}, "total_tokens": {ptok + ctok}}}'
        if (row.kind or "chat") == "chat":
            body = (f'{{"id": "chatcmpl-{rid}", "object": "chat.completion", "created": {created}, "model": {model}, '
                    f'"choices": [{{"index": 0, "message": {{"role": "assistant", "content": {_q(text)}}}, "logprobs": null, '
                    f'"finish_reason": {fin}}}], {usage}}}')
        else:
            body = (f'{{"id": "cmpl-{rid}", "object": "text_completion", "created": {created}, "model": {model}, '
                    f'"choices": [{{"index": 0, "text": {_q(text)}, "logprobs": null, "finish_reason": {fin}}}], {usage}}}')
        line = f'{{"id": "{rid}", "custom_id": {_q(cid)}, "response": {{"status_code": {status}, "request_id": "{rid}", "body": {body}}}, "error": null'
    else:
        code, message, status = row.error_code or "error", row.error_message or "request failed", row.status_code
        if type(code) is not str or type(message) is not str or not (status is None or type(status) is int):
            return None
        qcode, qmsg = _q(code), _q(message)
        if status:
            err_type = "invalid_request_error" if status == 400 else "server_error"
            response = (f'{{"status_code": {status}, "request_id": "{rid}", "body": {{"error": {{"message": {qmsg}, '
                        f'"type": "{err_type}", "code": {qcode}}}}}}}')
        else:
            response = "null"
        line = f'{{"id": "{rid}", "custom_id": {_q(cid)}, "response": {response}, "error": {{"code": {qcode}, "message": {qmsg}}}'
    if meta:
        parts = []
        for v in (row.worker, row.device, row.model):
            if v is not None and type(v) is not str:
                return None
            parts.append("null" if v is None else _q(v))
        lat = row.latency_ms
        if lat is None:
            lat_text = "null"
        elif type(lat) is float and math.isfinite(lat):
            lat_text = repr(round(lat, 1))
        else:
            return None
        if type(row.line_no) is not int:
            return None
        line += (f', "meta": {{"line": {row.line_no}, "worker": {parts[0]}, "device": {parts[1]}, "model": {parts[2]}, '
                 f'"latency_ms": {lat_text}}}')
    return line + "}"
