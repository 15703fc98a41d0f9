"""A private batchllm cluster for fault tests: its own PostgreSQL and Redis that a test can kill and restart.

Used by tests/test_faults.py, tests/test_faults_services.py (loopback) and tests/test_partition.py (workers in their
own network namespaces, services on veth addresses). Nothing is mocked: ``redis-server``, PostgreSQL's ``initdb`` and
``pg_ctl``, the ``batchllm scheduler`` and ``batchllm worker`` processes are the real ones. A missing binary
is a test failure, not a skip: a fault suite that silently does not run proves nothing.

Inspection goes through plain SQL (psycopg) on the store's tables, so the tests do not share the product's
own query code they are checking.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from batchllm.settings import Settings
from tests.conftest import WorkerProc, run_cli, stop_group

MODEL = "smollm2-135m-instruct"
REF = f"{MODEL}@bf16"
TERMINAL = ("completed", "failed", "cancelled", "expired")


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bindir() -> Path | None:
    """The directory with PostgreSQL's ``initdb`` and ``pg_ctl``."""
    for cand in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (cand / "initdb").is_file() and (cand / "pg_ctl").is_file():
            return cand
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def require(*binaries: str) -> None:
    """Fail (never skip) when a binary the fault suite needs is missing."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if "pg_ctl" in binaries and pg_bindir() is None:
        missing = [m for m in missing if m != "pg_ctl"] + ["initdb/pg_ctl"]
    elif "pg_ctl" in missing:
        missing.remove("pg_ctl")
    if missing:
        pytest.fail(f"the fault suite needs {', '.join(missing)} (bash scripts/setup.sh --test installs them)")


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``pred`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class PrivateRedis:
    """A redis-server of our own: password required, nothing persisted (a restart starts empty)."""

    def __init__(self, base: Path, port: int, password: str, bind: str = "127.0.0.1") -> None:
        self.base, self.port, self.password, self.bind = base, port, password, bind
        self.host = bind.split()[0]
        self.url = f"redis://:{quote(password, safe='')}@{self.host}:{port}/0"  # '/' and '@' percent-encoded
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.base / f"redis.{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", *self.bind.split(), "--save", "", "--appendonly", "no",
             "--requirepass", self.password, "--dir", str(self.base), "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_until(self._pong, 20, "redis-server to answer")

    def _pong(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:
            assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
            return False

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def client(self) -> Any:
        import redis

        return redis.Redis(host=self.host, port=self.port, password=self.password, socket_timeout=5)

    def queued(self) -> int:
        """Messages waiting in batchllm's queues."""
        r = self.client()
        return sum(int(r.llen(k)) for k in r.keys("batchllm.*") if r.type(k) == b"list")


