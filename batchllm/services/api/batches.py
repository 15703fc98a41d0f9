"""``/v1/batches``: create from an uploaded file, list, retrieve, cancel — answered with OpenAI's Batch object.

Create streams the stored upload through ``services.submit.submit_file`` (validation, chunks, one transaction)
and, on a cluster, sends the first chunks with ``dispatch_new``; under ``serve --local`` the in-process
worker finds them in SQL. Invalid input lines follow the batch's policy (``docs/api.md``): by default the valid
lines run and each invalid line is a 400 record in the error file and in ``errors``; metadata
``batchllm_on_invalid=fail`` asks for OpenAI's rule, where any invalid line fails the whole batch.
"""

from __future__ import annotations

import logging
import re
from typing import IO, Annotated, Any, cast

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict

from batchllm.errors import InputError, NoCapacity, NotFound, ServiceUnavailable, StateError
from batchllm.queue import producer
from batchllm.services.api.auth import CallerDep, ConfigDep
from batchllm.services.api.config import ApiConfig
from batchllm.services.api.errors import ApiError, bad_request, not_found
from batchllm.services.status import to_openai
from batchllm.services.submit import dispatch_new, submit_file
from batchllm.status import BatchStatus, Endpoint, InvalidLines
from batchllm.store import batches
from batchllm.store import files as file_rows
from batchllm.store.files import PartReader

log = logging.getLogger("batchllm.api")
router = APIRouter(prefix="/v1/batches")

ON_INVALID_KEY = "batchllm_on_invalid"
_WINDOW = re.compile(r"^([1-9][0-9]{0,3})([hd])$")
MAX_WINDOW_S = 30 * 86400
_IDEMPOTENCY_MAX = 150


class CreateBatch(BaseModel):
    """The body of ``POST /v1/batches`` (unknown fields are ignored, as extra SDK fields may come)."""

    model_config = ConfigDict(extra="ignore")
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


def check_endpoint(value: str) -> str:
    """One of the three endpoints, else OpenAI's 400."""
    if value not in {e.value for e in Endpoint}:
        supported = ", ".join(e.value for e in Endpoint)
        raise bad_request(f"Invalid value for 'endpoint': '{value[:80]}'. Supported values are: {supported}.", "endpoint")
    return value


def check_window(value: str) -> str:
    """``24h``, or a longer window in hours or days (``48h``, ``7d``; at most 30 days), else OpenAI's 400."""
    m = _WINDOW.match(value)
    seconds = int(m[1]) * (3600 if m[2] == "h" else 86400) if m else 0
    if not 24 * 3600 <= seconds <= MAX_WINDOW_S:
        raise bad_request(f"Invalid value for 'completion_window': '{value[:40]}'. Supported values are: '24h' "
                          "(batchllm also accepts longer windows in hours or days, e.g. '48h' or '7d', up to '30d').",
                          "completion_window")
    return value


def check_on_invalid(metadata: dict[str, str] | None) -> InvalidLines:
    """The invalid-lines policy asked for in ``metadata`` (default: the valid lines run)."""
    value = (metadata or {}).get(ON_INVALID_KEY)
    if value is None:
        return InvalidLines.RUN_VALID
    if value not in {p.value for p in InvalidLines}:
        raise bad_request(f"Invalid value for 'metadata.{ON_INVALID_KEY}': '{value[:40]}'. Supported values are: "
                          "'run_valid' (default) and 'fail'.", f"metadata.{ON_INVALID_KEY}")
    return InvalidLines(value)


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's list shape."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


@router.post("")
def create_batch(body: CreateBatch, request: Request, who: CallerDep, cfg: ConfigDep) -> dict[str, Any]:
    """Create a batch from an uploaded ``purpose=batch`` file; returns once its lines are validated and stored."""
    st = cfg.settings
    endpoint = check_endpoint(body.endpoint)
    window = check_window(body.completion_window)
    on_invalid = check_on_invalid(body.metadata)
    try:
        record = file_rows.get(st.database_url, body.input_file_id, who.owner)
    except NotFound:
        raise not_found(f"No such File object: {body.input_file_id[:80]}", "input_file_id") from None
    if record.purpose != "batch":
        raise bad_request(f"File {record.id} has purpose '{record.purpose}'; a batch needs a 'batch' file.", "input_file_id")
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= _IDEMPOTENCY_MAX:
        raise bad_request(f"Idempotency-Key must be 1-{_IDEMPOTENCY_MAX} characters.", "Idempotency-Key")
    try:
        res = submit_file(st, cast(IO[bytes], PartReader(st.database_url, record)), owner=who.owner, input_file_id=record.id,
                          on_invalid=on_invalid, endpoint=endpoint, metadata=body.metadata, completion_window=window,
                          idempotency_key=None if key is None else f"api:{who.owner or '-'}:{key}",
                          queue_anyway=cfg.local)
    except NoCapacity as e:
        raise bad_request(e.message.split("; add --queue-anyway")[0], "input_file_id", code="model_not_hostable") from e
    except InputError as e:
        if "no requests" in e.message:
            raise bad_request(f"File {record.id} has no requests (it is empty or has only blank lines).",
                              "input_file_id", code="empty_file") from e
        raise
    b = _get(cfg, res.batch_id, who.owner)
    if not res.existing and not cfg.local and b.status == BatchStatus.IN_PROGRESS:
        _dispatch(cfg, b.id)
    return to_openai(b)


def _dispatch(cfg: ApiConfig, batch_id: str) -> None:
    try:
        dispatch_new(cfg.settings, producer(cfg.settings), batch_id)
    except ServiceUnavailable as e:  # stored: the scheduler sends it when the broker is back
        log.warning("batch %s stored; dispatch deferred to the scheduler: %s", batch_id, e.message)


@router.get("")
def list_batches(who: CallerDep, cfg: ConfigDep, after: str | None = None,
                 limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    """The caller's batches, newest first, paged with ``after`` (a batch id) and ``limit`` (1-100)."""
    if after is not None:
        try:
            batches.get(cfg.settings.database_url, after, who.owner)
        except NotFound:
            raise bad_request(f"Invalid value for 'after': no batch '{after[:80]}'.", "after") from None
    rows = batches.listing(cfg.settings.database_url, limit + 1, owner=who.owner, after=after)
    return list_object([to_openai(b) for b in rows[:limit]], len(rows) > limit)


@router.get("/{batch_id}")
def retrieve_batch(batch_id: str, who: CallerDep, cfg: ConfigDep) -> dict[str, Any]:
    """A batch's Batch object."""
    return to_openai(_get(cfg, batch_id, who.owner))


@router.post("/{batch_id}/cancel")
def cancel_batch(batch_id: str, who: CallerDep, cfg: ConfigDep) -> dict[str, Any]:
    """Cancel: nothing more is dispatched; requests already running finish; finished results stay readable."""
    try:
        return to_openai(batches.cancel(cfg.settings.database_url, batch_id, who.owner))
    except NotFound:
        raise not_found(f"No such Batch object: {batch_id[:80]}") from None
    except StateError as e:
        raise ApiError(400, f"Cannot cancel batch {batch_id}: {e.message}", code="invalid_state") from e


def _get(cfg: ApiConfig, batch_id: str, owner: str | None) -> batches.BatchRecord:
    try:
        return batches.get(cfg.settings.database_url, batch_id, owner)
    except NotFound:
        raise not_found(f"No such Batch object: {batch_id[:80]}") from None
