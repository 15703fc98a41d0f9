"""Fault injection on real worker processes: malformed messages, SIGKILL, restart under the same name, SIGSTOP past
the lease, a model that cannot load, a skewed clock, credentials. (Redis and PostgreSQL faults, cancel, redelivery
and all faults at once: tests/test_faults_services.py.)

The private cluster, its timing, and what every test checks (answers at temperature 1.0 compared, exported
exactly once, all 200): tests/fault_suite.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli
from tests.fault_cluster import (
    MODEL,
    REF,
    Cluster,
    chat,
    require,
    staggered,
    unchanged,
    wait_until,
)
from tests.fault_suite import (
    GHOST,
    HEARTBEAT_TIMEOUT_S,
    LEASE_S,
    WORKER_ARGS,
    attempts,
    ensure_two,
    mid_chunk,
    serving,
    short,
)

pytest_plugins = ["tests.reliability_report", "tests.fault_suite"]  # the latter: the module's `cluster` fixture
pytestmark = [pytest.mark.faults, pytest.mark.slow]


# ----------------------------------------------------------------------------- malformed messages


class _Exploit:
    """Pickles to ``os.system('touch MARKER')``: if a worker ever unpickled it, the marker would appear."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))




def test_malformed_messages_are_rejected_and_the_worker_keeps_running(cluster: Cluster, reliability: Any,
                                                                       tmp_path: Path) -> None:
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
    for name in serving(c):
        assert c.workers[name].proc.poll() is None, f"{name} died on a malformed message"
    c.ready(serving(c), timeout=20)
    # Still serving real work, through the password-protected Redis.
    bid = c.submit(chat(8, "after-bad", 4))
    c.wait_batch(bid, 60)
    n_req = n_res = len(c.check_exactly_once(bid, tmp_path / "after.jsonl", 8))
    assert c.status(bid) == "completed"
    for what, _ev in sent.values():
        reliability.row(f"Celery message: {what}", f"{outcome[what]}; the worker kept running")
    reliability.row("A normal batch right after the malformed messages", "completed on the same workers",
                    requests=n_req, results=n_res)



# ----------------------------------------------------------------------------- workers dying, freezing, restarting


def test_worker_sigkilled_mid_chunk_is_recovered(cluster: Cluster, reliability: Any, tmp_path: Path) -> None:
    c = cluster
    ensure_two(c)
    bid = c.submit(chat(40, "kill", staggered))
    victim, held = mid_chunk(c, bid)
    t_kill = c.kill_worker(victim)
    before = c.answers(bid)
    survivor = next(n for n in serving(c) if n != victim)
    t_back: list[float] = []
    victim_instance = c.instance_of(victim)

    def watch() -> None:  # when the dead worker's chunks stop being leased to it
        if not t_back and all(o != victim_instance for _c, o, _n, _s in c.leased_progress(bid)):
            t_back.append(time.time())

    t_done = c.wait_batch(bid, 180, watch)
    lines = c.check_exactly_once(bid, tmp_path / "out.jsonl", 40)
    after = c.answers(bid)
    unchanged(before, after)
    tries = attempts(c, bid)
    assert all(tries[cid] >= 2 for cid in held), f"a held chunk was not re-claimed: {tries}"
    rerun = [k for k, v in after.items() if v[2] >= 2]
    assert rerun and all(after[k][3] == survivor for k in rerun), "the re-run requests were not written by the survivor"
    recovery = t_done - t_kill
    released = (t_back[0] - t_kill) if t_back else recovery
    print(f"[faults] SIGKILL: chunks back {released:.1f}s after the kill, batch done {recovery:.1f}s after")
    reliability.row(
        f"Worker SIGKILLed (whole process group, vLLM engine core included) mid-chunk: {len(held)} chunk(s) leased, "
        f"{sum(n for n, _ in held.values())} of their results already written",
        f"the scheduler declared it lost and re-queued its chunks {released:.1f} s after the kill; {survivor} re-ran "
        f"only the {len(rerun)} request(s) without a result (attempt 2); the {len(before)} answers written before "
        "the kill are unchanged; all 200",
        recovery_s=recovery, requests=40, results=len(lines),
    )
    c.start_worker(victim, WORKER_ARGS)  # back for the next tests (loads while they start)


