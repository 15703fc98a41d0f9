"""The Celery task every worker (distributed or embedded) runs: ``batchllm.run_chunk(chunk_id, ...)``."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.exceptions import Reject
from pydantic import ValidationError

from batchllm.queue import RUN_CHUNK, ChunkMessage
from batchllm.worker.runtime import get_runtime


def register_tasks(app: Celery) -> None:
    """Register ``run_chunk`` on ``app``; messages with bad arguments are rejected, never executed."""

    @app.task(name=RUN_CHUNK, bind=True, acks_late=True, ignore_result=True)
    def run_chunk(self: Any, *args: Any, **kwargs: Any) -> str:
        if args:
            raise Reject("malformed run_chunk message: positional arguments (takes chunk_id, batch_id, model, size)", False)
        try:
            msg = ChunkMessage.model_validate(kwargs)
        except ValidationError as e:
            raise Reject(f"malformed run_chunk message: {e.errors()[0]['msg']}", requeue=False) from e
        return get_runtime().run_chunk(msg)
