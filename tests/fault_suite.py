"""The fault suite's private cluster and helpers, shared by tests/test_faults.py and tests/test_faults_services.py
(a pytest plugin of both: each module gets its own ``cluster``).

Nothing is mocked. Each module starts a private cluster (tests/fault_cluster.py): its own PostgreSQL and Redis
(passwords with ``/`` and ``@``), a real ``batchllm scheduler`` and two real ``batchllm worker --cpu`` processes
running SmolLM2-135M under vLLM. Requests run at temperature 1.0 with no seed: a chunk that ran twice, or a
stale worker's write that overwrote a row, would change an answer's text, and every test compares the answers
it read during the fault with the final ones. Recovered requests must have *succeeded* (status 200), and
``batchllm results`` must export each request exactly once.

Timing of every process started here: heartbeat every 1 s, a worker is lost after 6 s without one, chunk leases
last 8 s, Redis's visibility timeout is 2 s (redelivery must be harmless), and writes retry a database outage for
10 s before the chunk is given up (and released, when the database returns, to run again).

``docs/reliability.md`` is rendered from these tests only by ``bash scripts/reliability-report.sh``.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fault_cluster import (
    MODEL,
    Cluster,
    start_services,
    stop_services,
)

GHOST = "ghost-smol"  # a catalog entry whose weights directory does not exist
LEASE_S = 8.0
VISIBILITY_S = 2
HEARTBEAT_TIMEOUT_S = 6.0
DB_RETRY_S = 10.0
RESEND_AFTER_S = 60.0  # the scheduler's time-based resend of a message presumed lost
WORKER_ARGS = ["--cpu", "--model", MODEL, "--loglevel", "INFO"]
ENV = {
    "BATCHLLM_LEASE_SECONDS": str(LEASE_S), "BATCHLLM_VISIBILITY_TIMEOUT": str(VISIBILITY_S),
    "BATCHLLM_HEARTBEAT_INTERVAL": "1", "BATCHLLM_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
    "BATCHLLM_DB_RETRY_SECONDS": str(DB_RETRY_S), "BATCHLLM_CHUNK_SIZE": "8",
}


@pytest.fixture(scope="module")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The private cluster: PostgreSQL, Redis, the scheduler and two warm CPU workers (fw-1, fw-2)."""
    base = Path(tempfile.mkdtemp(prefix="batchllm-faults-"))
    logs = tmp_path_factory.mktemp("fault-logs")
    redis, pg = start_services(base)
    models_file = base / "models.toml"
    models_file.write_text(  # SmolLM2's numbers, so it fits a CPU worker; its weights are nowhere
        f'[models.{GHOST}]\nsource = "{base}/no-such-weights/{GHOST}"\nparams_b = 0.135\nlayers = 30\nheads = 9\n'
        'kv_heads = 3\nhead_dim = 64\nmax_model_len = 8192\ncpu_ok = true\nvariants = [{ name = "bf16", floor_gb = 1 }]\n',
        encoding="utf-8",
    )
    c = Cluster(base, logs, redis, pg, {**ENV, "BATCHLLM_MODELS_FILE": str(models_file)})
    try:
        c.start_scheduler()
        t0 = time.time()
        c.start_worker("fw-1", WORKER_ARGS)
        c.start_worker("fw-2", WORKER_ARGS)
        c.ready(["fw-1", "fw-2"])
        c.load_s = time.time() - t0
        from tests.reliability_report import add_context

        add_context(
            "Test cluster: private PostgreSQL and Redis (password-protected, passwords containing `/` and `@`) on spare "
            "ports, a `batchllm scheduler` ticking every 1 s, two `batchllm worker --cpu` processes (SmolLM2-135M under "
            f"vLLM). Timing: heartbeat every 1 s, a worker is lost after {HEARTBEAT_TIMEOUT_S:.0f} s without one, chunk "
            f"lease {LEASE_S:.0f} s, Redis visibility timeout {VISIBILITY_S} s, database retry budget {DB_RETRY_S:.0f} s, "
            "chunk size 8. Requests at temperature 1.0, no seed (production defaults: heartbeat 5 s, timeout 30 s, "
            "lease 30 s, retry budget 120 s, chunk 64: recovery times scale with them)."
        )
        yield c
    finally:
        c.teardown()
        print(f"\n[faults] logs of the private cluster: {logs}")
        stop_services(redis, pg)
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def serving(c: Cluster) -> list[str]:
    return [n for n in c.serving() if n.startswith("fw-")]


def ensure_two(c: Cluster) -> None:
    """fw-1 and fw-2 running and ready (a test that killed one restarts it)."""
    for name in ("fw-1", "fw-2"):
        if name not in c.workers or c.workers[name].proc.poll() is not None:
            c.start_worker(name, WORKER_ARGS)
    c.ready(["fw-1", "fw-2"], timeout=300)


def mid_chunk(c: Cluster, batch_id: str, timeout: float = 120) -> tuple[str, dict[str, tuple[int, int]]]:
    """Wait until a serving worker holds a chunk of the batch with some, not all, results written.

    Returns:
        (worker name, {chunk id: (results written, size)} of the chunks it holds).
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        progress = c.leased_progress(batch_id)
        for _cid, owner, done, size in progress:
            name = c.name_of(owner)
            if name in serving(c) and 0 < done < size:
                return name, {cid: (n, sz) for cid, o, n, sz in progress if o == owner}
        time.sleep(0.05)
    raise AssertionError(f"no chunk was caught half-written: {c.describe(batch_id)}")


def attempts(c: Cluster, batch_id: str) -> dict[str, int]:
    return {ck["id"]: ck["attempt"] for ck in c.chunks(batch_id)}


def store_unsent(c: Cluster, rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Store a batch through the real submit service, its messages not sent (marked sent, so the scheduler
    leaves them alone): the test delivers them when it wants to."""
    from batchllm.services.submit import submit_file
    from batchllm.store import dispatch as store_dispatch

    res = submit_file(c.settings, c.write_input(rows), model=MODEL)
    chunks = c.chunks(res.batch_id)
    store_dispatch.mark_sent(c.db_url, [ck["id"] for ck in chunks])
    c.batches.append(res.batch_id)
    return res.batch_id, chunks


def send(c: Cluster, chunks: list[dict[str, Any]]) -> None:
    """Send the chunks' ``run_chunk`` messages, as submit and the scheduler do."""
    from batchllm.queue import dispatch, make_celery
    from batchllm.store.dispatch import ChunkRef

    dispatch(make_celery(c.settings), [ChunkRef(ck["id"], ck["batch_id"], ck["model"], ck["queue"], ck["size"], ck["priority"])
                                       for ck in chunks])


def unacked(c: Cluster, chunk_id: str) -> tuple[float, str] | None:
    """(seconds since delivery, Celery task id) of the chunk's message while it is delivered and not acked."""
    redis = c.redis.client()
    for tag, raw in redis.hgetall("unacked").items():
        score = redis.zscore("unacked_index", tag)
        if chunk_id.encode() in raw and score is not None:
            return time.time() - score, json.loads(raw)[0]["headers"]["id"]
    return None


def sweep(c: Cluster) -> None:
    """kombu's restore sweep (what every idle Celery worker runs periodically), with the cluster's 2 s timeout."""
    from batchllm.queue import make_celery

    with make_celery(c.settings).connection_for_write() as conn:
        conn.default_channel.qos.restore_visible(num=1000, interval=1)


def short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
