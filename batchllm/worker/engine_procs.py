"""The engine-core process vLLM spawns: where its output goes, and that it dies with the worker.

vLLM's ``EngineCore`` process survives a SIGKILL of the process that started it (measured with vLLM
0.32: orphaned, still using CPU, and on a GPU it would keep its VRAM). A killed worker must not leave
one behind, so each engine-core process gets a *reaper*: a tiny ``sh`` whose stdin is a pipe from the
worker. When the worker dies, however it dies, the kernel closes the pipe; the reaper then stops the
engine core (SIGTERM, SIGKILL two seconds later). ``stop()`` releases it the same way after vLLM's own
shutdown, when there is normally nothing left to stop.
"""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

_start_lock = threading.Lock()

# $1: pid, $2: its start time (field 22 of /proc/PID/stat). Waits for EOF on stdin (the worker died, or
# stop() released us), then stops the pid if it is still that process and not already a zombie (a
# recycled pid is left alone).
_REAPER_SCRIPT = (
    'read _ignored; '
    'running() { s=$(sed "s/.*) //" "/proc/$1/stat" 2>/dev/null | cut -d" " -f1,20); '
    '[ "${s#* }" = "$2" ] && [ "${s%% *}" != Z ]; }; '
    'if running "$1" "$2"; then kill -TERM "$1" 2>/dev/null; sleep 2; '
    'if running "$1" "$2"; then kill -KILL "$1" 2>/dev/null; fi; fi'
)


def process_start_time(pid: int) -> str:
    """Field 22 of ``/proc/PID/stat`` (start time in clock ticks): with the pid, names one process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rpartition(") ")[2].split()[19]
    except (OSError, IndexError):
        return ""


def start_reaper(pid: int) -> subprocess.Popen[bytes]:
    """Start a reaper for engine-core ``pid``; keep the returned handle until :func:`release_reaper`."""
    return subprocess.Popen(
        ["/bin/sh", "-c", _REAPER_SCRIPT, "batchllm-reaper", str(pid), process_start_time(pid)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the worker's terminal must not kill the reaper first
    )


def reaper_target(reaper: subprocess.Popen[bytes]) -> int | None:
    """The engine-core pid a live reaper watches (None once released)."""
    if reaper.poll() is not None:
        return None
    args = reaper.args
    return int(args[4]) if isinstance(args, list) and len(args) > 4 else None


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (from ``/proc/PID/task/*/children``)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        found.append(current)
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
            except OSError:
                continue
    return found


def release_reaper(reaper: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Let a reaper act now (after vLLM's own shutdown): it stops the engine core if that still runs,
    else exits at once. Waits up to ``timeout`` for it."""
    with contextlib.suppress(OSError, ValueError):
        if reaper.stdin is not None:
            reaper.stdin.close()
    try:
        reaper.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        reaper.kill()
        reaper.wait()


@contextlib.contextmanager
def engine_spawn_hooks(log_path: str | None, reapers: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """While vLLM starts its engine: give each process started here a reaper, and ``log_path`` as its
    stdout/stderr when set.

    The engine-core process is spawned, so it imports vLLM (which logs, e.g. "Triton is installed, but
    doesn't include CPU backend") before it reads any log setting, and a crash prints its traceback there.
    Our own fds 1 and 2 point at the file only for the instant of each ``Process.start()``: the child
    inherits them at exec time.
    """
    original = multiprocessing.process.BaseProcess.start

    def start(proc: multiprocessing.process.BaseProcess) -> None:
        if log_path is None:
            original(proc)
        else:
            with _start_lock, open(log_path, "ab", buffering=0) as log_file:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                saved = [os.dup(1), os.dup(2)]
                try:
                    os.dup2(log_file.fileno(), 1)
                    os.dup2(log_file.fileno(), 2)
                    original(proc)
                finally:
                    os.dup2(saved[0], 1)
                    os.dup2(saved[1], 2)
                    for fd in saved:
                        os.close(fd)
        if proc.pid is not None:
            reapers.append(start_reaper(proc.pid))

    multiprocessing.process.BaseProcess.start = start  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        multiprocessing.process.BaseProcess.start = original  # type: ignore[method-assign]


def log_tail_reason(path: str | None) -> str | None:
    """The last exception line of an engine log (``SomeError: why``), for a one-line load error."""
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 20000))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        text = line.strip()
        head = text.split(":", 1)[0]
        if ":" in text and " " not in head and head.endswith(("Error", "Exception")):
            return text[:300]
    return None
