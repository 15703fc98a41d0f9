"""The worker's writes on a real store: a chunk given up during a database outage is never left leased, and a
worker session frozen inside a transaction does not hold its locks."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from batchllm.errors import ServiceUnavailable
from batchllm.settings import Settings
from batchllm.store import dispatch, leases
from batchllm.worker import writer as writer_module
from batchllm.worker.engine import EngineResult
from batchllm.worker.writer import ResultWriter
from tests.test_store import make_batch, register, url  # noqa: F401  (url is the store's fixture: SQLite and PostgreSQL)


def _down(*_: Any, **__: Any) -> Any:
    raise ServiceUnavailable("PostgreSQL", "postgresql://u:***@db:5432/x", "connection refused")


def test_chunk_given_up_in_an_outage_is_released_by_a_clean_stop(url: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Writes fail past the retry budget, so the writer gives the chunk up and aborts it in the engine. The
    database returns and the worker stops cleanly before its next heartbeat: the chunk is queued again at once,
    not left leased until its 30 s lease lapses."""
    bid = make_batch(url, n=2, chunk=2)
    ck = dispatch.of_batch(url, bid)[0].id
    assert register(url, "w1", "inst-1") and register(url, "w2", "inst-2")
    claim = leases.claim(url, ck, "inst-1", ttl=30)
    assert claim.lease is not None
    aborted = threading.Event()
    w = ResultWriter(Settings(database_url=url, db_retry_seconds=0.3), "w1", None, lambda key: aborted.set() or 0)
    w.hold(claim.lease)
    w.start()
    monkeypatch.setattr(writer_module.results, "write_results", _down)
    rid = claim.requests[0].id
    w.on_results(claim.lease.key, [EngineResult(rid, 200, b'{"text": "hi"}', 1, 1, 1.0)], False)
    assert aborted.wait(10), "the writer never gave the chunk up"
    assert w.held() == 0
    assert leases.claim(url, ck, "inst-2", ttl=30).outcome == leases.ClaimOutcome.TAKEN  # still leased to inst-1
    monkeypatch.undo()  # the database is back
    w.stop(release=True)
    again = leases.claim(url, ck, "inst-2", ttl=30)
    assert again.outcome == leases.ClaimOutcome.CLAIMED and again.lease is not None and again.lease.attempt == 2
    assert [r.id for r in again.requests] == [r.id for r in claim.requests]  # nothing was written: all run again


def test_heartbeat_during_the_last_write_does_not_abort_a_finished_chunk(
        url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """A heartbeat that lands between the commit of a chunk's last results and the writer's own bookkeeping
    sees the lease finished, not renewable: that chunk is done, not lost, so nothing is aborted or warned."""
    bid = make_batch(url, n=2, chunk=2)
    ck = dispatch.of_batch(url, bid)[0].id
    assert register(url, "w1", "inst-1")
    claim = leases.claim(url, ck, "inst-1", ttl=30)
    assert claim.lease is not None
    aborted: list[str] = []
    w = ResultWriter(Settings(database_url=url), "w1", None, lambda key: aborted.append(key) or 0)
    w.hold(claim.lease)
    real = writer_module.results.write_results

    def write_then_beat(*args: Any, **kwargs: Any) -> Any:
        outcome = real(*args, **kwargs)
        w.renew()  # the heartbeat, right after the commit
        return outcome

    monkeypatch.setattr(writer_module.results, "write_results", write_then_beat)
    w.start()
    found = [EngineResult(r.id, 200, b'{"text": "hi"}', 1, 1, 1.0) for r in claim.requests]
    w.on_results(claim.lease.key, found, True)
    assert w.wait_idle(10)
    w.stop(release=False)
    assert aborted == [] and "lost" not in caplog.text
    assert w.held() == 0


def test_worker_sessions_end_when_idle_inside_a_transaction(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker frozen inside a transaction would hold its row locks until the server noticed (hours on a silent
    network), blocking the scheduler's recovery: PostgreSQL ends the session instead, and the next one works."""
    from sqlalchemy import text

    from batchllm.store import db
    from tests.conftest import _create_pg_database, _drop_pg_database

    pg = _create_pg_database("bl_idle_tx")
    monkeypatch.setattr(db, "_idle_tx_ms", None)  # the process-wide limit is put back after the test
    try:
        db.end_idle_transactions_after(0.5)
        with pytest.raises(ServiceUnavailable), db.session_scope(pg) as s:
            assert s.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "500ms"
            time.sleep(1.5)  # "frozen" inside the transaction
            s.execute(text("SELECT 1"))
        with db.session_scope(pg) as s:
            assert s.execute(text("SELECT 1")).scalar() == 1
        monkeypatch.undo()
        db.get_engine.cache_clear()
        db._sessionmaker.cache_clear()
        with db.session_scope(pg) as s:  # other processes (export, ingest) keep the server's default: no limit
            assert s.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "0"
    finally:
        db.get_engine.cache_clear()
        db._sessionmaker.cache_clear()
        _drop_pg_database("bl_idle_tx")


def test_retry_budget_is_used_to_the_end_and_not_beyond() -> None:
    """An outage 0.9 s long is ridden out on a 1 s budget (the last try lands on the deadline; backoff alone would
    have tried at 0, 0.25 and 0.75 s and then given up), and a longer one is raised at the deadline, not later."""
    from batchllm.store.db import with_db_retry

    start = time.monotonic()

    def back_at(t: float) -> Any:
        if time.monotonic() - start < t:
            return _down()
        return "written"

    assert with_db_retry(lambda: back_at(0.9), "sqlite:///unused.db", 1.0) == "written"
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        with_db_retry(lambda: back_at(60), "sqlite:///unused.db", 1.0)
    assert 1.0 <= time.monotonic() - start < 1.5
