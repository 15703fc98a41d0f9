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


LIVE_WORKER_STATES = frozenset(set(WorkerState) - {WorkerState.LOST, WorkerState.STOPPED})


class InvalidLines(StrEnum):
    """What a batch does when some input lines are invalid."""

    RUN_VALID = "run_valid"  # the valid lines run; each invalid line gets a 400 error record (batchllm's default)
    FAIL = "fail"  # the whole batch fails with the lines' errors (OpenAI's behaviour)


class Endpoint(StrEnum):
    """The OpenAI endpoints a request line can target (its ``url``)."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"
