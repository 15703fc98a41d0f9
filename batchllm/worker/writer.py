"""The worker's result writer: engine results → fenced, batched writes, off the engine's thread.

The engine reports finished requests on its own thread; they are queued here and a writer thread applies
them, grouping whatever arrived meanwhile per lease into one transaction each. Every write is fenced by
its chunk's lease (``store.results.write_results``). A refused (stale) write drops the lease and aborts
what the engine still runs of it; a database outage is retried for ``db_retry_seconds``, then the lease is
given up the same way — it lapses, and the chunk runs again elsewhere. A write the database rejects for
its content is retried one result at a time, and a result that still cannot be stored becomes a 500 error
record, so one bad answer never takes its neighbours down.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from batchllm.errors import mask_url
from batchllm.outages import Service, outage_of
from batchllm.settings import Settings
from batchllm.store import leases, results
from batchllm.store import workers as worker_rows
from batchllm.store.db import with_db_retry
from batchllm.store.leases import Lease
from batchllm.store.results import NewResult
from batchllm.worker.engine import openai_error_body

log = logging.getLogger(__name__)
_STOP = object()
_MAX_BATCH = 512  # results per writer pass


class ResultWriter:
    """Applies a worker's results (see the module docstring).

    Args:
        settings: settings (database URL, lease length, retry budget).
        worker: the worker's name, recorded with each result.
        device: its device name.
        abort: the engine's ``abort(group)``, called when a lease is lost or given up.
    """

    def __init__(self, settings: Settings, worker: str, device: str | None, abort: Callable[[str], int]) -> None:
        self.settings = settings
        self.url = settings.database_url
        self.worker, self.device, self._abort = worker, device, abort
        self._held: dict[str, Lease] = {}
        self._given_up: dict[str, Lease] = {}  # leases dropped during an outage: released once the database is back
        self._finishing: set[str] = set()  # leases whose last write is in flight: the writer decides their fate
        self._cond = threading.Condition()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._busy = 0  # items taken off the queue and not yet applied
        self._thread: threading.Thread | None = None
        self.stale_refused = 0  # results refused by fencing (also counted in the worker's row)

    # ----------------------------------------------------------------------------- leases held
    def hold(self, lease: Lease) -> None:
        """A chunk was claimed: its lease is renewed by the heartbeat until its last result is written."""
        with self._cond:
            self._held[lease.key] = lease

    def held(self) -> int:
        """Leases held now."""
        with self._cond:
            return len(self._held)

    def renew(self) -> None:
        """Renew exactly the held leases; a lease no longer ours is dropped and its requests aborted.

        Leases given up during an outage are released first (fenced: only if still ours), so their chunks
        run again as soon as the database is back instead of when the lease lapses."""
        self._release_given_up()
        with self._cond:
            held = list(self._held.values())
        if not held:
            return
        alive = leases.renew(self.url, held, self.settings.lease_seconds)
        for lease in held:
            if lease.key in alive:
                continue
            with self._cond:
                # A lease whose last write committed meanwhile is finished, not lost: the writer pops it.
                settled = lease.key not in self._held or lease.key in self._finishing
            if not settled:
                log.warning("lease on chunk %s (attempt %d) lost; aborting its requests", lease.chunk_id, lease.attempt)
                self._drop(lease.key)

    def _release_given_up(self) -> None:
        with self._cond:
            given_up = list(self._given_up.items())
        for key, lease in given_up:
            leases.release(self.url, lease)  # an outage raises: kept for the next beat
            with self._cond:
                self._given_up.pop(key, None)
            log.info("gave chunk %s (attempt %d) back for re-run", lease.chunk_id, lease.attempt)

    def abandon_all(self) -> None:
        """Drop every lease and abort its requests (this process lost its name)."""
        with self._cond:
            keys = list(self._held)
        for key in keys:
            self._drop(key)

    def _drop(self, key: str) -> None:
        with self._cond:
            lease = self._held.pop(key, None)
            self._cond.notify_all()
        if lease is not None:
            try:
                self._abort(key)
            except Exception:  # the engine may be gone already
                log.debug("abort of %s failed", key, exc_info=True)

    # ----------------------------------------------------------------------------- results
    def on_results(self, group: str, found: Sequence[Any], done: bool) -> None:
        """The engine's callback (its own thread): queue and return at once."""
        with self._cond:
            self._busy += 1
        self._queue.put((group, list(found), done))

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="batchllm-writer", daemon=True)
            self._thread.start()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is held or queued; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._held and self._busy == 0, timeout)

    def stop(self, release: bool) -> None:
        """Stop the writer; ``release`` gives the leases still held back (a clean shutdown), so others run them,
        with those given up during an outage and not yet released (fenced: only if still ours)."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
            self._thread = None
        if release:
            with self._cond:
                held, self._held = [*self._held.values(), *self._given_up.values()], {}
                self._given_up = {}
            for lease in held:
                try:
                    leases.release(self.url, lease)
                except Exception as e:
                    log.warning("could not give back chunk %s: %s", lease.chunk_id, mask_url(str(e))[:200])

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            items = [item]
            while len(items) < _MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)
                    break
                items.append(nxt)
            by_key: dict[str, tuple[list[NewResult], bool]] = {}
            for group, found, done in items:
                rows, was_done = by_key.get(group, ([], False))
                rows.extend(_new_result(r) for r in found)
                by_key[group] = (rows, was_done or done)
            for key, (rows, done) in by_key.items():
                try:
                    self._apply(key, rows, done)
                except Exception:  # never let the writer die: the lease lapses and the chunk runs again
                    log.exception("writing results of %s failed", key)
                    self._drop(key)
            with self._cond:
                self._busy -= len(items)
                self._cond.notify_all()

    def _apply(self, key: str, rows: list[NewResult], done: bool) -> None:
        with self._cond:
            lease = self._held.get(key)
        if lease is None:
            return  # lost or given up meanwhile: its results are not ours to write
        if done:
            with self._cond:
                self._finishing.add(key)
        try:
            self._settle(key, lease, rows, done)
        finally:
            with self._cond:
                self._finishing.discard(key)

    def _settle(self, key: str, lease: Lease, rows: list[NewResult], done: bool) -> None:
        outcome = self._write_with_retry(lease, rows, done)
        if outcome is None:
            log.error("database unreachable for %.0fs: giving up chunk %s; it will run again",
                      self.settings.db_retry_seconds, lease.chunk_id)
            with self._cond:
                self._given_up[key] = lease
            self._drop(key)
        elif outcome.stale:
            self.stale_refused += len(rows)
            log.warning("write of %d result(s) of chunk %s refused: attempt %d no longer holds the lease",
                        len(rows), lease.chunk_id, lease.attempt)
            self._count_stale(lease, len(rows))
            self._drop(key)
        elif done:
            with self._cond:
                self._held.pop(key, None)
                self._cond.notify_all()

    def _write_with_retry(self, lease: Lease, rows: list[NewResult], done: bool) -> results.WriteOutcome | None:
        """The write, retried through a database outage for ``db_retry_seconds``; None once that budget is spent."""
        try:
            return with_db_retry(lambda: self._write(lease, rows, done), self.url, self.settings.db_retry_seconds,
                                 "result write")
        except Exception as e:
            if outage_of(e) is not Service.DATABASE:
                raise
            return None

    def _write(self, lease: Lease, rows: list[NewResult], done: bool) -> results.WriteOutcome:
        ttl = self.settings.lease_seconds
        try:
            return results.write_results(self.url, lease, rows, done, ttl, self.worker, self.device)
        except Exception as e:
            if outage_of(e) is not None or len(rows) < 2:
                raise
            # The database refused the content of some row: find it by writing them one by one.
            log.warning("batched result write failed (%s); writing one by one", type(e).__name__)
            outcome = results.WriteOutcome(0, stale=False)
            for i, row in enumerate(rows):
                last = done and i == len(rows) - 1
                outcome = self._write_one(lease, row, last)
                if outcome.stale:
                    return outcome
            return outcome

    def _write_one(self, lease: Lease, row: NewResult, done: bool) -> results.WriteOutcome:
        ttl = self.settings.lease_seconds
        try:
            return results.write_results(self.url, lease, [row], done, ttl, self.worker, self.device)
        except Exception as e:
            if outage_of(e) is not None:
                raise
            why = f"the response could not be stored ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            body, code = openai_error_body(500, "response not storable", code="result_not_storable")
            failed = NewResult(row.request_id, 500, body, error_code=code, error_message=why)
            return results.write_results(self.url, lease, [failed], done, ttl, self.worker, self.device)

    def _count_stale(self, lease: Lease, n: int) -> None:
        try:
            worker_rows.add_stale_writes(self.url, lease.owner, n)
        except Exception:  # a metric; the refusal itself already happened
            log.debug("could not count stale writes", exc_info=True)


def _new_result(r: Any) -> NewResult:
    return NewResult(request_id=r.request_id, status_code=r.status_code, body=r.body, prompt_tokens=r.prompt_tokens,
                     completion_tokens=r.completion_tokens, latency_ms=r.latency_ms, error_code=r.error_code,
                     error_message=r.error_message)
