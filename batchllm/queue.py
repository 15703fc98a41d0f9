"""The queue contract between submitters, the scheduler and workers (Celery over Redis, JSON only).

A message carries a chunk id, never prompts: the store is the source of truth. Each ``model@variant``
has its own queue, so a worker only ever receives work for the model it has loaded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from celery import Celery
from pydantic import BaseModel, Field

from batchllm.errors import ServiceUnavailable
from batchllm.settings import Settings

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


def check_broker(app: Celery) -> None:
    """Connect to the broker once, quickly; raise ``ServiceUnavailable`` (exit 5) naming the URL."""
    url = str(app.conf.broker_url)
    if url.startswith("memory:"):
        return
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0.2, interval_step=0.2, timeout=3)
    except Exception as e:  # kombu raises several OperationalError flavours
        raise ServiceUnavailable("Redis", url, type(e).__name__) from e


_PIPELINE_GROUP = 500  # messages per Redis round trip


def _send(app: Celery, prod: Any, msg: ChunkMessage, queue: str, priority: int, **options: Any) -> None:
    """Build and publish one ``run_chunk`` task with Celery (task-sent events for Flower included)."""
    kwargs = msg.model_dump()
    app.send_task(
        RUN_CHUNK,
        kwargs=kwargs,
        queue=queue,
        routing_key=queue,
        priority=celery_priority(priority),
        producer=prod,
        argsrepr="()",
        kwargsrepr=repr(kwargs),
        # Flower shows this name; batch, chunk and size are in the kwargs. One name per model keeps
        # Flower's per-task-name metrics bounded on a cluster that runs millions of chunks.
        shadow=f"run_chunk[{msg.model}]",
        **options,
    )


def _dispatch_one_by_one(app: Celery, messages: Iterable[tuple[ChunkMessage, str, int]]) -> int:
    """Send messages one at a time with Celery's publish retries; outages become ``ServiceUnavailable``."""
    sent = 0
    url = str(app.conf.broker_url)
    retry_policy = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}
    try:
        with app.producer_or_acquire() as prod:
            for msg, queue, priority in messages:
                _send(app, prod, msg, queue, priority, retry=True, retry_policy=retry_policy)
                sent += 1
    except ServiceUnavailable:
        raise
    except Exception as e:
        if _is_connection_error(e):
            raise ServiceUnavailable("Redis", url, type(e).__name__) from e
        raise
    return sent


def dispatch(app: Celery, messages: Iterable[tuple[ChunkMessage, str, int]]) -> int:
    """Send one ``run_chunk`` task per chunk, ``_PIPELINE_GROUP`` messages per Redis round trip.

    kombu's publish batch (a Redis pipeline) buffers the commands, so a 15,000-chunk batch costs ~30 round
    trips instead of ~30,000. A group whose pipeline fails on a connection error is sent again one message
    at a time with retries; a chunk whose message arrives twice is run once (the lease decides), so
    resending a group whose delivery is uncertain is safe.

    Args:
        app: the Celery app.
        messages: ``(message, queue, priority 0-9)`` triples.

    Returns:
        How many messages were sent.

    Raises:
        ServiceUnavailable: Redis stays unreachable.
    """
    items = list(messages)
    sent = 0
    declared: set[str] = set()
    for start in range(0, len(items), _PIPELINE_GROUP):
        group = items[start : start + _PIPELINE_GROUP]
        try:
            with app.producer_or_acquire() as prod, prod.batch(4 * len(group) + 16):
                for msg, queue, priority in group:
                    if queue not in declared:  # declare each queue once, not once per message
                        prod.maybe_declare(app.amqp.queues[queue])
                        declared.add(queue)
                    _send(app, prod, msg, queue, priority, retry=False, declare=[])
        except Exception as e:
            if not _is_connection_error(e):
                raise
            log.warning("pipelined dispatch failed (%s); sending %d messages one by one", type(e).__name__, len(group))
            declared.clear()
            _dispatch_one_by_one(app, group)
        sent += len(group)
    return sent


def _is_connection_error(e: BaseException) -> bool:
    names = {type(x).__name__ for x in _chain(e)}
    return bool(names & {"OperationalError", "ConnectionError", "ConnectionRefusedError", "TimeoutError", "OSError"})


def _chain(e: BaseException | None) -> Iterable[BaseException]:
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


SCHEDULER_KEY = "batchllm:scheduler:alive"


def mark_scheduler_alive(app: Celery, ttl: float) -> None:
    """The scheduler says it is running (a Redis key with a TTL), so submits let it meter out chunks."""
    with app.connection_for_write() as conn:
        client: Any = conn.default_channel.client  # type: ignore[attr-defined]
        client.set(SCHEDULER_KEY, "1", ex=max(1, int(ttl)))


def broker_run_id(app: Celery) -> str | None:
    """Redis's run_id: it changes when the server restarts (and, without persistence, forgets every message)."""
    if str(app.conf.broker_url).startswith("memory:"):
        return None
    with app.connection_for_read() as conn:
        client: Any = conn.default_channel.client  # type: ignore[attr-defined]
        return str(client.info("server").get("run_id"))


def scheduler_alive(app: Celery) -> bool:
    """Whether a scheduler marked itself alive recently (False on the in-process broker)."""
    if str(app.conf.broker_url).startswith("memory:"):
        return False
    try:
        with app.connection_for_read() as conn:
            client: Any = conn.default_channel.client  # type: ignore[attr-defined]
            return bool(client.exists(SCHEDULER_KEY))
    except Exception:  # cannot tell: send everything, the safe default
        return False


def queue_depths(app: Celery, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting per queue (Redis LLEN over the priority sub-queues); used by metrics and reaping."""
    out: dict[str, int] = {}
    with app.connection_for_read() as conn:
        client: Any = conn.default_channel.client  # type: ignore[attr-defined]
        for q in queues:
            keys = [q] + [f"{q}:{p}" for p in range(1, 10)]
            out[q] = sum(int(client.llen(k)) for k in keys)
    return out
