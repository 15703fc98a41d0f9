"""The worker's runtime: one loaded model, its engine, fenced result writes and the heartbeat.

One process per GPU (or GPU group). The Celery task only claims a chunk (a fenced ``Lease``) and hands its
requests to the engine; it returns as soon as the engine holds no more than its feed target, so Celery
fetches the next chunk while the engine is still busy and the engine never idles at a chunk boundary.
Results reach a writer thread through a queue and are written in batches, fenced by the chunk's lease,
off the engine's thread. The heartbeat renews exactly the leases this process holds; a lease it lost
(frozen, partitioned) is dropped and its requests aborted in the engine, and a write that cannot be made
within ``db_retry_seconds`` gives the chunk up, so nothing is ever left leased by a process not running it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from batchllm.errors import FatalError, mask_url
from batchllm.formats import request_id_for
from batchllm.queue import ChunkMessage
from batchllm.settings import Settings
from batchllm.status import WorkerState
from batchllm.store import leases
from batchllm.store import workers as worker_rows
from batchllm.store.db import with_db_retry
from batchllm.worker.engine import Engine, EngineHealth, EngineRequest
from batchllm.worker.writer import ResultWriter

log = logging.getLogger(__name__)


class ChunkOutcome(StrEnum):
    """What the task did with a message (its return value, shown in Flower)."""

    FED = "fed"  # claimed; its requests are in the engine
    TAKEN = "taken"  # done, or another live worker holds it: acked and skipped
    CANCELLED = "cancelled"  # its batch was cancelled or expired
    EMPTY = "empty"  # nothing left to run (a re-run after a crash)
    WRONG_MODEL = "wrong_model"  # for another model: left to the reaper


@dataclass
class WorkerIdentity:
    """Who this worker is: a unique name while it lives, and the process's ``instance`` id that owns its leases."""

    name: str
    instance: str
    kind: str
    devices: list[dict[str, Any]]
    memory_total_bytes: int
    memory_free_bytes: int
    advertised_bytes: int | None
    host: str
    tensor_parallel: int = 1
    pinned: bool = False

    def row(self, pid: int) -> dict[str, Any]:
        """The identity columns of the workers table."""
        return {"host": self.host, "pid": pid, "kind": self.kind, "devices": self.devices,
                "memory_total_bytes": self.memory_total_bytes, "memory_free_bytes": self.memory_free_bytes,
                "advertised_bytes": self.advertised_bytes, "tensor_parallel": self.tensor_parallel, "pinned": self.pinned}

    @property
    def device(self) -> str | None:
        """The first device's name, recorded with each result."""
        return self.devices[0].get("name") if self.devices else None


@dataclass
class Hooks:
    """What the process does when the heartbeat learns something (set by ``worker.main``)."""

    reassigned: Callable[[str | None], None] | None = None  # the scheduler assigned another model
    engine_failed: Callable[[str], None] | None = None  # the engine died: restart the process
    identity_lost: Callable[[], None] | None = None  # another process took over our name: stop


