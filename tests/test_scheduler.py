"""The scheduler loop against real PostgreSQL and Redis (no model: workers are rows registered here).

Each module run gets its own PostgreSQL database and the session's Redis database; every test starts from
empty tables and an empty Redis database, so the decisions seen are only this test's. Batches are stored
through ``store.batches.create``, results through ``store.results.write_results`` — the store's real API.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from batchllm.queue import make_celery, queue_depths, queue_name
from batchllm.scheduler.dispatch import Dispatcher
from batchllm.scheduler.loop import Scheduler
from batchllm.scheduler.metrics import SchedulerMetrics
from batchllm.settings import Settings
from batchllm.status import BatchStatus, Endpoint, WorkerState
from batchllm.store import batches, dispatch, leases, results, workers
from batchllm.store.db import get_engine, session_scope
from batchllm.store.results import NewResult
from tests.conftest import _drop_pg_database, scratch_pg

pytestmark = pytest.mark.services

MIB = 2**20
BIG, SMALL = "big-smol@bf16", "small-smol@bf16"
MODELS_TOML = """
# Two copies of the CPU-sized model with made-up floors: placement is what is tested, not the model.
[models.big-smol]
base = "smollm2-135m-instruct"
floor_gb = 24

[models.small-smol]
base = "smollm2-135m-instruct"
floor_gb = 8
"""
TABLES = "batches, requests, chunks, results, workers, schedules, scheduler_lease"


@pytest.fixture(scope="module")
def db_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database of this module's own."""
    url, name = scratch_pg("sched")
    yield url
    _drop_pg_database(name)


def fresh_settings(db_url: str, redis_url: str, tmp_path: Path, **overrides: Any) -> Iterator[Settings]:
    """Settings for one test: empty tables, empty Redis database, the two-model test catalog."""
    import redis

    with session_scope(db_url) as s:
        s.execute(text(f"TRUNCATE {TABLES} CASCADE"))
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    models = tmp_path / "models.toml"
    models.write_text(MODELS_TOML)
    yield Settings(**{"database_url": db_url, "broker_url": redis_url, "models_file": models,
                      "data_dir": tmp_path / "data", "model_dir": tmp_path / "models", "chunk_size": 2,
                      "heartbeat_timeout": 30, "lease_seconds": 30, "scheduler_lease_seconds": 10, **overrides})
    client.flushdb()


