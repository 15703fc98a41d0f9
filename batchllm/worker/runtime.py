"""The worker's runtime: one loaded model, the engine loop, leases, result writes and heartbeats.

One process per GPU (or GPU group). The Celery task only claims a chunk and hands its requests to the
engine loop; results are written by the loop as requests finish, and the heartbeat keeps the chunk's
lease alive meanwhile. The task returns as soon as the engine has no more than its feed target of
requests waiting (``feed_depth``, and never less than the engine's batch capacity), so Celery fetches the
next chunk while the engine is still busy: the engine never idles at a chunk boundary, and small chunks
run in as large a batch as one big chunk would.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from batchllm.errors import FatalError, mask_url
from batchllm.queue import ChunkMessage
from batchllm.settings import Settings
from batchllm.status import BatchStatus, ChunkStatus, WorkerState
from batchllm.store import leases
from batchllm.store import workers as worker_rows
from batchllm.store.batches import maybe_finalize
from batchllm.store.db import session_scope, with_db_retry
from batchllm.store.models import Batch, Chunk
from batchllm.store.results import pending_requests, upsert_results

log = logging.getLogger(__name__)


class EngineLike(Protocol):
    """The slice of ``EngineLoop`` the runtime uses (a test stand-in implements the same)."""

    def submit(self, group: str, requests: list[Any], on_results: Callable[[str, list[Any], bool], None]) -> None: ...
    def pending(self) -> int: ...
    def wait_below(self, n: int, timeout: float | None = None) -> bool: ...
    def drain(self, timeout: float | None = None) -> bool: ...
    def stop(self) -> None: ...


@dataclass
class WorkerIdentity:
    """Who this worker is, as shown in `batchllm workers` and Flower."""

    name: str
    kind: str
    devices: list[dict[str, Any]]
    memory_total_bytes: int
    memory_free_bytes: int
    advertised_bytes: int | None
    tensor_parallel: int = 1
    pinned: bool = False
    host: str = field(default_factory=socket.gethostname)


class WorkerRuntime:
    """Runs chunks for one loaded model.

    Args:
        settings: settings (database URL, lease and heartbeat timing).
        identity: this worker.
        model_ref: ``name@variant`` loaded in the engine.
        engine: a started engine loop.
        feed_depth: keep at most this many requests waiting in the engine before taking the next chunk; raised to
            the engine's batch capacity (vLLM ``max_num_seqs``) when smaller, see :meth:`feed_target`.
    """

    def __init__(self, settings: Settings, identity: WorkerIdentity, model_ref: str, engine: EngineLike, feed_depth: int) -> None:
        self.settings = settings
        self.identity = identity
        self.model_ref = model_ref
        self.engine = engine
        self.feed_depth = feed_depth
        self._capacity: int | None = None
        self.url = settings.database_url
        self.chunks_in_engine: dict[str, str] = {}  # chunk id → batch id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._hb: threading.Thread | None = None
        self.on_reassigned: Callable[[str | None], None] | None = None
        self.on_engine_failed: Callable[[], None] | None = None
        self.state = WorkerState.READY
        self.error: str | None = None

    # ------------------------------------------------------------------ task body
    def run_chunk(self, msg: ChunkMessage) -> str:
        """Claim the chunk and feed its pending requests to the engine; skip it if it is not ours to run."""
        if msg.model != self.model_ref:
            # A message can reach the wrong worker only through a misconfigured queue; leave it to the reaper.
            log.warning("chunk %s is for %s, this worker runs %s; skipped", msg.chunk_id, msg.model, self.model_ref)
            return "wrong-model"

        def claim() -> tuple[str, list[Any]] | None:
            with session_scope(self.url) as s:
                ck = leases.claim(s, msg.chunk_id, self.identity.name, self.settings.lease_seconds)
                if ck is None:
                    return None
                batch = s.get(Batch, ck.batch_id)
                if batch is None or batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED, BatchStatus.EXPIRED):
                    ck.status = ChunkStatus.CANCELLED
                    s.flush()
                    maybe_finalize(s, ck.batch_id)
                    return ("cancelled", [])
                reqs = pending_requests(s, ck.id)
                if not reqs:
                    leases.finish(s, ck.id)
                    s.flush()
                    maybe_finalize(s, ck.batch_id)
                    return ("empty", [])
                return (ck.batch_id, reqs)

        claimed = with_db_retry(claim, self.url, self.settings.db_retry_seconds, "claim")
        if claimed is None:
            return "skipped"
        batch_id, reqs = claimed
        if not reqs:
            return batch_id
        from batchllm.worker.engine import EngineRequest

        with self._lock:
            self.chunks_in_engine[msg.chunk_id] = batch_id
        self.state = WorkerState.BUSY
        self.engine.submit(
            msg.chunk_id,
            [EngineRequest(request_id=r.id, kind=r.kind, messages=r.messages, prompt=r.prompt, params=r.params) for r in reqs],
            self._on_results,
        )
        self.engine.wait_below(self.feed_target())
        return f"fed {len(reqs)}"

    def feed_target(self) -> int:
        """How many requests to keep in the engine before taking the next chunk.

        ``feed_depth``, but at least as many as the engine runs at once (``max_num_seqs``): with less, small
        chunks would run in small batches (chunk 16 with a depth of 2 x 16 keeps only ~48 requests in a 256-wide
        batch). With this floor the engine's batch stays full and its own queue holds at most one chunk more,
        so the backlog still waits in the broker, where priorities apply.
        """
        if self._capacity is None:
            self._capacity = engine_capacity(self.engine)
        return max(self.feed_depth, self._capacity)

    def _on_results(self, chunk_id: str, results: list[Any], done: bool) -> None:
        """Engine-loop callback: upsert finished results; on the chunk's last one, finish it."""
        now = time.time()
        device = self.identity.devices[0]["name"] if self.identity.devices else None
        with self._lock:
            batch_id = self.chunks_in_engine.get(chunk_id, "")
        rows = [
            {
                "request_id": r.request_id, "batch_id": batch_id, "ok": r.ok, "status_code": 200 if r.ok else 400,
                "text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens, "error_code": r.error_code, "error_message": r.error_message,
                "latency_ms": r.latency_ms, "model": self.model_ref, "worker": self.identity.name, "device": device,
                "attempt": 1, "created_at": now,
            }
            for r in results
        ]
        tokens = sum(r.completion_tokens for r in results)

        def write() -> None:
            with session_scope(self.url) as s:
                upsert_results(s, rows)
                if rows:
                    worker_rows.add_usage(s, self.identity.name, tokens, len(rows))
                if done:
                    leases.finish(s, chunk_id)
                    s.flush()
                    maybe_finalize(s, batch_id)

        with_db_retry(write, self.url, self.settings.db_retry_seconds, "result write")
        if done:
            with self._lock:
                self.chunks_in_engine.pop(chunk_id, None)

    # ------------------------------------------------------------------ heartbeat
    def heartbeat_row(self) -> dict[str, Any]:
        """This worker's row for the workers table."""
        ident = self.identity
        return {
            "name": ident.name, "host": ident.host, "pid": os.getpid(), "kind": ident.kind, "devices": ident.devices,
            "memory_total_bytes": ident.memory_total_bytes, "memory_free_bytes": ident.memory_free_bytes,
            "advertised_bytes": ident.advertised_bytes, "tensor_parallel": ident.tensor_parallel,
            "model": self.model_ref, "pinned": ident.pinned, "state": str(self.state), "error": self.error,
            "started_at": time.time(), "assigned_model": self.model_ref if ident.pinned else None,
        }

    def beat(self) -> None:
        """Write the heartbeat, extend leases, and react to a new assignment from the scheduler."""
        if self.state == WorkerState.BUSY and not self.chunks_in_engine and self.engine.pending() == 0:
            self.state = WorkerState.READY
        with session_scope(self.url) as s:
            worker_rows.heartbeat(s, self.heartbeat_row())
            leases.extend(s, self.identity.name, self.settings.lease_seconds)
            assigned = None if self.identity.pinned else worker_rows.assigned_model(s, self.identity.name)
        engine_error = getattr(self.engine, "error", None)
        if engine_error and self.on_engine_failed is not None:
            # The engine declared itself broken: restart the process rather than fail every chunk.
            self.error = f"engine failed: {engine_error}"
            self.on_engine_failed()
        elif not self.identity.pinned and assigned != self.model_ref and self.on_reassigned is not None:
            self.on_reassigned(assigned)

    def start_heartbeat(self) -> None:
        """Beat every ``heartbeat_interval`` seconds in a daemon thread; database blips are logged, not fatal."""

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.beat()
                except Exception as e:  # keep beating through database restarts
                    log.warning("heartbeat failed: %s", mask_url(str(e))[:200])
                self._stop.wait(self.settings.heartbeat_interval)

        self._hb = threading.Thread(target=loop, name="batchllm-heartbeat", daemon=True)
        self._hb.start()

    def shutdown(self, drain_timeout: float | None = None) -> None:
        """Finish what is in the engine, stop beating, and mark the worker stopped."""
        self.state = WorkerState.DRAINING
        self.engine.drain(drain_timeout)
        self._stop.set()
        self.state = WorkerState.STOPPED
        try:
            with session_scope(self.url) as s:
                for ck_id in list(self.chunks_in_engine):
                    leases.release(s, ck_id, self.identity.name)
                worker_rows.heartbeat(s, self.heartbeat_row())
        except Exception as e:
            log.warning("could not record shutdown: %s", mask_url(str(e))[:200])
        self.engine.stop()


