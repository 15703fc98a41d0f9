"""The app factory of ``batchllm serve``: routes, OpenAI error handlers, upkeep, and the server's lifespan.

The app talks to the cluster only through the store and the queue, like ``batchllm submit``: importing it
imports neither vLLM nor torch (``tests/test_api.py`` checks ``sys.modules``). ``serve --local`` passes the
in-process worker's start and stop as ``on_start``/``on_stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi import FastAPI

from batchllm.errors import BatchLLMError
from batchllm.services.api import batches, errors, files, models
from batchllm.services.api.config import ApiConfig
from batchllm.services.api.errors import error_response
from batchllm.store import files as file_rows
from batchllm.store.db import now

log = logging.getLogger("batchllm.api")
UPKEEP_EVERY_S = 600.0
STALE_UPLOAD_S = 3600.0  # an upload no part reached for this long belongs to a process that died


def upkeep(cfg: ApiConfig) -> None:
    """Remove uploads abandoned by a dead process and files past their ``expires_at``."""
    url = cfg.settings.database_url
    swept, purged = file_rows.sweep_uploads(url, STALE_UPLOAD_S), file_rows.purge_expired(url)
    if swept or purged:
        log.info("upkeep: removed %d abandoned upload(s) and %d expired file(s)", swept, purged)


async def _upkeep_loop(cfg: ApiConfig) -> None:
    while True:
        try:
            await anyio.to_thread.run_sync(upkeep, cfg)
        except Exception as e:  # an outage: try again next time
            log.warning("upkeep failed: %s", str(e)[:200])
        await asyncio.sleep(UPKEEP_EVERY_S)


def create_app(cfg: ApiConfig, on_start: Callable[[], None] | None = None,
               on_stop: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app of the OpenAI Files, Batches and Models API.

    Args:
        cfg: the server's configuration.
        on_start: called (in a thread) before the first request is served, e.g. the local worker's start.
        on_stop: called (in a thread) at shutdown.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if on_start is not None:
            await anyio.to_thread.run_sync(on_start)
        task = asyncio.create_task(_upkeep_loop(cfg))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if on_stop is not None:
                await anyio.to_thread.run_sync(on_stop)

    app = FastAPI(title="batchllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = cfg
    errors.install(app)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(models.router)

    @app.get("/health", include_in_schema=False)
    def health() -> Any:
        """Unauthenticated liveness: 200 when the database answers, else 503 (for load balancers and compose)."""
        try:
            now(cfg.settings.database_url)
        except BatchLLMError:
            return error_response(503, "the database is unavailable", "server_error", code="service_unavailable")
        return {"status": "ok", "local": cfg.local}

    return app
