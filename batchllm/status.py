"""The status enums shared by the database, the pydantic models and the CLI (OpenAI's batch names)."""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    """Lifecycle of a batch, with OpenAI Batch API names."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        """True once the batch will not change any more."""
        return self in TERMINAL_BATCH


TERMINAL_BATCH = frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED, BatchStatus.EXPIRED})


class RequestStatus(StrEnum):
    """One request (one input line)."""

    QUEUED = "queued"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ChunkStatus(StrEnum):
    """A chunk of requests of one model: the unit a worker leases."""

    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    CANCELLED = "cancelled"


class WorkerState(StrEnum):
    """What a worker is doing, as written in its heartbeat row."""

    STARTING = "starting"
    IDLE = "idle"
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    ERROR = "error"
    LOST = "lost"  # set by the scheduler when the heartbeat lapsed
    STOPPED = "stopped"
