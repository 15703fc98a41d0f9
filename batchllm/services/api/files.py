"""``/v1/files``: upload, list, retrieve, read and delete — OpenAI's File object, exactly.

Uploaded files live in the store (``store.files``); output and error files are read from a batch's results
(``outputs``). Another key's file answers 404, like a file that does not exist.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from batchllm.errors import NotFound
from batchllm.services.api import outputs
from batchllm.services.api.auth import CallerDep, ConfigDep
from batchllm.services.api.batches import list_object
from batchllm.services.api.config import ApiConfig
from batchllm.services.api.errors import bad_request
from batchllm.services.api.upload import receive
from batchllm.store import files as file_rows
from batchllm.store.files import FileRecord

router = APIRouter(prefix="/v1/files")


def file_object(f: FileRecord) -> dict[str, Any]:
    """OpenAI's File object of an uploaded file."""
    return {"id": f.id, "object": "file", "bytes": f.size, "created_at": int(f.created_at), "filename": f.filename,
            "purpose": f.purpose, "status": "processed",
            "expires_at": None if f.expires_at is None else int(f.expires_at), "status_details": None}


@router.post("")
async def create_file(request: Request, who: CallerDep, cfg: ConfigDep) -> dict[str, Any]:
    """Upload a file (multipart: ``file`` and ``purpose=batch``), streamed into the store."""
    return file_object(await receive(request, cfg, who.owner))


@router.get("")
def list_files(who: CallerDep, cfg: ConfigDep, purpose: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, after: str | None = None,
               order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
    """The caller's uploaded files, newest first (``order=asc`` for oldest first), paged with ``after``.

    Output and error files are not listed: they are reached through their batch's ``output_file_id`` and
    ``error_file_id``.
    """
    if after is not None:
        try:
            file_rows.get(cfg.settings.database_url, after, who.owner)
        except NotFound:
            raise bad_request(f"Invalid value for 'after': no file '{after[:80]}'.", "after") from None
    rows = file_rows.listing(cfg.settings.database_url, who.owner, purpose, limit + 1, after, order == "asc")
    data = [file_object(f) for f in rows[:limit]]
    return list_object(data, len(rows) > limit)


@router.get("/{file_id}")
def retrieve_file(file_id: str, who: CallerDep, cfg: ConfigDep) -> dict[str, Any]:
    """A file's File object."""
    virtual = outputs.resolve(cfg, file_id, who.owner)
    if virtual is not None:
        return outputs.file_object(cfg, virtual)
    return file_object(file_rows.get(cfg.settings.database_url, file_id, who.owner))


@router.get("/{file_id}/content")
def file_content(file_id: str, who: CallerDep, cfg: ConfigDep) -> StreamingResponse:
    """A file's bytes, streamed (one ~1 MiB part, or one export write, in memory at a time)."""
    virtual = outputs.resolve(cfg, file_id, who.owner)
    if virtual is not None:
        return StreamingResponse(outputs.stream(cfg, virtual), media_type="application/octet-stream",
                                 headers=_disposition(virtual.filename))
    record = file_rows.get(cfg.settings.database_url, file_id, who.owner)
    headers = {**_disposition(record.filename), "Content-Length": str(record.size)}
    return StreamingResponse(_parts(cfg, record), media_type="application/octet-stream", headers=headers)


async def _parts(cfg: ApiConfig, record: FileRecord) -> Any:
    url = cfg.settings.database_url
    for seq in range(record.parts):
        data = await anyio.to_thread.run_sync(file_rows.read_part, url, record.id, seq)
        if data is None:  # deleted while being read: end short (Content-Length tells the client)
            return
        yield data


def _disposition(filename: str) -> dict[str, str]:
    safe = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return {"Content-Disposition": f'attachment; filename="{safe}"'}


@router.delete("/{file_id}")
def delete_file(file_id: str, who: CallerDep, cfg: ConfigDep) -> dict[str, Any]:
    """Delete a file. Batches made from an uploaded file keep their requests; a deleted output file answers 404."""
    virtual = outputs.resolve(cfg, file_id, who.owner)
    if virtual is not None:
        file_rows.tombstone(cfg.settings.database_url, file_id, who.owner, virtual.filename, outputs.PURPOSE)
    else:
        file_rows.delete_file(cfg.settings.database_url, file_id, who.owner)
    return {"id": file_id, "object": "file", "deleted": True}
