"""The store's guarantees on real PostgreSQL and SQLite: fencing, insert-only results, database time,
unique worker names, the leader lease, and state-checked batch actions. No model, no broker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchllm.errors import NotLeader, StateError
from batchllm.status import BatchStatus, Endpoint, WorkerState
from batchllm.store import batches, dispatch, leader, leases, results, workers
from batchllm.store.db import now, upgrade
from batchllm.store.results import NewResult


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database of each kind."""
    if request.param == "sqlite":
        u = f"sqlite:///{tmp_path / 'store.db'}"
        upgrade(u)
        yield u
        return
    from tests.conftest import _create_pg_database, _drop_pg_database

    name = f"bl_store_{int(time.time() * 1000) % 10**9}"
    u = _create_pg_database(name)
    upgrade(u)
    yield u
    _drop_pg_database(name)


def make_batch(url: str, n: int = 4, chunk: int = 2, window_s: float = 3600) -> str:
    """A batch of ``n`` chat requests in chunks of ``chunk``, stored through the real ingest."""
    spec = batches.NewBatch(name="t", model="m", priority=0, idempotency_key=None, input_name="t.jsonl",
                            completion_window="1h", window_s=window_s)
    with batches.create(url, spec) as ing:
        chunks = []
        for i in range(n):
            ck = f"ck_{ing.batch_id[-8:]}_{i // chunk}"
            if i % chunk == 0:
                chunks.append(batches.NewChunk(ck, "m@bf16", "batchllm.m@bf16", len(chunks) + 1, min(chunk, n - i)))
            ing.add((ing.batch_id, i + 1, f"r{i}", "m", Endpoint.CHAT.value, ck, b'{"messages": []}', None, None, None))
        ing.finish(chunks, total=n, invalid=0, blank=0, models={"m": "m@bf16"}, input_sha256=None,
                   status=BatchStatus.IN_PROGRESS)
    return ing.batch_id


def ok(rid: int, text: str = "hi") -> NewResult:
    return NewResult(request_id=rid, status_code=200, body=f'{{"text": "{text}"}}', completion_tokens=3)


def register(url: str, name: str, instance: str) -> bool:
    ident = {"host": "h", "pid": 1, "kind": "cpu", "devices": [], "memory_total_bytes": 1, "memory_free_bytes": 1,
             "advertised_bytes": None, "tensor_parallel": 1, "pinned": True}
    return workers.register(url, name, instance, ident, WorkerState.READY, timeout=5)


def test_fenced_writes_refuse_a_stale_holder(url: str) -> None:
    bid = make_batch(url)
    ck = dispatch.of_batch(url, bid)[0].id
    assert register(url, "w1", "inst-1") and register(url, "w2", "inst-2")
    first = leases.claim(url, ck, "inst-1", ttl=0.2)
    assert first.outcome == leases.ClaimOutcome.CLAIMED and first.lease is not None and first.lease.attempt == 1
    time.sleep(0.4)  # the lease lapses (database clock)
    second = leases.claim(url, ck, "inst-2", ttl=30)
    assert second.outcome == leases.ClaimOutcome.CLAIMED and second.lease is not None and second.lease.attempt == 2
    rid = second.requests[0].id
    stale = results.write_results(url, first.lease, [ok(rid, "old")], done=False, ttl=30, worker="w1", device=None)
    assert stale.stale and stale.applied == 0
    fresh = results.write_results(url, second.lease, [ok(rid, "new")], done=False, ttl=30, worker="w2", device=None)
    assert not fresh.stale and fresh.applied == 1
    # Insert-only: the same request written again (a re-run) keeps its first answer and counts nothing.
    again = results.write_results(url, second.lease, [ok(rid, "newer")], done=False, ttl=30, worker="w2", device=None)
    assert again.applied == 0
    rows = [t for page in results.iter_export(url, bid) for t in page]
    assert [t[11] for t in rows if t[0] == rid] == ['{"text": "new"}']
    w = {x.name: x for x in workers.all_workers(url)}
    assert w["w2"].requests_done == 1 and w["w2"].tokens_generated == 3 and w["w1"].requests_done == 0
    # Renewal covers only what is still held.
    assert leases.renew(url, [first.lease], ttl=30) == set()
    assert leases.renew(url, [second.lease], ttl=30) == {second.lease.key}


