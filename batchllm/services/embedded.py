"""``batchllm run``: the embedded default — SQLite, Celery's in-process broker, a local worker in this process.

It uses exactly the distributed code path: the same submit service, chunks, leases, Celery task and
result upserts; only the broker is ``memory://`` and the worker runs in a thread of this process. The
batch is found again by the input's content hash (plus model), so a rerun after a kill resumes it.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchllm.errors import InputError
from batchllm.queue import make_celery, queue_name
from batchllm.settings import Settings
from batchllm.status import BatchStatus
from batchllm.store import leases
from batchllm.store.batches import get_batch
from batchllm.store.db import check_database, session_scope

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What an embedded run did."""

    batch_id: str
    resumed: bool
    view: dict[str, Any]


def embedded_settings(settings: Settings, db: str | None) -> Settings:
    """Settings for the embedded mode: SQLite (default file or ``--db``) and the in-process broker."""
    url = settings.database_url
    if db:
        url = db if "://" in db else f"sqlite:///{Path(db).expanduser().resolve()}"
    elif not url.startswith("sqlite"):
        url = f"sqlite:///{settings.data_dir / 'batchllm.db'}"
    # One person at a terminal: only vLLM's errors, not its start-up chatter, around the progress bar.
    level = settings.engine_log_level if logging.getLogger().isEnabledFor(logging.INFO) else "ERROR"
    return settings.model_copy(update={"database_url": url, "broker_url": "memory://", "engine_log_level": level})


def run_file(
    settings: Settings,
    file: str,
    *,
    model: str | None,
    idempotency_key: str | None = None,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> RunOutcome:
    """Run a JSONL file to completion on this machine; resumes an interrupted run of the same file.

    Args:
        settings: settings already made embedded by ``embedded_settings``.
        file: path of the JSONL file (stdin is not resumable, so it is not accepted here).
        model: default model for lines that name none.
        idempotency_key: overrides the content-hash key.
        on_update: progress callback with the batch view.
        on_stage: called with a short description of each stage (loading model, …).
    """
    from batchllm.services.status import batch_view, wait
    from batchllm.services.submit import dispatch_batch, file_sha256, submit_file

    if file == "-":
        raise InputError("`batchllm run` needs a file path (stdin cannot be resumed); use `batchllm submit -` for stdin")
    path = Path(file)
    if not path.is_file():
        raise InputError(f"{file}: no such file; give a JSONL file path")
    check_database(settings.database_url)
    key = idempotency_key or f"run:{file_sha256(path)}:{model or ''}"
    res = submit_file(settings, file, app=None, model=model, idempotency_key=key, queue_anyway=True)
    with session_scope(settings.database_url) as s:
        batch = get_batch(s, res.batch_id)
        refs = sorted(set((batch.models or {}).values()))
        status = batch.status
    if BatchStatus(status).terminal and status != BatchStatus.COMPLETED:
        raise InputError(f"batch {res.batch_id} for this file is {status}; pass --idempotency-key to run it again")
    from batchllm.worker.devices import discover

    devices = discover(cpu=False, gpus=None)[:1]
    for ref in refs:
        if on_stage:
            on_stage(f"loading {ref} on {devices[0].name}")
        _run_model(settings, res.batch_id, ref, devices, dispatch_batch, on_update)
    wait(settings, res.batch_id, on_update, poll=0.5, timeout=5)
    return RunOutcome(batch_id=res.batch_id, resumed=res.existing, view=batch_view(settings, res.batch_id))


def _run_model(
    settings: Settings,
    batch_id: str,
    ref: str,
    devices: list[Any],
    dispatch_batch: Callable[..., int],
    on_update: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Host one model in-process, feed it every queued chunk of the batch for that model, and wait."""
    from celery.contrib.testing.worker import start_worker

    from batchllm.services.status import batch_view
    from batchllm.worker.main import build_engine
    from batchllm.worker.runtime import WorkerIdentity, WorkerRuntime, set_runtime
    from batchllm.worker.tasks import register_tasks

    kind = devices[0].kind
    name = f"embedded-{kind}@{socket.gethostname()}"
    identity = WorkerIdentity(
        name=name,
        kind=kind,
        devices=[d.as_dict() for d in devices],
        memory_total_bytes=sum(d.total_bytes for d in devices),
        memory_free_bytes=sum(d.free_bytes for d in devices),
        advertised_bytes=None,
        pinned=True,
    )
    with session_scope(settings.database_url) as s:
        leases.release_owner(s, name)  # a killed earlier run's leases: ours to take back now
    engine = build_engine(settings, ref, kind, 1)
    rt = WorkerRuntime(settings, identity, ref, engine, feed_depth=settings.feed_depth())
    set_runtime(rt)
    rt.start_heartbeat()
    app = make_celery(settings, broker_url="memory://localhost/")
    register_tasks(app)
    try:
        with start_worker(
            app,
            pool="solo",
            concurrency=1,
            perform_ping_check=False,
            queues=[queue_name(ref)],
            loglevel="WARNING",
            shutdown_timeout=60.0,
        ):
            dispatch_batch(settings, app, batch_id, only_undispatched=False)
            while True:
                v = batch_view(settings, batch_id)
                if on_update:
                    on_update(v)
                if BatchStatus(v["status"]).terminal or not _open_chunks(settings, batch_id, ref):
                    break
                time.sleep(0.5)
    finally:
        rt.shutdown()
        set_runtime(None)


def _open_chunks(settings: Settings, batch_id: str, ref: str) -> int:
    from sqlalchemy import func, select

    from batchllm.status import ChunkStatus
    from batchllm.store.models import Chunk

    with session_scope(settings.database_url) as s:
        return int(
            s.scalar(
                select(func.count()).where(
                    Chunk.batch_id == batch_id, Chunk.model == ref, Chunk.status.in_([ChunkStatus.QUEUED, ChunkStatus.LEASED])
                )
            )
            or 0
        )