def test_worker_restarted_under_the_same_name_gives_back_its_dead_leases(cluster: Cluster, reliability: Any,
                                                                          tmp_path: Path) -> None:
    """A supervisor restarts a killed worker under the same name at once: the new process knows its predecessor
    (same host, dead pid) is gone, takes the name over without waiting for the heartbeat timeout, and re-queues
    the chunks the dead process held. The scheduler is paused (SIGSTOP) from before the kill until then, so the
    chunks can only have been given back by the new process, however long its start-up takes on loaded cores."""
    c = cluster
    ensure_two(c)
    bid = c.submit(chat(40, "restart", staggered))
    victim, held = mid_chunk(c, bid)
    old_instance = c.instance_of(victim)
    for p in c.schedulers:
        os.killpg(p.pid, signal.SIGSTOP)
    try:
        t_kill = c.kill_worker(victim)
        before = c.answers(bid)
        w = c.start_worker(victim, WORKER_ARGS)
        wait_until(lambda: c.instance_of(victim) not in (None, old_instance), 120, "the new process to take the name")
        wait_until(lambda: not [1 for _cid, owner, _n, _sz in c.leased_progress(bid) if owner == old_instance], 10,
                   "the dead process's chunks to be re-queued")
        t_requeued = time.time()
    finally:
        for p in c.schedulers:
            os.killpg(p.pid, signal.SIGCONT)
    assert "its previous process held" in w.log.read_text(errors="replace")
    t_done = c.wait_batch(bid, 180)
    lines = c.check_exactly_once(bid, tmp_path / "out.jsonl", 40)
    unchanged(before, c.answers(bid))
    recovery = t_done - t_kill
    print(f"[faults] same-name restart: chunks re-queued {t_requeued - t_kill:.1f}s after the kill by the new process; "
          f"batch done {recovery:.1f}s after the kill")
    reliability.row(
        f"Worker SIGKILLed mid-chunk ({len(held)} chunk(s) leased) and restarted at once under the same `--name`; "
        "the scheduler paused meanwhile",
        f"the new process took the name over (its predecessor's pid is gone on this host) and re-queued the dead "
        f"process's chunks {t_requeued - t_kill:.1f} s after the kill, with no scheduler running; batch completed, "
        "answers written before the kill unchanged, all 200",
        recovery_s=recovery, requests=40, results=len(lines),
    )


def test_worker_frozen_past_its_lease_is_fenced(cluster: Cluster, reliability: Any, tmp_path: Path) -> None:
    """SIGSTOP a worker mid-chunk for longer than its lease and the heartbeat timeout, then SIGCONT it: the other
    worker re-runs its chunks under a new attempt, and the frozen one's late results are refused, never applied."""
    c = cluster
    ensure_two(c)
    bid = c.submit(chat(48, "freeze", staggered))
    victim, held = mid_chunk(c, bid)
    stale_before = c.stale_writes(victim)
    c.signal_worker(victim, signal.SIGSTOP)
    t_stop = time.time()
    try:
        before = c.answers(bid)
        # Its chunks are re-claimed (attempt 2) by the other worker while it is frozen.
        wait_until(lambda: all(attempts(c, bid)[cid] >= 2 for cid in held), 60, "the frozen worker's chunks to be re-claimed")
        t_reclaimed = time.time()
        time.sleep(max(0.0, LEASE_S + 2 - (time.time() - t_stop)))
        mid = c.answers(bid)
    finally:
        c.signal_worker(victim, signal.SIGCONT)
    frozen_s = time.time() - t_stop
    t_done = c.wait_batch(bid, 180)
    wait_until(lambda: c.worker_state(victim) and c.worker_state(victim)[0] in ("ready", "busy"), 30,  # type: ignore[index]
               "the resumed worker to heartbeat again")
    lines = c.check_exactly_once(bid, tmp_path / "out.jsonl", 48)
    after = c.answers(bid)
    unchanged(before, after)
    unchanged(mid, after)
    log = c.logs_text(f"{victim}.")
    refused = c.stale_writes(victim) - stale_before
    aborted = len(re.findall(r"lease on chunk \S+ \(attempt \d+\) lost; aborting", log))
    assert refused > 0 or aborted > 0, f"the resumed worker showed no sign of fencing:\n{log[-3000:]}"
    # Of the chunks it held when frozen, every result written since came from the re-claim (attempt 2 or later).
    # Once resumed it may claim chunks nobody had started (e.g. a message it had prefetched): those are its own.
    chunk_of = dict(c.sql("SELECT custom_id, chunk_id FROM requests WHERE batch_id = %s", bid))
    late = {k: v for k, v in after.items() if k not in before and chunk_of[k] in held}
    stale_rows = [k for k, v in late.items() if v[3] == victim or v[2] < 2]
    assert late and not stale_rows, f"the frozen worker's late results were applied: {stale_rows}"
    print(f"[faults] SIGSTOP {frozen_s:.0f}s: re-claimed {t_reclaimed - t_stop:.1f}s after the freeze; "
          f"{refused} stale write(s) refused, {aborted} lease(s) dropped on resume")
    reliability.row(
        f"Worker frozen with SIGSTOP mid-chunk for {frozen_s:.0f} s (lease {LEASE_S:.0f} s, heartbeat timeout "
        f"{HEARTBEAT_TIMEOUT_S:.0f} s), then resumed with SIGCONT",
        f"its chunks were re-claimed by the other worker (attempt 2) {t_reclaimed - t_stop:.1f} s after the freeze; on "
        f"resume its {refused} late result write(s) were refused by fencing (counted in `stale_writes`) and it dropped "
        f"{aborted} lost lease(s), aborting their requests; no answer changed; all 200",
        recovery_s=t_done - t_stop, requests=48, results=len(lines),
    )


