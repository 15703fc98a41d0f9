"""The scheduler loop: one active scheduler places models, recovers lost work, ends batches and dispatches.

``tick()`` is one pass; ``run_forever()`` repeats it every ``settings.scheduler_interval`` seconds. Each tick
first takes or renews the **leader lease** (``store.leader``, ``scheduler_lease_seconds``). A scheduler that
does not hold it stands by: it does nothing else, retries each tick, and takes over once the lease lapses
(within ``scheduler_lease_seconds`` + a tick of the active one dying; at once when it resigns on SIGTERM).
Every write of the active one passes its ``LeaderFence``, so one frozen past its lease is refused even in
the middle of a tick (``NotLeader``) and goes back to standing by. Then, in order:

1. **recover** - workers whose heartbeat lapsed become ``lost``; chunks whose lease lapsed or whose owner
   is gone are queued again with no message (``store.leases.reap``), so step 5 sends them again.
2. **assign** - ``placement.assign`` decides from the live workers and the open work per model ref which
   model each worker hosts, and which refs nobody can load (their queued chunks fail with the message).
3. **lifecycle** - batches past their window expire; batches whose work ended are finalized.
4. **hooks** - steps injected by the caller, e.g. ``("schedules", fn)`` (nightly runs live in services,
   which the scheduler must not import); each gets the ``LeaderFence`` for its writes.
5. **dispatch** - queued chunks are metered into Redis; lost messages are re-sent (``scheduler.dispatch``).
6. **metrics** - the Prometheus snapshot is refreshed (at most every ``METRICS_EVERY_S``).

Every step is a fixed number of aggregate statements, so a tick costs the same with 1 or 100 workers and
1 or 1,000 batches. An outage (``outages.outage_of``) fails the steps that need the service, is logged in
one line, and the next tick reconnects; the loop never dies of an outage. Without any scheduler no work is
lost: chunks wait in SQL until one starts and dispatches them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from batchllm.catalog import Catalog, load_catalog
from batchllm.errors import BatchLLMError, NotLeader, mask_url
from batchllm.outages import Service, outage_of
from batchllm.placement.assign import assign, fit_predicate
from batchllm.scheduler.dispatch import Dispatcher
from batchllm.scheduler.metrics import WORKER_FORGET_S, SchedulerMetrics
from batchllm.settings import Settings
from batchllm.store import batches, cluster, leader, leases, workers
from batchllm.store.cluster import OpenWork
from batchllm.store.leader import LeaderFence
from batchllm.store.workers import WorkerInfo

log = logging.getLogger(__name__)

LOG_REPEAT_S = 60.0  # the same outage is logged again at most this often
METRICS_EVERY_S = 5.0  # Prometheus scrapes every 15 s or so: reading the snapshot every tick would be waste
HookFn = Callable[[LeaderFence], dict[str, Any]]


@dataclass
class _Tick:
    """What steps of one tick share, so no step reads again what an earlier one read."""

    fence: LeaderFence
    live: list[WorkerInfo] | None = None
    work: list[OpenWork] | None = None
    summary: dict[str, Any] = field(default_factory=dict)


class Scheduler:
    """One scheduler process (of possibly several: one acts, the others stand by).

    Args:
        settings: settings (database, broker, timing, lease).
        app: Celery app to send messages with; None skips the Redis steps (store-only tests).
        hooks: extra steps ``(name, fn(fence) -> summary)`` run after the lifecycle step, e.g. the schedules.
        metrics: where metrics go (a fresh registry by default).
        dispatcher: the dispatch step (default: ``Dispatcher(settings.database_url, app)``).
        metrics_every_s: the metrics snapshot is read at most this often (0: every tick).
    """

    def __init__(self, settings: Settings, app: Celery | None, hooks: Sequence[tuple[str, HookFn]] = (),
                 metrics: SchedulerMetrics | None = None, dispatcher: Dispatcher | None = None,
                 metrics_every_s: float = METRICS_EVERY_S) -> None:
        self.settings = settings
        self.app = app
        self.url = settings.database_url
        self.hooks = list(hooks)
        self.metrics = metrics or SchedulerMetrics()
        self.dispatcher = dispatcher or (Dispatcher(self.url, app) if app is not None else None)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.fence: LeaderFence | None = None
        self._catalog: Catalog | None = None
        # (worker name, instance) → {ref: message}: refs that process failed to load. Keyed by instance, so a
        # restarted worker gets a new chance; its row keeps only the last failure.
        self._load_failures: dict[tuple[str, str | None], dict[str, str]] = {}
        self._standby_seen: str | None = None  # the active scheduler last logged while standing by
        self._recover_after = 0.0  # monotonic; after a database outage workers get time to heartbeat again
        self._last_log: tuple[str, float] = ("", 0.0)
        self._stop = threading.Event()
        self._metrics_every_s = metrics_every_s
        self._metrics_at: float | None = None  # monotonic time of the last snapshot read

    # ------------------------------------------------------------------------------------------ the tick

    def tick(self) -> dict[str, Any]:
        """One pass (see the module docstring); returns what it did, with ``errors`` for failed steps."""
        t0 = time.monotonic()
        errors: list[str] = []
        try:
            fence = self._lead()
        except Exception as e:
            errors.append(f"leader: {_one_line(e)}")
            self._after_error("leader", e)
            self._log_errors(errors)
            return {"leader": self.fence is not None, "errors": errors}
        if fence is None:
            self._log_errors(errors)
            return {"leader": False, "active": self._standby_seen, "errors": errors}
        tick = _Tick(fence, summary={"leader": True, "term": fence.term, "errors": errors})
        steps: list[tuple[str, Callable[[_Tick], dict[str, Any]]]] = [
            ("recover", self._recover), ("assign", self._assign), ("lifecycle", self._lifecycle),
            *[(name, _hook(fn)) for name, fn in self.hooks], ("dispatch", self._dispatch), ("metrics", self._refresh_metrics),
        ]
        for name, step in steps:
            try:
                tick.summary.update(step(tick))
            except NotLeader as e:
                self._lost_leadership(str(e))
                errors.append(f"{name}: {_one_line(e)}")
                tick.summary["leader"] = False
                break
            except Exception as e:
                errors.append(f"{name}: {_one_line(e)}")
                if self._after_error(name, e) is Service.DATABASE:
                    break  # later steps need the database too
        self._log_errors(errors)
        if tick.summary["leader"]:
            self.metrics.record_tick(time.monotonic() - t0, len(errors))
        return tick.summary

    def _lead(self) -> LeaderFence | None:
        """Take or renew the leader lease; log changes of role once."""
        st = self.settings
        fence = leader.acquire(self.url, self.owner, self.host, self.pid, st.scheduler_lease_seconds)
        if fence is not None:
            if self.fence is None or self.fence.term != fence.term:
                log.info("scheduler %s active (term %d)", self.owner, fence.term)
            self.fence, self._standby_seen = fence, None
            self.metrics.set_leader(True)
            return fence
        if self.fence is not None:
            log.warning("scheduler %s lost the leader lease (term %d)", self.owner, self.fence.term)
        self.fence = None
        self.metrics.set_leader(False)
        info = leader.current(self.url)
        active = f"{info.host} pid {info.pid}" if info is not None and info.active else "none"
        if active != self._standby_seen:
            log.info("scheduler %s standing by (active: %s)", self.owner, active)
            self._standby_seen = active
        return None

    def _lost_leadership(self, why: str) -> None:
        self.metrics.refused_writes += 1
        log.warning("scheduler %s: write refused, another scheduler took over (%s); standing by", self.owner, why)
        self.fence = None
        self.metrics.set_leader(False)

    def _still_leading(self, tick: _Tick) -> Callable[[], None]:
        """A check for right before messages leave: this scheduler still holds the lease it started the tick with.

        Messages are not SQL writes, so no fence guards them; renewing here narrows the window in which a
        scheduler frozen mid-tick could send after another took over (a duplicate would be harmless anyway:
        a chunk's claim is one atomic UPDATE).
        """
        def check() -> None:
            fence = leader.acquire(self.url, self.owner, self.host, self.pid, self.settings.scheduler_lease_seconds)
            if fence is None or fence.term != tick.fence.term:
                raise NotLeader(f"scheduler {self.owner} (term {tick.fence.term}) is no longer the active scheduler")

        return check

    # ------------------------------------------------------------------------------------------ steps

    def _recover(self, tick: _Tick) -> dict[str, Any]:
        if time.monotonic() < self._recover_after:
            return {"lost_workers": [], "requeued": 0}
        reaped = leases.reap(self.url, self.settings.heartbeat_timeout, tick.fence)
        if reaped.lost_workers:
            log.warning("worker(s) %s lost (no heartbeat for %.0fs)", ", ".join(reaped.lost_workers),
                        self.settings.heartbeat_timeout)
        if reaped.requeued:
            log.warning("re-queued %d chunk(s) of lost workers or with lapsed leases", reaped.requeued)
        return {"lost_workers": reaped.lost_workers, "requeued": reaped.requeued}

    def _assign(self, tick: _Tick) -> dict[str, Any]:
        catalog = self._catalog_now()
        tick.live = workers.live_workers(self.url, self.settings.heartbeat_timeout)
        tick.work = cluster.open_work(self.url)
        d = assign(tick.live, tick.work, fit_predicate(self.settings, catalog), self._remember_failures(tick.live))
        for name, ref in d.withdrawn:
            log.warning("worker %s failed to load %s; it will not be given %s again", name, ref, ref)
        workers.apply_assignments(self.url, d.changes, tick.fence)
        for name, old, new in d.moved:
            log.info("moving %s from %s to %s, which has work and no worker", name, old, new)
        if d.assigned:
            log.info("assigned %s", ", ".join(f"{ref} to {name}" for name, ref in d.assigned))
        failed: dict[str, list[str]] = {}
        for ref, message in d.fail.items():
            failed[ref] = batches.fail_model(self.url, ref, "model_load_failed", message, tick.fence)
            log.error("failed the queued chunks of %s (batches %s): %s", ref, ", ".join(failed[ref]) or "-", message)
        return {"assigned": [list(a) for a in d.assigned], "moved": [[n, new] for n, _old, new in d.moved],
                "failed_models": failed, "demand": {r: round(x.score, 1) for r, x in d.demand.items()}}

    def _remember_failures(self, live: list[WorkerInfo]) -> dict[str, dict[str, str]]:
        keys = {(w.name, w.instance) for w in live}
        self._load_failures = {k: v for k, v in self._load_failures.items() if k in keys}  # bounded by live workers
        for w in live:
            if w.load_failed_ref:
                self._load_failures.setdefault((w.name, w.instance), {})[w.load_failed_ref] = (
                    w.error or f"could not load {w.load_failed_ref}")
        return {name: refs for (name, _), refs in self._load_failures.items()}

    def _catalog_now(self) -> Catalog:
        try:
            self._catalog = load_catalog(self.settings)  # re-read each tick: models-file edits apply without restart
        except BatchLLMError:
            if self._catalog is None:
                raise
            log.warning("models file unreadable; keeping the catalog read before", exc_info=True)
        return self._catalog

    def _lifecycle(self, tick: _Tick) -> dict[str, Any]:
        expired = batches.expire_due(self.url, tick.fence)
        if expired:
            log.warning("batch(es) %s expired (past their completion window)", ", ".join(expired))
        return {"expired": expired, "finalized": batches.finalize_open(self.url, tick.fence)}

    def _dispatch(self, tick: _Tick) -> dict[str, Any]:
        if self.dispatcher is None:
            return {}
        live = tick.live if tick.live is not None else workers.live_workers(self.url, self.settings.heartbeat_timeout)
        work = tick.work if tick.work is not None else cluster.open_work(self.url)
        out = self.dispatcher.step(live, work, self._still_leading(tick))
        if self._catalog is not None:
            self.metrics.set_queue_depths(out.depths, self._catalog)
        return {"dispatched": len(out.fresh), "resent": len(out.resent), "queue_depths": out.depths}

    def _refresh_metrics(self, tick: _Tick) -> dict[str, Any]:
        started = time.monotonic()
        if self._metrics_at is not None and started - self._metrics_at < self._metrics_every_s and self.metrics.has_snapshot:
            return {}
        read = cluster.metrics(self.url, WORKER_FORGET_S, with_results=self.metrics.wants_results())
        self.metrics.update(read, self._catalog_now())
        self._metrics_at = started
        return {}

    # ------------------------------------------------------------------------------------------ the loop

    def run_forever(self, metrics_port: int | None = None) -> None:
        """Tick every ``scheduler_interval`` seconds until SIGTERM/SIGINT or ``stop()``; then resign the lease.

        Args:
            metrics_port: serve ``/metrics`` on ``settings.metrics_address`` and this port (None: no server).
        """
        if metrics_port is not None:
            port = self.metrics.serve(metrics_port, self.settings.metrics_address)
            log.info("metrics on http://%s:%d/metrics", self.settings.metrics_address, port)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        log.info("scheduler %s ticking every %.1fs", self.owner, self.settings.scheduler_interval)
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    self.tick()
                except Exception:  # tick() already guards each step; this is the last line of defence
                    log.exception("scheduler tick failed")
                self._stop.wait(max(0.0, self.settings.scheduler_interval - (time.monotonic() - started)))
        finally:
            self.resign()

    def stop(self) -> None:
        """Ask ``run_forever`` to return after the current tick."""
        self._stop.set()

    def resign(self) -> None:
        """Give the lease up now (a clean shutdown), so a standby takes over on its next tick."""
        if self.fence is None:
            return
        try:
            leader.resign(self.url, self.fence)
            log.info("scheduler %s resigned (term %d)", self.owner, self.fence.term)
        except Exception as e:  # the database is down: the lease simply lapses
            log.warning("scheduler %s could not resign: %s", self.owner, _one_line(e))
        self.fence = None
        self.metrics.set_leader(False)

    # ------------------------------------------------------------------------------------------ errors

    def _after_error(self, step: str, e: Exception) -> Service | None:
        service = outage_of(e)
        if service is Service.DATABASE:
            # Workers could not heartbeat either: give them a heartbeat timeout to reappear before they are
            # declared lost and their work runs again.
            self._recover_after = time.monotonic() + self.settings.heartbeat_timeout
        elif service is None and not isinstance(e, BatchLLMError):
            log.exception("scheduler step %s failed", step)  # a bug, not an outage: keep the trace
        return service

    def _log_errors(self, errors: list[str]) -> None:
        # The same outage is one line a minute, whichever step met it first.
        key, (last, at) = "; ".join(sorted({e.split(": ", 1)[-1] for e in errors})), self._last_log
        if not errors and last:
            log.warning("scheduler tick: all steps succeed again")
        if key != last or (errors and time.monotonic() - at >= LOG_REPEAT_S):
            if errors:
                log.warning("scheduler tick: %s (will retry)", "; ".join(errors))
            self._last_log = (key, time.monotonic())


def _hook(fn: HookFn) -> Callable[[_Tick], dict[str, Any]]:
    return lambda tick: fn(tick.fence)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return mask_url(f"{type(e).__name__}: {text}" if not isinstance(e, BatchLLMError) else text)[:300]