class PrivatePostgres:
    """A PostgreSQL cluster of our own (scram password auth over TCP) that can be stopped and started."""

    def __init__(self, base: Path, port: int, password: str, listen: str = "127.0.0.1") -> None:
        self.dir = base / "pg"
        self.data = self.dir / "data"
        self.port, self.password, self.listen = port, password, listen
        self.host = listen.split(",")[0]
        self.bindir = pg_bindir()
        self.url = f"postgresql://postgres:{quote(password, safe='')}@{self.host}:{port}/batchllm"

    def _run(self, *args: str) -> None:
        assert self.bindir is not None
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {proc.stdout[-1500:]}{proc.stderr[-1500:]}")

    def init(self) -> None:
        self.dir.mkdir(parents=True)
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            shutil.chown(pwfile, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", f"--pwfile={pwfile}", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        with (self.data / "pg_hba.conf").open("a") as f:  # veth addresses are not loopback
            f.write("host all all 0.0.0.0/0 scram-sha-256\n")

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses='{self.listen}' -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "server.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` terminates every session at once (clients see their connections die)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self) -> None:
        with psycopg.connect(host=self.host, port=self.port, user="postgres", password=self.password,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute('CREATE DATABASE "batchllm"')


class Cluster:
    """The private services plus the batchllm processes, and helpers to submit, inspect and break things.

    Args:
        base: scratch directory (services' data, inputs).
        logs: where process logs go (kept after the run).
        redis, pg: the started private services.
        env: extra environment for every batchllm process (timing knobs).
    """

    def __init__(self, base: Path, logs: Path, redis: PrivateRedis, pg: PrivatePostgres, env: dict[str, str]) -> None:
        self.base, self.logs, self.redis, self.pg = base, logs, redis, pg
        self.db_url, self.broker_url = pg.url, redis.url
        data_dir = base / "data"
        data_dir.mkdir(exist_ok=True)
        self.env = dict(os.environ)
        self.env.update({
            "BATCHLLM_DATABASE_URL": self.db_url, "BATCHLLM_BROKER_URL": self.broker_url,
            "BATCHLLM_DATA_DIR": str(data_dir), "BATCHLLM_CONFIG": str(base / "no-batchllm.toml"),
            "BATCHLLM_METRICS_PORT": "0", **env,
        })
        self.settings = Settings(database_url=self.db_url, broker_url=self.broker_url, data_dir=data_dir,
                                 visibility_timeout=int(self.env.get("BATCHLLM_VISIBILITY_TIMEOUT", "43200")))
        self.workers: dict[str, WorkerProc] = {}
        self.log_files: list[Path] = []
        self._gen: dict[str, int] = {}
        self.schedulers: list[subprocess.Popen[bytes]] = []
        self.scheduler_log = logs / "scheduler.log"
        self.batches: list[str] = []
        self._inputs = 0
        self._conn: psycopg.Connection[Any] | None = None
        self.load_s = 0.0  # how long the first workers took to load, side by side (set by the fixture)

    # ------------------------------------------------------------------ processes
    def start_scheduler(self, prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
        self.log_files.append(self.scheduler_log)
        p = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "batchllm", "scheduler", "--interval", "1", "--metrics-port", "0"],
            env=self.env, stdout=self.scheduler_log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.schedulers.append(p)
        return p

    def start_worker(self, name: str, args: list[str], prefix: list[str] | None = None,
                     env: dict[str, str] | None = None) -> WorkerProc:
        n = self._gen[name] = self._gen.get(name, 0) + 1
        log = self.logs / f"{name}.{n}.log"
        self.log_files.append(log)
        w = WorkerProc(args, {**self.env, **(env or {})}, log, name, prefix=prefix)
        self.workers[name] = w
        return w

    def kill_worker(self, name: str) -> float:
        """SIGKILL the worker's whole process group (the Celery process and its vLLM engine core)."""
        w = self.workers[name]
        os.killpg(w.proc.pid, signal.SIGKILL)
        t = time.time()
        w.proc.wait(30)
        return t

    def signal_worker(self, name: str, sig: int) -> None:
        os.killpg(self.workers[name].proc.pid, sig)

    def ready(self, names: list[str], timeout: float = 240) -> None:
        for name in names:
            self.workers[name].wait_state(self.db_url, timeout=timeout)

    def serving(self) -> list[str]:
        return [n for n, w in self.workers.items() if w.proc.poll() is None]

    def logs_text(self, prefix: str = "") -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.log_files
                         if p.name.startswith(prefix) and p.exists())

    def teardown(self) -> None:
        for w in self.workers.values():
            if w.proc.poll() is None:
                os.killpg(w.proc.pid, signal.SIGCONT)
            w.stop(timeout=20)
        for p in self.schedulers:
            stop_group(p)
        if self._conn is not None:
            self._conn.close()

    # ------------------------------------------------------------------ batches
    def write_input(self, rows: list[dict[str, Any]]) -> Path:
        self._inputs += 1
        path = self.base / f"input-{self._inputs}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    def submit(self, rows: list[dict[str, Any]], model: str = MODEL, env: dict[str, str] | None = None) -> str:
        proc = run_cli(["submit", str(self.write_input(rows)), "-m", model], {**self.env, **(env or {})}, timeout=120)
        assert proc.returncode == 0, proc.stderr
        batch_id = proc.stdout.strip().splitlines()[0]
        assert batch_id.startswith("batch_"), proc.stdout
        self.batches.append(batch_id)
        return batch_id

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run one statement on the private database (autocommit; reconnects after an outage)."""
        for attempt in range(2):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self.db_url, autocommit=True, connect_timeout=5)
                cur = self._conn.execute(query, params)  # type: ignore[arg-type]
                return list(cur.fetchall()) if cur.description else []
            except psycopg.OperationalError:
                self._conn = None
                if attempt:
                    raise
        return []

    def status(self, batch_id: str) -> str:
        return str(self.sql("SELECT status FROM batches WHERE id = %s", batch_id)[0][0])

    def wait_batch(self, batch_id: str, timeout: float, on_poll: Callable[[], None] | None = None) -> float:
        """Wait until the batch reaches an end state; returns the time it was seen there."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if on_poll:
                on_poll()
            if self.status(batch_id) in TERMINAL:
                return time.time()
            time.sleep(0.2)
        raise AssertionError(f"batch {batch_id} not finished after {timeout:.0f}s: {self.describe(batch_id)}")

    def describe(self, batch_id: str) -> str:
        chunks = self.sql("SELECT seq, status, lease_owner, attempt FROM chunks WHERE batch_id = %s ORDER BY seq", batch_id)
        workers = self.sql("SELECT name, state, round((extract(epoch from now()) - last_heartbeat)::numeric, 1) FROM workers")
        return f"status={self.status(batch_id)} results={self.n_results(batch_id)} chunks={chunks} workers={workers}"

    def n_results(self, batch_id: str) -> int:
        return int(self.sql("SELECT count(*) FROM results WHERE batch_id = %s", batch_id)[0][0])

    def answers(self, batch_id: str) -> dict[str, tuple[int | None, str | None, int, str | None]]:
        """custom_id → (status code, stored body, attempt that wrote it, worker) for every written result."""
        rows = self.sql("SELECT r.custom_id, s.status_code, s.body, s.attempt, s.worker FROM results s "
                        "JOIN requests r ON r.id = s.request_id WHERE s.batch_id = %s", batch_id)
        return {r[0]: (r[1], r[2], int(r[3]), r[4]) for r in rows}

    def chunks(self, batch_id: str) -> list[dict[str, Any]]:
        cols = ("id", "seq", "status", "lease_owner", "attempt", "size", "model", "queue", "priority", "batch_id")
        rows = self.sql(f"SELECT {', '.join(cols)} FROM chunks WHERE batch_id = %s ORDER BY seq", batch_id)
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def leased_progress(self, batch_id: str) -> list[tuple[str, str | None, int, int]]:
        """(chunk, lease owner instance, results written, size) for the batch's leased chunks."""
        return [tuple(r) for r in self.sql(  # type: ignore[misc]
            "SELECT c.id, c.lease_owner, count(s.request_id), c.size FROM chunks c JOIN requests r ON r.chunk_id = c.id "
            "LEFT JOIN results s ON s.request_id = r.id WHERE c.batch_id = %s AND c.status = 'leased' "
            "GROUP BY c.id, c.lease_owner, c.size", batch_id)]

    def instance_of(self, name: str) -> str | None:
        rows = self.sql("SELECT instance FROM workers WHERE name = %s", name)
        return rows[0][0] if rows else None

    def name_of(self, instance: str | None) -> str | None:
        rows = self.sql("SELECT name FROM workers WHERE instance = %s", instance)
        return rows[0][0] if rows else None

    def stale_writes(self, name: str) -> int:
        rows = self.sql("SELECT stale_writes FROM workers WHERE name = %s", name)
        return int(rows[0][0]) if rows else 0

    def worker_state(self, name: str) -> tuple[str, float] | None:
        """(state, heartbeat age by the database's clock) of a worker row."""
        rows = self.sql("SELECT state, extract(epoch from now()) - last_heartbeat FROM workers WHERE name = %s", name)
        return (rows[0][0], float(rows[0][1])) if rows else None

    def exported(self, batch_id: str, out: Path) -> dict[str, dict[str, Any]]:
        """Export through `batchllm results` (output and error files); custom_id → line, each seen exactly once."""
        err = out.with_suffix(".errors.jsonl")
        r = run_cli(["results", batch_id, "-o", str(out), "--errors", str(err)], self.env, timeout=120)
        assert r.returncode == 0, r.stderr
        seen: dict[str, dict[str, Any]] = {}
        for path in (out, err):
            for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
                obj = json.loads(line)
                assert obj["custom_id"] not in seen, f"{obj['custom_id']} exported twice"
                seen[obj["custom_id"]] = obj
        return seen

    def check_exactly_once(self, batch_id: str, out: Path, n: int) -> dict[str, dict[str, Any]]:
        """Every one of ``n`` requests answered once and successfully (200), counters match the applied rows."""
        lines = self.exported(batch_id, out)
        assert len(lines) == n, f"{len(lines)} of {n} requests exported"
        bad = {k: v for k, v in lines.items() if (v.get("response") or {}).get("status_code") != 200}
        assert not bad, f"{len(bad)} request(s) did not succeed, e.g. {next(iter(bad.values()))}"
        (done, failed, out_tok), = self.sql("SELECT completed_count, failed_count, output_tokens FROM batches WHERE id = %s",
                                            batch_id)
        (tok,), = self.sql("SELECT coalesce(sum(completion_tokens), 0) FROM results WHERE batch_id = %s", batch_id)
        assert (done, failed) == (n, 0) and int(out_tok) == int(tok), (done, failed, out_tok, tok)
        return lines


def chat(n: int, tag: str, max_tokens: int | Callable[[int], int] = 16, temperature: float = 1.0) -> list[dict[str, Any]]:
    """Chat requests (no seed) that generate up to ``max_tokens`` (a number, or a function of the index)."""
    return [
        {"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Write a short story about the number {i}."}],
                  "max_tokens": max_tokens(i) if callable(max_tokens) else max_tokens, "temperature": temperature}}
        for i in range(n)
    ]