# ----------------------------------------------------------------------------- a model that cannot load


def test_model_that_fails_to_load(cluster: Cluster, reliability: Any) -> None:
    c = cluster
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
    try:
        wait_until(lambda: (c.worker_state("ghost-idle") or ("", 0))[0] == "idle", 90, "the unpinned worker to register idle")
        bid = c.submit([{**r, "body": {**r["body"], "model": GHOST}} for r in chat(4, "ghost", 4)], model=GHOST)
        # The state shows error for about a heartbeat, then idle again; the failure itself stays on the row.
        wait_until(lambda: c.sql("SELECT load_failed_ref FROM workers WHERE name = %s", "ghost-idle")[0][0] is not None,
                   90, "the load failure to be reported")
        listing = run_cli(["workers", "--json"], c.env, timeout=60)
        assert listing.returncode == 0, listing.stderr
        shown = {x["name"]: x for x in json.loads(listing.stdout)["workers"]}["ghost-idle"]
        assert f"could not load {GHOST}@bf16" in (shown["error"] or ""), shown
        c.wait_batch(bid, 90)
        time.sleep(4)  # long enough for a crash loop to show
        assert w.proc.poll() is None, "the unpinned worker exited"
        log = w.log.read_text(errors="replace")
        tries = len(re.findall(rf"could not load {re.escape(GHOST)}", log))
        assert tries == 1, f"{tries} load attempts (crash loop?):\n{log[-3000:]}"
        assert "Traceback" not in log
        view = json.loads(run_cli(["status", bid, "--json"], c.env, timeout=60).stdout)
        assert view["request_counts"] == {"total": 4, "completed": 0, "failed": 4}, view
        codes = {r[0] for r in c.sql("SELECT error_code FROM results WHERE batch_id = %s", bid)}
        assert codes == {"model_load_failed"}
    finally:
        w.stop()
    reliability.row(
        f"Pinned worker for a models-file entry whose weights dir does not exist (`worker --model {GHOST}`)",
        f"exited {pinned.returncode} after {took:.1f} s with one line: "
        f"`{short(mentions[0].replace(str(c.base), '$TMP'), 160)}`; no traceback",
    )
    reliability.row(
        f"Unpinned worker assigned {GHOST} by the scheduler (a batch of 4 requests for it)",
        "`batchllm workers` showed the load error with its message; it stayed up in the same process and tried "
        "once (no crash loop); the "
        f"scheduler failed the 4 requests with model_load_failed and the batch ended ({view['status']})",
        requests=4, results=4,
    )


# ----------------------------------------------------------------------------- a skewed clock


