"""The child processes of ``bench/scale.py``: a real scheduler, and a group of stub workers.

* ``scheduler_main``: ``batchllm.scheduler.loop.Scheduler`` (its real tick: leader lease, recover, assign,
  lifecycle, dispatch into Redis, metrics) ticking every ``interval`` seconds, as ``run_forever`` does. Each
  tick's wall time and SQL statements (a SQLAlchemy ``before_cursor_execute`` listener on the store's
  engine, counted here in bench/ only) go to a JSON-lines file.
* ``workers_main``: ``count`` in-process workers, each a real ``WorkerRuntime`` (fenced claim, feed, result
  writer thread, heartbeat) on a ``tests.stub_engine.StubEngine`` (no model). Each takes its model queue's
  messages as kombu's Redis transport does (``BRPOP`` over the priority sub-queues, most urgent first) and
  runs them through ``WorkerRuntime.run_chunk``, the Celery task's body. Every claim is logged.

Both stop on SIGTERM and flush their log files first.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from batchllm.queue import ChunkMessage, make_celery, queue_name
from batchllm.settings import Settings
from batchllm.status import WorkerState

MIB = 2**20


def bench_settings(db_url: str, redis_url: str, models_file: Path, interval: float) -> Settings:
    """Settings every process of the bench shares."""
    return Settings(database_url=db_url, broker_url=redis_url, models_file=models_file, data_dir=Path("/tmp/bl_scale_data"),
                    model_dir=Path("/tmp/bl_scale_models"), heartbeat_interval=5.0, heartbeat_timeout=60.0,
                    lease_seconds=60.0, scheduler_interval=interval, scheduler_lease_seconds=30.0)


def _stopper() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def scheduler_main(st: Settings, out: Path) -> None:
    """Tick the real scheduler until SIGTERM; one JSON line per tick: seconds, statements, what it did."""
    from sqlalchemy import event  # the bench's statement counter (allowed in bench/ only)

    from batchllm.scheduler.loop import Scheduler
    from batchllm.store.db import get_engine

    count = [0]
    event.listen(get_engine(st.database_url), "before_cursor_execute", lambda *a, **k: count.__setitem__(0, count[0] + 1))
    sched = Scheduler(st, make_celery(st))
    stop = _stopper()
    with out.open("w") as f:
        while not stop.is_set():
            started, n0 = time.perf_counter(), count[0]
            summary = sched.tick()
            took = time.perf_counter() - started
            f.write(json.dumps({"t": time.time(), "s": took, "statements": count[0] - n0,
                                "dispatched": summary.get("dispatched", 0), "finalized": len(summary.get("finalized") or {}),
                                "errors": summary.get("errors", [])}) + "\n")
            f.flush()
            stop.wait(max(0.0, st.scheduler_interval - took))
    sched.resign()


def _identity(name: str) -> dict[str, Any]:
    return {"host": "bench", "pid": os.getpid(), "kind": "cuda", "tensor_parallel": 1, "pinned": True,
            "devices": [{"index": 0, "name": "bench GPU", "total_bytes": 80_000 * MIB, "kind": "cuda"}],
            "memory_total_bytes": 80_000 * MIB, "memory_free_bytes": 80_000 * MIB, "advertised_bytes": None}


def workers_main(st: Settings, refs: list[str], first: int, out: Path) -> None:
    """Run one stub worker per entry of ``refs`` (worker ``first + i`` hosts ``refs[i]``) until SIGTERM."""
    import redis

    from batchllm.store import workers as worker_rows
    from batchllm.store.db import with_db_retry
    from batchllm.worker.runtime import WorkerIdentity, WorkerRuntime
    from tests.stub_engine import StubEngine

    stop = _stopper()
    claims: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one(i: int, ref: str) -> None:
        try:
            serve(i, ref)
        except Exception as e:  # one worker dying must not end the others; the scheduler sees it as lost
            print(f"bench worker {first + i} died: {type(e).__name__}: {e}"[:300], flush=True)

    def serve(i: int, ref: str) -> None:
        name, instance = f"bench-w{first + i:03d}", uuid.uuid4().hex
        ident = _identity(name)
        with_db_retry(lambda: worker_rows.register(st.database_url, name, instance, ident, WorkerState.READY,
                                                   timeout=st.heartbeat_timeout), st.database_url, 60, "register")
        worker_rows.heartbeat(st.database_url, instance, model=ref)
        identity = WorkerIdentity(name=name, instance=instance, kind="cuda", devices=ident["devices"],
                                  memory_total_bytes=ident["memory_total_bytes"], memory_free_bytes=ident["memory_free_bytes"],
                                  advertised_bytes=None, host="bench", pinned=True)
        rt = WorkerRuntime(st, identity, ref, StubEngine(capacity=64, model=ref), feed_depth=64)
        rt.start_heartbeat()
        q = queue_name(ref)
        keys = [q] + [f"{q}:{p}" for p in range(1, 10)]  # kombu's priority sub-queues, most urgent first
        client = redis.Redis.from_url(st.broker_url)
        while not stop.is_set():
            got = client.brpop(keys, timeout=1)
            if got is None:
                continue
            popped = time.time()
            payload = json.loads(got[1])
            kwargs = json.loads(base64.b64decode(payload["body"]))[1]  # Celery protocol 2: [args, kwargs, embed]
            try:
                outcome: Any = rt.run_chunk(ChunkMessage(**kwargs))
            except Exception as e:  # as Celery would: the task failed, the worker goes on (the lease lapses)
                outcome = f"error: {type(e).__name__}: {e}"[:200]
            with lock:
                claims.append({"t": popped, "claimed": time.time(), "chunk": kwargs["chunk_id"], "batch": kwargs["batch_id"],
                               "queue": q, "outcome": str(outcome)})

    threads = [threading.Thread(target=one, args=(i, ref), daemon=True) for i, ref in enumerate(refs)]
    for t in threads:
        t.start()
    stop.wait()
    deadline = time.monotonic() + 3  # each consumer notices within its 1 s BRPOP timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        out.write_text("\n".join(json.dumps(c) for c in claims) + "\n")
    os._exit(0)  # leases and rows of this bench's database need no clean shutdown


def main(argv: list[str]) -> None:
    """Entry point of the children: ``scheduler DB REDIS MODELS INTERVAL OUT`` or
    ``workers DB REDIS MODELS FIRST OUT REF,REF,...``."""
    kind, db, rds, models = argv[:4]
    if kind == "scheduler":
        scheduler_main(bench_settings(db, rds, Path(models), float(argv[4])), Path(argv[5]))
    else:
        workers_main(bench_settings(db, rds, Path(models), 2.0), argv[6].split(","), int(argv[4]), Path(argv[5]))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(sys.argv[1:])
