"""The queue contract between submitters, the scheduler and workers (Celery over Redis, JSON only).

A message carries a chunk id, never prompts: the store is the source of truth. Each ``model@variant``
has its own queue, so a worker only ever receives work for the model it has loaded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from celery import Celery
from pydantic import BaseModel, Field

from batchllm.errors import ServiceUnavailable
from batchllm.outages import Service, outage_of
from batchllm.settings import Settings
from batchllm.store.dispatch import ChunkRef

log = logging.getLogger(__name__)

RUN_CHUNK = "batchllm.run_chunk"
QUEUE_PREFIX = "batchllm."


class ChunkMessage(BaseModel):
    """Arguments of the ``batchllm.run_chunk`` task (validated again on the worker)."""

    chunk_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    batch_id: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=200)
    size: int = Field(ge=0)


def queue_name(model_ref: str) -> str:
    """The Celery queue of a resolved model reference ``name@variant``."""
    return QUEUE_PREFIX + re.sub(r"[^A-Za-z0-9@._\-]", "_", model_ref)


def celery_priority(priority: int) -> int:
    """Map our priority (9 = most urgent) onto kombu's Redis priority (0 = served first)."""
    return 9 - max(0, min(9, priority))


def make_celery(settings: Settings, broker_url: str | None = None) -> Celery:
    """Build the Celery app with the reliability settings every batchllm process shares.

    Args:
        settings: the settings (broker URL, visibility timeout).
        broker_url: override, e.g. ``memory://`` for the embedded mode.
    """
    url = broker_url or settings.broker_url
    if url.rstrip("/") == "memory:":
        url = "memory://localhost/"  # kombu warns about a missing hostname otherwise
    app = Celery("batchllm", broker=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],  # never pickle
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,  # a killed worker's message comes back
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE_PREFIX + "default",
        task_create_missing_queues=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            # Our leases recover a dead worker's chunk in seconds; this only has to outlive the longest chunk.
            "visibility_timeout": settings.visibility_timeout,
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),
            "sep": ":",
        },
        broker_heartbeat=0,
    )
    return app


@lru_cache(maxsize=4)
def _producer_app(url: str, visibility_timeout: int) -> Celery:
    return make_celery(Settings(broker_url=url, visibility_timeout=visibility_timeout))


def producer(settings: Settings) -> Celery:
    """A cached Celery app for sending messages (submit, scheduler)."""
    return _producer_app(settings.broker_url, settings.visibility_timeout)


@contextmanager
def _broker_connection(app: Celery, *, write: bool = False) -> Iterator[Any]:
    """A broker connection that fails fast; a broker outage in the block becomes ``ServiceUnavailable``."""
    url = str(app.conf.broker_url)
    try:
        with app.connection_for_write() if write else app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0.2, interval_step=0.2, timeout=3)
            yield conn
    except Exception as e:
        if outage_of(e) is not Service.BROKER:
            raise
        raise ServiceUnavailable("Redis", url, type(e).__name__) from e


def check_broker(app: Celery) -> None:
    """Connect to the broker once, quickly; raise ``ServiceUnavailable`` (exit 5) naming the URL."""
    if str(app.conf.broker_url).startswith("memory:"):
        return
    with _broker_connection(app, write=True):
        pass


_PIPELINE_GROUP = 500  # messages per Redis round trip


def message(ref: ChunkRef) -> ChunkMessage:
    """The ``run_chunk`` arguments of a chunk (the one place they are built)."""
    return ChunkMessage(chunk_id=ref.id, batch_id=ref.batch_id, model=ref.model, size=ref.size)


def _send(app: Celery, prod: Any, ref: ChunkRef, **options: Any) -> None:
    """Build and publish one ``run_chunk`` task with Celery (task-sent events for Flower included)."""
    kwargs = message(ref).model_dump()
    app.send_task(
        RUN_CHUNK,
        kwargs=kwargs,
        queue=ref.queue,
        routing_key=ref.queue,
        priority=celery_priority(ref.priority),
        producer=prod,
        argsrepr="()",
        kwargsrepr=repr(kwargs),
        # Flower shows this name; batch, chunk and size are in the kwargs. One name per model keeps
        # Flower's per-task-name metrics bounded on a cluster that runs millions of chunks.
        shadow=f"run_chunk[{ref.model}]",
        **options,
    )


