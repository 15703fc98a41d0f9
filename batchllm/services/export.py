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
from batchllm.store.results import ExportRow, export_row, iter_export_rows


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
        for rows in iter_export_rows(s, batch_id):
            for t in rows:
                if t[5] is None:  # not rejected at validation (see store.results.export_row)
                    if t[7] is None:  # no result yet
                        counts.pending += 1
                        continue
                    if t[8] and not meta:  # the common line: a successful result
                        text = _ok_tuple_text(t)
                        if text is not None:
                            buf_out.append(text)
                            counts.outputs += 1
                            continue
                row = export_row(t)
                text = _line_text(row, meta) or dumps(row_to_line(row, meta))
                if row.ok or errors is None:
                    buf_out.append(text)
                else:
                    buf_err.append(text)
                if row.ok:
                    counts.outputs += 1
                else:
                    counts.errors += 1
                if len(buf_err) >= 2000 and errors is not None:
                    errors.write("\n".join(buf_err) + "\n")
                    buf_err.clear()
            if buf_out:  # one write per page
                buf_out.append("")  # the last line's newline, without copying the page once more
                out.write("\n".join(buf_out))
                buf_out.clear()
        if buf_out:
            out.write("\n".join(buf_out) + "\n")
        if buf_err and errors is not None:
            errors.write("\n".join(buf_err) + "\n")
    return counts


_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": ")).encode


def _ok_tuple_text(t: Any) -> str | None:
    """``_line_text(export_row(t))`` for a successful result's export tuple, without the ``ExportRow``."""
    return _ok_line(t[0], t[2], t[3], t[9] or 200, t[10] or t[4], t[11], t[12] or "", t[13], t[14] or 0, t[15] or 0)


_QUOTED_MODEL: dict[Any, str] = {}  # model → its quoted public name (a handful per batch)
_QUOTED_FINISH: dict[Any, str] = {None: "null"}


def _ok_line(row_id: Any, cid: Any, kind: Any, status: Any, model: Any, created: Any, text: Any, finish: Any,
             ptok: Any, ctok: Any) -> str | None:
    """A successful result's output line (no ``meta``), or None for a value of an unexpected type."""
    if (type(row_id) is not int or type(cid) is not str or type(status) is not int or type(text) is not str
            or type(ptok) is not int or type(ctok) is not int or not (kind is None or type(kind) is str)):
        return None
    qmodel = _QUOTED_MODEL.get(model)
    if qmodel is None:
        if not (model is None or type(model) is str):
            return None
        qmodel = _q((model or "").split("@", 1)[0])  # the name the user asked for; the variant is in --meta
        if len(_QUOTED_MODEL) < 256:
            _QUOTED_MODEL[model] = qmodel
    fin = _QUOTED_FINISH.get(finish)
    if fin is None:
        if type(finish) is not str:
            return None
        fin = _q(finish)
        if len(_QUOTED_FINISH) < 64:
            _QUOTED_FINISH[finish] = fin
    rid = f"batch_req_{row_id:012d}"  # formats.request_id_for
    created = int(created or time.time())
    head = f'{{"id": "{rid}", "custom_id": {_q(cid)}, "response": {{"status_code": {status}, "request_id": "{rid}", "body": '
    usage = (f'"usage": {{"prompt_tokens": {ptok}, "completion_tokens": {ctok}, "total_tokens": {ptok + ctok}}}}}}}, '
             '"error": null}')
    if (kind or "chat") == "chat":
        return (f'{head}{{"id": "chatcmpl-{rid}", "object": "chat.completion", "created": {created}, "model": {qmodel}, '
                f'"choices": [{{"index": 0, "message": {{"role": "assistant", "content": {_q(text)}}}, "logprobs": null, '
                f'"finish_reason": {fin}}}], {usage}')
    return (f'{head}{{"id": "cmpl-{rid}", "object": "text_completion", "created": {created}, "model": {qmodel}, '
            f'"choices": [{{"index": 0, "text": {_q(text)}, "logprobs": null, "finish_reason": {fin}}}], {usage}')


def _line_text(row: ExportRow, meta: bool = False) -> str | None:
    """``_DUMPS(row_to_line(row, meta))`` without building the dict: the same text, byte for byte.

    The output line has a fixed shape, so it is written from a template with every value quoted or
    formatted exactly as the JSON encoder would. Returns None for anything unusual (a value of an
    unexpected type): the caller then takes the dict path.
    """
    if row.ok:
        line = _ok_line(row.row_id, row.custom_id, row.kind, row.status_code or 200, row.model, row.created, row.text or "",
                        row.finish_reason, row.prompt_tokens, row.completion_tokens)
        if line is None:
            return None
        line = line[:-1]  # reopen the object for "meta"
    else:
        cid, status = row.custom_id, row.status_code
        code, message = row.error_code or "error", row.error_message or "request failed"
        if (type(row.row_id) is not int or type(cid) is not str or type(code) is not str or type(message) is not str
                or not (status is None or type(status) is int)):
            return None
        rid = request_id_for(row.row_id)
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
