"""OpenAI's Batch object (``status BATCH --json``), field for field as the ``openai`` SDK's ``openai.types.Batch``.

Timestamps are int Unix seconds (``unix`` converts the store's float times); every field is always written,
null when it does not apply, as OpenAI's API does.
"""

from typing import Literal

import msgspec

from batchllm.status import BatchStatus


class BatchFileError(msgspec.Struct, kw_only=True):
    """One problem with the input file: ``errors.data[]`` (e.g. a line rejected at submit)."""

    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(msgspec.Struct, kw_only=True):
    """``errors``: a list object."""

    object: Literal["list"] = "list"
    data: list[BatchFileError] = []


class BatchRequestCounts(msgspec.Struct, kw_only=True):
    """How many requests the batch has, and how many finished each way (they add up once it is done)."""

    total: int = 0
    completed: int = 0
    failed: int = 0


class InputTokensDetails(msgspec.Struct, kw_only=True):
    """Breakdown of input tokens."""

    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct, kw_only=True):
    """Breakdown of output tokens."""

    reasoning_tokens: int = 0


class BatchUsage(msgspec.Struct, kw_only=True):
    """Token usage of the batch's finished requests."""

    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class Batch(msgspec.Struct, kw_only=True):
    """OpenAI's Batch object."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts = msgspec.field(default_factory=BatchRequestCounts)
    usage: BatchUsage = msgspec.field(default_factory=BatchUsage)
    metadata: dict[str, str] | None = None


_encode = msgspec.json.Encoder().encode


def unix(ts: float | None) -> int | None:
    """A store time (float seconds) as OpenAI's int Unix timestamp; None stays None.

    Args:
        ts: seconds since the epoch, or None.
    """
    return None if ts is None else int(ts)


def usage(input_tokens: int, output_tokens: int) -> BatchUsage:
    """``usage`` from token totals (no prompt cache and no reasoning tokens are counted locally).

    Args:
        input_tokens: prompt tokens of the finished requests.
        output_tokens: generated tokens of the finished requests.
    """
    return BatchUsage(input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens)


def encode_batch(batch: Batch) -> bytes:
    """The Batch object as JSON (every field present, as OpenAI writes it).

    Args:
        batch: the object.
    """
    return _encode(batch)
