"""Fault injection on real processes, the services side: Redis killed, PostgreSQL stopped (within and past the
retry budget), cancel during a run, redelivery past the visibility timeout, and every fault at once on one batch.
(Worker faults: tests/test_faults.py.)

The private cluster, its timing, and what every test checks (answers at temperature 1.0 compared, exported
exactly once, all 200): tests/fault_suite.py.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli
from tests.fault_cluster import (
    MODEL,
    TERMINAL,
    Cluster,
    chat,
    staggered,
    unchanged,
    wait_until,
)
from tests.fault_suite import (
    DB_RETRY_S,
    LEASE_S,
    RESEND_AFTER_S,
    VISIBILITY_S,
    WORKER_ARGS,
    attempts,
    ensure_two,
    mid_chunk,
    send,
    serving,
    store_unsent,
    sweep,
    unacked,
)

pytest_plugins = ["tests.reliability_report", "tests.fault_suite"]  # the latter: the module's `cluster` fixture
pytestmark = [pytest.mark.faults, pytest.mark.slow]


# ----------------------------------------------------------------------------- Redis and PostgreSQL


def test_redis_killed_and_restarted_mid_batch(cluster: Cluster, reliability: Any, tmp_path: Path) -> None:
    c = cluster
    ensure_two(c)
    a = c.submit(chat(24, "redis-a", 32))
    wait_until(lambda: c.n_results(a) > 0, 90, "batch A to start producing results")
    b, b_chunks = store_unsent(c, chat(48, "redis-b", 8))
    # Workers too busy to consume (frozen for a moment, well under the heartbeat timeout): B's messages wait in
    # Redis when it dies, and are lost with it (no persistence).
    for name in serving(c):
        c.signal_worker(name, signal.SIGSTOP)
    try:
        send(c, b_chunks)
        queued = wait_until(c.redis.queued, 3, "batch B's messages to wait in Redis")
        c.redis.kill()
        t_kill = time.time()
    finally:
        for name in serving(c):
            c.signal_worker(name, signal.SIGCONT)
    before = c.answers(a)
    # While Redis is down: status still answers (the store is the truth); `submit` refuses before storing
    # anything, exit 5 naming Redis with the password masked.
    st = run_cli(["status", a, "--json"], c.env, timeout=60)
    assert st.returncode == 0, st.stderr
    sub = run_cli(["submit", str(c.write_input(chat(8, "refused", 8))), "-m", MODEL], c.env, timeout=90)
    assert sub.returncode == 5 and "Traceback" not in sub.stderr, sub.stderr
    assert c.redis.password not in sub.stderr + sub.stdout and ":***@" in sub.stderr, sub.stderr
    # Redis failing between the store's commit and the dispatch (submit's own two steps, in-process): the batch
    # is stored and its chunks go out from SQL alone once Redis is back.
    from batchllm.errors import ServiceUnavailable
    from batchllm.queue import make_celery
    from batchllm.services.submit import dispatch_new, submit_file

    down = submit_file(c.settings, c.write_input(chat(8, "down", 8)), model=MODEL).batch_id
    with pytest.raises(ServiceUnavailable):
        dispatch_new(c.settings, make_celery(c.settings), down)
    time.sleep(max(0.0, 3 - (time.time() - t_kill)))
    c.redis.start()  # same port and password, empty
    t_up = time.time()
    t_end = max(c.wait_batch(x, 240) for x in (a, b, down))
    for x, n in ((a, 24), (b, 48), (down, 8)):
        c.check_exactly_once(x, tmp_path / f"{x}.jsonl", n)
    unchanged(before, c.answers(a))
    recovery = t_end - t_up
    assert recovery < RESEND_AFTER_S, f"recovery took {recovery:.0f}s: it waited for the time-based resend"
    print(f"[faults] Redis restart: {queued} message(s) lost, all batches done {recovery:.1f}s after the restart")
    reliability.row(
        f"Redis SIGKILLed mid-batch (no persistence) and restarted empty 3 s later; batch A running, batch B's "
        f"{queued} chunk message(s) queued; a third batch stored while Redis was down, its dispatch failing",
        "workers and scheduler reconnected by themselves; `status` kept answering; `submit` exited 5 with the URL "
        "masked, storing nothing; a batch stored just before its dispatch failed was sent from SQL alone once Redis "
        "returned; the scheduler saw Redis's new run_id "
        f"and re-sent the lost messages at once ({recovery:.1f} s to all three batches completed, under the "
        f"{RESEND_AFTER_S:.0f} s time-based resend); all 200, A's earlier answers unchanged",
        recovery_s=recovery, requests=80, results=80, extra="recovery measured from Redis's restart",
    )


def test_database_restarted_within_the_retry_budget(cluster: Cluster, reliability: Any, tmp_path: Path) -> None:
    c = cluster
    ensure_two(c)
    bid = c.submit(chat(40, "pg", staggered))
    wait_until(lambda: c.n_results(bid) > 0, 90, "the batch to start producing results")
    before = c.answers(bid)
    c.pg.stop("fast")  # every session is terminated
    t_down = time.time()
    time.sleep(5)
    c.pg.start()
    t_up = time.time()
    t_done = c.wait_batch(bid, 180)
    lines = c.check_exactly_once(bid, tmp_path / "out.jsonl", 40)
    unchanged(before, c.answers(bid))
    tries = attempts(c, bid)
    logs = c.logs_text("fw-")
    waits = len(re.findall(r"result write waits for the database|heartbeat failed|database unavailable", logs))
    assert waits > 0, "no sign the workers saw the outage"
    assert max(tries.values()) == 1, f"a chunk ran twice after an outage within the retry budget: {tries}"
    recovery = t_done - t_up
    print(f"[faults] PostgreSQL restart ({t_up - t_down:.0f}s down): batch done {recovery:.1f}s after")
    reliability.row(
        f"PostgreSQL stopped (`pg_ctl stop -m fast`, all sessions killed) for {t_up - t_down:.0f} s mid-batch, within "
        f"the {DB_RETRY_S:.0f} s retry budget ({len(before)} of 40 results written)",
        f"workers kept generating and retried their writes ({waits} logged waits); no chunk re-run; batch completed, "
        "earlier answers unchanged, all 200",
        recovery_s=recovery, requests=40, results=len(lines), extra="recovery measured from the database's restart",
    )


def test_database_outage_longer_than_the_retry_budget(cluster: Cluster, reliability: Any, tmp_path: Path) -> None:
    """Writes cannot wait forever: past the budget the worker gives the chunk up (aborts it in the engine) and
    releases its lease when the database is back, so the chunk runs again at once; nothing stays leased."""
    c = cluster
    ensure_two(c)
    bid = c.submit(chat(40, "pg-long", staggered))
    wait_until(lambda: c.n_results(bid) > 0, 90, "the batch to start producing results")
    before = c.answers(bid)
    c.pg.stop("fast")
    t_down = time.time()
    time.sleep(DB_RETRY_S + 6)
    c.pg.start()
    t_up = time.time()
    t_done = c.wait_batch(bid, 240)
    lines = c.check_exactly_once(bid, tmp_path / "out.jsonl", 40)
    unchanged(before, c.answers(bid))
    logs = c.logs_text("fw-")
    gave_up = len(re.findall(r"giving up chunk", logs))
    assert gave_up > 0, "no worker gave a chunk up: the outage did not outlast the retry budget"
    assert not [ck for ck in c.chunks(bid) if ck["status"] != "done"]
    recovery = t_done - t_up
    print(f"[faults] PostgreSQL down {t_up - t_down:.0f}s (> {DB_RETRY_S:.0f}s budget): batch done {recovery:.1f}s after")
    reliability.row(
        f"PostgreSQL stopped for {t_up - t_down:.0f} s mid-batch, longer than the workers' {DB_RETRY_S:.0f} s write "
        "retry budget",
        f"workers gave {gave_up} chunk(s) up (aborted in the engine, lease released when the database returned, never "
        "left leased); the chunks ran again; batch completed, earlier answers unchanged, all 200",
        recovery_s=recovery, requests=40, results=len(lines), extra="recovery measured from the database's restart",
    )


# ----------------------------------------------------------------------------- cancel and redelivery


def test_cancel_during_a_run(cluster: Cluster, reliability: Any, tmp_path: Path) -> None:
    c = cluster
    ensure_two(c)
    # Stored by the real submit path; 2 chunks are sent now, 3 stand for messages still queued behind busy
    # workers (marked sent, so the scheduler does not send them either), delivered after the cancel.
    # Up to 344 tokens: the two chunks still run when the cancel lands, so the batch is cancelling, not cancelled.
    bid, chunks = store_unsent(c, chat(40, "cancel", lambda i: 8 + (i % 8) * 48))
    send(c, chunks[:2])
    wait_until(lambda: c.n_results(bid) > 0, 90, "the first results")
    running = [ck for ck in c.chunks(bid) if ck["status"] == "leased"]  # read before the CLI's seconds of start-up
    proc = run_cli(["cancel", bid, "--json"], c.env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    t_cancel = time.time()
    at_cancel = json.loads(proc.stdout)
    assert at_cancel["status"] == "cancelling" and running, f"nothing was running at the cancel: {at_cancel}"
    again = run_cli(["retry", bid], c.env, timeout=60)  # state-checked: a cancelling batch is not retried
    assert again.returncode != 0 and "cancelling" in again.stderr and "Traceback" not in again.stderr, again.stderr
    send(c, chunks[2:])  # the late messages arrive after the cancel
    t_end = c.wait_batch(bid, 120)
    wait_until(lambda: c.redis.queued() == 0, 30, "the late messages to be consumed")
    time.sleep(1.0)
    assert c.status(bid) == "cancelled"
    after = {ck["id"]: ck for ck in c.chunks(bid)}
    for ck in chunks[2:]:
        assert after[ck["id"]]["status"] == "cancelled", after[ck["id"]]
    late_ok = c.sql("SELECT count(*) FROM results s JOIN requests r ON r.id = s.request_id "
                    "WHERE r.chunk_id = ANY(%s) AND s.ok", [ck["id"] for ck in chunks[2:]])[0][0]
    assert late_ok == 0
    lines = c.exported(bid, tmp_path / "out.jsonl")
    ok = [x for x in lines.values() if x.get("response") and x["response"]["status_code"] == 200]
    errs = [x for x in lines.values() if x.get("error")]
    assert len(lines) == 40 and ok and len(ok) + len(errs) == 40
    assert {x["error"]["code"] for x in errs} <= {"batch_cancelled"}
    view = json.loads(run_cli(["status", bid, "--json"], c.env, timeout=60).stdout)
    counts = view["request_counts"]
    assert view["status"] == "cancelled" and counts == {"total": 40, "completed": len(ok), "failed": len(errs)}, view
    retried = run_cli(["retry", bid, "--json"], c.env, timeout=60)  # a cancelled batch can be retried
    assert retried.returncode == 0, retried.stderr
    c.wait_batch(bid, 180)
    c.check_exactly_once(bid, tmp_path / "retried.jsonl", 40)
    reliability.row(
        f"`batchllm cancel` while {len(running)} of 5 chunks run; the other 3 chunks' messages delivered after the "
        "cancel; `retry` while cancelling, then after",
        f"status went to cancelling at once; `retry` refused while cancelling; no new chunk started (late messages "
        f"acked and skipped); the batch became cancelled after {t_end - t_cancel:.1f} s with {len(ok)} completed + "
        f"{len(errs)} batch_cancelled lines; `retry` then ran the {len(errs)} cancelled requests: all 40 answered, 200",
        requests=40, results=40,
    )


def test_chunks_outliving_the_visibility_timeout_run_once(cluster: Cluster, reliability: Any, tmp_path: Path) -> None:
    """Redis's visibility timeout is 2 s here; chunks run far longer. A task hands its requests to the engine and
    returns, so the message is acked long before the timeout; a message redelivered anyway (a sweep while a claim
    is blocked) finds the chunk leased and is acked and skipped."""
    c = cluster
    ensure_two(c)
    bid = c.submit(chat(8, "vt-long", 200))
    (ck,) = c.chunks(bid)
    wait_until(lambda: c.leased_progress(bid), 60, "the long chunk to be claimed")
    t0 = time.time()
    time.sleep(VISIBILITY_S + 0.5)
    still_running = c.status(bid) not in TERMINAL and c.n_results(bid) < 8
    held_msg = unacked(c, ck["id"])
    sweep(c)
    t_long = c.wait_batch(bid, 180)
    assert still_running, "the long chunk finished within the visibility timeout: make it longer"
    assert held_msg is None, f"a chunk's message stayed unacked {held_msg[0]:.1f}s while its requests ran"
    # The same message delivered again after the run (a redelivery): the claim finds the chunk done.
    send(c, [ck])
    wait_until(lambda: c.redis.queued() == 0, 30, "the duplicate message to be consumed")
    time.sleep(2)
    assert attempts(c, bid)[ck["id"]] == 1, "a redelivered message ran the chunk again"
    lines = c.check_exactly_once(bid, tmp_path / "out.jsonl", 8)
    reliability.row(
        f"A chunk running {t_long - t0:.0f} s with Redis's visibility timeout at {VISIBILITY_S} s; a restore sweep "
        "while it ran; the same message delivered again after it finished",
        "the message was acked as soon as the requests were in the engine, so the sweep had nothing to redeliver; "
        "the duplicate delivery was acked and skipped; claimed once, all 200",
        requests=8, results=len(lines),
    )


# ----------------------------------------------------------------------------- everything at once


def test_combined_faults_on_one_batch(cluster: Cluster, reliability: Any, tmp_path: Path) -> None:
    """160 requests at temperature 1.0 survive, in one run: SIGKILL of one worker, SIGSTOP of the other past its
    lease, a Redis restart, and a PostgreSQL outage longer than the retry budget."""
    c = cluster
    ensure_two(c)
    n = 160
    bid = c.submit(chat(n, "all", lambda i: 64 + (i % 8) * 8))  # 64..120 tokens: long enough for four faults
    seen: dict[str, Any] = {}

    def snap() -> None:
        seen.update(c.answers(bid))

    def running() -> None:
        assert c.status(bid) not in TERMINAL, f"the batch ended before every fault was injected: {c.describe(bid)}"

    def progress(timeout: float, what: str) -> float:
        """Seconds until 8 more results are written than were seen (the work moves again)."""
        t0, have = time.time(), c.n_results(bid)
        wait_until(lambda: c.n_results(bid) >= have + 8 or c.status(bid) in TERMINAL, timeout, what)
        return time.time() - t0

    times: dict[str, float] = {}
    # 1. SIGKILL a worker mid-chunk; its supervisor restarts it at once (it loads while the rest goes on).
    victim, _ = mid_chunk(c, bid)
    other = next(x for x in ("fw-1", "fw-2") if x != victim)
    c.kill_worker(victim)
    snap()
    c.start_worker(victim, WORKER_ARGS)
    # 2. SIGSTOP the other one past its lease (nothing runs meanwhile: the first is still loading).
    c.signal_worker(other, signal.SIGSTOP)
    try:
        time.sleep(LEASE_S + 4)
        snap()
    finally:
        c.signal_worker(other, signal.SIGCONT)
    times["SIGKILL of one worker + SIGSTOP of the other"] = progress(180, "progress after the worker faults")
    running()
    # 3. Redis restart.
    snap()
    c.redis.kill()
    time.sleep(3)
    c.redis.start()
    times["Redis restart"] = progress(120, "progress after the Redis restart")
    running()
    # 4. PostgreSQL down longer than the retry budget.
    snap()
    c.pg.stop("fast")
    time.sleep(DB_RETRY_S + 5)
    c.pg.start()
    times["PostgreSQL outage"] = progress(180, "progress after the PostgreSQL outage")
    c.wait_batch(bid, 600)
    lines = c.check_exactly_once(bid, tmp_path / "out.jsonl", n)
    final = c.answers(bid)
    unchanged(seen, final)
    assert len({v[1] for v in final.values()}) > n * 0.9, "answers are not varied: temperature 1.0 not applied?"
    stale = c.stale_writes("fw-1") + c.stale_writes("fw-2")
    print(f"[faults] combined: {times}; {stale} stale write(s) refused")
    reliability.row(
        f"One {n}-request batch at temperature 1.0: SIGKILL of one worker (restarted at once), SIGSTOP of the other "
        f"for {LEASE_S + 4:.0f} s (past its lease), a Redis restart, and a PostgreSQL outage of {DB_RETRY_S + 5:.0f} s "
        "(past the retry budget), one after the other",
        f"every request answered exactly once with 200; none of the {len(seen)} answers read during the faults "
        f"changed; {stale} stale write(s) refused; recovery per step: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + " (from the fault's end to 8 more results written)",
        requests=n, results=len(lines),
    )