def _dispatch_one_by_one(app: Celery, refs: Iterable[ChunkRef]) -> None:
    """Send messages one at a time with Celery's publish retries; outages become ``ServiceUnavailable``."""
    retry_policy = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}
    try:
        with app.producer_or_acquire() as prod:
            for ref in refs:
                _send(app, prod, ref, retry=True, retry_policy=retry_policy)
    except Exception as e:
        if outage_of(e) is Service.BROKER:
            raise ServiceUnavailable("Redis", str(app.conf.broker_url), type(e).__name__) from e
        raise


def dispatch(app: Celery, refs: Sequence[ChunkRef]) -> int:
    """Send one ``run_chunk`` task per chunk, ``_PIPELINE_GROUP`` messages per Redis round trip.

    kombu's publish batch (a Redis pipeline) buffers the commands, so a 15,000-chunk batch costs ~30 round
    trips instead of ~30,000. A group whose pipeline fails on a connection error is sent again one message
    at a time with retries; a chunk whose message arrives twice is run once (the lease decides), so
    resending a group whose delivery is uncertain is safe.

    Returns:
        How many messages were sent.

    Raises:
        ServiceUnavailable: Redis stays unreachable.
    """
    declared: set[str] = set()
    for start in range(0, len(refs), _PIPELINE_GROUP):
        group = refs[start : start + _PIPELINE_GROUP]
        try:
            with app.producer_or_acquire() as prod, prod.batch(4 * len(group) + 16):
                for ref in group:
                    if ref.queue not in declared:  # declare each queue once, not once per message
                        prod.maybe_declare(app.amqp.queues[ref.queue])
                        declared.add(ref.queue)
                    _send(app, prod, ref, retry=False, declare=[])
        except Exception as e:
            if outage_of(e) is not Service.BROKER:
                raise
            log.warning("pipelined dispatch failed (%s); sending %d messages one by one", type(e).__name__, len(group))
            declared.clear()
            _dispatch_one_by_one(app, group)
    return len(refs)


def _depth_keys(queue: str) -> list[str]:
    """The Redis lists of a queue: kombu keeps one per priority step (``sep`` is ``:`` in ``make_celery``)."""
    return [queue] + [f"{queue}:{p}" for p in range(1, 10)]


@dataclass(frozen=True)
class BrokerView:
    """What the scheduler reads from Redis each tick."""

    run_id: str | None  # changes when the server restarts (and, without persistence, forgets every message)
    depths: dict[str, int]  # queue name → messages waiting


def read_broker(app: Celery, queues: Iterable[str]) -> BrokerView:
    """Redis's run_id and the depth of each queue: one connection, failing fast like ``check_broker``, and one
    pipelined round trip (a tick used to open three connections and make ten LLEN round trips per queue).

    Raises:
        ServiceUnavailable: Redis is down (naming the masked URL).
    """
    url, names = str(app.conf.broker_url), list(queues)
    if url.startswith("memory:"):
        return BrokerView(None, _memory_depths(app, names))
    with _broker_connection(app) as conn:
        pipe = conn.default_channel.client.pipeline(transaction=False)
        pipe.info("server")
        for q in names:
            for key in _depth_keys(q):
                pipe.llen(key)
        replies = pipe.execute()
    lens = [int(x) for x in replies[1:]]
    depths = {q: sum(lens[10 * i : 10 * i + 10]) for i, q in enumerate(names)}
    return BrokerView(str(replies[0].get("run_id")), depths)


def queue_depths(app: Celery, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting per queue (Redis: the priority sub-queues, via ``read_broker``; memory: its own count)."""
    if not str(app.conf.broker_url).startswith("memory:"):
        return read_broker(app, queues).depths
    return _memory_depths(app, queues)


def _memory_depths(app: Celery, queues: Iterable[str]) -> dict[str, int]:
    with app.connection_for_read() as conn:
        channel: Any = conn.default_channel
        return {q: int(channel._size(q)) for q in queues}