@pytest.fixture
def st(db_url: str, redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    yield from fresh_settings(db_url, redis_url, tmp_path)


@pytest.fixture
def app(st: Settings) -> Any:
    return make_celery(st)


# ---------------------------------------------------------------------------------------------- helpers
def sched(st: Settings, app: Any = None, ahead: int = 4, resend_after_s: float = 60.0, **kw: Any) -> Scheduler:
    """A scheduler whose dispatch ignores the submit grace period (batches here are stored, not submitted)."""
    disp = Dispatcher(st.database_url, app, ahead=ahead, grace_s=0.0, resend_after_s=resend_after_s) if app else None
    kw.setdefault("metrics_every_s", 0.0)
    return Scheduler(st, app, dispatcher=disp, **kw)


def worker(st: Settings, name: str, mib: int, state: str = "idle", model: str | None = None,
           assigned: str | None = None) -> str:
    """Register a GPU worker row as ``batchllm worker`` does (made-up card); returns its instance id."""
    instance = f"inst-{name}"
    ident = {"host": "test", "pid": 4242, "kind": "cuda", "tensor_parallel": 1, "pinned": False,
             "devices": [{"index": 0, "name": f"GPU {mib} MiB", "total_bytes": mib * MIB, "kind": "cuda"}],
             "memory_total_bytes": mib * MIB, "memory_free_bytes": mib * MIB, "advertised_bytes": None}
    if not workers.heartbeat(st.database_url, instance, state=state, model=model).registered:
        assert workers.register(st.database_url, name, instance, ident, WorkerState(state), timeout=st.heartbeat_timeout)
        workers.heartbeat(st.database_url, instance, model=model)
    if assigned:
        workers.apply_assignments(st.database_url, [(name, assigned)], None)
    return instance


def batch(st: Settings, ref: str, n: int, priority: int = 0, window_s: float = 3600, rejected: str | None = None) -> str:
    """Store a batch of ``n`` requests of ``ref`` in chunks of ``st.chunk_size`` (and one line rejected for
    naming model ``rejected``, if given), as submit does."""
    name = ref.split("@")[0]
    spec = batches.NewBatch(name="t", model=name, priority=priority, idempotency_key=None, input_name="t.jsonl",
                            completion_window="1h", window_s=window_s)
    with batches.create(st.database_url, spec) as ing:
        chunks: list[batches.NewChunk] = []
        for i in range(n):
            if i % st.chunk_size == 0:
                chunks.append(batches.NewChunk(batches.new_chunk_id(), ref, queue_name(ref), len(chunks) + 1,
                                               min(st.chunk_size, n - i)))
            body = b'{"messages": []}'
            ing.add((ing.batch_id, i + 1, f"r{i}", name, Endpoint.CHAT.value, chunks[-1].id, body, None, None, None))
        if rejected:
            ing.add((ing.batch_id, n + 1, "bad", rejected, Endpoint.CHAT.value, None, None, "model_not_found", "unknown", None))
        ing.finish(chunks, total=n + bool(rejected), invalid=int(bool(rejected)), blank=0, models={name: ref},
                   input_sha256=None, status=BatchStatus.IN_PROGRESS)
    return ing.batch_id


def complete(st: Settings, batch_id: str, owner: str = "inst-done") -> None:
    """Run every chunk of a batch as a worker would: claim, write 200 results, close."""
    for ref in dispatch.of_batch(st.database_url, batch_id, only_unsent=False):
        c = leases.claim(st.database_url, ref.id, owner, ttl=30)
        assert c.lease is not None
        out = [NewResult(r.id, 200, '{"object": "chat.completion"}', prompt_tokens=3, completion_tokens=2) for r in c.requests]
        results.write_results(st.database_url, c.lease, out, done=True, ttl=30, worker="w", device=None)


def assignments(st: Settings) -> dict[str, str | None]:
    return {w.name: w.assigned_model for w in workers.all_workers(st.database_url)}


def consume(app: Any, q: str) -> str:
    """Take one message off queue ``q`` (as a worker would) and return its chunk id."""
    with app.connection_for_read() as conn:
        sq = conn.SimpleQueue(q)
        msg = sq.get(timeout=5)
        msg.ack()
        sq.close()
        return str(msg.payload[1]["chunk_id"])


def drain(app: Any, q: str) -> list[str]:
    """Every message waiting in ``q``, in the order a worker gets them."""
    return [consume(app, q) for _ in range(queue_depths(app, [q])[q])]


# ---------------------------------------------------------------------------------------------- placement
def test_big_model_never_goes_to_a_small_worker(st: Settings) -> None:
    worker(st, "w16", 16_384)
    batch(st, BIG, 6)
    s = sched(st)
    out = s.tick()
    assert out["assigned"] == [] and not out["errors"] and out["leader"]
    assert assignments(st) == {"w16": None}  # 16,384 MiB = 17.2 GB < 24 GB: it waits rather than crash
    worker(st, "w24", 24_564)  # an RTX 4090: 25.8 GB ≥ 24 GB
    assert s.tick()["assigned"] == [["w24", BIG]]
    assert assignments(st) == {"w16": None, "w24": BIG}
    for _ in range(3):  # ticking again changes nothing: the 16 GB card is never given the big model
        s.tick()
    assert assignments(st)["w16"] is None


def test_small_model_prefers_the_smallest_worker(st: Settings) -> None:
    worker(st, "w24", 24_564)
    worker(st, "w16", 16_384)
    batch(st, SMALL, 2)  # one chunk: one worker is enough
    s = sched(st)
    s.tick()
    assert assignments(st) == {"w16": SMALL, "w24": None}  # the big card stays free for big models
    batch(st, BIG, 2)
    s.tick()
    assert assignments(st) == {"w16": SMALL, "w24": BIG}


def test_shared_model_gives_up_a_worker_for_a_model_with_none(st: Settings) -> None:
    worker(st, "w24", 24_564)
    worker(st, "w16", 16_384)
    batch(st, SMALL, 8)  # four chunks: both idle workers are put on it
    s = sched(st)
    assert sorted(s.tick()["assigned"]) == [["w16", SMALL], ["w24", SMALL]]
    worker(st, "w24", 24_564, model=SMALL, state="busy")
    worker(st, "w16", 16_384, model=SMALL, state="busy")
    batch(st, BIG, 2)
    out = s.tick()  # the small model keeps w16; only w24 can host the big one
    assert out["moved"] == [["w24", BIG]] and assignments(st) == {"w16": SMALL, "w24": BIG}
    assert s.tick()["moved"] == []  # and it stays so: no thrashing


def test_demand_priority_and_keeping_a_loaded_model(st: Settings) -> None:
    worker(st, "w24", 24_564)
    small = batch(st, SMALL, 20)
    batch(st, BIG, 6)
    s = sched(st)
    assert s.tick()["assigned"] == [["w24", SMALL]]  # 20 requests beat 6
    # The worker loaded it; a priority-9 big batch arrives. Its model keeps the worker while it has work.
    worker(st, "w24", 24_564, model=SMALL, state="ready")
    batch(st, BIG, 6, priority=9)
    out = s.tick()
    assert out["moved"] == [] and assignments(st)["w24"] == SMALL
    assert out["demand"][BIG] > out["demand"][SMALL]  # priority weighs: 6 x 10 (+ 6 x 1) > 20
    complete(st, small)  # the small queue empties: the worker moves to the model with work and no worker
    out = s.tick()
    assert out["moved"] == [["w24", BIG]] and assignments(st)["w24"] == BIG


def test_failed_load_is_not_retried_and_fails_the_chunks(st: Settings) -> None:
    batch_id = batch(st, BIG, 3)
    worker(st, "w16", 16_384)
    inst = worker(st, "w24", 24_564, assigned=BIG)
    # What a worker records when loading fails: a structured field, not prose to parse.
    workers.record_load_failure(st.database_url, inst, BIG, "CUDA out of memory")
    out = sched(st).tick()
    assert out["assigned"] == [] and assignments(st) == {"w16": None, "w24": None}
    assert out["failed_models"] == {BIG: [batch_id]}
    b = batches.get(st.database_url, batch_id)
    assert b.status == BatchStatus.COMPLETED and (b.counts.total, b.counts.completed, b.counts.failed) == (3, 0, 3)
    lines = [t for page in results.iter_export(st.database_url, batch_id) for t in page]
    assert {t[13] for t in lines} == {f"no worker could load {BIG} (w24: CUDA out of memory)"}


# ---------------------------------------------------------------------------------------------- recovery
def test_expired_lease_is_reaped_and_redispatched(st: Settings, app: Any) -> None:
    inst = worker(st, "w16", 16_384, model=SMALL, assigned=SMALL, state="busy")
    batch(st, SMALL, 2)
    q, s = queue_name(SMALL), sched(st, app)
    assert s.tick()["dispatched"] == 1 and queue_depths(app, [q])[q] == 1
    ck_id = consume(app, q)  # the worker took the message ...
    assert leases.claim(st.database_url, ck_id, inst, ttl=0.2).lease is not None  # ... claimed it, then stalled
    time.sleep(0.4)
    out = s.tick()
    assert (out["requeued"], out["dispatched"]) == (1, 1) and queue_depths(app, [q])[q] == 1


def test_lost_worker_chunks_are_requeued(st: Settings, app: Any) -> None:
    short = st.model_copy(update={"heartbeat_timeout": 1.0})
    inst = worker(short, "dead", 16_384, model=SMALL, assigned=SMALL, state="busy")
    batch(st, SMALL, 2)
    (ref,) = dispatch.of_batch(st.database_url, batches.listing(st.database_url)[0].id)
    leases.claim(st.database_url, ref.id, inst, ttl=3600)  # a long lease: only the lapsed heartbeat frees it
    dispatch.mark_sent(st.database_url, [ref.id])
    time.sleep(1.3)
    out = sched(short, app).tick()
    assert out["lost_workers"] == ["dead"] and out["requeued"] == 1 and out["dispatched"] == 1
    assert queue_depths(app, [queue_name(SMALL)])[queue_name(SMALL)] == 1
    assert {w.name: w.state for w in workers.all_workers(st.database_url)} == {"dead": "lost"}


def test_lost_message_is_resent(st: Settings, app: Any) -> None:
    batch(st, SMALL, 4)
    s, q = sched(st, app, resend_after_s=0.5), queue_name(SMALL)
    assert s.tick()["dispatched"] == 2
    assert s.tick()["resent"] == 0  # recent messages are never second-guessed
    consume(app, q)
    consume(app, q)  # Redis lost them (e.g. a restart without persistence)
    time.sleep(0.6)
    out = s.tick()
    assert out["resent"] == 2 and queue_depths(app, [q])[q] == 2
    assert s.tick()["resent"] == 0


def test_outages_are_survived(st: Settings) -> None:
    batch(st, SMALL, 2)
    no_redis = st.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    out = sched(no_redis, make_celery(no_redis)).tick()
    assert len(out["errors"]) == 1 and out["errors"][0].startswith("dispatch: cannot reach Redis")
    no_db = st.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:1/nothing"})
    t0 = time.monotonic()
    out = sched(no_db).tick()
    assert len(out["errors"]) == 1 and "cannot reach database" in out["errors"][0]  # one line, then the tick stops
    assert time.monotonic() - t0 < 10


def test_redis_restart_resends_at_once(st: Settings, tmp_path: Path) -> None:
    """A private Redis (no persistence) is stopped and started again: the tick survives, then re-sends
    everything at once (new run_id), long before the time-based resend would."""
    import shutil
    import socket
    import subprocess

    server = shutil.which("redis-server")
    assert server is not None, "redis-server is needed for this test"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([server, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return proc
            time.sleep(0.05)
        raise AssertionError("private redis-server did not start")

    private = st.model_copy(update={"broker_url": f"redis://127.0.0.1:{port}/0"})
    app = make_celery(private)
    s, q = sched(private, app, resend_after_s=3600), queue_name(SMALL)
    proc = start()
    try:
        batch(private, SMALL, 4)
        assert s.tick()["dispatched"] == 2 and queue_depths(app, [q])[q] == 2
        proc.terminate()
        proc.wait(10)
        batch(private, SMALL, 2)
        out = s.tick()
        assert out["errors"] and out["errors"][0].startswith("dispatch: cannot reach Redis") and "finalized" in out
        proc = start()  # back, empty: the first two messages are gone
        out = s.tick()
        assert not out["errors"] and (out["dispatched"], out["resent"]) == (1, 2)
        assert queue_depths(app, [q])[q] == 3
    finally:
        proc.terminate()
        proc.wait(10)


# ---------------------------------------------------------------------------------------------- lifecycle
def test_finalize_and_expire(st: Settings) -> None:
    done_id = batch(st, SMALL, 3)
    late_id = batch(st, SMALL, 3, window_s=0.2)
    complete(st, done_id)
    time.sleep(0.4)
    out = sched(st).tick()
    assert out["expired"] == [late_id] and batches.get(st.database_url, done_id).status == BatchStatus.COMPLETED
    late = batches.get(st.database_url, late_id)
    assert late.status == BatchStatus.EXPIRED and (late.counts.total, late.counts.failed, late.counts.pending) == (3, 3, 0)


def test_run_forever_ticks_until_stopped_and_resigns(st: Settings) -> None:
    import threading

    from batchllm.store import leader

    s = sched(st.model_copy(update={"scheduler_interval": 0.05}))
    thread = threading.Thread(target=s.run_forever, daemon=True)
    thread.start()
    deadline = time.time() + 20  # the first tick reads the catalog and connects: slow on a loaded machine
    while time.time() < deadline and not s.metrics.last_tick > 0:
        time.sleep(0.05)
    assert s.metrics.is_leader and s.metrics.last_tick > 0
    s.stop()
    thread.join(5)
    info = leader.current(st.database_url)
    assert not thread.is_alive() and info is not None and not info.active  # resigned: a standby takes over at once
    assert sched(st).tick()["leader"]


# ---------------------------------------------------------------------------------------------- dispatch order
def test_priority_and_fair_share_decide_what_is_sent(st: Settings, app: Any) -> None:
    """With little room in Redis, queue order decides: FIFO would send the older priority-0 chunks first,
    and batch A's chunks before any of B's."""
    worker(st, "w16", 16_384, model=SMALL, assigned=SMALL, state="busy")
    low = batch(st, SMALL, 8)  # 4 chunks, first
    high = batch(st, SMALL, 8, priority=9)  # 4 chunks, later
    s, q = sched(st, app, ahead=2), queue_name(SMALL)
    assert s.tick()["dispatched"] == 2
    chunk_batch = {r.id: r.batch_id for b in (low, high) for r in dispatch.of_batch(st.database_url, b, only_unsent=False)}
    assert [chunk_batch[c] for c in drain(app, q)] == [high, high]
    # Equal priority: batches share the queue chunk by chunk (A1 B1 A2 B2), not one after the other.
    complete(st, high)
    complete(st, low)
    a, b = batch(st, SMALL, 8), batch(st, SMALL, 8)
    s2 = sched(st, app, ahead=4)
    s.resign()
    assert s2.tick()["dispatched"] == 4
    seqs = {r.id: (r.batch_id, i) for x in (a, b) for i, r in enumerate(dispatch.of_batch(st.database_url, x, only_unsent=False))}
    assert [seqs[c] for c in drain(app, q)] == [(a, 0), (b, 0), (a, 1), (b, 1)]


def test_sql_statements_per_tick_do_not_grow(st: Settings, app: Any) -> None:
    """A tick costs the same number of statements with 1 or 20 workers and 1 or 40 batches."""
    def count() -> int:
        n = [0]

        def on_execute(*_: Any) -> None:
            n[0] += 1

        engine = get_engine(st.database_url)
        event.listen(engine, "before_cursor_execute", on_execute)
        try:
            s.tick()
        finally:
            event.remove(engine, "before_cursor_execute", on_execute)
        return n[0]

    worker(st, "w0", 16_384, model=SMALL, assigned=SMALL, state="busy")
    batch(st, SMALL, 40)
    s = sched(st, app)
    s.tick()  # the first tick assigns and sends; from then on the cluster is steady
    small = count()
    for i in range(1, 20):
        worker(st, f"w{i}", 16_384, model=SMALL, assigned=SMALL, state="busy")
    for _ in range(39):
        batch(st, SMALL, 40)
    s.tick()
    big = count()
    assert big == small, (small, big)


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_endpoint(st: Settings, app: Any) -> None:
    inst = worker(st, "w16", 16_384, model=SMALL, assigned=SMALL, state="busy")
    done_id = batch(st, SMALL, 2, rejected="my-own-model-name")
    complete(st, done_id, owner=inst)
    batch(st, SMALL, 4)
    workers.add_stale_writes(st.database_url, inst, 3)
    metrics = SchedulerMetrics()
    s = sched(st, app, metrics=metrics)
    port = metrics.serve(0, addr="127.0.0.1")
    s.tick()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line and line[0] != "#"}
    assert values['batchllm_batches{status="completed"}'] == 1 and values['batchllm_batches{status="in_progress"}'] == 1
    assert values['batchllm_requests_total{model="small-smol",outcome="completed"}'] == 2
    assert values['batchllm_requests_total{model="other",outcome="failed"}'] == 1  # the rejected line's made-up model
    assert "my-own-model-name" not in body
    assert values['batchllm_worker_generated_tokens_total{worker="w16"}'] == 4
    assert values['batchllm_stale_writes_refused_total{worker="w16"}'] == 3
    assert values['batchllm_queue_depth{model="small-smol",variant="bf16"}'] == 2
    assert values['batchllm_chunks_open{model="small-smol",status="queued",variant="bf16"}'] == 2
    assert values["batchllm_scheduler_is_leader"] == 1
    for q in ("0.5", "0.99"):
        assert f'batchllm_scheduler_tick_seconds{{quantile="{q}"}}' in values
    assert values["batchllm_scheduler_tick_duration_seconds_count"] == 1
    standby = SchedulerMetrics()
    assert sched(st, app, metrics=standby).tick()["leader"] is False  # the first one holds the lease
    text_ = standby.render().decode()
    assert "batchllm_scheduler_is_leader 0.0" in text_ and "batchllm_batches" not in text_  # nothing counted twice


# ---------------------------------------------------------------------------------------------- the queue
def test_redis_serves_priority_9_before_earlier_priority_0(app: Any) -> None:
    """Measured, not assumed: kombu's Redis priority lists hand out a later p9 message first."""
    from kombu import Consumer, Queue

    from batchllm.queue import dispatch as send
    from batchllm.store.dispatch import ChunkRef

    for mode in ("consumer", "simple"):
        q = f"batchllm.prio-{mode}-{uuid.uuid4().hex[:6]}@bf16"
        refs = [ChunkRef(f"p0-{i}", "b", "m@bf16", q, 1, 0) for i in range(4)]
        refs += [ChunkRef("p5", "b", "m@bf16", q, 1, 5), ChunkRef("p9", "b", "m@bf16", q, 1, 9)]
        send(app, refs)
        got: list[str] = []
        if mode == "simple":
            got = [consume(app, q) for _ in range(6)]
        else:
            with app.connection_for_read() as conn:
                def on_message(body: Any, m: Any, got: list[str] = got) -> None:
                    got.append(body[1]["chunk_id"])
                    m.ack()

                queue = Queue(q, routing_key=q, channel=conn.default_channel)
                with Consumer(conn, [queue], accept=["json"], prefetch_count=1, callbacks=[on_message]):
                    while len(got) < 6:
                        conn.drain_events(timeout=5)
        assert got == ["p9", "p5", "p0-0", "p0-1", "p0-2", "p0-3"], mode


def test_schedule_hook_runs_with_the_fence(st: Settings) -> None:
    """Hooks (the schedules step) run after the lifecycle step and get the leader's fence."""
    seen: list[Any] = []
    out = sched(st, hooks=[("probe", lambda fence: seen.append(fence) or {"probe": True})]).tick()
    assert out["probe"] is True and seen and seen[0].term == out["term"]
    _ = json.dumps(out, default=str)  # what `scheduler --once` prints
