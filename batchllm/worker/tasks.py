"""The Celery task every worker (distributed or embedded) runs: ``batchllm.run_chunk(chunk_id, ...)``."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.exceptions import Reject
from pydantic import ValidationError

from batchllm.errors import mask_url
from batchllm.outages import Service, outage_of
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
        try:
            return get_runtime().run_chunk(msg)
        except Exception as e:
            if outage_of(e) is not Service.DATABASE:
                raise
            # The claim met a database outage longer than the retry budget: nothing was claimed. Put the
            # message back (acking it would leave the chunk to the scheduler's slower time-based resend).
            raise Reject(f"database unavailable, chunk {msg.chunk_id} requeued: {mask_url(str(e))[:160]}", requeue=True) from e