def staggered(i: int) -> int:
    """8..64 tokens within each chunk of 8, so a chunk's results arrive over many engine steps."""
    return 8 + (i % 8) * 8


def unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Every answer read earlier is still there, byte for byte (at temperature 1.0 a re-run would differ)."""
    changed = [k for k, v in before.items() if after.get(k, (None, None))[1] != v[1]]
    assert not changed, f"{len(changed)} answer(s) changed after they were first read: {changed[:5]}"


def start_services(base: Path, redis_bind: str = "127.0.0.1",
                   pg_listen: str = "127.0.0.1") -> tuple[PrivateRedis, PrivatePostgres]:
    """Start a private PostgreSQL (schema at head) and Redis; the caller stops them with ``stop_services``."""
    import secrets

    from batchllm.store.db import upgrade

    require("redis-server", "pg_ctl", "runuser")
    os.chmod(base, 0o755)  # the postgres user must reach its data directory
    redis = PrivateRedis(base, free_port(), "rpw/" + secrets.token_hex(8), redis_bind)
    pg = PrivatePostgres(base, free_port(), "pg/pw@" + secrets.token_hex(8), pg_listen)
    pg.init()
    pg.start()
    pg.create_database()
    upgrade(pg.url)
    redis.start()
    return redis, pg


def stop_services(redis: PrivateRedis, pg: PrivatePostgres) -> None:
    if redis.proc is not None and redis.proc.poll() is None:
        redis.kill()
    try:
        pg.stop("immediate")
    except Exception:
        pass
