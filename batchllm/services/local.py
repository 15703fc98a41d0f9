"""``batchllm serve --local``: the in-process worker behind the API, on SQLite, with no broker.

A thread polls SQL every ``poll_s`` seconds and does what the scheduler and a worker would: expire batches
past their window and move finished ones on (``store.batches.expire_due``/``finalize_open``), re-queue
lapsed leases (``store.leases.reap``), then feed the queued chunks of running batches to the worker's own task
body (``WorkerRuntime.run_chunk``: fenced claim, engine, result writer) — the same code path as a cluster
worker, with SQL instead of Redis as the queue. One model is loaded at a time: the loaded model's chunks go
first; another model is loaded once the current one has nothing queued and nothing in flight. A model that
cannot be loaded fails its queued requests with a 503 record (the batch still ends), as the scheduler does.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

from batchllm.errors import mask_url
from batchllm.queue import message
from batchllm.settings import Settings
from batchllm.store import batches, leases
from batchllm.store import dispatch as dispatch_rows
from batchllm.store import workers as worker_rows
from batchllm.store.dispatch import ChunkRef
from batchllm.worker.devices import discover
from batchllm.worker.identity import claim_name
from batchllm.worker.main import build_engine
from batchllm.worker.runtime import Hooks, WorkerIdentity, WorkerRuntime

log = logging.getLogger("batchllm.local")
#: ``(settings, model_ref, device kind, tensor parallel) -> started engine`` (``worker.main.build_engine``).
EngineFactory = Callable[[Settings, str, str, int], Any]
DRAIN_ON_STOP_S = 30.0


class LocalWorker:
    """Runs the queued work of a ``serve --local`` database in this process (see the module docstring).

    Args:
        settings: the local settings (SQLite database, ``memory://`` broker).
        engine_factory: builds the engine for a model; the real vLLM engine (tests pass their own here).
        poll_s: seconds between polls when there is nothing to feed.
        cpu: run on the CPU even when a GPU is present.
    """

    def __init__(self, settings: Settings, engine_factory: EngineFactory = build_engine, poll_s: float = 0.5,
                 cpu: bool = False) -> None:
        self.settings = settings
        self.url = settings.database_url
        self.engine_factory = engine_factory
        self.poll_s = poll_s
        self.cpu = cpu
        self.runtime: WorkerRuntime | None = None
        self._stop = threading.Event()
        self._engine_failed: str | None = None
        self._thread: threading.Thread | None = None

    @property
    def loaded(self) -> str | None:
        """The model ref loaded now."""
        return self.runtime.model_ref if self.runtime is not None else None

    def start(self) -> None:
        """Take back leases a dead earlier server left (the database file is ours) and start polling."""
        freed = leases.release_all(self.url)
        if freed:
            log.info("re-queued %d chunk(s) left leased by an earlier server", freed)
        self._thread = threading.Thread(target=self._run, name="batchllm-local-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop feeding, let the engine finish for up to ``DRAIN_ON_STOP_S``, give the rest back, unload."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._unload(DRAIN_ON_STOP_S)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                fed = self.tick()
            except Exception as e:  # an outage or a bug: log it, keep polling
                log.warning("local worker pass failed: %s: %s", type(e).__name__, mask_url(str(e))[:300])
                fed = False
            if not fed:
                self._stop.wait(self.poll_s)

    def tick(self) -> bool:
        """One pass (see the module docstring); True when chunks were fed (poll again at once)."""
        batches.expire_due(self.url, None)
        batches.finalize_open(self.url, None)
        leases.reap(self.url, self.settings.heartbeat_timeout, None)
        if self._engine_failed is not None:
            log.error("engine of %s failed (%s); reloading", self.loaded, self._engine_failed)
            self._unload(0.0)
        refs = dispatch_rows.unsent(self.url, grace_s=0.0)
        if not refs:
            return False
        ref = self.loaded if self.loaded is not None and any(r.model == self.loaded for r in refs) else refs[0].model
        if ref != self.loaded:
            if self.runtime is not None and not self.runtime.wait_idle(timeout=0):
                return False  # the loaded model still has work in flight; switch once it is written
            self._unload(0.0)
            if not self._load(ref):
                return True
        return self._feed([r for r in refs if r.model == ref])

    def _feed(self, refs: list[ChunkRef]) -> bool:
        rt = self.runtime
        assert rt is not None
        for chunk in refs:
            if self._stop.is_set() or self._engine_failed is not None:
                break
            rt.run_chunk(message(chunk))  # claims (fenced) and blocks while the engine holds enough
            dispatch_rows.mark_sent(self.url, [chunk.id])
        return True

    def _load(self, ref: str) -> bool:
        device = discover(cpu=self.cpu, gpus=None)[0]
        host = socket.gethostname()
        identity = WorkerIdentity(
            name=f"serve-local-{device.kind}@{host}", instance=uuid.uuid4().hex, kind=device.kind,
            devices=[device.as_dict()], memory_total_bytes=device.total_bytes, memory_free_bytes=device.free_bytes,
            advertised_bytes=None, host=host, pinned=True,
        )
        identity.name = claim_name(self.settings, identity, explicit=False)
        log.info("loading %s on %s", ref, device.name)
        try:
            engine = self.engine_factory(self.settings, ref, device.kind, 1)
        except Exception as e:  # missing weights, no vLLM installed, out of memory: fail its work, keep serving
            why = f"could not load {ref}: {mask_url(str(e)).splitlines()[0][:300] if str(e) else type(e).__name__}"
            log.error("%s", why)
            worker_rows.record_load_failure(self.url, identity.instance, ref, why)
            batches.fail_model(self.url, ref, "model_load_failed", why, None)
            return False
        self._engine_failed = None
        hooks = Hooks(engine_failed=self._on_engine_failed)
        self.runtime = WorkerRuntime(self.settings, identity, ref, engine, feed_depth=self.settings.feed_depth(), hooks=hooks)
        self.runtime.start_heartbeat()
        return True

    def _on_engine_failed(self, why: str) -> None:
        self._engine_failed = why

    def _unload(self, drain_s: float) -> None:
        rt, self.runtime = self.runtime, None
        if rt is not None:
            log.info("unloading %s", rt.model_ref)
            rt.shutdown(drain_timeout=drain_s)
