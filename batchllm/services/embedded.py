"""``batchllm run``: the embedded default — SQLite, an in-process queue and a local worker, in this process.

It runs the distributed code path: the same submit service, chunks, fenced leases, the worker's task body
(``WorkerRuntime.run_chunk``), result writer and finalization; only the broker is replaced by handing the
batch's chunk messages to the task body in order. The batch is found again by the input's content hash
(plus model), so a rerun after a kill resumes it; the rerun first gives back every lease in its own database
file, whatever process (host name, container) held it, so a resume never waits for a dead run's leases.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from batchllm.errors import InputError
from batchllm.queue import message
from batchllm.services.submit import file_sha256, submit_file
from batchllm.settings import Settings, database_url_of
from batchllm.status import BatchStatus
from batchllm.store import batches, leases
from batchllm.store import dispatch as dispatch_rows
from batchllm.store.batches import BatchRecord
from batchllm.store.db import check_database
from batchllm.worker.devices import discover
from batchllm.worker.identity import claim_name
from batchllm.worker.main import build_engine
from batchllm.worker.runtime import WorkerIdentity, WorkerRuntime

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.5


@dataclass
class RunOutcome:
    """What an embedded run did."""

    batch: BatchRecord
    resumed: bool


def embedded_settings(settings: Settings, db: str | None) -> Settings:
    """Settings for the embedded mode: SQLite (default file or ``--db``) and no broker."""
    url = settings.database_url
    if db:
        url = database_url_of(db)
    elif not url.startswith("sqlite"):
        url = f"sqlite:///{settings.data_dir / 'batchllm.db'}"
    return settings.in_process(url)


def run_file(settings: Settings, file: str, *, model: str | None, idempotency_key: str | None = None,
             on_update: Callable[[BatchRecord], None] | None = None,
             on_stage: Callable[[str], None] | None = None) -> RunOutcome:
    """Run a JSONL file to completion on this machine; resumes an interrupted run of the same file.

    Args:
        settings: settings already made embedded by ``embedded_settings``.
        file: path of the JSONL file (stdin cannot be resumed, so it is not accepted here).
        model: default model for lines that name none.
        idempotency_key: overrides the content-hash key.
        on_update: progress callback with the batch.
        on_stage: called with a short description of each stage (loading model, …).
    """
    if file == "-":
        raise InputError("`batchllm run` needs a file path (stdin cannot be resumed); use `batchllm submit -` for stdin")
    path = Path(file)
    if not path.is_file():
        raise InputError(f"{file}: no such file; give a JSONL file path")
    url = settings.database_url
    check_database(url)
    key = idempotency_key or f"run:{file_sha256(path)}:{model or ''}"
    res = submit_file(settings, file, model=model, idempotency_key=key, queue_anyway=True)
    b = batches.get(url, res.batch_id)
    if b.terminal and b.status not in (BatchStatus.COMPLETED, BatchStatus.FAILED):
        raise InputError(f"batch {b.id} for this file is {b.status}; pass --idempotency-key to run it again")
    leases.release_all(url)  # this file is ours: a killed earlier run's leases are ours to take back now
    for ref in sorted(set(b.models.values())):
        chunks = [c for c in dispatch_rows.of_batch(url, b.id, only_unsent=False) if c.model == ref]
        if chunks:
            _run_model(settings, b.id, ref, chunks, on_update, on_stage)
    return RunOutcome(batch=batches.refresh(url, b.id), resumed=res.existing)


def _run_model(settings: Settings, batch_id: str, ref: str, chunks: list[dispatch_rows.ChunkRef],
               on_update: Callable[[BatchRecord], None] | None, on_stage: Callable[[str], None] | None) -> None:
    """Host one model in this process and feed it the batch's chunks for it, then wait for the last write."""
    device = discover(cpu=False, gpus=None)[0]
    identity = WorkerIdentity(
        name=f"embedded-{device.kind}@{socket.gethostname()}", instance=uuid.uuid4().hex, kind=device.kind,
        devices=[device.as_dict()], memory_total_bytes=device.total_bytes, memory_free_bytes=device.free_bytes,
        advertised_bytes=None, host=socket.gethostname(), pinned=True,
    )
    identity.name = claim_name(settings, identity, explicit=False)
    if on_stage:
        on_stage(f"loading {ref} on {device.name}")
    engine = build_engine(settings, ref, device.kind, 1)
    engine.shutdown_grace_s = 0.0  # this process ends after the run: no grace for the engine core (no idle tail)
    rt = WorkerRuntime(settings, identity, ref, engine, feed_depth=settings.feed_depth())
    rt.start_heartbeat()
    done = threading.Event()
    progress = threading.Thread(target=_report, args=(settings, batch_id, on_update, done), daemon=True)
    progress.start()
    try:
        if on_stage:
            on_stage(batch_id)
        for ref_chunk in chunks:
            rt.run_chunk(message(ref_chunk))
        rt.wait_idle()  # returns the moment the last result is written: no polling on the way out
    finally:
        done.set()
        rt.shutdown()
        progress.join(timeout=2)
    if on_update:
        on_update(batches.refresh(settings.database_url, batch_id))


def _report(settings: Settings, batch_id: str, on_update: Callable[[BatchRecord], None] | None, done: threading.Event) -> None:
    while on_update is not None and not done.wait(PROGRESS_EVERY_S):
        try:
            on_update(batches.get(settings.database_url, batch_id))
        except Exception:  # progress is cosmetic; the run goes on
            log.debug("progress update failed", exc_info=True)
