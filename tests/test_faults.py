"""Fault injection on real processes: kill workers, Redis and PostgreSQL mid-batch; bad messages; credentials.

Nothing is mocked. The module starts a private cluster on spare ports so it can kill and restart every part:
its own PostgreSQL (initdb + pg_ctl, password auth), its own Redis (``--requirepass``, no persistence, so a
restart loses every queued message), a real ``batchllm scheduler`` and two real ``batchllm worker --cpu``
processes running SmolLM2-135M under vLLM. Each test injects one fault while a batch runs and checks the
SPEC's reliability rules: the batch still ends, every request has exactly one result, and no chunk runs
twice unless its worker died.

Cluster timing (environment of every process started here): heartbeat every 1 s, a worker is lost after 6 s
without one, leases last 30 s (longer than the heartbeat timeout, as in production where both are 30 s, so
a dead worker's work comes back through its lapsed heartbeat, not through lease expiry) and Redis's
visibility timeout is 2 s (redelivery must be harmless).

Each test adds rows to ``docs/reliability.md`` through the ``reliability`` fixture (tests/reliability_report.py).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from batchllm.settings import Settings
from batchllm.store.db import session_scope
from batchllm.store.models import Batch, Chunk, Request, Result, Worker
from tests.conftest import WorkerProc, run_cli

pytest_plugins = ["tests.reliability_report"]
pytestmark = [pytest.mark.faults, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
REF = f"{MODEL}@bf16"
GHOST = "ghost-smol"  # a catalog entry whose weights directory does not exist
LEASE_S = 30.0
VISIBILITY_S = 2
HEARTBEAT_TIMEOUT_S = float(os.environ.get("BATCHLLM_HEARTBEAT_TIMEOUT", "6"))
TERMINAL = ("completed", "failed", "cancelled", "expired")
WORKER_ARGS = ["--cpu", "--model", MODEL, "--loglevel", "INFO"]


# ----------------------------------------------------------------------------- private services


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bindir() -> Path | None:
    for cand in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (cand / "initdb").is_file() and (cand / "pg_ctl").is_file():
            return cand
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


class PrivateRedis:
    """A redis-server of our own: password required, nothing persisted (a restart starts empty)."""

    def __init__(self, base: Path, port: int, password: str) -> None:
        self.base, self.port, self.password = base, port, password
        self.url = f"redis://:{password}@127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.base / f"redis.{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--requirepass", self.password, "--dir", str(self.base)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.time() + 20
        while True:
            try:
                client.ping()
                return
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: a crash, no chance to save anything."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)


class PrivatePostgres:
    """A PostgreSQL cluster of our own (scram password auth over TCP) that can be stopped and started."""

    def __init__(self, base: Path, port: int, password: str) -> None:
        self.dir = base / "pg"
        self.data = self.dir / "data"
        self.port, self.password = port, password
        self.bindir = _pg_bindir()
        self.url = f"postgresql://postgres:{password}@127.0.0.1:{port}/batchllm"

    def _run(self, *args: str) -> None:
        assert self.bindir is not None
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:1])} failed: {proc.stdout[-1500:]}{proc.stderr[-1500:]}")

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

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "server.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` terminates every session at once (clients see their connections die)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self) -> None:
        import psycopg

        admin = f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute('CREATE DATABASE "batchllm"')


# ----------------------------------------------------------------------------- the cluster


class Cluster:
    """The private cluster and helpers to submit, wait, inspect and break things."""

    def __init__(self, base: Path, logs: Path, redis: PrivateRedis, pg: PrivatePostgres) -> None:
        self.base, self.logs, self.redis, self.pg = base, logs, redis, pg
        self.db_url, self.broker_url = pg.url, redis.url
        self.models_file = base / "models.toml"
        self.models_file.write_text(  # SmolLM2's numbers, so it fits a CPU worker; its weights are nowhere
            f'# A model whose weights directory does not exist (tests/test_faults.py).\n[models.{GHOST}]\n'
            f'source = "{base}/no-such-weights/{GHOST}"\nparams_b = 0.135\nlayers = 30\nheads = 9\nkv_heads = 3\n'
            'head_dim = 64\nmax_model_len = 8192\ncpu_ok = true\nvariants = [{ name = "bf16", floor_gb = 1 }]\n',
            encoding="utf-8",
        )
        data_dir = base / "data"
        data_dir.mkdir()
        self.env = dict(os.environ)
        self.env.update({
            "BATCHLLM_DATABASE_URL": self.db_url, "BATCHLLM_BROKER_URL": self.broker_url,
            "BATCHLLM_DATA_DIR": str(data_dir), "BATCHLLM_MODELS_FILE": str(self.models_file),
            "BATCHLLM_LEASE_SECONDS": str(LEASE_S), "BATCHLLM_VISIBILITY_TIMEOUT": str(VISIBILITY_S),
            "BATCHLLM_CONFIG": str(base / "no-batchllm.toml"), "BATCHLLM_METRICS_PORT": "0",
        })
        self.settings = Settings(
            database_url=self.db_url, broker_url=self.broker_url, data_dir=data_dir, models_file=self.models_file,
            lease_seconds=LEASE_S, visibility_timeout=VISIBILITY_S,
        )
        self.workers: dict[str, WorkerProc] = {}
        self.log_files: list[Path] = []
        self._gen: dict[str, int] = {}
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.scheduler_log = logs / "scheduler.log"
        self.batches: list[str] = []
        self._inputs = 0
        self.load_s = 0.0  # how long the first two workers took to load the model, side by side

    # processes
    def start_scheduler(self) -> None:
        self.log_files.append(self.scheduler_log)
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "batchllm", "scheduler", "--interval", "1", "--metrics-port", "0"],
            env=self.env, stdout=self.scheduler_log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def start_worker(self, name: str, args: list[str] | None = None) -> WorkerProc:
        n = self._gen[name] = self._gen.get(name, 0) + 1
        log = self.logs / f"{name}.{n}.log"
        self.log_files.append(log)
        w = WorkerProc(args or WORKER_ARGS, self.env, log, name)
        self.workers[name] = w
        return w

    def kill_worker(self, name: str) -> float:
        """SIGKILL the worker's whole process group (the Celery process and its vLLM engine)."""
        w = self.workers[name]
        os.killpg(w.proc.pid, signal.SIGKILL)
        t = time.time()
        w.proc.wait(30)
        return t

    def signal_workers(self, sig: int) -> None:
        for w in self.workers.values():
            if w.proc.poll() is None:
                os.killpg(w.proc.pid, sig)

    def ready(self, names: list[str] | None = None, timeout: float = 240) -> None:
        for name in names or self.serving():
            self.workers[name].wait_state(self.db_url, timeout=timeout)

    def serving(self) -> list[str]:
        return [n for n, w in self.workers.items() if w.proc.poll() is None and n.startswith("fw-")]

    def logs_text(self, prefix: str = "fw-") -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.log_files if p.name.startswith(prefix) and p.exists())

    def teardown(self) -> None:
        self.signal_workers(signal.SIGCONT)
        for w in self.workers.values():
            w.stop(timeout=20)
        if self.scheduler is not None and self.scheduler.poll() is None:
            os.killpg(self.scheduler.pid, signal.SIGTERM)
            try:
                self.scheduler.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.scheduler.pid, signal.SIGKILL)
        from batchllm.store.db import get_engine

        try:
            get_engine(self.db_url).dispose()
        except Exception:
            pass

    # batches
    def write_input(self, rows: list[dict[str, Any]]) -> Path:
        self._inputs += 1
        path = self.base / f"input-{self._inputs}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    def submit(self, rows: list[dict[str, Any]], model: str = MODEL, env: dict[str, str] | None = None) -> str:
        proc = run_cli(["submit", str(self.write_input(rows)), "-m", model], {**self.env, **(env or {})}, timeout=120)
        assert proc.returncode == 0, proc.stderr
        batch_id = proc.stdout.strip().splitlines()[-1]
        assert batch_id.startswith("batch_"), proc.stdout
        self.batches.append(batch_id)
        return batch_id

    def status(self, batch_id: str) -> str:
        with session_scope(self.db_url) as s:
            b = s.get(Batch, batch_id)
            assert b is not None
            return b.status

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
        with session_scope(self.db_url) as s:
            b = s.get(Batch, batch_id)
            n = s.scalar(select(func.count()).select_from(Result).where(Result.batch_id == batch_id))
            chunks = [(c.seq, c.status, c.lease_owner, c.attempts) for c in
                      s.scalars(select(Chunk).where(Chunk.batch_id == batch_id).order_by(Chunk.seq))]
            workers = [(w.name, w.state, round(time.time() - w.last_heartbeat, 1)) for w in s.scalars(select(Worker))]
        return f"status={b.status if b else None} results={n} chunks={chunks} workers={workers}"

    def n_results(self, batch_id: str) -> int:
        with session_scope(self.db_url) as s:
            return int(s.scalar(select(func.count()).select_from(Result).where(Result.batch_id == batch_id)) or 0)

    def exactly_once(self, batch_id: str) -> tuple[int, int]:
        """Assert every request has exactly one result row; returns (requests, results)."""
        with session_scope(self.db_url) as s:
            reqs = list(s.scalars(select(Request.id).where(Request.batch_id == batch_id)))
            per = dict(s.execute(select(Result.request_id, func.count()).where(Result.batch_id == batch_id)
                                 .group_by(Result.request_id)).all())
        missing = [r for r in reqs if r not in per]
        assert not missing, f"{len(missing)} request(s) without a result"
        assert all(n == 1 for n in per.values()) and set(per) == set(reqs)
        return len(reqs), sum(per.values())

    def chunks(self, batch_id: str) -> list[Chunk]:
        with session_scope(self.db_url) as s:
            return list(s.scalars(select(Chunk).where(Chunk.batch_id == batch_id).order_by(Chunk.seq)))

    def result_times(self, batch_id: str) -> dict[int, float]:
        with session_scope(self.db_url) as s:
            return dict(s.execute(select(Result.request_id, Result.created_at).where(Result.batch_id == batch_id)).all())

    def leased_progress(self, batch_id: str) -> list[tuple[str, str | None, int, int]]:
        """(chunk, lease owner, results written, size) for the batch's leased chunks."""
        with session_scope(self.db_url) as s:
            return [tuple(r) for r in s.execute(  # type: ignore[misc]
                select(Chunk.id, Chunk.lease_owner, func.count(Result.request_id), Chunk.size)
                .join(Request, Request.chunk_id == Chunk.id)
                .outerjoin(Result, Result.request_id == Request.id)
                .where(Chunk.batch_id == batch_id, Chunk.status == "leased")
                .group_by(Chunk.id, Chunk.lease_owner, Chunk.size)
            ).all()]

    def view(self, batch_id: str) -> dict[str, Any]:
        proc = run_cli(["status", batch_id, "--json"], self.env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


def prompts(n: int, tag: str, max_tokens: int | Callable[[int], int] = 16) -> list[dict[str, Any]]:
    """Completion requests that generate up to ``max_tokens`` (a number, or a function of the index)."""
    return [
        {"id": f"{tag}-{i}", "prompt": f"Count from {i} upward, one number per line:",
         "max_tokens": max_tokens(i) if callable(max_tokens) else max_tokens, "temperature": 0}
        for i in range(n)
    ]


def staggered(i: int) -> int:
    """2..16 tokens within each chunk of 8, so a chunk's results arrive over several engine steps."""
    return 2 + (i % 8) * 2


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The private cluster: PostgreSQL, Redis with a password, the scheduler and two warm CPU workers."""
    from batchllm.store.db import upgrade

    if shutil.which("redis-server") is None or _pg_bindir() is None:
        pytest.skip("needs redis-server and PostgreSQL's initdb/pg_ctl on this machine")
    base = Path(tempfile.mkdtemp(prefix="batchllm-faults-"))
    os.chmod(base, 0o755)  # the postgres user must reach its data directory
    logs = tmp_path_factory.mktemp("fault-logs")
    redis = PrivateRedis(base, _free_port(), "rpw" + secrets.token_hex(10))
    pg = PrivatePostgres(base, _free_port(), "pgpw" + secrets.token_hex(10))
    c: Cluster | None = None
    try:
        pg.init()
        pg.start()
        pg.create_database()
        upgrade(pg.url)
        redis.start()
        c = Cluster(base, logs, redis, pg)
        c.start_scheduler()
        t0 = time.time()
        c.start_worker("fw-1")
        c.start_worker("fw-2")
        c.ready(["fw-1", "fw-2"])
        c.load_s = time.time() - t0
        from tests.reliability_report import add_context

        hb = os.environ.get("BATCHLLM_HEARTBEAT_INTERVAL", "?")
        add_context(
            f"Test cluster: private PostgreSQL 15 and Redis 7 on spare ports, a `batchllm scheduler` ticking every 1 s, "
            f"two `batchllm worker --cpu` processes. Timing: heartbeat every {hb} s, a worker is lost after "
            f"{HEARTBEAT_TIMEOUT_S:.0f} s without one, chunk lease {LEASE_S:.0f} s, Redis visibility timeout "
            f"{VISIBILITY_S} s, chunk size {os.environ.get('BATCHLLM_CHUNK_SIZE', '?')} (production defaults: "
            "heartbeat 5 s, timeout 30 s, lease 30 s, visibility 12 h, chunk 64: recovery times scale with the timeout)."
        )
        yield c
    finally:
        if c is not None:
            c.teardown()
            print(f"\n[faults] logs of the private cluster: {logs}")
        if redis.proc is not None and redis.proc.poll() is None:
            redis.kill()
        try:
            pg.stop("immediate")
        except Exception:
            pass
        shutil.rmtree(base, ignore_errors=True)


def kill_mid_chunk(c: Cluster, batch_id: str, timeout: float = 90) -> tuple[str, float, dict[str, tuple[int, int]]]:
    """SIGKILL whichever worker first holds a chunk of the batch with some, not all, results written.

    Returns:
        (worker name, kill time, {chunk id: (results written, size)} for every chunk it held at the kill).
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        for _cid, owner, done, size in c.leased_progress(batch_id):
            if owner in c.serving() and 0 < done < size:
                t = c.kill_worker(owner)
                held = {cid: (n, sz) for cid, o, n, sz in c.leased_progress(batch_id) if o == owner}
                return owner, t, held
        time.sleep(0.05)
    raise AssertionError(f"no chunk was caught half-written: {c.describe(batch_id)}")


def sweep(c: Cluster) -> None:
    """kombu's restore sweep (what every idle Celery worker runs periodically), with the cluster's 2 s timeout:
    messages delivered and not acked for longer than the visibility timeout go back to their queue."""
    from batchllm.queue import make_celery

    with make_celery(c.settings).connection_for_write() as conn:
        conn.default_channel.qos.restore_visible(num=1000, interval=1)


def unacked(c: Cluster, chunk_id: str) -> tuple[float, str] | None:
    """(seconds since delivery, Celery task id) of the chunk's message while it is delivered and not acked."""
    redis = c.redis.client()
    for tag, raw in redis.hgetall("unacked").items():
        score = redis.zscore("unacked_index", tag)
        if chunk_id.encode() in raw and score is not None:
            return time.time() - score, json.loads(raw)[0]["headers"]["id"]
    return None


def held_past_timeout(c: Cluster, chunk_id: str, timeout: float = 90) -> tuple[str, float]:
    """Wait until the chunk's message has been unacked longer than the visibility timeout; (task id, age)."""
    start = time.time()

    def check() -> tuple[str, float] | str | None:
        msg = unacked(c, chunk_id)
        if msg is not None and msg[0] > VISIBILITY_S + 0.5:
            return msg[1], msg[0]
        return "acked" if msg is None and time.time() - start > 5 else None

    got = wait_until(check, timeout, "the message to outlive the visibility timeout")
    assert got != "acked", "the task returned (acked its message) within the visibility timeout"
    return got  # type: ignore[return-value]


def deliveries(c: Cluster, task_id: str, n: int) -> tuple[list[str], list[str]]:
    """The workers whose log shows the task feeding ``n`` requests to the engine / being skipped (a redelivered
    message keeps its task id)."""
    fed: list[str] = []
    skipped: list[str] = []
    for path in c.log_files:
        if path.name.startswith("fw-") and path.exists():
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if task_id in ln and "succeeded" in ln]
            fed += [path.name.split(".")[0] for ln in lines if f"'fed {n}'" in ln]
            skipped += [path.name.split(".")[0] for ln in lines if "'skipped'" in ln]
    return fed, skipped


