"""The engine protocol the worker runtime drives, and the bookkeeping every engine shares.

An engine takes groups of OpenAI request bodies (one group per leased chunk), runs them, and reports
each group's results through a callback as they finish. :class:`Engine` is the contract; the vLLM
implementation lives in :mod:`batchllm.worker.vllm_engine` and a model-free stand-in for control-plane
tests in ``tests/stub_engine.py``. :class:`GroupLedger` holds what both need: the pending count
behind ``pending`` / ``wait_below`` / ``drain``, ``group_done`` exactly once, and ``abort`` that
silences a group for good.

Importing this module never imports vLLM or torch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import msgspec

from batchllm.status import Endpoint

log = logging.getLogger(__name__)

__all__ = [
    "Endpoint", "Engine", "EngineHealth", "EngineRequest", "EngineResult", "GroupLedger", "OnResults",
    "error_result", "openai_error_body",
]


@dataclass(slots=True)
class EngineRequest:
    """One request for the engine.

    Attributes:
        request_id: the store's request row id.
        public_id: ``batch_req_…``; becomes vLLM's request id (the response ``id`` suffix).
        endpoint: which OpenAI endpoint the body is for.
        body: the OpenAI request body JSON as stored; the engine sets ``model`` to its served name.
    """

    request_id: int
    public_id: str
    endpoint: Endpoint
    body: bytes


@dataclass(slots=True)
class EngineResult:
    """The outcome of one request, as the HTTP server would have answered it.

    Attributes:
        request_id: the store's request row id.
        status_code: 200, or the HTTP status vLLM's server answers (400 bad params, 500 engine error …).
        body: the response body JSON: the success object, or ``{"error": {message, type, param, code}}``.
        prompt_tokens: from the response's ``usage`` (0 when it failed before tokenizing).
        completion_tokens: from the response's ``usage`` (0 for embeddings and failures).
        latency_ms: from ``submit`` to the result.
        error_code: short code of a failure (the error body's ``code``, else its ``type``).
        error_message: the error body's ``message``.
    """

    request_id: int
    status_code: int
    body: bytes
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    error_code: str | None = None
    error_message: str | None = None


#: ``on_results(group, results, group_done)``: called on the engine's own thread; must not block.
OnResults = Callable[[str, list[EngineResult], bool], None]


class EngineHealth(StrEnum):
    """Whether the engine can still run requests; FAILED means restart the worker."""

    OK = "ok"
    FAILED = "failed"


class Engine(Protocol):
    """What the worker runtime needs from an engine. Every method is safe to call from any thread."""

    capacity: int  # requests it runs at once (vLLM's max_num_seqs)
    shutdown_grace_s: float  # how long ``stop`` lets the engine's own processes exit before killing them

    def submit(self, group: str, requests: Sequence[EngineRequest], on_results: OnResults) -> None:
        """Queue a group and return at once; results arrive through ``on_results``.

        ``group_done`` is True exactly once per group, on its last call (an empty group gets one call).
        A request the engine rejects is reported like any other (4xx + error body), never raised.
        """
        ...

    def abort(self, group: str) -> int:
        """Drop a group (its lease was lost): no callback for it after this returns.

        Returns:
            How many of its requests had not been reported yet.
        """
        ...

    def pending(self) -> int:
        """Requests submitted and not reported (nor aborted) yet."""
        ...

    def wait_below(self, n: int, timeout: float | None = None) -> bool:
        """Block while ``pending() > n``; False on timeout or when the engine stops first."""
        ...

    def drain(self, timeout: float | None = None) -> bool:
        """Block until everything submitted was reported; False on timeout."""
        ...

    def health(self) -> tuple[EngineHealth, str | None]:
        """``(OK, None)``, or ``(FAILED, one-line reason)`` once the engine cannot run requests."""
        ...

    def stop(self) -> None:
        """Shut down quickly; unreported requests are dropped (their leases expire and they re-run)."""
        ...


# --- OpenAI error bodies ---------------------------------------------------------------------------------

_CONTEXT_HINTS = ("maximum context length", "longer than the maximum model length", "max_model_len")


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> tuple[bytes, str]:
    """Build OpenAI's error body for an HTTP-level failure.

    OpenAI's ``type`` is ``invalid_request_error`` for client errors and ``server_error`` otherwise; its
    ``code`` is a string or null. An over-long prompt gets ``context_length_exceeded``, as OpenAI says.

    Args:
        status: the HTTP status code.
        message: the human-readable reason (vLLM's message, kept as is).
        param: the request field at fault, when known.
        code: a machine code; derived from the message when None.

    Returns:
        ``(body JSON bytes, short error code)``; the short code is ``code`` or else ``type``.
    """
    err_type = "invalid_request_error" if status < 500 else "server_error"
    if code is None and status < 500:
        if any(hint in message for hint in _CONTEXT_HINTS) or param in ("input_tokens", "input_text"):
            code = "context_length_exceeded"
        elif status == 404 and param == "model":
            code = "model_not_found"
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return msgspec.json.encode(body), code or err_type


def error_result(request_id: int, status: int, message: str, since: float, *, param: str | None = None,
                 code: str | None = None, prompt_tokens: int = 0) -> EngineResult:
    """An :class:`EngineResult` for a failure, with OpenAI's error body.

    Args:
        request_id: the store's request row id.
        status: the HTTP status code (400 for a bad request, 500 for an engine failure).
        message: one-line reason.
        since: ``time.monotonic()`` when the request was submitted (for ``latency_ms``).
        param: the request field at fault, when known.
        code: OpenAI's error code, when known.
        prompt_tokens: tokens counted before it failed.
    """
    body, short = openai_error_body(status, message, param, code)
    return EngineResult(request_id=request_id, status_code=status, body=body, prompt_tokens=prompt_tokens,
                        completion_tokens=0, latency_ms=(time.monotonic() - since) * 1000.0,
                        error_code=short, error_message=message)


def one_line(exc: BaseException, limit: int = 500) -> str:
    """``exc``'s message on one line (whitespace folded), at most ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text[:limit] or type(exc).__name__


# --- group bookkeeping -----------------------------------------------------------------------------------

@dataclass(eq=False)
class Group:
    """One submitted group: its callback and how many of its results are still to be reported.

    ``handles`` belongs to the engine (e.g. its asyncio tasks, so ``abort`` can cancel them).
    """

    name: str
    on_results: OnResults
    size: int
    submitted_at: float = field(default_factory=time.monotonic)
    remaining: int = 0
    aborted: bool = False
    done: bool = False
    handles: set[Any] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.remaining = self.size


class GroupLedger:
    """Pending counts, callbacks and aborts for an engine; thread-safe.

    Two locks, always taken in this order: ``_deliver_lock`` (held while a callback runs, so that
    ``abort`` waits for a callback in progress and none starts after it) and ``_cond`` (the counts). The
    deliver lock is re-entrant so that a callback may itself call ``abort``.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deliver_lock = threading.RLock()
        self._groups: dict[str, list[Group]] = {}
        self._pending = 0
        self._closed = False

    def open(self, name: str, size: int, on_results: OnResults) -> Group:
        """Register a group of ``size`` requests.

        Raises:
            RuntimeError: the engine is stopped.
        """
        grp = Group(name, on_results, size)
        with self._cond:
            if self._closed:
                raise RuntimeError("engine is stopped")
            self._groups.setdefault(name, []).append(grp)
            self._pending += size
            self._cond.notify_all()
        return grp

    def deliver(self, grp: Group, results: list[EngineResult]) -> None:
        """Hand ``results`` of ``grp`` to its callback (nothing happens once it was aborted).

        ``group_done`` is set on the call that reports its last result; an empty group is done at once.
        A callback that raises is logged; the engine goes on.
        """
        with self._deliver_lock:
            if grp.aborted or grp.done:
                return
            grp.remaining -= len(results)
            if grp.remaining <= 0:
                grp.done = True
                self._forget(grp)
            try:
                grp.on_results(grp.name, results, grp.done)
            except Exception:  # the runtime retries at its own level; the engine must go on
                log.exception("on_results for group %s raised; continuing", grp.name)
            finally:
                with self._cond:
                    self._pending -= len(results)
                    self._cond.notify_all()

    def abort(self, name: str) -> list[Group]:
        """Silence every live group called ``name``; returns them (the engine cancels their work).

        Waits for a callback of that group in progress; none starts afterwards.
        """
        with self._deliver_lock, self._cond:
            groups = self._groups.pop(name, [])
            for grp in groups:
                grp.aborted = True
                self._pending -= grp.remaining
            self._cond.notify_all()
        return groups

    def live_groups(self) -> list[Group]:
        """Every group not yet done nor aborted."""
        with self._cond:
            return [g for groups in self._groups.values() for g in groups]

    def pending(self) -> int:
        """Requests submitted and not yet reported or aborted."""
        with self._cond:
            return self._pending

    def wait_below(self, n: int, timeout: float | None = None) -> bool:
        """Block while ``pending() > n``; False on timeout or when closed first."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._pending <= n or self._closed, timeout)
            return bool(ok) and self._pending <= n

    def close(self) -> None:
        """Refuse new groups and wake every waiter (the engine is stopping)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _forget(self, grp: Group) -> None:
        with self._cond:
            groups = self._groups.get(grp.name)
            if groups is not None and grp in groups:
                groups.remove(grp)
                if not groups:
                    del self._groups[grp.name]