@dataclass
class WorkerRuntime:
    """Runs chunks for one loaded model (see the module docstring).

    Args:
        settings: settings (database URL, lease and heartbeat timing, retry budget).
        identity: this worker.
        model_ref: ``name@variant`` loaded in the engine.
        engine: a started engine.
        feed_depth: requests kept waiting in the engine before taking the next chunk (raised to the engine's
            capacity when smaller, so small chunks still run in full batches).
    """

    settings: Settings
    identity: WorkerIdentity
    model_ref: str
    engine: Engine
    feed_depth: int
    hooks: Hooks = field(default_factory=Hooks)
    state: WorkerState = WorkerState.READY  # a Celery worker starts LOADING: ready once it consumes (mark_consuming)

    def __post_init__(self) -> None:
        self.url = self.settings.database_url
        self._stop = threading.Event()
        self._hb: threading.Thread | None = None
        self.writer = ResultWriter(self.settings, self.identity.name, self.identity.device, self.engine.abort)

    # ------------------------------------------------------------------ task body
    def run_chunk(self, msg: ChunkMessage) -> ChunkOutcome:
        """Claim the chunk and feed its pending requests to the engine; skip it when it is not ours to run."""
        if msg.model != self.model_ref:
            # Only a misrouted message reaches the wrong worker; acking it is safe, the reaper re-sends the chunk.
            log.warning("chunk %s is for %s, this worker runs %s; skipped", msg.chunk_id, msg.model, self.model_ref)
            return ChunkOutcome.WRONG_MODEL
        claimed = with_db_retry(lambda: leases.claim(self.url, msg.chunk_id, self.identity.instance, self.settings.lease_seconds),
                                self.url, self.settings.db_retry_seconds, "claim")
        if claimed.outcome != leases.ClaimOutcome.CLAIMED or claimed.lease is None:
            return ChunkOutcome(claimed.outcome.value)
        lease = claimed.lease
        self.writer.hold(lease)
        self.state = WorkerState.BUSY
        requests = [EngineRequest(request_id=r.id, public_id=request_id_for(r.id), endpoint=r.endpoint, body=r.body)
                    for r in claimed.requests]
        self.engine.submit(lease.key, requests, self.writer.on_results)
        self.engine.wait_below(self.feed_target())
        return ChunkOutcome.FED

    def feed_target(self) -> int:
        """Requests to keep in the engine before taking the next chunk: ``feed_depth``, but at least the engine's
        capacity, so its batch stays full while the backlog waits in the broker, where priorities apply."""
        return max(self.feed_depth, self.engine.capacity)

    def mark_consuming(self) -> None:
        """The queue consumer is up: from now on messages reach this worker, so its row says ``ready`` at once."""
        if self.state == WorkerState.LOADING:
            self.state = WorkerState.READY
        try:
            self.beat()
        except Exception as e:  # the heartbeat thread writes it within an interval anyway
            log.warning("worker %s: heartbeat failed: %s", self.identity.name, mask_url(str(e))[:200])

    # ------------------------------------------------------------------ heartbeat
    def beat(self) -> None:
        """Write the heartbeat, renew held leases (dropping lost ones), and react to what the row says."""
        if self.state == WorkerState.BUSY and not self.writer.held() and self.engine.pending() == 0:
            self.state = WorkerState.READY
        beat = worker_rows.heartbeat(self.url, self.identity.instance, state=str(self.state), model=self.model_ref,
                                     memory_free_bytes=self.identity.memory_free_bytes)
        if not beat.registered:
            log.error("worker %s: another process now holds this name (this one was presumed dead); stopping",
                      self.identity.name)
            self.writer.abandon_all()
            if self.hooks.identity_lost:
                self.hooks.identity_lost()
            return
        self.writer.renew()
        health, why = self.engine.health()
        if health is EngineHealth.FAILED:
            if self.hooks.engine_failed:
                self.hooks.engine_failed(why or "engine failed")
        elif not self.identity.pinned and beat.assigned_model != self.model_ref and self.hooks.reassigned:
            self.hooks.reassigned(beat.assigned_model)

    def start_heartbeat(self) -> None:
        """Beat every ``heartbeat_interval`` seconds in a daemon thread; outages are logged, never fatal."""

        def loop() -> None:
            while not self._stop.wait(self.settings.heartbeat_interval):
                try:
                    self.beat()
                except Exception as e:  # keep beating through database restarts
                    log.warning("heartbeat failed: %s", mask_url(str(e))[:200])

        self.writer.start()
        self._hb = threading.Thread(target=loop, name="batchllm-heartbeat", daemon=True)
        self._hb.start()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every claimed chunk is written or given up (the embedded runner's end condition)."""
        return self.writer.wait_idle(timeout)

    def shutdown(self, drain_timeout: float | None = None) -> None:
        """Finish what is in the engine and written, give back the rest, stop beating, mark the worker stopped."""
        self.state = WorkerState.DRAINING
        self.engine.drain(drain_timeout)
        self.writer.wait_idle(drain_timeout)
        self._stop.set()
        self.writer.stop(release=True)
        self.state = WorkerState.STOPPED
        try:
            worker_rows.mark_stopped(self.url, self.identity.instance)
        except Exception as e:
            log.warning("could not record shutdown: %s", mask_url(str(e))[:200])
        self.engine.stop()


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
