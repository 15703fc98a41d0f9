"""Prometheus metrics of the whole cluster, served by the active scheduler on ``metrics_address:metrics_port``.

The scheduler is the one long-lived process that sees the store and the broker, so it exports what an
operator graphs: batches by status, requests and generated tokens per model and per worker, tokens/s,
queue depth per model, worker heartbeat age, fencing refusals, leadership and tick time. Each tick the
active scheduler reads one aggregate snapshot (``store.cluster.metrics``); a custom collector serves the
last snapshot, so a scrape never touches the database. A standing-by scheduler exports only its own
series (``batchllm_scheduler_is_leader 0``), so scraping both never counts the cluster twice.

Label values are bounded: a model label is a catalog model name (a variant label, a catalog variant name),
and anything else — a model named only by a rejected line, a local directory — is ``other``.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from batchllm.catalog import Catalog
from batchllm.errors import InputError
from batchllm.status import BatchStatus
from batchllm.store.cluster import MetricsRead

OTHER = "other"
# Tokens/s over this window: a worker writes results in bursts, so one tick's delta would be noise.
RATE_WINDOW_S = 30.0
# The per-model totals aggregate the whole results table: cheap enough every 15 s, wasteful every tick.
RESULTS_REFRESH_S = 15.0
# Workers not seen for this long drop out of the per-worker series.
WORKER_FORGET_S = 24 * 3600.0
TICK_WINDOW = 1000  # ticks the p50/p99 summary is computed over
TICK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUANTILES = (0.5, 0.9, 0.99)


def model_labels(catalog: Catalog, ref: str | None) -> tuple[str, str]:
    """``(model, variant)`` label values for a model name or ``name@variant``; unknown parts are ``other``.

    Only the catalog's own names pass (aliases map to the name), never a local path, so the number of
    series stays bounded whatever users write in their files.
    """
    if not ref:
        return OTHER, OTHER
    name, at, variant = ref.rpartition("@") if "@" in ref else (ref, "", "")
    spec = catalog.find(name)
    if spec is None:
        return OTHER, OTHER
    if not at:
        return spec.name, ""
    return spec.name, next((v.name for v in spec.variants if v.name.lower() == variant.lower()), OTHER)


@dataclass
class Snapshot:
    """What the last refresh read; the collector renders it."""

    batches: dict[str, int] = field(default_factory=dict)
    requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, completed|failed) → n
    tokens_by_model: dict[str, int] = field(default_factory=dict)
    tokens_by_worker: dict[str, int] = field(default_factory=dict)
    requests_by_worker: dict[str, int] = field(default_factory=dict)
    stale_by_worker: dict[str, int] = field(default_factory=dict)
    tps_by_model: dict[str, float] = field(default_factory=dict)
    tps_by_worker: dict[str, float] = field(default_factory=dict)
    queue_depth: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, variant) → messages in Redis
    open_chunks: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (model, variant, status) → n
    heartbeat_age: dict[str, float] = field(default_factory=dict)
    worker_info: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # worker → (model, variant, state)


class SchedulerMetrics:
    """The scheduler's metrics: its own ``CollectorRegistry`` (never the global one) and HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.snapshot = Snapshot()
        self.is_leader = False
        self.tick_errors = 0
        self.refused_writes = 0  # NotLeader: writes of this scheduler refused because another took over
        self.last_tick = 0.0
        self._ticks: deque[float] = deque(maxlen=TICK_WINDOW)
        self._buckets = [0] * (len(TICK_BUCKETS) + 1)
        self._tick_sum = 0.0
        self._tick_count = 0
        self._token_history: dict[str, deque[tuple[float, int]]] = {}
        self._results_at: float | None = None
        self.registry.register(_SnapshotCollector(self))

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Start the ``/metrics`` HTTP server in a daemon thread; returns the bound port (``port=0``: any free one)."""
        try:
            server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise InputError(f"cannot serve metrics on {addr}:{port}: {e.strerror}; pick another with --metrics-port "
                             "or BATCHLLM_METRICS_PORT (0 turns metrics off), or BATCHLLM_METRICS_ADDRESS") from e
        return int(server.server_port)

    def render(self) -> bytes:
        """The exposition text (what a scrape returns)."""
        return generate_latest(self.registry)

    def record_tick(self, seconds: float, errors: int) -> None:
        """Note how long an active tick took and how many of its steps failed."""
        self.last_tick = time.time()
        self.tick_errors += errors
        self._ticks.append(seconds)
        self._buckets[bisect.bisect_left(TICK_BUCKETS, seconds)] += 1
        self._tick_sum += seconds
        self._tick_count += 1

    def tick_quantiles(self) -> dict[float, float]:
        """p50/p90/p99 of the last ``TICK_WINDOW`` active ticks (seconds); empty before the first."""
        if not self._ticks:
            return {}
        ordered = sorted(self._ticks)
        return {q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in QUANTILES}

    def set_leader(self, leader: bool) -> None:
        """Whether this scheduler is the active one; a standby forgets the cluster snapshot."""
        if not leader and self.is_leader:
            self.snapshot = Snapshot()
            self._token_history.clear()
            self._results_at = None
        self.is_leader = leader

    @property
    def has_snapshot(self) -> bool:
        """Whether a cluster snapshot was read since this scheduler became the active one."""
        return bool(self.snapshot.batches)

    def wants_results(self) -> bool:
        """Whether this refresh should include the heavier result totals (every ``RESULTS_REFRESH_S``)."""
        return self._results_at is None or time.monotonic() - self._results_at >= RESULTS_REFRESH_S

    def set_queue_depths(self, depths: dict[str, int], catalog: Catalog) -> None:
        """Messages waiting per model ref (read by the dispatch step from Redis)."""
        out: dict[tuple[str, str], int] = {}
        for ref, n in depths.items():
            key = model_labels(catalog, ref)
            out[key] = out.get(key, 0) + n
        self.snapshot.queue_depth = out

    def update(self, read: MetricsRead, catalog: Catalog) -> None:
        """Take a ``store.cluster.metrics`` read into the snapshot (labels bounded by the catalog)."""
        now = time.monotonic()
        snap = self.snapshot
        snap.batches = {str(s): 0 for s in BatchStatus} | read.batches
        snap.open_chunks = {}
        for (ref, status), n in read.open_chunks.items():
            model, variant = model_labels(catalog, ref)
            snap.open_chunks[(model, variant, status)] = snap.open_chunks.get((model, variant, status), 0) + n
        snap.tokens_by_worker, snap.requests_by_worker, snap.stale_by_worker = {}, {}, {}
        snap.heartbeat_age, snap.worker_info, snap.tps_by_worker, snap.tps_by_model = {}, {}, {}, {}
        for name, (ref, state, tokens, done, stale, age) in read.workers.items():
            model, variant = model_labels(catalog, ref) if ref else ("", "")
            snap.tokens_by_worker[name], snap.requests_by_worker[name], snap.stale_by_worker[name] = tokens, done, stale
            snap.heartbeat_age[name] = age
            snap.worker_info[name] = (model, variant, state)
            rate = self._rate(name, now, tokens)
            snap.tps_by_worker[name] = rate
            if model:  # a worker's tokens/s counts for the model it has loaded now
                snap.tps_by_model[model] = snap.tps_by_model.get(model, 0.0) + rate
        for gone in set(self._token_history) - set(read.workers):
            del self._token_history[gone]
        if read.requests is not None and read.tokens_by_model is not None:
            snap.requests, snap.tokens_by_model = {}, {}
            for (ref, outcome), n in read.requests.items():
                key = (model_labels(catalog, ref)[0], outcome)
                snap.requests[key] = snap.requests.get(key, 0) + n
            for ref, n in read.tokens_by_model.items():
                model = model_labels(catalog, ref)[0]
                snap.tokens_by_model[model] = snap.tokens_by_model.get(model, 0) + n
            self._results_at = now

    def _rate(self, worker: str, now: float, tokens: int) -> float:
        hist = self._token_history.setdefault(worker, deque())
        if hist and tokens < hist[-1][1]:
            hist.clear()  # the row was reset: start over rather than report a negative rate
        hist.append((now, tokens))
        while len(hist) > 2 and now - hist[1][0] >= RATE_WINDOW_S:
            hist.popleft()
        (t0, k0), (t1, k1) = hist[0], hist[-1]
        return (k1 - k0) / (t1 - t0) if t1 > t0 else 0.0


class _SnapshotCollector(Collector):
    """Renders the last snapshot (a scrape is cheap and never blocks on the database)."""

    def __init__(self, owner: SchedulerMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Any]:
        m, snap = self.owner, self.owner.snapshot
        yield GaugeMetricFamily("batchllm_scheduler_is_leader", "1 while this scheduler is the active one.",
                                value=1 if m.is_leader else 0)
        yield CounterMetricFamily("batchllm_scheduler_refused_writes", "Writes of this scheduler refused because "
                                  "another one had taken over (NotLeader).", value=m.refused_writes)
        yield CounterMetricFamily("batchllm_scheduler_tick_errors", "Tick steps that failed (outages).", value=m.tick_errors)
        yield GaugeMetricFamily("batchllm_scheduler_last_tick_timestamp_seconds", "When the last active tick ended.",
                                value=m.last_tick)
        yield from _tick_families(m)
        if not m.is_leader:
            return
        yield _family(GaugeMetricFamily, "batchllm_batches", "Batches by status.", ["status"],
                      {(k,): v for k, v in snap.batches.items()})
        yield _family(CounterMetricFamily, "batchllm_requests", "Finished requests per model and outcome.",
                      ["model", "outcome"], snap.requests)
        yield _family(CounterMetricFamily, "batchllm_model_generated_tokens", "Generated tokens per model.", ["model"],
                      {(k,): v for k, v in snap.tokens_by_model.items()})
        yield _family(GaugeMetricFamily, "batchllm_model_tokens_per_second",
                      f"Generation throughput per model (last {RATE_WINDOW_S:g} s).", ["model"],
                      {(k,): v for k, v in snap.tps_by_model.items()})
        yield _family(GaugeMetricFamily, "batchllm_queue_depth", "Messages waiting in Redis per model queue.",
                      ["model", "variant"], snap.queue_depth)
        yield _family(GaugeMetricFamily, "batchllm_chunks_open", "Queued and leased chunks per model.",
                      ["model", "variant", "status"], snap.open_chunks)
        per_worker: list[tuple[Any, str, str, dict[str, Any]]] = [
            (CounterMetricFamily, "batchllm_worker_generated_tokens", "Generated tokens per worker.", snap.tokens_by_worker),
            (CounterMetricFamily, "batchllm_worker_requests", "Requests finished per worker.", snap.requests_by_worker),
            (CounterMetricFamily, "batchllm_stale_writes_refused", "Result writes of a worker refused by fencing "
             "(it had lost the chunk's lease).", snap.stale_by_worker),
            (GaugeMetricFamily, "batchllm_worker_tokens_per_second",
             f"Generation throughput per worker (last {RATE_WINDOW_S:g} s).", snap.tps_by_worker),
            (GaugeMetricFamily, "batchllm_worker_heartbeat_age_seconds", "Seconds since each worker's heartbeat "
             "(database clock).", snap.heartbeat_age),
        ]
        for cls, name, doc, values in per_worker:
            yield _family(cls, name, doc, ["worker"], {(k,): v for k, v in values.items()})
        yield _family(GaugeMetricFamily, "batchllm_worker_info", "Each worker's model and state (value 1).",
                      ["worker", "model", "variant", "state"], {(w, *info): 1 for w, info in snap.worker_info.items()})


def _tick_families(m: SchedulerMetrics) -> Iterator[Any]:
    """Tick time as a summary with p50/p90/p99 over recent ticks, and as a histogram for aggregation."""
    summary = Metric("batchllm_scheduler_tick_seconds", f"Active tick duration (quantiles over the last {TICK_WINDOW} "
                     "ticks).", "summary")
    for q, v in m.tick_quantiles().items():
        summary.add_sample("batchllm_scheduler_tick_seconds", {"quantile": f"{q:g}"}, v)
    summary.add_sample("batchllm_scheduler_tick_seconds_count", {}, m._tick_count)
    summary.add_sample("batchllm_scheduler_tick_seconds_sum", {}, m._tick_sum)
    yield summary
    hist = HistogramMetricFamily("batchllm_scheduler_tick_duration_seconds", "Active tick duration.")
    cumulative, buckets = 0, []
    for bound, n in zip([*map(str, TICK_BUCKETS), "+Inf"], m._buckets, strict=True):
        cumulative += n
        buckets.append((bound, cumulative))
    hist.add_metric([], buckets, m._tick_sum)
    yield hist


def _family(cls: Any, name: str, doc: str, labels: list[str], values: Mapping[Any, Any]) -> Any:
    fam = cls(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        fam.add_metric(list(key), value)
    return fam
