"""Prometheus metrics of the whole cluster, served by the scheduler on ``settings.metrics_port``.

The scheduler is the one long-lived process that sees the store and the broker, so it exports what an
operator graphs: batches by status, requests and generated tokens per model and per worker, tokens/s,
queue depth per model and worker heartbeat age. Values are read from the store once per tick into a
snapshot; a custom collector serves the last snapshot, so a scrape never touches the database.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from batchllm.errors import InputError
from batchllm.status import BatchStatus, ChunkStatus
from batchllm.store.models import Batch, Chunk, Request, Result, Worker

# Tokens/s over this window: a worker writes results in bursts, so one tick's delta would be noise.
RATE_WINDOW_S = 30.0
# The per-model totals aggregate the whole results table: cheap enough every 15 s, wasteful every tick.
RESULTS_REFRESH_S = 15.0
# Workers not seen for this long drop out of the per-worker series (their counters stop being exported).
WORKER_FORGET_S = 24 * 3600.0


@dataclass
class Snapshot:
    """What the last refresh read; the collector renders it."""

    batches: dict[str, int] = field(default_factory=dict)
    requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, "completed"|"failed") → n
    tokens_by_model: dict[str, int] = field(default_factory=dict)
    tokens_by_worker: dict[str, int] = field(default_factory=dict)
    requests_by_worker: dict[str, int] = field(default_factory=dict)
    tps_by_model: dict[str, float] = field(default_factory=dict)
    tps_by_worker: dict[str, float] = field(default_factory=dict)
    queue_depth: dict[str, int] = field(default_factory=dict)  # model ref → messages in Redis
    open_chunks: dict[tuple[str, str], int] = field(default_factory=dict)  # (model ref, status) → n
    heartbeat_age: dict[str, float] = field(default_factory=dict)
    worker_info: dict[str, tuple[str, str]] = field(default_factory=dict)  # worker → (model, state)
    tick_seconds: float = 0.0
    last_tick: float = 0.0
    tick_errors: int = 0


class SchedulerMetrics:
    """The scheduler's metrics: an own ``CollectorRegistry`` (never the global one) and its HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.snapshot = Snapshot()
        self._token_history: dict[str, deque[tuple[float, int]]] = {}
        self._results_at = 0.0
        self.registry.register(_SnapshotCollector(self))

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Start the ``/metrics`` HTTP server in a daemon thread; returns the bound port (``port=0``: any free one)."""
        try:
            server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise InputError(f"cannot serve metrics on {addr}:{port}: {e.strerror}; pick another with --metrics-port "
                             "or BATCHLLM_METRICS_PORT (0 turns metrics off)") from e
        return int(server.server_port)

    def render(self) -> bytes:
        """The exposition text (what a scrape returns)."""
        return generate_latest(self.registry)

    def record_tick(self, seconds: float, errors: int) -> None:
        """Note how long a tick took and whether it met errors."""
        self.snapshot.tick_seconds = seconds
        self.snapshot.last_tick = time.time()
        self.snapshot.tick_errors += errors

    def set_queue_depths(self, depths: dict[str, int]) -> None:
        """Messages waiting per model ref (read by the dispatch step from Redis)."""
        self.snapshot.queue_depth = dict(depths)

    def refresh(self, session: Session, now: float | None = None) -> None:
        """Read batches, chunks, workers and (every ``RESULTS_REFRESH_S``) result totals from the store."""
        now = time.time() if now is None else now
        snap = self.snapshot
        snap.batches = {str(s): 0 for s in BatchStatus}
        for status, n in session.execute(select(Batch.status, func.count()).group_by(Batch.status)):
            snap.batches[status] = int(n)
        snap.open_chunks = {
            (model, status): int(n)
            for model, status, n in session.execute(
                select(Chunk.model, Chunk.status, func.count())
                .where(Chunk.status.in_([ChunkStatus.QUEUED, ChunkStatus.LEASED]))
                .group_by(Chunk.model, Chunk.status)
            )
        }
        self._refresh_workers(session, now)
        if now - self._results_at >= RESULTS_REFRESH_S:
            self._refresh_results(session)
            self._results_at = now

    def _refresh_workers(self, session: Session, now: float) -> None:
        snap = self.snapshot
        rows = session.execute(
            select(Worker.name, Worker.model, Worker.state, Worker.tokens_generated, Worker.requests_done, Worker.last_heartbeat)
            .where(Worker.last_heartbeat >= now - WORKER_FORGET_S)
        ).all()
        snap.tokens_by_worker, snap.requests_by_worker, snap.heartbeat_age, snap.worker_info = {}, {}, {}, {}
        snap.tps_by_worker, snap.tps_by_model = {}, {}
        for name, model, state, tokens, done, beat in rows:
            snap.tokens_by_worker[name] = int(tokens or 0)
            snap.requests_by_worker[name] = int(done or 0)
            snap.heartbeat_age[name] = max(0.0, now - beat)
            snap.worker_info[name] = (model or "", state or "")
            rate = self._rate(name, now, int(tokens or 0))
            snap.tps_by_worker[name] = rate
            if model:  # a worker's tokens/s counts for the model it has loaded now
                snap.tps_by_model[model] = snap.tps_by_model.get(model, 0.0) + rate
        for gone in set(self._token_history) - set(snap.tokens_by_worker):
            del self._token_history[gone]

    def _rate(self, worker: str, now: float, tokens: int) -> float:
        hist = self._token_history.setdefault(worker, deque())
        if hist and tokens < hist[-1][1]:
            hist.clear()  # the row was reset: start over rather than report a negative rate
        hist.append((now, tokens))
        while len(hist) > 2 and now - hist[1][0] >= RATE_WINDOW_S:
            hist.popleft()
        (t0, k0), (t1, k1) = hist[0], hist[-1]
        return (k1 - k0) / (t1 - t0) if t1 > t0 else 0.0

    def _refresh_results(self, session: Session) -> None:
        snap = self.snapshot
        requests: dict[tuple[str, str], int] = {}
        tokens: dict[str, int] = {}
        for model, ok, n, ctok in session.execute(
            select(Result.model, Result.ok, func.count(), func.coalesce(func.sum(Result.completion_tokens), 0))
            .group_by(Result.model, Result.ok)
        ):
            key = (model or "unknown", "completed" if ok else "failed")
            requests[key] = requests.get(key, 0) + int(n)
            tokens[model or "unknown"] = tokens.get(model or "unknown", 0) + int(ctok)
        # Lines rejected at validation never get a result row but are failed requests all the same.
        for model, n in session.execute(
            select(Request.model, func.count()).where(Request.error_code.is_not(None)).group_by(Request.model)
        ):
            key = (model or "unknown", "failed")
            requests[key] = requests.get(key, 0) + int(n)
        snap.requests, snap.tokens_by_model = requests, tokens


class _SnapshotCollector(Collector):
    """Renders the last snapshot (a scrape is cheap and never blocks on the database)."""

    def __init__(self, owner: SchedulerMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Any]:
        snap = self.owner.snapshot
        g = GaugeMetricFamily("batchllm_batches", "Batches by status.", labels=["status"])
        for status, n in sorted(snap.batches.items()):
            g.add_metric([status], n)
        yield g
        c = CounterMetricFamily("batchllm_requests", "Finished requests per model and outcome.", labels=["model", "outcome"])
        for (model, outcome), n in sorted(snap.requests.items()):
            c.add_metric([model, outcome], n)
        yield c
        yield _family(CounterMetricFamily, "batchllm_model_generated_tokens", "Generated tokens per model.", "model",
                      snap.tokens_by_model)
        yield _family(CounterMetricFamily, "batchllm_worker_generated_tokens", "Generated tokens per worker.", "worker",
                      snap.tokens_by_worker)
        yield _family(CounterMetricFamily, "batchllm_worker_requests", "Requests finished per worker.", "worker",
                      snap.requests_by_worker)
        yield _family(GaugeMetricFamily, "batchllm_model_tokens_per_second",
                      f"Generation throughput per model (last {RATE_WINDOW_S:g} s).", "model", snap.tps_by_model)
        yield _family(GaugeMetricFamily, "batchllm_worker_tokens_per_second",
                      f"Generation throughput per worker (last {RATE_WINDOW_S:g} s).", "worker", snap.tps_by_worker)
        yield _family(GaugeMetricFamily, "batchllm_queue_depth", "Messages waiting in Redis per model queue.", "model",
                      snap.queue_depth)
        g = GaugeMetricFamily("batchllm_chunks_open", "Queued and leased chunks per model.", labels=["model", "status"])
        for (model, status), n in sorted(snap.open_chunks.items()):
            g.add_metric([model, status], n)
        yield g
        yield _family(GaugeMetricFamily, "batchllm_worker_heartbeat_age_seconds", "Seconds since each worker's heartbeat.",
                      "worker", snap.heartbeat_age)
        g = GaugeMetricFamily("batchllm_worker_info", "Each worker's model and state (value 1).",
                              labels=["worker", "model", "state"])
        for name, (model, state) in sorted(snap.worker_info.items()):
            g.add_metric([name, model, state], 1)
        yield g
        yield GaugeMetricFamily("batchllm_scheduler_tick_seconds", "Duration of the last tick.", value=snap.tick_seconds)
        yield GaugeMetricFamily("batchllm_scheduler_last_tick_timestamp_seconds", "When the last tick ended.",
                                value=snap.last_tick)
        yield CounterMetricFamily("batchllm_scheduler_tick_errors", "Tick steps that failed (outages).", value=snap.tick_errors)


def _family(cls: Any, name: str, doc: str, label: str, values: dict[str, Any]) -> Any:
    fam = cls(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        fam.add_metric([key], value)
    return fam