def task_seconds(c: Cluster, task_id: str) -> float:
    """The longest run of the task (any delivery) as Celery logged it: how long its message stayed unacked."""
    found = re.findall(rf"\[{re.escape(task_id)}\] succeeded in ([0-9.]+)s", c.logs_text())
    return max((float(x) for x in found), default=0.0)


def fed_and_skipped(c: Cluster, task_id: str, n: int) -> tuple[list[str], list[str]] | None:
    """``deliveries`` once the task was seen both feeding the engine and skipped, else None."""
    fed, skipped = deliveries(c, task_id, n)
    return (fed, skipped) if fed and skipped else None


def store_unsent(c: Cluster, rows: list[dict[str, Any]]) -> tuple[str, list[Chunk]]:
    """Store a batch through the real submit path without sending its messages (marked sent, so the scheduler
    leaves it alone): the test delivers them when it wants to."""
    from batchllm.services.submit import submit_file
    from batchllm.store import leases

    res = submit_file(c.settings, c.write_input(rows), app=None, model=MODEL)
    chunks = c.chunks(res.batch_id)
    with session_scope(c.db_url) as s:
        leases.mark_dispatched(s, [ck.id for ck in chunks])
    c.batches.append(res.batch_id)
    return res.batch_id, chunks


def send(c: Cluster, chunks: list[Chunk]) -> None:
    """Send the chunks' ``run_chunk`` messages, as submit and the scheduler do."""
    from batchllm.queue import ChunkMessage, dispatch, make_celery

    dispatch(make_celery(c.settings), [
        (ChunkMessage(chunk_id=ck.id, batch_id=ck.batch_id, model=ck.model, size=ck.size), ck.queue, ck.priority)
        for ck in chunks
    ])