def engine_capacity(engine: Any) -> int:
    """The engine's batch capacity (vLLM ``max_num_seqs``), or 0 when it cannot be told (a test stand-in)."""
    cap = getattr(engine, "max_num_seqs", None)
    if cap is None:  # EngineLoop: read it off the vLLM engine it owns
        llm_engine = getattr(engine, "_engine", None)
        scheduler = getattr(getattr(llm_engine, "vllm_config", None), "scheduler_config", None)
        cap = getattr(scheduler, "max_num_seqs", None)
    try:
        return max(0, int(cap or 0))
    except (TypeError, ValueError):
        return 0


_RUNTIME: WorkerRuntime | None = None


def set_runtime(rt: WorkerRuntime | None) -> None:
    """Install the process's runtime (the Celery task finds it here)."""
    global _RUNTIME
    _RUNTIME = rt


def get_runtime() -> WorkerRuntime:
    """The process's runtime; a task arriving before the model is loaded is a configuration bug."""
    if _RUNTIME is None:
        raise FatalError("no model loaded in this worker process")
    return _RUNTIME


def chunk_status(url: str, chunk_id: str) -> str | None:
    """A chunk's status (tests and diagnostics)."""
    with session_scope(url) as s:
        ck = s.get(Chunk, chunk_id)
        return ck.status if ck else None
