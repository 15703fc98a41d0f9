"""The scheduler loop: places models on workers by demand, recovers lost work, ends batches, fires schedules.

``tick()`` is one pass; ``run_forever()`` repeats it every ``settings.scheduler_interval`` seconds and serves
Prometheus metrics. Each tick, in order:

1. **recover** - workers whose heartbeat lapsed are marked ``lost`` and their leases released; expired leases
   are reaped. Both leave the chunk ``queued`` with no message, so step 5 sends it again.
2. **assign** - demand per ``model@variant`` (queued + leased requests weighted by priority and age) goes to
   idle workers that fit it, smallest fitting worker first. A loaded worker moves only to a model with work
   and no worker, and only if its own queue is empty or its model keeps another worker. A worker that failed
   to load a model is not given it again; if nobody else can host it, its queued chunks fail with the message.
3. **lifecycle** - batches past ``expires_at`` expire; in-progress and cancelling batches are finalized.
4. **schedules** - recurring runs fire and finished ones are exported (``batchllm.scheduler.schedules``).
5. **dispatch** - queued chunks without a message are sent, most urgent then oldest first; chunks whose
   message looks lost (sent over ``RESEND_AFTER_S`` ago, Redis short of messages) are sent again.
   Duplicates are harmless: a worker's claim is one atomic UPDATE.
6. **metrics** - the Prometheus snapshot is refreshed.

Priority needs no holding back: kombu's Redis transport keeps a list per priority and pops the most urgent
first (measured in ``tests/test_scheduler.py``). An outage fails the steps that need the service, the tick
logs one line and the next tick reconnects; the loop never dies of an outage.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisDown
from redis.exceptions import TimeoutError as RedisTimeout
from sqlalchemy import case, func, select, update
from sqlalchemy.exc import InterfaceError, OperationalError

from batchllm.catalog import Catalog, load_catalog
from batchllm.errors import BatchLLMError, ServiceUnavailable, mask_url
from batchllm.queue import (
    ChunkMessage,
    broker_run_id,
    check_broker,
    dispatch,
    mark_scheduler_alive,
    queue_depths,
    queue_name,
)
from batchllm.scheduler import schedules
from batchllm.scheduler.metrics import SchedulerMetrics
from batchllm.scheduler.placement import fits_ref, row_capacity
from batchllm.settings import Settings
from batchllm.status import BatchStatus, ChunkStatus, WorkerState
from batchllm.store import batches as batch_rows
from batchllm.store import leases
from batchllm.store import workers as worker_rows
from batchllm.store.db import session_scope
from batchllm.store.models import Batch, Chunk, Worker

log = logging.getLogger(__name__)

LOST = "lost"  # a worker whose heartbeat lapsed (not a WorkerState: the worker never says it of itself)
RESEND_AFTER_S = 60.0  # a message younger than this is surely still in Redis or with a worker
SUBMIT_GRACE_S = 1.0  # `batchllm submit` sends its first chunks right after commit (a duplicate is harmless)
DISPATCH_AHEAD = 4  # messages kept waiting in Redis per worker serving a queue; the rest wait in SQL
AGE_WEIGHT_S = 600.0  # a chunk waiting this long counts double, so old low-priority work is not starved
LOG_REPEAT_S = 60.0  # the same outage is logged again at most this often
_LOAD_ERROR = re.compile(r"^could not load (\S+?): ")  # what worker.main writes to its row on a failed load
# A database or broker outage is logged in one line; anything else is a bug and logged with its trace.
_OUTAGES = (BatchLLMError, OperationalError, InterfaceError, KombuOperationalError, RedisDown, RedisTimeout, OSError)
_IDLE_STATES = {WorkerState.IDLE, WorkerState.ERROR, WorkerState.STARTING}
_MOVABLE_STATES = {WorkerState.READY, WorkerState.BUSY}


@dataclass
class Demand:
    """Open work of one model ref."""

    queued: int = 0  # chunks waiting for a worker
    score: float = 0.0  # requests x (1 + priority) x (1 + age / AGE_WEIGHT_S)


class Scheduler:
    """The cluster's one scheduler process.

    Args:
        settings: settings (database, broker, timing, metrics port).
        app: Celery app to send messages with; None skips the Redis steps (store-only tests).
        metrics: where metrics go (a fresh registry by default).
    """

    def __init__(self, settings: Settings, app: Celery | None, metrics: SchedulerMetrics | None = None) -> None:
        self.settings = settings
        self.app = app
        self.metrics = metrics or SchedulerMetrics()
        self.url = settings.database_url
        self._catalog: Catalog | None = None
        # (worker, pid, ref) → the worker's message. Keyed by pid so a worker restarted by hand gets a new chance.
        self._load_failures: dict[tuple[str, int | None, str], str] = {}
        self._stop = threading.Event()
        self._last_log: tuple[str, float] = ("", 0.0)
        self._recover_after = 0.0
        self._broker_run_id: str | None = None

    def tick(self) -> dict[str, Any]:
        """One pass (see the module docstring); returns what it did, with ``errors`` for failed steps."""
        t0 = time.monotonic()
        now = time.time()
        summary: dict[str, Any] = {"errors": []}
        steps: list[tuple[str, Callable[[float], dict[str, Any]]]] = [
            ("recover", self._recover), ("assign", self._assign), ("lifecycle", self._lifecycle),
            ("schedules", lambda t: schedules.run_due(self.settings, t)), ("dispatch", self._dispatch),
            ("metrics", self._refresh_metrics),
        ]
        for name, step in steps:
            try:
                summary.update(step(now))
            except Exception as e:
                summary["errors"].append(f"{name}: {_one_line(e)}")
                if self._is_db_outage(e):
                    # Workers could not heartbeat either: give them a heartbeat timeout to reappear before
                    # they are declared lost and their work re-run. Later steps need the database too.
                    self._recover_after = time.time() + self.settings.heartbeat_timeout
                    break
                if not isinstance(e, _OUTAGES):
                    log.exception("scheduler step %s failed", name)
        self._log_errors(summary["errors"])
        self.metrics.record_tick(time.monotonic() - t0, len(summary["errors"]))
        return summary

    def run_forever(self, metrics_port: int | None = None) -> None:
        """Tick every ``scheduler_interval`` seconds until SIGTERM/SIGINT or ``stop()``; serve metrics if a port is given."""
        if metrics_port:
            port = self.metrics.serve(metrics_port)
            log.info("metrics on http://0.0.0.0:%d/metrics", port)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        log.info("scheduler running every %.1fs", self.settings.scheduler_interval)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception:  # tick() already guards each step; this is the last line of defence
                log.exception("scheduler tick failed")
            self._stop.wait(max(0.0, self.settings.scheduler_interval - (time.monotonic() - started)))

    def stop(self) -> None:
        """Ask ``run_forever`` to return after the current tick."""
        self._stop.set()

    def _recover(self, now: float) -> dict[str, Any]:
        if now < self._recover_after:
            return {"lost_workers": [], "released": 0, "reaped": 0}
        cutoff = now - self.settings.heartbeat_timeout
        with session_scope(self.url) as s:
            lost = list(s.scalars(select(Worker.name).where(Worker.last_heartbeat < cutoff,
                                                            Worker.state.not_in([WorkerState.STOPPED, LOST]))))
            if lost:  # conditional on the stale heartbeat, so a worker that just came back keeps its state
                s.execute(update(Worker).where(Worker.name.in_(lost), Worker.last_heartbeat < cutoff).values(state=LOST))
            live = {w.name for w in worker_rows.live_workers(s, self.settings.heartbeat_timeout)}
            owners = s.scalars(select(Chunk.lease_owner).where(Chunk.status == ChunkStatus.LEASED).distinct())
            released = [ck.id for owner in list(owners) if owner and owner not in live for ck in leases.release_owner(s, owner)]
            reaped = [ck.id for ck in leases.reap_expired(s)]
        if lost:
            log.warning("worker(s) %s lost (no heartbeat for %.0fs)", ", ".join(lost), self.settings.heartbeat_timeout)
        if released or reaped:
            log.warning("re-queued %d chunk(s) of lost workers and %d with expired leases", len(released), len(reaped))
        return {"lost_workers": lost, "released": len(released), "reaped": len(reaped)}

    def _catalog_now(self) -> Catalog:
        try:
            self._catalog = load_catalog(self.settings)  # re-read each tick: models-file edits apply without restart
        except BatchLLMError:
            if self._catalog is None:
                raise
            log.warning("models file unreadable; keeping the catalog read before", exc_info=True)
        return self._catalog

    def _assign(self, now: float) -> dict[str, Any]:
        catalog = self._catalog_now()
        fit_cache: dict[tuple[str, str], bool] = {}

        def fits(w: Worker, ref: str) -> bool:
            key = (w.name, ref)
            if key not in fit_cache:
                try:
                    fit_cache[key] = fits_ref(self.settings, catalog, ref, row_capacity(w)).fits
                except (BatchLLMError, ValueError):  # a ref the catalog no longer knows, a malformed row
                    fit_cache[key] = False
            return fit_cache[key]

        assigned: list[list[str]] = []
        moved: list[list[str]] = []
        failed: dict[str, int] = {}
        with session_scope(self.url) as s:
            live = worker_rows.live_workers(s, self.settings.heartbeat_timeout)
            demand = self._demand(s, now)
            self._note_failures(live)

            def ok(w: Worker, ref: str) -> bool:
                return ref not in self._failed_refs(w) and fits(w, ref)

            serving: dict[str, list[Worker]] = {}
            idle: list[Worker] = []
            for w in live:
                if not w.pinned and w.assigned_model and w.assigned_model in self._failed_refs(w):
                    worker_rows.assign(s, w.name, None)  # it failed to load this: don't let it retry forever
                    w.assigned_model = None
                ref = w.model if w.pinned else (w.assigned_model or w.model)
                if ref and w.state != WorkerState.ERROR:
                    serving.setdefault(ref, []).append(w)
                elif not w.pinned and not w.model and not w.assigned_model and w.state in _IDLE_STATES:
                    idle.append(w)

            def give(w: Worker, ref: str) -> None:
                worker_rows.assign(s, w.name, ref)
                serving.setdefault(ref, []).append(w)

            # Idle workers: the ref with most unserved demand first (refs nobody serves before extra workers
            # for served ones); for it the smallest idle worker that fits, so big workers stay free for big models.
            while idle:
                best: tuple[tuple[bool, float], str, list[Worker]] | None = None
                for ref, d in demand.items():
                    n = len(serving.get(ref, []))
                    cands = [w for w in idle if ok(w, ref)] if d.queued > n else []
                    key = (n == 0, d.score / (n + 1))
                    if cands and (best is None or key > best[0]):
                        best = (key, ref, cands)
                if best is None:
                    break
                w, ref = min(best[2], key=_size_key), best[1]
                give(w, ref)
                idle.remove(w)
                assigned.append([w.name, ref])

            # A loaded worker moves to a ref that has work and no worker when its own queue is empty, or when
            # its model keeps another worker (so no model with work is left unserved); empty queues first.
            def current(w: Worker) -> str:
                return w.assigned_model or w.model or ""

            def can_move(w: Worker, ref: str) -> bool:
                cur, mates = current(w), serving.get(current(w), [])
                movable = not w.pinned and w.state in _MOVABLE_STATES and cur not in ("", ref) and w in mates
                return movable and (demand.get(cur, Demand()).queued == 0 or len(mates) > 1) and ok(w, ref)

            uncovered = sorted((r for r, d in demand.items() if d.queued and not serving.get(r)), key=lambda r: -demand[r].score)
            for ref in uncovered:
                movable = [w for w in live if can_move(w, ref)]
                if movable:
                    w = min(movable, key=lambda w: (demand.get(current(w), Demand()).queued > 0, *_size_key(w)))
                    old = current(w)
                    serving[old].remove(w)
                    give(w, ref)
                    moved.append([w.name, ref])
                    log.info("moving %s from %s to %s, which has work and no worker", w.name, old, ref)

            # A ref that failed to load on every live worker able to host it: fail its queued chunks, don't wait forever.
            live_names = {w.name for w in live}
            for ref, d in demand.items():
                msgs = [m for (name, _pid, r), m in self._load_failures.items() if r == ref and name in live_names]
                hostable = any(ok(w, ref) for w in live if not w.pinned or w.model == ref)
                if not d.queued or not msgs or serving.get(ref) or hostable:
                    continue
                message = f"no worker could load {ref} ({msgs[0]})"
                touched = batch_rows.fail_chunks(s, ref, "model_load_failed", message)
                s.flush()
                for batch_id in touched:
                    batch_rows.maybe_finalize(s, batch_id)
                failed[ref] = d.queued
                log.error("failed %d queued chunk(s) of %s: %s", d.queued, ref, message)
        if assigned:
            log.info("assigned %s", ", ".join(f"{ref} to {name}" for name, ref in assigned))
        return {"assigned": assigned, "moved": moved, "failed_chunks": failed,
                "demand": {r: round(d.score, 1) for r, d in demand.items()}}

    def _demand(self, s: Any, now: float) -> dict[str, Demand]:
        """Open work per model ref of in-progress batches, aggregated in SQL (one row per ref/status/priority)."""
        rows = s.execute(
            select(Chunk.model, Chunk.status, Chunk.priority, func.count(), func.sum(Chunk.size), func.min(Chunk.created_at))
            .join(Batch, Batch.id == Chunk.batch_id)
            .where(Chunk.status.in_([ChunkStatus.QUEUED, ChunkStatus.LEASED]), Batch.status == BatchStatus.IN_PROGRESS)
            .group_by(Chunk.model, Chunk.status, Chunk.priority)
        ).all()
        out: dict[str, Demand] = {}
        for ref, status, priority, n, size, oldest in rows:
            d = out.setdefault(ref, Demand())
            d.queued += int(n) if status == ChunkStatus.QUEUED else 0
            d.score += int(size or 0) * (1 + (priority or 0)) * (1 + max(0.0, now - (oldest or now)) / AGE_WEIGHT_S)
        return out

    def _note_failures(self, live: list[Worker]) -> None:
        for w in live:
            m = _LOAD_ERROR.match(w.error or "") if w.state == WorkerState.ERROR else None
            if m and (w.name, w.pid, m[1]) not in self._load_failures:
                self._load_failures[(w.name, w.pid, m[1])] = f"{w.name}: {(w.error or '')[m.end():]}"
                log.warning("worker %s failed to load %s; it will not be given %s again", w.name, m[1], m[1])

    def _failed_refs(self, w: Worker) -> set[str]:
        return {ref for (name, pid, ref) in self._load_failures if name == w.name and pid == w.pid}

    def _lifecycle(self, now: float) -> dict[str, Any]:
        open_ = [BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS]
        active = [BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING, BatchStatus.FINALIZING]
        with session_scope(self.url) as s:
            late = list(s.scalars(select(Batch.id).where(Batch.status.in_(open_), Batch.expires_at < now)))
            expired = [b for b in late if batch_rows.expire(s, b)]
            s.flush()
            active_ids = s.scalars(select(Batch.id).where(Batch.status.in_(active))).all()
            finalized = {b: str(new) for b in active_ids if (new := batch_rows.maybe_finalize(s, b))}
        if expired:
            log.warning("batch(es) %s expired (past their completion window)", ", ".join(expired))
        return {"expired": expired, "finalized": finalized}

    def _dispatch(self, now: float) -> dict[str, Any]:
        if self.app is None:
            return {}
        check_broker(self.app)  # fails in well under a second when Redis is down; a read would retry for longer
        mark_scheduler_alive(self.app, ttl=max(10.0, 5 * self.settings.scheduler_interval))
        open_batch = (Chunk.status == ChunkStatus.QUEUED, Batch.status == BatchStatus.IN_PROGRESS)
        # A Redis that restarted (new run_id) kept nothing: every message sent before is gone, resend at once.
        run_id = broker_run_id(self.app)
        restarted = self._broker_run_id is not None and run_id != self._broker_run_id
        self._broker_run_id = run_id
        stale_before = now if restarted else now - RESEND_AFTER_S
        with session_scope(self.url) as s:
            refs = set(s.scalars(select(Chunk.model).where(Chunk.status == ChunkStatus.QUEUED).distinct()))
            live = worker_rows.live_workers(s, self.settings.heartbeat_timeout)
        serving = {r: sum(1 for w in live if w.model == r) for r in refs | {w.model for w in live if w.model}}
        queues = {queue_name(r): r for r in serving}
        # Redis before the store: a message popped by a worker in between then looks present, not lost.
        depths = queue_depths(self.app, list(queues))
        by_ref = {queues[q]: n for q, n in depths.items()}
        with session_scope(self.url) as s:
            # Priority first; then by chunk number, which interleaves batches of equal priority (A1 B1 A2 B2 …)
            # so they share the workers instead of queueing one behind the other.
            unsent = list(s.scalars(
                select(Chunk).join(Batch, Batch.id == Chunk.batch_id)
                .where(*open_batch, Chunk.dispatched_at.is_(None), Batch.started_at < now - SUBMIT_GRACE_S)
                .order_by(Chunk.priority.desc(), Chunk.seq, Chunk.created_at)
            ))
            waiting = s.execute(
                select(Chunk.queue, Chunk.model, func.count(), func.sum(case((Chunk.dispatched_at < stale_before, 1), else_=0)))
                .join(Batch, Batch.id == Chunk.batch_id)
                .where(*open_batch, Chunk.dispatched_at.is_not(None))
                .group_by(Chunk.queue, Chunk.model)
            ).all()
            lost = [q for q, ref, n, stale in waiting
                    if restarted or (stale and _looks_lost(depths.get(q, 0), int(n), serving.get(ref, 0)))]
            resend = list(s.scalars(
                select(Chunk).join(Batch, Batch.id == Chunk.batch_id)
                .where(*open_batch, Chunk.queue.in_(lost), Chunk.dispatched_at < stale_before)
                .order_by(Chunk.priority.desc(), Chunk.created_at, Chunk.seq)
            )) if lost else []
        fresh = _meter(unsent, depths, serving)
        todo = fresh + resend
        if todo:
            dispatch(self.app, [(_message(c), c.queue, c.priority) for c in todo])
            with session_scope(self.url) as s:
                leases.mark_dispatched(s, [c.id for c in todo])
            for c in todo:  # the depth read above predates these messages
                by_ref[c.model] = by_ref.get(c.model, 0) + 1
        self.metrics.set_queue_depths(by_ref)
        if resend:
            log.warning("re-sent %d chunk message(s) that Redis no longer holds (queues %s)", len(resend), ", ".join(lost))
        return {"dispatched": len(fresh), "resent": len(resend), "queue_depths": by_ref}

    def _refresh_metrics(self, now: float) -> dict[str, Any]:
        with session_scope(self.url) as s:
            self.metrics.refresh(s, now)
        return {}

    def _is_db_outage(self, e: BaseException) -> bool:
        if isinstance(e, ServiceUnavailable):
            return e.url == mask_url(self.url)
        return isinstance(e, OperationalError | InterfaceError)

    def _log_errors(self, errors: list[str]) -> None:
        # The same outage is one line a minute, whichever step met it first (recovery is paused after one).
        key, (last, at) = "; ".join(sorted({e.split(": ", 1)[-1] for e in errors})), self._last_log
        if not errors and last:
            log.warning("scheduler tick: all steps succeed again")
        if key != last or (errors and time.monotonic() - at >= LOG_REPEAT_S):
            if errors:
                log.warning("scheduler tick: %s (will retry)", "; ".join(errors))
            self._last_log = (key, time.monotonic())


def _meter(unsent: list[Chunk], depths: dict[str, int], serving: dict[str, int]) -> list[Chunk]:
    """Keep about ``DISPATCH_AHEAD`` messages per serving worker in each queue; later chunks wait in SQL.

    Holding the backlog in SQL, not Redis, is what lets a later priority-9 batch or a second batch of
    equal priority get the next free worker.
    """
    room: dict[str, int] = {}
    out = []
    for c in unsent:
        if c.queue not in room:
            room[c.queue] = max(0, DISPATCH_AHEAD * max(1, serving.get(c.model, 0)) - depths.get(c.queue, 0))
        if room[c.queue] > 0:
            out.append(c)
            room[c.queue] -= 1
    return out


def _looks_lost(depth: int, waiting: int, workers: int) -> bool:
    """Whether some waiting chunks' messages are missing from Redis.

    An empty queue while chunks wait means lost messages (e.g. Redis restarted without persistence).
    Otherwise fewer messages than waiting chunks, beyond the one each serving worker may have popped and
    not yet claimed, means some are missing. Re-sending is cheap, but not free for deep queues.
    """
    return depth == 0 or depth + workers < waiting


def _message(c: Chunk) -> ChunkMessage:
    return ChunkMessage(chunk_id=c.id, batch_id=c.batch_id, model=c.model, size=c.size)


def _size_key(w: Worker) -> tuple[int, str]:
    return (row_capacity(w).capacity_bytes, w.name)  # only called on workers that passed the fit check


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return mask_url(f"{type(e).__name__}: {text}" if not isinstance(e, BatchLLMError) else text)[:300]