def test_worker_with_a_skewed_clock(cluster: Cluster, reliability: Any, tmp_path: Path) -> None:
    """A worker whose clock runs a minute behind (libfaketime) is neither declared lost nor stealing leases:
    leases, heartbeats and liveness use the database's clock."""
    require("faketime")
    c = cluster
    ensure_two(c)
    sched_from = c.scheduler_log.stat().st_size  # only what the scheduler logs from now on counts
    lib = sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))
    assert lib, "Debian's faketime package is installed but libfaketimeMT.so.1 is not where it puts it"
    # Preloaded into the worker process itself (the `faketime` wrapper would fork, hiding the worker's pid).
    skew_env = {"LD_PRELOAD": str(lib[0]), "FAKETIME": "-60s", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    shown = subprocess.run(["date", "+%s"], capture_output=True, text=True, check=True, env={**os.environ, **skew_env})
    assert abs(int(shown.stdout) - (time.time() - 60)) < 5, "libfaketime did not skew the clock"
    c.workers["fw-2"].stop()
    c.start_worker("fw-2", WORKER_ARGS, env=skew_env)
    c.ready(["fw-1", "fw-2"], timeout=300)
    bid = c.submit(chat(48, "skew", staggered))
    c.wait_batch(bid, 240)
    lines = c.check_exactly_once(bid, tmp_path / "out.jsonl", 48)
    by = {v[3] for v in c.answers(bid).values()}
    assert "fw-2" in by, "the skewed worker ran nothing"
    assert max(attempts(c, bid).values()) == 1, "a chunk ran twice: a lease was stolen or a worker declared lost"
    state = c.worker_state("fw-2")
    assert state is not None and state[0] in ("ready", "busy") and state[1] < 3, state
    sched = c.scheduler_log.read_bytes()[sched_from:].decode(errors="replace")
    assert not re.search(r"fw-2\S* lost", sched), f"the skewed worker was declared lost:\n{sched[-2000:]}"
    reliability.row(
        "A worker started with libfaketime (`FAKETIME=-60s`: its clock a minute behind) next to a normal one",
        f"it ran {sum(1 for v in c.answers(bid).values() if v[3] == 'fw-2')} of 48 requests; never declared lost; "
        "no chunk claimed twice; its heartbeat age by the database's clock stayed under 3 s; all 200",
        recovery_s=None, requests=48, results=len(lines),
    )
    c.workers["fw-2"].stop()
    c.start_worker("fw-2", WORKER_ARGS)


# ----------------------------------------------------------------------------- credentials (last: reads every log)


def test_credentials_json_only_and_masked_urls(cluster: Cluster, reliability: Any) -> None:
    from urllib.parse import quote

    from batchllm.queue import make_celery

    c = cluster
    app = make_celery(c.settings)
    assert app.conf.accept_content == ["json"] and app.conf.task_serializer == "json" and app.conf.result_serializer == "json"
    src = str(c.write_input(chat(1, "pw")))
    enc_redis = quote(c.redis.password, safe="")
    wrong_redis = c.broker_url.replace(enc_redis, "wrong%2F" + enc_redis[:6])
    p = run_cli(["submit", src, "-m", MODEL], {**c.env, "BATCHLLM_BROKER_URL": wrong_redis}, timeout=60)
    assert p.returncode == 5 and "Traceback" not in p.stderr, p.stderr
    assert f"redis://:***@127.0.0.1:{c.redis.port}/0" in p.stderr, p.stderr
    assert enc_redis[:6] not in p.stderr and "wrong" not in p.stderr
    enc_pg = quote(c.pg.password, safe="")
    wrong_pg = c.db_url.replace(enc_pg, "wrong%2F" + enc_pg[:6])
    p2 = run_cli(["status", "--json"], {**c.env, "BATCHLLM_DATABASE_URL": wrong_pg}, timeout=60)
    assert p2.returncode == 5 and "Traceback" not in p2.stderr, p2.stderr
    assert "postgres:***@127.0.0.1" in p2.stderr and "wrong" not in p2.stderr, p2.stderr
    reliability.row(
        "Wrong Redis password / wrong database password (containing `/`) given to the CLI",
        "exit 5 with one line naming the URL with the password masked (`redis://:***@…`, `postgresql://postgres:***@…`)",
    )
    logs = {p.name: p.read_text(errors="replace") for p in c.log_files if p.exists()}
    assert len(logs) >= 3
    for name, text in logs.items():
        for secret in (c.redis.password, c.pg.password, enc_redis, enc_pg):
            assert secret not in text, f"a password appears in {name}"
    reliability.row(
        f"Worker and scheduler logs ({len(logs)} files, through Redis and PostgreSQL outages) grepped for both "
        "passwords (raw and percent-encoded)",
        "neither password appears anywhere",
    )