# ----------------------------------------------------------------------------- bad input (no cluster)


def test_bad_input_corpus_is_accounted_for(tmp_path: Path, reliability: Any) -> None:
    """Every kind of bad input in tests/data/bad: each non-blank line becomes exactly one request or error row."""
    from batchllm.errors import InputError
    from batchllm.services.submit import submit_file
    from batchllm.store.db import upgrade
    from tests.test_bad_input import CORPUS, FILES, GENERATORS, expected_errors, non_blank_line_numbers

    st = Settings(database_url=f"sqlite:///{tmp_path}/corpus.db", data_dir=tmp_path)
    upgrade(st.database_url)
    lines = valid = errors = rejected = at_worker = 0
    codes: set[str] = set()
    for name, entry in FILES.items():
        path = CORPUS / name
        if entry.get("generated"):
            path = tmp_path / name
            GENERATORS[entry["generated"]](path)
        nonblank = non_blank_line_numbers(path.read_bytes())
        if "submit_error" in entry:
            with pytest.raises(InputError, match=entry["submit_error"]):
                submit_file(st, path, app=None, model=entry.get("default_model", MODEL))
            rejected += 1
            continue
        res = submit_file(st, path, app=None, model=entry.get("default_model", MODEL))
        with session_scope(st.database_url) as s:
            rows = list(s.scalars(select(Request).where(Request.batch_id == res.batch_id).order_by(Request.line_no)))
        assert [r.line_no for r in rows] == nonblank, f"{name}: not one row per non-blank line"
        bad = {r.line_no: r.error_code for r in rows if r.error_code}
        expected = expected_errors(entry)
        if expected is None:
            assert set(bad.values()) <= set(entry["error_codes"]) and len(bad) == len(rows), name
        else:
            assert bad == expected, name
        assert len(rows) - len(bad) == entry["valid"], name
        lines += len(nonblank)
        valid += len(rows) - len(bad)
        errors += len(bad)
        codes.update(bad.values())
        at_worker += len(entry.get("fails_at_worker", {}))
    reliability.row(
        f"Bad-input corpus: {len(FILES)} kinds of malformed JSONL (tests/data/bad/MANIFEST.json) through `submit`",
        f"all {len(FILES)} kinds accounted for: each of {lines} non-blank lines became exactly one request row "
        f"({valid}) or one error record ({errors}, {len(codes)} distinct codes, line numbers as the manifest says); "
        f"{rejected} files with no request rejected whole (exit 2, nothing stored); {at_worker} line(s) valid at "
        "submit are left to fail alone at the worker (context_length_exceeded, tests/test_pipeline.py)",
        requests=lines, results=valid + errors,
    )


