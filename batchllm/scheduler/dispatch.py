"""The dispatch step: meter queued chunks out of SQL into Redis, and re-send messages Redis lost.

The backlog waits in SQL, not Redis: each model queue holds about ``ahead`` messages per worker serving
it, so a priority-9 batch submitted later, or a second batch of equal priority, gets the next free worker
(``store.dispatch.unsent`` orders by priority, then by chunk number, which interleaves batches A1 B1 A2 B2).

A message is presumed lost when its chunk is still queued long after it was sent and Redis holds fewer
messages than such chunks (``looks_lost``); a Redis that restarted (new ``run_id``) kept nothing, so
everything it held is sent again at once. A chunk whose message arrives twice runs once: a worker's claim
is one atomic UPDATE. All times are the database's (``dispatched_at``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from celery import Celery

from batchllm.queue import dispatch, queue_name, read_broker
from batchllm.status import ChunkStatus
from batchllm.store import dispatch as store_dispatch
from batchllm.store.cluster import OpenWork
from batchllm.store.dispatch import ChunkRef
from batchllm.store.workers import WorkerInfo

log = logging.getLogger(__name__)

RESEND_AFTER_S = 60.0  # a message younger than this is surely still in Redis or with a worker
SUBMIT_GRACE_S = 1.0  # `batchllm submit` sends its first chunks right after its commit
DISPATCH_AHEAD = 4  # messages kept waiting in Redis per worker serving a queue; the rest wait in SQL


@dataclass
class Dispatched:
    """What one dispatch step did."""

    fresh: list[ChunkRef] = field(default_factory=list)
    resent: list[ChunkRef] = field(default_factory=list)
    lost_queues: list[str] = field(default_factory=list)
    depths: dict[str, int] = field(default_factory=dict)  # model ref → messages in Redis, after sending
    broker_restarted: bool = False


class Dispatcher:
    """Meters chunks into Redis for one scheduler; remembers Redis's ``run_id`` across ticks.

    Args:
        url: database URL.
        app: Celery app that sends.
        ahead: messages kept in each queue per serving worker.
        grace_s: a batch younger than this is left to its submit, which sends its first chunks itself.
        resend_after_s: a message is presumed lost only after this long.
    """

    def __init__(self, url: str, app: Celery, ahead: int = DISPATCH_AHEAD, grace_s: float = SUBMIT_GRACE_S,
                 resend_after_s: float = RESEND_AFTER_S) -> None:
        self.url = url
        self.app = app
        self.ahead = ahead
        self.grace_s = grace_s
        self.resend_after_s = resend_after_s
        self._run_id: str | None = None

    def step(self, live: Sequence[WorkerInfo], work: Iterable[OpenWork], before_send: Callable[[], None]) -> Dispatched:
        """One pass: read Redis and SQL, send what is due, record it.

        Args:
            live: live workers (a queue's room grows with the workers that have its model loaded).
            work: open work per ref (``store.cluster.open_work``): whose queues to read, and which have chunks waiting.
            before_send: called right before anything is sent (the scheduler checks it still leads).

        Raises:
            ServiceUnavailable: Redis or the database is down (nothing is recorded as sent).
            NotLeader: from ``before_send``.
        """
        serving: dict[str, int] = {}
        for w in live:
            if w.model:
                serving[w.model] = serving.get(w.model, 0) + 1
        work = list(work)
        queued = {w.model for w in work if w.status == ChunkStatus.QUEUED}
        queues = {queue_name(r): r for r in {*(w.model for w in work), *serving}}
        # Redis before the store: a message popped by a worker in between then looks present, not lost.
        seen = read_broker(self.app, list(queues))  # fails in well under a second when Redis is down
        run_id, depths = seen.run_id, seen.depths
        restarted = self._run_id is not None and run_id != self._run_id
        stale_after = 0.0 if restarted else self.resend_after_s
        out = Dispatched(broker_restarted=restarted)
        # Reading the unsent chunks is the step's heaviest query: skip it while every queue with waiting work is full.
        full = all(self.ahead * max(1, serving.get(r, 0)) <= depths.get(queue_name(r), 0) for r in queued)
        unsent = [] if full else store_dispatch.unsent(self.url, self.grace_s)
        backlog = store_dispatch.backlog(self.url, stale_after)
        out.lost_queues = sorted(
            b.queue for b in backlog
            if restarted or (b.stale and looks_lost(depths.get(b.queue, 0), b.waiting, serving.get(b.model, 0)))
        )
        out.resent = store_dispatch.to_resend(self.url, out.lost_queues, stale_after) if out.lost_queues else []
        out.fresh = meter(unsent, depths, serving, self.ahead)
        todo = out.fresh + out.resent
        if todo:
            before_send()
            dispatch(self.app, todo)
            store_dispatch.mark_sent(self.url, [c.id for c in todo])
            for c in todo:  # the depth read above predates these messages
                depths[c.queue] = depths.get(c.queue, 0) + 1
        # Only now: if sending failed, the next tick still knows Redis restarted and resends everything.
        self._run_id = run_id
        out.depths = {queues[q]: n for q, n in depths.items() if q in queues}
        if out.resent:
            log.warning("re-sent %d chunk message(s) that Redis no longer holds (queues %s)%s", len(out.resent),
                        ", ".join(out.lost_queues), "; Redis restarted" if restarted else "")
        return out


def meter(unsent: Sequence[ChunkRef], depths: dict[str, int], serving: dict[str, int], ahead: int) -> list[ChunkRef]:
    """Keep about ``ahead`` messages per serving worker in each queue (at least ``ahead``); the rest wait in SQL.

    ``unsent`` is in dispatch order (most urgent first), so what fits in each queue's room is what goes.
    """
    room: dict[str, int] = {}
    out = []
    for c in unsent:
        if c.queue not in room:
            room[c.queue] = max(0, ahead * max(1, serving.get(c.model, 0)) - depths.get(c.queue, 0))
        if room[c.queue] > 0:
            out.append(c)
            room[c.queue] -= 1
    return out


def looks_lost(depth: int, waiting: int, workers: int) -> bool:
    """Whether some waiting chunks' messages are missing from Redis.

    An empty queue while chunks wait means lost messages (e.g. Redis restarted without persistence).
    Otherwise fewer messages than waiting chunks, beyond the one each serving worker may have popped and
    not yet claimed, means some are missing. Re-sending is cheap, but not free for deep queues.
    """
    return depth == 0 or depth + workers < waiting
