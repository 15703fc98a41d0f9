"""Helpers for the benches: a subprocess with timestamped output, a per-second CPU sampler, a scratch database.

Times are epoch seconds (``time.time()``) throughout, so they compare directly with the database's result
timestamps (``results.created_at``, database clock on the same host).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from batchllm.worker.engine_procs import descendants

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Proc:
    """A subprocess whose combined output lines are timestamped (epoch seconds) as they arrive.

    Args:
        argv: the command.
        env: its environment.
        log: every output line is also written here.
        cwd: working directory.
    """

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> None:
        self.t0 = time.time()
        self.lines: list[tuple[float, str]] = []
        self.log = log
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log.open("w") as f:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append((time.time(), line))
                f.write(line + "\n")

    def wait(self, timeout: float) -> tuple[int, float, float]:
        """Wait for exit; returns (exit code, wall seconds, epoch time of the exit)."""
        rc = self.proc.wait(timeout)
        end = time.time()
        self._reader.join(10)
        return rc, end - self.t0, end

    def first(self, pattern: str) -> float | None:
        """Epoch time of the first output line matching ``pattern``."""
        rx = re.compile(pattern)
        return next((t for t, line in self.lines if rx.search(line)), None)

    def last(self, pattern: str) -> float | None:
        """Epoch time of the last output line matching ``pattern``."""
        rx = re.compile(pattern)
        return next((t for t, line in reversed(self.lines) if rx.search(line)), None)

    def tail(self, n: int = 40) -> str:
        """The last ``n`` output lines."""
        return "\n".join(line for _, line in self.lines[-n:])

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after 60 s."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def thread_cpu_seconds(pid: int) -> dict[tuple[int, int], float]:
    """CPU seconds (user + system) of each thread of ``pid``, from ``/proc/PID/task/*/stat``."""
    out: dict[tuple[int, int], float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rpartition(") ")[2].split()
            out[(pid, int(tid))] = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            continue
    return out


class CpuSampler:
    """Samples, once every ``interval`` seconds, the CPU time used by every process under ``roots()``.

    Every thread ever seen keeps its last reading, so processes and threads that exit between samples still
    count. ``utilisation(t0, t1)`` is CPU seconds per wall second (1.0 = one core busy) between the first
    and the last sample inside the window.

    Args:
        roots: the root pids to walk (children, e.g. vLLM's engine-core processes, are found each sample).
        interval: seconds between samples.
    """

    def __init__(self, roots: Callable[[], list[int]], interval: float = 1.0) -> None:
        self.roots = roots
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._seen: dict[tuple[int, int], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def start(self) -> CpuSampler:
        """Start sampling (a daemon thread); returns self."""
        self._thread.start()
        return self

    def sample(self) -> None:
        """Take one sample now."""
        for root in self.roots():
            for pid in descendants(root):
                self._seen.update(thread_cpu_seconds(pid))
        self.samples.append((time.time(), sum(self._seen.values())))

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(5)

    def utilisation(self, t0: float, t1: float) -> float | None:
        """Cores busy on average in [t0, t1] (None when fewer than two samples fall inside)."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def fresh_pg(admin_url: str, name: str) -> str:
    """Drop and create the scratch database ``name`` next to ``admin_url``'s, migrated to the head; its URL."""
    import psycopg

    from batchllm.store.db import upgrade

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    upgrade(url)
    return url