# ----------------------------------------------------------------------------- messages


class _Exploit:
    """Pickles to ``os.system('touch MARKER')``: if a worker ever unpickled it, the marker would appear."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_malformed_messages_are_rejected_and_the_worker_keeps_running(cluster: Cluster, reliability: Any, tmp_path: Path) -> None:
    from kombu import Exchange, Queue

    from batchllm.queue import RUN_CHUNK, make_celery, queue_name

    c = cluster
    # Loading took longer than the heartbeat timeout: the workers must have kept beating meanwhile.
    sched = c.scheduler_log.read_text(errors="replace")
    assert " lost " not in sched, f"a loading worker was declared lost:\n{sched}"
    reliability.row(
        f"Two workers loading SmolLM2 side by side for {c.load_s:.0f} s, longer than the {HEARTBEAT_TIMEOUT_S:.0f} s "
        "heartbeat timeout",
        "they heartbeat as `loading` throughout; the scheduler never declared them lost",
    )
    app = make_celery(c.settings)
    assert app.conf.accept_content == ["json"] and app.conf.task_serializer == "json"
    q = queue_name(REF)
    marker = tmp_path / "unpickled"
    sent: dict[str, tuple[str, str]] = {}  # text that identifies the message in a log → (what, log evidence)
    outcome: dict[str, str] = {}  # what → what the worker did

    def send(what: str, evidence: str, did: str, name: str = RUN_CHUNK, key: str | None = None, **kw: Any) -> None:
        tid = f"bad-{uuid.uuid4().hex[:12]}"
        app.send_task(name, task_id=tid, queue=q, routing_key=q, **kw)
        sent[key or tid] = (what, evidence)
        outcome[what] = did

    validated = "rejected by the task's argument validation (Celery Reject, not requeued); nothing claimed or run"
    send("wrong kwargs: a chunk id that is a path", "malformed run_chunk message", validated,
         kwargs={"chunk_id": "../../etc/passwd", "batch_id": "b", "model": REF, "size": 1})
    send("wrong kwargs: unknown argument names only", "malformed run_chunk message", validated,
         kwargs={"evil": True, "cmd": "rm -rf /"})
    send("wrong kwargs: chunk id of the wrong type", "malformed run_chunk message", validated,
         kwargs={"chunk_id": {"$ne": ""}, "batch_id": "b", "model": REF, "size": -1})
    send("positional arguments instead of kwargs", "malformed run_chunk message", validated, args=["ck_x", "b"])
    send("unknown task name (`batchllm.shell`)", "unregistered task",
         "discarded by Celery as an unregistered task", name="batchllm.shell", kwargs={"cmd": "id"})
    # Celery logs a refused pickle without its task id, but with the body: the marker path identifies it.
    send("pickle-serialized message (payload runs `touch` if unpickled)", "untrusted content of type pickle",
         "refused undecoded: accept_content is ['json'] (ContentDisallowed); the marker file was never created",
         key=str(marker), kwargs={"chunk_id": _Exploit(marker)}, serializer="pickle")
    raw_id = f"bad-{uuid.uuid4().hex[:12]}"
    with app.connection_for_write() as conn:
        conn.Producer().publish(
            b'{"not": json', exchange=Exchange(q), routing_key=q, declare=[Queue(q, Exchange(q), routing_key=q)],
            content_type="application/json", content_encoding="utf-8",
            headers={"task": RUN_CHUNK, "id": raw_id, "lang": "py", "argsrepr": "", "kwargsrepr": ""},
        )
    sent[raw_id] = ("body that is not valid JSON", "decode")
    outcome["body that is not valid JSON"] = "decode error logged, message discarded"

    def unseen() -> list[str]:
        """The malformed messages whose rejection is not in a worker log yet (the log names the task id)."""
        text = c.logs_text()
        out = []
        for key, (what, ev) in sent.items():
            at = text.find(key)
            if at < 0 or ev.lower() not in text[max(0, at - 3000): at + 3000].lower():
                out.append(what)
        return out

    try:
        wait_until(lambda: not unseen(), 60, "the workers to log every malformed message")
    except AssertionError:
        raise AssertionError(f"not seen in worker logs: {unseen()}\n{c.logs_text()[-4000:]}") from None
    assert not marker.exists(), "a pickled payload was executed by a worker"
    for name in c.serving():
        assert c.workers[name].proc.poll() is None, f"{name} died on a malformed message"
    c.ready(c.serving(), timeout=20)
    # Still serving real work, through the password-protected Redis.
    bid = c.submit(prompts(8, "after-bad", 4))
    c.wait_batch(bid, 60)
    n_req, n_res = c.exactly_once(bid)
    assert c.status(bid) == "completed"
    for what, _ev in sent.values():
        reliability.row(f"Celery message: {what}", f"{outcome[what]}; the worker kept running")
    reliability.row("A normal batch right after the malformed messages", "completed on the same workers",
                    requests=n_req, results=n_res)


# ----------------------------------------------------------------------------- workers dying


def test_worker_sigkilled_mid_chunk_is_recovered(cluster: Cluster, reliability: Any) -> None:
    c = cluster
    bid = c.submit(prompts(40, "kill", staggered))
    victim, t_kill, held = kill_mid_chunk(c, bid)
    written = sum(n for n, _ in held.values())
    rerun = sum(sz - n for n, sz in held.values())
    before = c.result_times(bid)
    survivor = next(n for n in c.serving() if n != victim)
    t_back: list[float] = []

    def watch() -> None:  # when the dead worker's chunks stop being leased to it
        if not t_back and all(o != victim for _c, o, _n, _s in c.leased_progress(bid)):
            t_back.append(time.time())

    t_done = c.wait_batch(bid, 120, watch)
    n_req, n_res = c.exactly_once(bid)
    assert c.status(bid) == "completed"
    chunks = {ck.id: ck for ck in c.chunks(bid)}
    for cid in held:
        assert chunks[cid].status == "done" and chunks[cid].attempts == 2, (cid, chunks[cid].attempts)
    after = c.result_times(bid)
    assert all(after[r] == t for r, t in before.items()), "results written before the kill were computed again"
    recovery = t_done - t_kill
    released = (t_back[0] - t_kill) if t_back else recovery
    sched = c.scheduler_log.read_text(errors="replace")
    assert f"{victim} lost" in sched or victim in sched
    print(f"[faults] SIGKILL recovery: work back in the queue after {released}s, batch done {recovery:.1f}s after the kill")
    assert recovery < 60
    reliability.row(
        f"Worker SIGKILLed (whole process group, vLLM included) mid-chunk: {len(held)} chunk(s) leased, "
        f"{written} of their results already written; second worker + scheduler running",
        f"scheduler declared it lost after its heartbeat lapsed and re-queued its chunks "
        f"({released:.1f} s after the kill); {survivor} re-ran only the {rerun} request(s) "
        "without a result (the written ones kept their original rows); batch completed",
        recovery_s=recovery, requests=n_req, results=n_res, extra="each held chunk claimed twice, no result twice",
    )
    reliability.note(f"Worker SIGKILL: {recovery:.1f} s from kill to batch completed "
                     f"(heartbeat timeout {HEARTBEAT_TIMEOUT_S:.0f} s + scheduler tick + re-run).")
    c.start_worker(victim)  # back for the next tests (loads while they start)


def test_worker_restarted_under_the_same_name_gives_back_its_dead_leases(cluster: Cluster, reliability: Any) -> None:
    """systemd restarts a killed worker under the same name before its heartbeat lapses: the chunks its
    predecessor held must not stay leased by a name that is alive again (its heartbeat would extend them)."""
    c = cluster
    c.ready(timeout=240)
    bid = c.submit(prompts(40, "restart", staggered))
    victim, t_kill, held = kill_mid_chunk(c, bid)
    c.start_worker(victim)  # at once, same name, as a supervisor would
    t_done = c.wait_batch(bid, 90)
    n_req, n_res = c.exactly_once(bid)
    assert c.status(bid) == "completed"
    recovery = t_done - t_kill
    log = c.logs_text(f"{victim}.")
    via = ("the restarted process re-queued them at start-up" if "leased by an earlier process of the same name" in log
           else "the scheduler saw the heartbeat lapse first")
    print(f"[faults] same-name restart recovery {recovery:.1f}s ({via})")
    assert recovery < LEASE_S - 5, f"work waited for the {LEASE_S:.0f}s lease: {c.describe(bid)}"
    reliability.row(
        f"Worker SIGKILLed mid-chunk ({len(held)} chunk(s) leased) and restarted at once under the same name "
        f"(its lease is {LEASE_S:.0f} s)",
        f"{via}; the other worker ran them; batch completed without waiting for the lease to expire",
        recovery_s=recovery, requests=n_req, results=n_res,
    )


# ----------------------------------------------------------------------------- Redis and PostgreSQL restarts


def test_redis_killed_and_restarted_mid_batch(cluster: Cluster, reliability: Any) -> None:
    c = cluster
    c.ready(timeout=240)
    a = c.submit(prompts(24, "redis-a", 16))
    wait_until(lambda: c.n_results(a) > 0, 60, "batch A to start producing results")
    # Workers too busy to consume (frozen for a moment, well under the heartbeat timeout): batch B's messages
    # wait in Redis. B goes through the real submit service in-process, to keep the freeze short; submit sends
    # its first chunks (each frozen worker's pending BRPOP takes one) and the scheduler tops the queue up.
    from batchllm.queue import make_celery
    from batchllm.services.submit import submit_file

    def resends() -> int:
        return sum(int(m) for m in re.findall(r"re-sent (\d+) chunk message", c.scheduler_log.read_text(errors="replace")))

    resent_before = resends()
    c.signal_workers(signal.SIGSTOP)
    t_freeze = time.time()
    try:
        b = submit_file(c.settings, c.write_input(prompts(48, "redis-b", 8)), app=make_celery(c.settings), model=MODEL).batch_id
        c.batches.append(b)
        redis = c.redis.client()
        deadline = time.time() + 3
        while (queued := sum(int(redis.llen(k)) for k in redis.keys("batchllm.*"))) == 0 and time.time() < deadline:
            time.sleep(0.1)
        c.redis.kill()
        t_kill = time.time()
    finally:
        c.signal_workers(signal.SIGCONT)
        frozen_s = time.time() - t_freeze
    assert queued > 0, "no message was waiting in Redis when it died"
    # While Redis is down: status still answers (the store is the truth); submit fails cleanly, URL masked.
    st = run_cli(["status", a, "--json"], c.env, timeout=60)
    assert st.returncode == 0, st.stderr
    sub = run_cli(["submit", str(c.write_input(prompts(1, "down"))), "-m", MODEL], c.env, timeout=60)
    assert sub.returncode == 5 and "Traceback" not in sub.stderr, sub.stderr
    assert c.redis.password not in sub.stderr + sub.stdout and ":***@127.0.0.1" in sub.stderr, sub.stderr
    time.sleep(max(0.0, 4 - (time.time() - t_kill)))
    c.redis.start()  # same port and password, empty
    t_up = time.time()
    t_a = c.wait_batch(a, 150)
    t_b = c.wait_batch(b, 150)
    res = [c.exactly_once(x) for x in (a, b)]
    assert c.status(a) == "completed" and c.status(b) == "completed"
    attempts = [ck.attempts for x in (a, b) for ck in c.chunks(x)]
    resent = resends() - resent_before
    if frozen_s < HEARTBEAT_TIMEOUT_S - 1:  # longer, and the scheduler rightly re-runs the "lost" workers' chunks
        assert max(attempts) == 1, f"a chunk ran twice: {attempts}"
    recovery = max(t_a, t_b) - t_up
    print(f"[faults] Redis restart: {queued} message(s) lost, {resent} re-sent, batches done {recovery:.1f}s after restart")
    reliability.row(
        f"Redis SIGKILLed mid-batch (no persistence) and restarted empty on the same port 4 s later; batch A running, "
        f"batch B's {queued} chunk message(s) still queued in Redis",
        f"workers and scheduler reconnected by themselves; `status` kept answering and `submit` exited 5 with the "
        f"URL masked while Redis was down; the scheduler saw Redis's new run_id and re-sent {resent} lost "
        "message(s) at once; both batches completed, "
        + ("no chunk ran twice" if max(attempts) == 1 else f"{sum(x > 1 for x in attempts)} chunk(s) re-run after a "
           "frozen worker was declared lost, no result twice"),
        recovery_s=recovery, requests=sum(r[0] for r in res), results=sum(r[1] for r in res),
        extra="recovery measured from Redis's restart",
    )
    reliability.note(f"Redis restart: {recovery:.1f} s from Redis back to both batches completed (the scheduler "
                     "notices the restart by Redis's run_id and re-sends at once).")


def test_database_stopped_and_started_mid_batch(cluster: Cluster, reliability: Any) -> None:
    c = cluster
    c.ready(timeout=240)
    bid = c.submit(prompts(40, "pg", lambda i: 4 + (i % 8) * 8))  # 4..60 tokens: results trickle in
    late, (late_ck,) = store_unsent(c, prompts(8, "pg-late", 8))  # its message arrives during the outage
    wait_until(lambda: c.n_results(bid) > 0, 60, "the batch to start producing results")
    from batchllm.store.db import get_engine

    written_before = c.n_results(bid)
    c.pg.stop("fast")  # every session is terminated
    t_down = time.time()
    get_engine(c.db_url).dispose()
    # A worker takes the late message and blocks in its claim (retrying); past the visibility timeout the
    # sweep hands the message to the other worker, whose claim blocks too: both retry when the database is back.
    send(c, [late_ck])
    late_task, late_age = held_past_timeout(c, late_ck.id, timeout=30)
    sweep(c)
    time.sleep(max(0.0, 8 - (time.time() - t_down)))
    c.pg.start()
    t_up = time.time()
    names = c.serving()

    def heartbeats_back() -> bool:
        with session_scope(c.db_url) as s:
            rows = {w.name: w for w in s.scalars(select(Worker).where(Worker.name.in_(names)))}
        return all(n in rows and rows[n].last_heartbeat > t_up and rows[n].state in ("ready", "busy") for n in names)

    wait_until(heartbeats_back, 60, "both workers to heartbeat again")
    t_hb = time.time()
    t_done = c.wait_batch(bid, 150)
    c.wait_batch(late, 60)
    n_req, n_res = c.exactly_once(bid)
    assert c.status(bid) == "completed" and c.status(late) == "completed"
    c.exactly_once(late)
    attempts = [ck.attempts for ck in c.chunks(bid) + c.chunks(late)]
    assert max(attempts) == 1, f"a chunk ran twice after the outage: {attempts}"
    fed, skipped = wait_until(lambda: fed_and_skipped(c, late_task, 8), 30, "both deliveries of the late message to end")
    assert len(fed) == 1 and len(skipped) == 1, (fed, skipped)
    late_held = task_seconds(c, late_task)
    logs = c.logs_text()
    retries = len(re.findall(r"database unavailable during (?:result write|claim)", logs))
    hb_fail = len(re.findall(r"heartbeat failed", logs))
    assert retries + hb_fail > 0, "no sign the workers saw the outage"
    assert written_before < n_req, "the batch had finished before the outage"
    recovery = t_done - t_up
    print(f"[faults] PostgreSQL restart: heartbeats back {t_hb - t_up:.1f}s after start, batch done {recovery:.1f}s after")
    reliability.row(
        f"PostgreSQL stopped (`pg_ctl stop -m fast`, all sessions killed) for {t_up - t_down:.0f} s mid-batch "
        f"({written_before} of 40 results written)",
        f"workers kept their engines running and retried writes with backoff ({retries} logged retries, "
        f"{hb_fail} failed heartbeats); heartbeats resumed {t_hb - t_up:.1f} s after the restart; no worker "
        "declared lost, no chunk re-run; batch completed",
        recovery_s=recovery, requests=n_req, results=n_res, extra="recovery measured from the database's restart",
    )
    reliability.row(
        f"A chunk message delivered while the database was down: the worker's claim retried, so its task held the "
        f"message unacked for {late_held:.0f} s (> the {VISIBILITY_S} s visibility timeout); kombu's sweep "
        f"redelivered it ({late_age:.1f} s after delivery) to the other worker, whose claim blocked too",
        f"when the database came back both claims ran; the atomic UPDATE let exactly one win ({fed[0]} fed the engine), "
        f"the other delivery was acked and skipped ({skipped[0]}); chunk claimed once, 8 results written once",
        requests=8, results=8,
    )
    reliability.note(f"PostgreSQL restart: {recovery:.1f} s from the database back to the batch completed "
                     "(write retries back off 0.5 s → 10 s).")


# ----------------------------------------------------------------------------- cancel


def test_cancel_during_a_run(cluster: Cluster, reliability: Any, tmp_path: Path) -> None:
    c = cluster
    # Stored by the real submit path; 2 chunks are sent now, 3 stand for messages still queued behind busy
    # workers (marked sent, so the scheduler does not send them either), delivered after the cancel.
    bid, chunks = store_unsent(c, prompts(40, "cancel", lambda i: 4 + (i % 8) * 16))  # 4..116 tokens
    send(c, chunks[:2])
    wait_until(lambda: c.n_results(bid) > 0, 60, "the first results")
    proc = run_cli(["cancel", bid, "--json"], c.env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    t_cancel = time.time()
    at_cancel = json.loads(proc.stdout)
    running = [ck for ck in c.chunks(bid) if ck.status == "leased"]
    assert at_cancel["status"] == "cancelling" and running, f"nothing was running at the cancel: {at_cancel}"
    send(c, chunks[2:])  # the late messages arrive after the cancel
    t_end = c.wait_batch(bid, 90)
    redis = c.redis.client()
    wait_until(lambda: sum(int(redis.llen(k)) for k in redis.keys("batchllm.*")) == 0, 30, "the late messages to be consumed")
    time.sleep(1.0)
    assert c.status(bid) == "cancelled"
    after = {ck.id: ck for ck in c.chunks(bid)}
    for ck in chunks[2:]:
        assert after[ck.id].attempts == 0 and after[ck.id].status == "cancelled", (after[ck.id].status, after[ck.id].attempts)
    with session_scope(c.db_url) as s:
        late_ok = s.scalar(select(func.count()).select_from(Result).join(Request, Request.id == Result.request_id)
                           .where(Request.chunk_id.in_([ck.id for ck in chunks[2:]]), Result.ok.is_(True)))
    assert late_ok == 0
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    r = run_cli(["results", bid, "-o", str(out), "--errors", str(err)], c.env, timeout=60)
    assert r.returncode == 0, r.stderr
    ok_lines = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    err_lines = [json.loads(x) for x in err.read_text().splitlines() if x.strip()]
    assert ok_lines and all(x["response"]["status_code"] == 200 for x in ok_lines)
    assert all(x["response"]["body"]["choices"][0]["text"] is not None for x in ok_lines)
    assert {x["error"]["code"] for x in err_lines} <= {"batch_cancelled"}
    view = c.view(bid)
    counts = view["request_counts"]
    assert view["status"] == "cancelled"
    assert counts["total"] == counts["completed"] + counts["failed"] == 40 == len(ok_lines) + len(err_lines)
    assert counts["completed"] == len(ok_lines)
    n_req, n_res = c.exactly_once(bid)
    reliability.row(
        f"`batchllm cancel` while {len(running)} of 5 chunks run ({at_cancel['request_counts']['completed']} results "
        "written); the other 3 chunks' messages delivered after the cancel",
        f"status went to cancelling at once; no new chunk started (the 3 late messages were acked and skipped, 0 claims); "
        f"the running chunks finished ({t_end - t_cancel:.1f} s) and the batch became cancelled; "
        f"`batchllm results` returned {len(ok_lines)} completed + {len(err_lines)} batch_cancelled lines; "
        f"counts total {counts['total']} = completed {counts['completed']} + failed {counts['failed']}; status cancelled",
        requests=n_req, results=n_res,
    )


# ----------------------------------------------------------------------------- redelivery after the visibility timeout


def test_chunks_outliving_the_visibility_timeout_run_once(cluster: Cluster, reliability: Any) -> None:
    """Redis's visibility timeout is 2 s here; chunks run far longer.

    1. A normal long chunk: its task hands the requests to the engine and returns at once, so the message is
       acked long before the timeout and a restore sweep finds nothing to redeliver.
    2. A chunk bigger than the engine's batch (vLLM's max_num_seqs, 256 here) keeps its task feeding until the
       engine has room, so its message stays unacked past the timeout. The sweep puts it back, a worker receives
       it again, and the lease must make that delivery a no-op.
    Either way: the chunk is claimed once, the engine is fed it once, each result is written once.
    """
    c = cluster
    c.ready(timeout=240)

    # 1. a long chunk: 8 requests of 256 tokens
    long_bid = c.submit(numbered(8, "vt-long", 256))
    (long_ck,) = c.chunks(long_bid)
    wait_until(lambda: c.leased_progress(long_bid), 60, "the long chunk to be claimed")
    t0 = time.time()
    time.sleep(VISIBILITY_S + 0.5)
    still_running = c.status(long_bid) not in TERMINAL and c.n_results(long_bid) < 8
    held_msg = unacked(c, long_ck.id)
    sweep(c)
    t_long = c.wait_batch(long_bid, 120)
    assert still_running, "the long chunk finished within the visibility timeout: make it longer"
    assert held_msg is None, f"a chunk's message stayed unacked {held_msg[0]:.1f}s while its requests ran"
    assert c.chunks(long_bid)[0].attempts == 1  # claims gate the engine: one claim, one run
    n1 = c.exactly_once(long_bid)
    reliability.row(
        f"A chunk running {t_long - t0:.0f} s with Redis's visibility timeout at {VISIBILITY_S} s "
        "(BATCHLLM_VISIBILITY_TIMEOUT); a restore sweep while it ran",
        "its message was acked as soon as the requests were in the engine, so the sweep had nothing to redeliver; "
        "claimed once, fed once",
        requests=n1[0], results=n1[1],
    )

    # 2. a chunk whose task holds its message past the timeout
    n = 272
    bid = c.submit(numbered(n, "vt", 48), env={"BATCHLLM_CHUNK_SIZE": str(n)})
    (chunk,) = c.chunks(bid)
    owner = wait_until(lambda: c.leased_progress(bid) and c.leased_progress(bid)[0][1], 60, "the chunk to be claimed")
    task_id, held_for = held_past_timeout(c, chunk.id)
    sweep(c)
    c.wait_batch(bid, 300)
    n_req, n_res = c.exactly_once(bid)
    assert c.status(bid) == "completed"
    (after,) = c.chunks(bid)
    assert after.attempts == 1, f"the chunk was claimed {after.attempts} times"
    fed, skipped = wait_until(lambda: fed_and_skipped(c, task_id, n), 30, "the redelivered message to be handled")
    assert len(fed) == 1, f"the engine was fed the chunk {len(fed)} times"
    held_total = task_seconds(c, task_id)
    print(f"[faults] visibility timeout: message held {held_for:.1f}s > {VISIBILITY_S}s, redelivered, skipped")
    reliability.row(
        f"A {n}-request chunk (more than the engine's 256-sequence batch) whose task held its message unacked for "
        f"{held_total:.0f} s (> the {VISIBILITY_S} s visibility timeout) while feeding the engine; kombu's sweep put "
        f"the message back in the queue {held_for:.1f} s after delivery",
        f"redelivered while {owner} still ran the chunk; the atomic claim found a live lease, so the delivery was "
        f"acked and skipped ({', '.join(sorted(set(skipped)))}); engine fed once, chunk claimed once, each result "
        "written once",
        requests=n_req, results=n_res,
    )


def numbered(n: int, tag: str, max_tokens: int) -> list[dict[str, Any]]:
    """Completions of number lists: the model keeps counting, so each request runs its full ``max_tokens``."""
    return [
        {"id": f"{tag}-{i}", "prompt": ", ".join(str(i + k) for k in range(6)) + ",", "max_tokens": max_tokens, "temperature": 0}
        for i in range(n)
    ]


# ----------------------------------------------------------------------------- a model that cannot load


def test_model_that_fails_to_load(cluster: Cluster, reliability: Any) -> None:
    c = cluster
    # Pinned: the worker exits at once with one line, no traceback.
    t0 = time.time()
    pinned = run_cli(["worker", "--cpu", "--model", GHOST, "--name", "ghost-pinned"], c.env, timeout=120)
    took = time.time() - t0
    assert pinned.returncode not in (0, None), pinned.stderr
    assert "Traceback" not in pinned.stderr + pinned.stdout, pinned.stderr
    mentions = [ln for ln in pinned.stderr.splitlines() if "could not load" in ln or ln.startswith("error")]
    assert len(mentions) == 1 and mentions[0].startswith("error: "), pinned.stderr
    assert GHOST in mentions[0] and "no-such-weights" in mentions[0]
    # Unpinned: the scheduler assigns it the model that has work; it fails, says so, and stays up.
    w = c.start_worker("ghost-idle", ["--cpu", "--loglevel", "INFO"])
    wait_until(lambda: _worker_row(c, "ghost-idle", ("idle",)), 90, "the unpinned worker to register idle")
    bid = c.submit(prompts(4, "ghost", 4), model=GHOST)
    row = wait_until(lambda: _worker_row(c, "ghost-idle", ("error",)), 60, "the load failure to be reported")
    c.wait_batch(bid, 60)
    time.sleep(4)  # long enough for a crash loop to show
    assert w.proc.poll() is None, "the unpinned worker exited"
    listing = run_cli(["workers", "--json"], c.env, timeout=60)
    assert listing.returncode == 0, listing.stderr
    shown = {x["name"]: x for x in json.loads(listing.stdout)}["ghost-idle"]
    assert shown["state"] == "error" and f"could not load {GHOST}@bf16" in (shown["error"] or ""), shown
    log = w.log.read_text(errors="replace")
    tries = len(re.findall(rf"could not load {re.escape(GHOST)}", log))
    assert tries == 1, f"{tries} load attempts (crash loop?):\n{log[-3000:]}"
    assert "Traceback" not in log
    now_row = _worker_row(c, "ghost-idle", ("error", "idle"))
    assert now_row is not None and now_row.pid == row.pid == w.proc.pid  # the same process all along
    view = c.view(bid)
    counts = view["request_counts"]
    assert counts == {"total": 4, "completed": 0, "failed": 4}, view
    with session_scope(c.db_url) as s:
        codes = set(s.scalars(select(Result.error_code).where(Result.batch_id == bid)))
    assert codes == {"model_load_failed"}
    w.stop()
    reliability.row(
        f"Pinned worker for a models-file entry whose weights dir does not exist (`worker --model {GHOST}`)",
        f"exited {pinned.returncode} after {took:.1f} s with one line: "
        f"`{_short(mentions[0].replace(str(c.base), '$TMP'), 160)}`; no traceback",
    )
    reliability.row(
        f"Unpinned worker assigned {GHOST} by the scheduler (a batch of 4 requests for it)",
        f"`batchllm workers` showed it in state error with the message; it stayed up in the same process, tried "
        f"once (no crash loop), was not given the model again; the scheduler failed the 4 requests with "
        f"model_load_failed and the batch ended ({view['status']})",
        requests=4, results=counts["completed"] + counts["failed"],
    )


def _worker_row(c: Cluster, name: str, states: tuple[str, ...]) -> Worker | None:
    with session_scope(c.db_url) as s:
        w = s.get(Worker, name)
        return w if w is not None and w.state in states and time.time() - w.last_heartbeat < HEARTBEAT_TIMEOUT_S else None


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ----------------------------------------------------------------------------- credentials (last: reads every log)


def test_credentials_json_only_and_masked_urls(cluster: Cluster, reliability: Any) -> None:
    from batchllm.queue import make_celery

    c = cluster
    app = make_celery(c.settings)
    assert app.conf.accept_content == ["json"] and app.conf.task_serializer == "json" and app.conf.result_serializer == "json"
    reliability.row("Celery serializer settings", "accept_content = ['json'], task and result serializer json (never pickle)")

    src = str(c.write_input(prompts(1, "pw")))
    wrong_redis = c.broker_url.replace(c.redis.password, "wrong-" + c.redis.password[:6])
    p = run_cli(["submit", src, "-m", MODEL], {**c.env, "BATCHLLM_BROKER_URL": wrong_redis}, timeout=60)
    assert p.returncode == 5 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and f"redis://:***@127.0.0.1:{c.redis.port}/0" in p.stderr, p.stderr
    assert c.redis.password[:6] not in p.stderr
    wrong_pg = c.db_url.replace(c.pg.password, "wrong-" + c.pg.password[:6])
    p2 = run_cli(["status", "--json"], {**c.env, "BATCHLLM_DATABASE_URL": wrong_pg}, timeout=60)
    assert p2.returncode == 5 and "Traceback" not in p2.stderr, p2.stderr
    assert "postgres:***@127.0.0.1" in p2.stderr and c.pg.password[:6] not in p2.stderr, p2.stderr
    reliability.row(
        "Wrong Redis password / wrong database password given to the CLI",
        "exit 5 with one line naming the URL with the password masked (`redis://:***@…`, `postgresql://postgres:***@…`)",
    )

    done = [b for b in c.batches if c.status(b) in TERMINAL]
    assert done and all(c.status(b) != "failed" for b in done)
    reliability.row(
        "Redis with `--requirepass` for the whole suite (`redis://:PASSWORD@127.0.0.1:PORT/0` in BATCHLLM_BROKER_URL)",
        f"{len(done)} batches submitted, run by workers and finished through it"
        + (" (before and after a Redis restart)" if c.redis.starts > 1 else ""),
    )

    logs = {p.name: p.read_text(errors="replace") for p in c.log_files if p.exists()}
    assert len(logs) >= 3
    for name, text in logs.items():
        for secret in (c.redis.password, c.pg.password):
            assert secret not in text, f"a password appears in {name}"
    masked = [n for n, t in logs.items() if re.search(r"redis://:\*+@127\.0\.0\.1", t)]
    reliability.row(
        f"Worker and scheduler logs ({len(logs)} files, through Redis and PostgreSQL outages) grepped for both passwords",
        f"neither password appears anywhere; URLs are logged masked (`redis://:**@…` in {len(masked)} file(s))",
    )
    _ = pickle  # the exploit above relies on pickle's __reduce__ protocol
