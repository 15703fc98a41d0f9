"""The scheduler loop against real PostgreSQL and Redis (no vLLM: workers are heartbeat rows written here).

Each module run gets its own PostgreSQL database and Redis database number; every test starts from
empty tables and an empty Redis database, so the placement decisions seen are only this test's.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from batchllm.queue import ChunkMessage, dispatch, make_celery, queue_depths, queue_name
from batchllm.scheduler import schedules
from batchllm.scheduler.loop import Scheduler
from batchllm.scheduler.metrics import SchedulerMetrics
from batchllm.services.submit import submit_file
from batchllm.settings import Settings
from batchllm.status import BatchStatus, ChunkStatus
from batchllm.store import leases
from batchllm.store import workers as worker_rows
from batchllm.store.batches import counts
from batchllm.store.db import session_scope, upgrade
from batchllm.store.models import Batch, Chunk, Request, Schedule, Worker
from batchllm.store.results import upsert_results

pytestmark = pytest.mark.services

PG_ADMIN = os.environ.get("BATCHLLM_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("BATCHLLM_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("BATCHLLM_TEST_SCHED_REDIS_DB", "13"))
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


@pytest.fixture(scope="module")
def db_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database of this module's own."""
    import psycopg

    from batchllm.store.db import get_engine

    name = f"bl_sched_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"
    upgrade(url)
    yield url
    get_engine.cache_clear()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def st(db_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings for one test: empty tables, empty Redis database, the two-model test catalog."""
    import redis

    with session_scope(db_url) as s:
        s.execute(text("TRUNCATE batches, requests, chunks, results, workers, schedules CASCADE"))
    broker = f"{REDIS_BASE}/{REDIS_DB}"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    models = tmp_path / "models.toml"
    models.write_text(MODELS_TOML)
    yield Settings(database_url=db_url, broker_url=broker, models_file=models, data_dir=tmp_path / "data",
                    model_dir=tmp_path / "models", chunk_size=2, heartbeat_timeout=30, lease_seconds=30)
    client.flushdb()


@pytest.fixture
def app(st: Settings) -> Any:
    return make_celery(st)


def worker(st: Settings, name: str, mib: int, **fields: Any) -> None:
    """Write a GPU worker's heartbeat row (what `batchllm worker` writes)."""
    row = {"name": name, "host": "test", "pid": 4242, "kind": "cuda", "tensor_parallel": 1,
           "devices": [{"index": 0, "name": f"GPU {mib} MiB", "total_bytes": mib * MIB, "kind": "cuda"}],
           "memory_total_bytes": mib * MIB, "memory_free_bytes": mib * MIB, "advertised_bytes": None,
           "model": None, "pinned": False, "state": "idle", "error": None, "started_at": time.time(), **fields}
    with session_scope(st.database_url) as s:
        worker_rows.heartbeat(s, row)
        if "assigned_model" in fields:
            worker_rows.assign(s, name, fields["assigned_model"])


def batch(st: Settings, tmp_path: Path, model: str, n: int, priority: int = 0, age: float = 60.0, **kw: Any) -> str:
    """Submit ``n`` short-form requests (no dispatch) and age the batch past the submit grace period."""
    path = tmp_path / f"in-{uuid.uuid4().hex[:6]}.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"hello {i}"}) + "\n" for i in range(n)))
    res = submit_file(st, path, app=None, model=model, priority=priority, queue_anyway=True, **kw)
    with session_scope(st.database_url) as s:
        s.execute(update(Batch).where(Batch.id == res.batch_id).values(started_at=Batch.started_at - age))
    return res.batch_id


def assignments(st: Settings) -> dict[str, str | None]:
    with session_scope(st.database_url) as s:
        return {w.name: w.assigned_model for w in s.scalars(select(Worker))}


def complete(st: Settings, batch_id: str) -> None:
    """Answer every request of a batch, as a worker would, and mark its chunks done."""
    with session_scope(st.database_url) as s:
        ids = list(s.scalars(select(Request.id).where(Request.batch_id == batch_id)))
        upsert_results(s, [{"request_id": i, "batch_id": batch_id, "ok": True, "status_code": 200, "text": "hi",
                            "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 2, "model": SMALL,
                            "worker": "w", "attempt": 1, "created_at": time.time()} for i in ids])
        for ck in s.scalars(select(Chunk.id).where(Chunk.batch_id == batch_id)):
            leases.finish(s, ck)


# ---------------------------------------------------------------------------------------------- placement
def test_big_model_never_goes_to_a_small_worker(st: Settings, tmp_path: Path) -> None:
    worker(st, "w16", 16_384)
    batch(st, tmp_path, "big-smol", 6)
    out = Scheduler(st, None).tick()
    assert out["assigned"] == [] and not out["errors"]
    assert assignments(st) == {"w16": None}  # 16,384 MiB = 17.2 GB < 24 GB: it waits rather than crash

    worker(st, "w24", 24_564)  # an RTX 4090: 25.8 GB ≥ 24 GB
    out = Scheduler(st, None).tick()
    assert out["assigned"] == [["w24", BIG]]
    assert assignments(st) == {"w16": None, "w24": BIG}
    for _ in range(3):  # ticking again changes nothing: the 16 GB card is never given the big model
        Scheduler(st, None).tick()
    assert assignments(st)["w16"] is None


def test_small_model_prefers_the_smallest_worker(st: Settings, tmp_path: Path) -> None:
    worker(st, "w24", 24_564)
    worker(st, "w16", 16_384)
    batch(st, tmp_path, "small-smol", 2)  # one chunk: one worker is enough
    Scheduler(st, None).tick()
    assert assignments(st) == {"w16": SMALL, "w24": None}  # the big card stays free for big models
    batch(st, tmp_path, "big-smol", 2)
    Scheduler(st, None).tick()
    assert assignments(st) == {"w16": SMALL, "w24": BIG}


def test_shared_model_gives_up_a_worker_for_a_model_with_none(st: Settings, tmp_path: Path) -> None:
    worker(st, "w24", 24_564)
    worker(st, "w16", 16_384)
    batch(st, tmp_path, "small-smol", 8)  # four chunks: both idle workers are put on it
    assert sorted(Scheduler(st, None).tick()["assigned"]) == [["w16", SMALL], ["w24", SMALL]]
    worker(st, "w24", 24_564, model=SMALL, state="busy")
    worker(st, "w16", 16_384, model=SMALL, state="busy")
    batch(st, tmp_path, "big-smol", 2)
    out = Scheduler(st, None).tick()  # the small model keeps w16; only w24 can host the big one
    assert out["moved"] == [["w24", BIG]] and assignments(st) == {"w16": SMALL, "w24": BIG}
    assert Scheduler(st, None).tick()["moved"] == []  # and it stays so: no thrashing


def test_run_forever_ticks_until_stopped(st: Settings) -> None:
    import threading

    sched = Scheduler(st.model_copy(update={"scheduler_interval": 0.05}), None)
    thread = threading.Thread(target=sched.run_forever, daemon=True)
    thread.start()
    time.sleep(0.5)
    sched.stop()
    thread.join(5)
    assert not thread.is_alive() and sched.metrics.snapshot.last_tick > 0


def test_demand_priority_and_keeping_a_loaded_model(st: Settings, tmp_path: Path) -> None:
    worker(st, "w24", 24_564)
    batch(st, tmp_path, "small-smol", 20)
    batch(st, tmp_path, "big-smol", 6)
    assert Scheduler(st, None).tick()["assigned"] == [["w24", SMALL]]  # 20 requests beat 6

    # The worker loaded it; a priority-9 big batch arrives. Its model keeps the worker while it has work.
    worker(st, "w24", 24_564, model=SMALL, state="ready")
    batch(st, tmp_path, "big-smol", 6, priority=9)
    out = Scheduler(st, None).tick()
    assert out["moved"] == [] and assignments(st)["w24"] == SMALL
    assert out["demand"][BIG] > out["demand"][SMALL]  # priority weighs: 6 x 10 (+ 6 x 1) > 20

    # Once the small queue is empty, the worker moves to the model with work and no worker.
    with session_scope(st.database_url) as s:
        s.execute(update(Chunk).where(Chunk.model == SMALL).values(status=ChunkStatus.DONE))
    out = Scheduler(st, None).tick()
    assert out["moved"] == [["w24", BIG]] and assignments(st)["w24"] == BIG


def test_idle_worker_takes_highest_priority_demand(st: Settings, tmp_path: Path) -> None:
    worker(st, "w24", 24_564)
    batch(st, tmp_path, "small-smol", 20)
    batch(st, tmp_path, "big-smol", 4, priority=9)  # 4 x 10 > 20 x 1
    assert Scheduler(st, None).tick()["assigned"] == [["w24", BIG]]


def test_failed_load_is_not_retried_and_fails_the_chunks(st: Settings, tmp_path: Path) -> None:
    batch_id = batch(st, tmp_path, "big-smol", 3)
    worker(st, "w16", 16_384)
    # What worker.main writes when loading fails: state error, the message, assignment cleared.
    worker(st, "w24", 24_564, state="error", error=f"could not load {BIG}: CUDA out of memory")
    out = Scheduler(st, None).tick()
    assert out["assigned"] == [] and assignments(st) == {"w16": None, "w24": None}
    assert out["failed_chunks"] == {BIG: 2}
    with session_scope(st.database_url) as s:
        b = s.get(Batch, batch_id)
        assert b is not None and b.status == BatchStatus.COMPLETED
        c = counts(s, b)
        assert (c.total, c.completed, c.failed) == (3, 0, 3)
        msgs = {r[0] for r in s.execute(text("SELECT error_message FROM results WHERE batch_id = :b"), {"b": batch_id})}
    assert len(msgs) == 1 and "CUDA out of memory" in msgs.pop()


# ---------------------------------------------------------------------------------------------- recovery
def test_expired_lease_is_reaped_and_redispatched(st: Settings, tmp_path: Path, app: Any) -> None:
    worker(st, "w16", 16_384, model=SMALL, assigned_model=SMALL, state="busy")
    batch(st, tmp_path, "small-smol", 2)
    q = queue_name(SMALL)
    assert Scheduler(st, app).tick()["dispatched"] == 1
    assert queue_depths(app, [q])[q] == 1
    _consume(app, q)  # the worker took the message ...
    with session_scope(st.database_url) as s:
        ck_id = s.scalar(select(Chunk.id))
        assert leases.claim(s, ck_id, "w16", ttl=0.2) is not None  # ... and claimed it, then stalled
    time.sleep(0.4)
    out = Scheduler(st, app).tick()
    assert (out["reaped"], out["dispatched"]) == (1, 1)
    assert queue_depths(app, [q])[q] == 1
    with session_scope(st.database_url) as s:
        ck = s.get(Chunk, ck_id)
        assert ck is not None and ck.status == ChunkStatus.QUEUED and ck.lease_owner is None and ck.dispatched_at


def test_lost_worker_chunks_are_released(st: Settings, tmp_path: Path, app: Any) -> None:
    worker(st, "dead", 16_384, model=SMALL, assigned_model=SMALL, state="busy")
    batch(st, tmp_path, "small-smol", 2)
    with session_scope(st.database_url) as s:
        ck_id = s.scalar(select(Chunk.id))
        leases.claim(s, ck_id, "dead", ttl=3600)  # a long lease: only the lapsed heartbeat frees it
        s.execute(update(Worker).values(last_heartbeat=time.time() - 100))
        leases.mark_dispatched(s, [ck_id])
    out = Scheduler(st, app).tick()
    assert out["lost_workers"] == ["dead"] and out["released"] == 1 and out["dispatched"] == 1
    q = queue_name(SMALL)
    assert queue_depths(app, [q])[q] == 1
    with session_scope(st.database_url) as s:
        w = s.get(Worker, "dead")
        ck = s.get(Chunk, ck_id)
        assert w is not None and w.state == "lost"
        assert ck is not None and ck.status == ChunkStatus.QUEUED and ck.lease_owner is None


def test_lost_message_is_resent(st: Settings, tmp_path: Path, app: Any) -> None:
    batch(st, tmp_path, "small-smol", 4)
    sched = Scheduler(st, app)
    assert sched.tick()["dispatched"] == 2
    q = queue_name(SMALL)
    assert sched.tick()["resent"] == 0  # recent messages are never second-guessed
    _consume(app, q)
    _consume(app, q)  # Redis lost them (restart without persistence)
    with session_scope(st.database_url) as s:
        s.execute(update(Chunk).values(dispatched_at=time.time() - 120))
    out = sched.tick()
    assert out["resent"] == 2 and queue_depths(app, [q])[q] == 2
    assert sched.tick()["resent"] == 0


def test_outages_are_survived(st: Settings, tmp_path: Path) -> None:
    batch(st, tmp_path, "small-smol", 2)
    no_redis = st.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    out = Scheduler(no_redis, make_celery(no_redis)).tick()
    assert len(out["errors"]) == 1 and out["errors"][0].startswith("dispatch: cannot reach Redis")
    no_db = st.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:1/nothing"})
    t0 = time.monotonic()
    out = Scheduler(no_db, None).tick()
    assert len(out["errors"]) == 1 and "cannot reach database" in out["errors"][0]  # one line, then the tick stops
    assert time.monotonic() - t0 < 10


def test_redis_restart_mid_batch_loses_nothing(st: Settings, tmp_path: Path) -> None:
    """A private Redis (no persistence) is stopped and started again: the tick survives, then re-sends."""
    import shutil
    import socket
    import subprocess

    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
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
    sched, q = Scheduler(private, app), queue_name(SMALL)
    proc = start()
    try:
        batch(private, tmp_path, "small-smol", 4)
        assert sched.tick()["dispatched"] == 2 and queue_depths(app, [q])[q] == 2
        proc.terminate()
        proc.wait(10)
        batch(private, tmp_path, "small-smol", 2)
        out = sched.tick()
        assert out["errors"] and out["errors"][0].startswith("dispatch: cannot reach Redis") and "finalized" in out
        proc = start()  # back, empty: the first two messages are gone
        with session_scope(st.database_url) as s:
            s.execute(update(Chunk).where(Chunk.dispatched_at.is_not(None)).values(dispatched_at=time.time() - 120))
        out = sched.tick()
        assert not out["errors"] and (out["dispatched"], out["resent"]) == (1, 2)
        assert queue_depths(app, [q])[q] == 3
    finally:
        proc.terminate()
        proc.wait(10)


# ---------------------------------------------------------------------------------------------- lifecycle
def test_finalize_and_expire(st: Settings, tmp_path: Path) -> None:
    done_id = batch(st, tmp_path, "small-smol", 3)
    late_id = batch(st, tmp_path, "small-smol", 3)
    complete(st, done_id)
    with session_scope(st.database_url) as s:
        s.execute(update(Batch).where(Batch.id == late_id).values(expires_at=time.time() - 1))
    out = Scheduler(st, None).tick()
    assert out["finalized"] == {done_id: "completed"} and out["expired"] == [late_id]
    with session_scope(st.database_url) as s:
        late = s.get(Batch, late_id)
        assert late is not None and late.status == BatchStatus.EXPIRED
        c = counts(s, late)
        assert (c.total, c.completed, c.failed, c.pending) == (3, 0, 3, 0)


def test_schedule_fires_once_and_writes_output_once(st: Settings, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "jobs.jsonl").write_text("".join(json.dumps({"id": f"a{i}", "prompt": "x"}) + "\n" for i in range(3))
                                       + "not json\n")
    out_dir = tmp_path / "out"
    schedules.add_schedule(st, "nightly", "0 2 * * *", str(inputs / "*.jsonl"), "small-smol", str(out_dir))
    with session_scope(st.database_url) as s:
        s.execute(update(Schedule).values(created_at=time.time() - 3 * 86400))
    sched = Scheduler(st, None)
    assert sched.tick()["schedules_fired"] == 1
    assert sched.tick()["schedules_fired"] == 0
    with session_scope(st.database_url) as s:  # fire again for the same night (e.g. a restored database)
        s.execute(update(Schedule).values(last_fired_at=None))
    assert sched.tick()["schedules_fired"] == 1
    with session_scope(st.database_url) as s:
        assert s.scalar(select(func.count()).select_from(Batch)) == 1
        row = s.get(Schedule, "nightly")
        assert row is not None and row.last_fired_at is not None
        (batch_id,) = list(s.scalars(select(Batch.id)))
        assert [e["batch_id"] for e in row.pending_batches or []] == [batch_id]
        date = schedules.stamp(row.cron, row.last_fired_at)
    assert sched.tick()["exports_written"] == 0  # not finished: nothing written
    complete(st, batch_id)
    assert sched.tick()["exports_written"] == 1
    out, err = out_dir / f"nightly-{date}.jsonl", out_dir / f"nightly-{date}.errors.jsonl"
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()] == ["a0", "a1", "a2"]
    assert [json.loads(line)["error"]["code"] for line in err.read_text().splitlines()] == ["invalid_json"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([out.name, err.name])  # no temporary files left
    first = out.stat().st_mtime_ns
    with session_scope(st.database_url) as s:
        s.execute(update(Schedule).values(last_fired_at=None))
    assert sched.tick()["exports_written"] == 0 and out.stat().st_mtime_ns == first  # written once
    with session_scope(st.database_url) as s:
        row = s.get(Schedule, "nightly")
        assert row is not None and row.pending_batches == []


def test_cli_schedule_commands(st: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from batchllm.cli import BatchLLMGroup
    from batchllm.cli.scheduler import COMMANDS
    from batchllm.settings import get_settings

    for key, value in (("DATABASE_URL", st.database_url), ("BROKER_URL", st.broker_url), ("MODELS_FILE", str(st.models_file)),
                       ("DATA_DIR", str(st.data_dir))):
        monkeypatch.setenv(f"BATCHLLM_{key}", value)
    get_settings.cache_clear()
    cli = BatchLLMGroup("t", commands={c.name: c for c in COMMANDS})
    run = CliRunner().invoke
    try:
        bad = run(cli, ["schedule", "add", "n", "--cron", "0 2 * *", "--input", "x", "--model", "small-smol", "--output", "o"])
        assert bad.exit_code == 2 and "invalid cron expression" in bad.output
        ok = run(cli, ["schedule", "add", "n", "--cron", "0 2 * * *", "--input", str(tmp_path / "*.jsonl"),
                       "--model", "small-smol", "--output", str(tmp_path / "o")])
        assert ok.exit_code == 0, ok.output
        listed = run(cli, ["schedule", "list", "--json"])
        assert [r["name"] for r in json.loads(listed.output)] == ["n"]
        assert run(cli, ["schedule", "remove", "n"]).exit_code == 0
        assert run(cli, ["schedule", "remove", "n"]).exit_code == 2
        once = run(cli, ["scheduler", "--once"])
        assert once.exit_code == 0 and json.loads(once.output)["errors"] == []
    finally:
        get_settings.cache_clear()


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_endpoint(st: Settings, tmp_path: Path, app: Any) -> None:
    worker(st, "w16", 16_384, model=SMALL, assigned_model=SMALL, state="busy")
    done_id = batch(st, tmp_path, "small-smol", 2)
    complete(st, done_id)
    batch(st, tmp_path, "small-smol", 4)
    metrics = SchedulerMetrics()
    sched = Scheduler(st, app, metrics)
    port = metrics.serve(0, addr="127.0.0.1")
    sched.tick()
    with session_scope(st.database_url) as s:
        worker_rows.add_usage(s, "w16", 500, 10)
        metrics.refresh(s, now=time.time() + 10)  # 500 tokens over ~10 s
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in ("batchllm_batches{", "batchllm_requests_total{", "batchllm_model_generated_tokens_total{",
                 "batchllm_worker_generated_tokens_total{", "batchllm_model_tokens_per_second{",
                 "batchllm_worker_tokens_per_second{", "batchllm_queue_depth{", "batchllm_worker_heartbeat_age_seconds{",
                 "batchllm_chunks_open{", "batchllm_scheduler_tick_seconds"):
        assert name in body, name
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line and line[0] != "#"}
    assert values['batchllm_batches{status="completed"}'] == 1 and values['batchllm_batches{status="in_progress"}'] == 1
    assert values[f'batchllm_requests_total{{model="{SMALL}",outcome="completed"}}'] == 2
    assert values['batchllm_worker_generated_tokens_total{worker="w16"}'] == 500
    assert 40 < values['batchllm_worker_tokens_per_second{worker="w16"}'] <= 50
    per_worker = values['batchllm_worker_tokens_per_second{worker="w16"}']
    assert values[f'batchllm_model_tokens_per_second{{model="{SMALL}"}}'] == per_worker
    assert values[f'batchllm_queue_depth{{model="{SMALL}"}}'] == 2


# ---------------------------------------------------------------------------------------------- priority
def test_redis_serves_priority_9_before_earlier_priority_0(app: Any) -> None:
    """Measured, not assumed: kombu's Redis priority lists must hand out a later p9 message first.

    Checked both the way Celery's worker consumes (BRPOP over the priority lists, via a kombu Consumer)
    and with basic_get (SimpleQueue); if this failed, the scheduler would have to hold messages back.
    """
    from kombu import Consumer, Queue

    for consume in ("consumer", "simple"):
        q = f"batchllm.prio-{consume}-{uuid.uuid4().hex[:6]}@bf16"
        msgs = [(ChunkMessage(chunk_id=f"p0-{i}", batch_id="b", model="m@bf16", size=1), q, 0) for i in range(4)]
        msgs += [(ChunkMessage(chunk_id="p5", batch_id="b", model="m@bf16", size=1), q, 5)]
        msgs += [(ChunkMessage(chunk_id="p9", batch_id="b", model="m@bf16", size=1), q, 9)]
        dispatch(app, msgs)
        got: list[str] = []
        with app.connection_for_read() as conn:
            if consume == "simple":
                while len(got) < 6:
                    got.append(_consume(app, q))
            else:
                def on_message(body: Any, m: Any, got: list[str] = got) -> None:
                    got.append(body[1]["chunk_id"])
                    m.ack()

                queue = Queue(q, routing_key=q, channel=conn.default_channel)
                with Consumer(conn, [queue], accept=["json"], prefetch_count=1, callbacks=[on_message]):
                    while len(got) < 6:
                        conn.drain_events(timeout=5)
        assert got == ["p9", "p5", "p0-0", "p0-1", "p0-2", "p0-3"], consume


def _consume(app: Any, q: str) -> str:
    """Take one message off queue ``q`` (as a worker would) and return its chunk id."""
    with app.connection_for_read() as conn:
        sq = conn.SimpleQueue(q)
        msg = sq.get(timeout=5)
        msg.ack()
        sq.close()
        return str(msg.payload[1]["chunk_id"])
