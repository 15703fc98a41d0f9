"""Batch status: OpenAI's Batch object, waiting for a batch, and the exit code of a finished one."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from batchllm.errors import BatchFailed, BatchPartiallyFailed
from batchllm.formats import Batch, BatchErrors, BatchFileError, BatchRequestCounts, unix, usage
from batchllm.settings import Settings
from batchllm.status import BatchStatus
from batchllm.store import batches
from batchllm.store.batches import BatchRecord


def file_ids(b: BatchRecord) -> tuple[str, str | None, str | None]:
    """The batch's input, output and error file ids, as OpenAI names them.

    Output and error files exist once the batch ended, and only when they have lines (as OpenAI sets them).
    A batch submitted from the CLI has no uploaded input file: its input file id names the batch's input.
    """
    key = b.id.removeprefix("batch_")
    input_id = b.input_file_id or f"file-input-{key}"
    if not b.terminal:
        return input_id, None, None
    out = f"file-output-{key}" if b.counts.completed else None
    err = f"file-errors-{key}" if b.counts.failed else None
    return input_id, out, err


def openai_batch(b: BatchRecord) -> Batch:
    """The OpenAI Batch object of a batch (every field; int timestamps)."""
    input_id, out_id, err_id = file_ids(b)
    c = b.counts
    # The model the batch ran (as its responses name it); a --model default no line used is not it.
    models = sorted({ref.split("@", 1)[0] for ref in b.models.values()})
    model = models[0] if len(models) == 1 else None if models else b.model
    errors = BatchErrors(data=[BatchFileError(**e) for e in b.errors]) if b.errors else None
    return Batch(
        id=b.id, endpoint=b.endpoint or "/v1/chat/completions", model=model,
        errors=errors, input_file_id=input_id, completion_window=b.completion_window, status=BatchStatus(b.status),
        output_file_id=out_id, error_file_id=err_id, created_at=int(b.created_at), in_progress_at=unix(b.in_progress_at),
        expires_at=unix(b.expires_at), finalizing_at=unix(b.finalizing_at), completed_at=unix(b.completed_at),
        failed_at=unix(b.failed_at), expired_at=unix(b.expired_at), cancelling_at=unix(b.cancelling_at),
        cancelled_at=unix(b.cancelled_at), request_counts=BatchRequestCounts(total=c.total, completed=c.completed,
                                                                             failed=c.failed),
        usage=usage(c.input_tokens, c.output_tokens), metadata=b.meta,
    )


def to_openai(b: BatchRecord) -> dict[str, Any]:
    """The OpenAI Batch object as plain JSON data."""
    return dict(msgspec.to_builtins(openai_batch(b)))


def wait(settings: Settings, batch_id: str, on_update: Callable[[BatchRecord], None] | None = None, poll: float = 1.0,
         timeout: float | None = None) -> BatchRecord:
    """Poll until the batch reaches a terminal status (moving it on as needed: no scheduler required)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        b = batches.refresh(settings.database_url, batch_id)
        if on_update:
            on_update(b)
        if b.terminal or (deadline is not None and time.monotonic() > deadline):
            return b
        time.sleep(poll)


def raise_for_outcome(b: BatchRecord) -> None:
    """Exit codes of the contract: 3 if some requests failed, 4 if the batch failed, was cancelled or expired."""
    status = BatchStatus(b.status)
    c = b.counts
    summary = f"{c.completed} completed, {c.failed} failed of {c.total}"
    if status in (BatchStatus.FAILED, BatchStatus.CANCELLED, BatchStatus.EXPIRED):
        raise BatchFailed(f"batch {b.id} {status.value}: {summary}")
    if status == BatchStatus.COMPLETED and c.failed:
        raise BatchPartiallyFailed(f"batch {b.id} completed with failures: {summary}")