def test_batch_completes_through_finalizing_with_sealed_counts(url: str) -> None:
    bid = make_batch(url, n=4, chunk=2)
    assert register(url, "w1", "inst-1")
    for ref in dispatch.of_batch(url, bid):
        c = leases.claim(url, ref.id, "inst-1", ttl=30)
        assert c.lease is not None
        out = [ok(r.id) for r in c.requests[:-1]] + [NewResult(c.requests[-1].id, 400, '{"error": {}}', error_code="bad")]
        results.write_results(url, c.lease, out, done=True, ttl=30, worker="w1", device=None)
    b = batches.get(url, bid)
    assert b.status == BatchStatus.COMPLETED and b.finalizing_at is not None and b.completed_at is not None
    assert (b.counts.completed, b.counts.failed, b.counts.pending, b.counts.output_tokens) == (2, 2, 0, 6)
    with pytest.raises(StateError):
        batches.cancel(url, bid)
    retried = batches.retry(url, bid, chunk_size=8, window_s=60, queue_of=lambda ref: f"batchllm.{ref}")
    assert retried.requests == 2 and retried.batch.status == BatchStatus.IN_PROGRESS
    with pytest.raises(StateError):  # running: no second retry
        batches.retry(url, bid, chunk_size=8, window_s=60, queue_of=lambda ref: ref)


def test_expired_batch_gets_a_new_window_on_retry(url: str) -> None:
    bid = make_batch(url, n=2, chunk=2, window_s=0.1)
    time.sleep(0.3)
    assert batches.expire_due(url, None) == [bid]
    b = batches.get(url, bid)
    assert b.status == BatchStatus.EXPIRED and b.counts.failed == 2
    r = batches.retry(url, bid, chunk_size=8, window_s=3600, queue_of=lambda ref: ref)
    assert r.batch.status == BatchStatus.IN_PROGRESS and r.batch.expires_at is not None
    assert r.batch.expires_at > now(url) + 3000
    assert batches.expire_due(url, None) == []  # not re-expired at the next tick


def test_worker_names_are_unique_while_alive(url: str) -> None:
    assert register(url, "gpu0", "a")
    assert not register(url, "gpu0", "b")  # a live worker holds it
    assert workers.heartbeat(url, "a", state=WorkerState.BUSY).registered
    workers.mark_stopped(url, "a")
    assert register(url, "gpu0", "b")  # free once its holder stopped
    assert not workers.heartbeat(url, "a", state=WorkerState.BUSY).registered  # the old process lost its name


def test_one_leader_at_a_time(url: str) -> None:
    a = leader.acquire(url, "sched-a", "h", 1, ttl=2)
    assert a is not None
    assert leader.acquire(url, "sched-b", "h", 2, ttl=2) is None  # stands by
    time.sleep(2.3)
    b = leader.acquire(url, "sched-b", "h", 2, ttl=30)
    assert b is not None and b.term > a.term
    with pytest.raises(NotLeader):
        batches.finalize_open(url, a)  # the old leader's writes are refused
    assert batches.finalize_open(url, b) == {}
    info = leader.current(url)
    assert info is not None and info.owner == "sched-b" and info.active


def test_generated_nul_and_lone_surrogates_round_trip(url: str) -> None:
    """PostgreSQL text cannot hold U+0000: a generated NUL (raw, or JSON-escaped in a body) and a lone surrogate
    are stored escaped, the rest of the step is written, and the exported JSON decodes to the same characters."""
    import json

    bid = make_batch(url, n=2, chunk=2)
    ck = dispatch.of_batch(url, bid)[0].id
    claimed = leases.claim(url, ck, "inst-1", ttl=30)
    assert claimed.lease is not None
    r1, r2 = (r.id for r in claimed.requests)
    body = json.dumps({"text": "a\x00b\ud800c"})  # json.dumps escapes both: \u0000 and \ud800
    raw = NewResult(request_id=r2, status_code=500, body=b"{}", error_code="engine_error",
                    error_message="bad\x00byte \udc80 here")
    out = results.write_results(url, claimed.lease, [NewResult(r1, 200, body, completion_tokens=2), raw],
                                done=True, ttl=30, worker="w", device=None)
    assert out.applied == 2 and not out.stale
    rows = {t[0]: t for page in results.iter_export(url, bid) for t in page}
    assert json.loads(rows[r1][11])["text"] == "a\x00b\ud800c"
    assert "\\u0000" in rows[r2][13] and "\\udc80" in rows[r2][13]  # visible, not silently dropped
