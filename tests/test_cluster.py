"""A real cluster on one CPU: the scheduler and two unpinned workers advertising a 16,384 MiB and a 24,564 MiB card.

The module's models file has two models on SmolLM2's weights, one with a 24 GB floor and one with an 8 GB
floor, so placement decisions are real while inference stays CPU-sized. Chunks of 2 requests and an engine
feed depth of 2 keep little work in flight per worker, so what runs next is decided by the queue order the
scheduler meters out of SQL (priority, then round-robin across batches): the priority and fair-share tests
fail under FIFO, which would run all of the earlier batch first.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WorkerProc, _drop_pg_database, run_cli, scratch_pg
from tests.openai_shapes import check_output_line, read_jsonl, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.services]

MODELS_TOML = """
[models.test-big-24gb]
base = "smollm2-135m-instruct"
floor_gb = 24

[models.test-small-8gb]
base = "smollm2-135m-instruct"
floor_gb = 8
"""
W16, W24 = "w16", "w24"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster(cluster_env: dict[str, str], model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Scheduler + two unpinned CPU workers standing in for a 16,384 MiB and a 24,564 MiB GPU; a schedule that
    fires once, at the next minute, while the other tests run."""
    from batchllm.settings import get_settings

    tmp = tmp_path_factory.mktemp("cluster")
    models = tmp / "models.toml"
    models.write_text(MODELS_TOML)
    # A database of its own: the session's (and its pinned worker, if another module started it) stays out of
    # these workers' listing, placement and plans.
    db_url, db_name = scratch_pg("cluster")
    env = dict(cluster_env, BATCHLLM_DATABASE_URL=db_url, BATCHLLM_MODELS_FILE=str(models), BATCHLLM_CHUNK_SIZE="2",
               BATCHLLM_ENGINE_FEED_DEPTH="2")
    session_db = os.environ["BATCHLLM_DATABASE_URL"]
    os.environ["BATCHLLM_DATABASE_URL"] = db_url  # for this process's own reads (get_settings)
    get_settings.cache_clear()
    port = _free_port()
    sched_log = tmp / "scheduler.log"
    sched = subprocess.Popen(
        [sys.executable, "-m", "batchllm", "scheduler", "--interval", "0.5", "--metrics-port", str(port)],
        env=env, stdout=sched_log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    w16 = WorkerProc(["--cpu", "--advertise-vram", "16384MiB", "--loglevel", "WARNING"], env, tmp / "w16.log", W16)
    w24 = WorkerProc(["--cpu", "--advertise-vram", "24564MiB", "--loglevel", "WARNING"], env, tmp / "w24.log", W24)
    url = env["BATCHLLM_DATABASE_URL"]
    try:
        w16.wait_state(url, ("idle",), timeout=180)
        w24.wait_state(url, ("idle",), timeout=180)
        inbox, outdir = tmp / "inbox", tmp / "outbox"
        inbox.mkdir()
        write_jsonl(inbox / "tonight.jsonl", [{"id": f"n{i}", "prompt": f"Number {i} is", "max_tokens": 4} for i in range(5)])
        # Local time, as cron reads it: fires once, at the start of the next minute, or of the one after when the
        # next starts within 15 s (the schedule must be stored before its time comes, or it waits for tomorrow).
        now = datetime.now()
        at = now + timedelta(minutes=1 if now.second < 45 else 2)
        add = run_cli(["schedule", "add", "next-minute", "--cron", f"{at.minute} {at.hour} * * *", "--input",
                       str(inbox / "*.jsonl"), "--model", "test-small-8gb", "--output", str(outdir)], env)
        assert add.returncode == 0, add.stderr
        yield {"env": env, "w16": w16, "w24": w24, "metrics": f"http://127.0.0.1:{port}/metrics", "tmp": tmp,
               "sched_log": sched_log, "outdir": outdir, "url": url}
    finally:
        for w in (w16, w24):
            w.stop(timeout=30)
        sched.send_signal(signal.SIGTERM)
        try:
            sched.wait(20)
        except subprocess.TimeoutExpired:
            sched.kill()
        os.environ["BATCHLLM_DATABASE_URL"] = session_db
        get_settings.cache_clear()
        _drop_pg_database(db_name)


def _lines(model: str, n: int, tag: str, max_tokens: int = 4) -> list[dict[str, Any]]:
    return [{"id": f"{tag}{i}", "model": model, "messages": [{"role": "user", "content": f"Say {i}."}],
             "max_tokens": max_tokens} for i in range(n)]


def _submit(cluster: dict[str, Any], name: str, rows: list[dict[str, Any]], *args: str) -> str:
    proc = run_cli(["submit", str(write_jsonl(cluster["tmp"] / name, rows)), *args], cluster["env"], timeout=600)
    assert proc.returncode == 0, proc.stderr + _logs(cluster)
    return str(proc.stdout.split()[0])


def _logs(cluster: dict[str, Any]) -> str:
    paths = (cluster["sched_log"], cluster["w16"].log, cluster["w24"].log)
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in paths)


def _meta(batch_id: str) -> list[dict[str, Any]]:
    """The batch's lines with ``meta`` (worker, model), as far as written (``results --meta --partial``)."""
    from batchllm.services.export import export
    from batchllm.settings import get_settings

    buf = io.BytesIO()
    export(get_settings(), batch_id, buf, buf, meta=True)
    return [json.loads(x) for x in buf.getvalue().splitlines()]


def _done(url: str, batch_id: str) -> int:
    from batchllm.store import batches

    return batches.get(url, batch_id).counts.completed


def _wait_terminal(cluster: dict[str, Any], batch_id: str, timeout: float = 400) -> Any:
    from batchllm.store import batches

    deadline = time.time() + timeout
    while time.time() < deadline:
        b = batches.refresh(cluster["url"], batch_id)
        if b.terminal:
            return b
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} not finished after {timeout}s\n{_logs(cluster)}")


def test_plan_shows_fit(cluster: dict[str, Any]) -> None:
    env = cluster["env"]
    proc = run_cli(["plan", "--model", "test-big-24gb", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)[0]
    assert [p.split()[0] for p in plan["placed_on"]] == [W24]
    w16_rows = [r for r in plan["workers"] if r["worker"] == W16]
    assert w16_rows and "needs ≥ 24 GB" in w16_rows[0]["reason"] and "16,384 MiB" in w16_rows[0]["reason"]
    # Embedding models are placed like any model: by floor and estimate (bge-large: a 4 GB floor, GPU-only).
    embed = json.loads(run_cli(["plan", "--model", "bge-large-en-v1.5", "--json"], env).stdout)[0]
    assert sorted(p.split()[0] for p in embed["placed_on"]) == [W16, W24] and all("bf16" in p for p in embed["placed_on"])
    human = run_cli(["plan", "--model", "mixtral-8x7b-instruct"], env)
    assert human.returncode == 0 and W24 in human.stdout and "awq-offload" in human.stdout and "GB" in human.stdout


def test_big_model_only_on_big_worker(cluster: dict[str, Any]) -> None:
    rows = _lines("test-big-24gb", 12, "big") + _lines("test-small-8gb", 12, "small")
    rows = [r for pair in zip(rows[:12], rows[12:], strict=True) for r in pair]  # interleave the two models
    batch_id = _submit(cluster, "mix.jsonl", rows, "--wait")
    meta = _meta(batch_id)
    assert [m["custom_id"] for m in meta] == [r["id"] for r in rows]
    for m in meta:
        check_output_line({k: v for k, v in m.items() if k != "meta"}, "/v1/chat/completions")
    big = {m["meta"]["worker"] for m in meta if m["custom_id"].startswith("big")}
    small = {m["meta"]["worker"] for m in meta if m["custom_id"].startswith("small")}
    assert big == {W24}, big  # 24 GB-floor work only ever on the 24 GB worker
    assert W16 in small, small
    assert all(m["meta"]["model"].startswith(("test-big-24gb@", "test-small-8gb@")) for m in meta)


def test_refuses_model_no_worker_can_host(cluster: dict[str, Any]) -> None:
    src = write_jsonl(cluster["tmp"] / "huge.jsonl", _lines("llama-2-70b-chat", 1, "h"))
    proc = run_cli(["submit", str(src)], cluster["env"])
    assert proc.returncode == 2 and proc.stdout == ""
    said = " ".join(proc.stderr.split())
    assert "llama-2-70b-chat needs ≥ 80 GB; the largest worker has" in said and "(24,564 MiB)" in said, said


# The priority and fair-share tests run on test-big-24gb, which only w24 can host: one engine, whose batch (vLLM's
# max_num_seqs, 256 on the CPU backend; the runtime keeps max(feed depth, that) requests in it) is far smaller than
# the earlier batch, so the order in which chunks reach the worker decides which batch finishes first.
BIG = "test-big-24gb"
ENGINE_BATCH = 256
EARLY, LATE = 768, 32  # requests of the earlier and the later batch; chunks of 16


def _tiny_lines(n: int, tag: str) -> list[dict[str, Any]]:
    """Cheap requests (2 tokens each): a batch of hundreds runs in seconds on SmolLM2."""
    return [{"custom_id": f"{tag}{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": BIG, "messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 2,
                      "ignore_eos": True}} for i in range(n)]


def _submit_now(cluster: dict[str, Any], name: str, rows: list[dict[str, Any]], priority: int = 0) -> str:
    """Submit in this process, as `batchllm submit` does (store, then send the head chunks): no CLI start-up delay,
    so the order of two submits is the order in which they reach the queue."""
    from batchllm.queue import producer
    from batchllm.services.submit import dispatch_new, submit_file
    from batchllm.settings import Settings

    st = Settings(database_url=cluster["url"], models_file=Path(cluster["env"]["BATCHLLM_MODELS_FILE"]), chunk_size=16)
    res = submit_file(st, write_jsonl(cluster["tmp"] / name, rows), priority=priority)
    dispatch_new(st, producer(st), res.batch_id)
    return res.batch_id


def _warm_big(cluster: dict[str, Any]) -> None:
    """Make sure w24 has the big model loaded (a load takes a minute; the timed tests must not wait for one)."""
    _submit(cluster, "warm.jsonl", [_tiny_lines(1, "warm")[0]], "--wait")


def test_priority_overtakes_and_metrics_move(cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    _warm_big(cluster)
    low_id = _submit_now(cluster, "low.jsonl", _tiny_lines(EARLY, "l"), priority=0)
    deadline = time.time() + 300
    while time.time() < deadline and _done(url, low_id) < 1:  # the low batch is running
        time.sleep(0.05)
    high_id = _submit_now(cluster, "high.jsonl", _tiny_lines(LATE, "h"), priority=9)
    low_done_when_high_finished, seen_rate = None, 0.0
    while time.time() < deadline:  # the scheduler's metrics show the model's throughput while the batches run
        if low_done_when_high_finished is None and _done(url, high_id) == LATE:
            low_done_when_high_finished = _done(url, low_id)
        text = urllib.request.urlopen(cluster["metrics"], timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith("batchllm_model_tokens_per_second{") and BIG in line:
                seen_rate = max(seen_rate, float(line.rsplit(" ", 1)[1]))
        if _done(url, low_id) == EARLY and low_done_when_high_finished is not None and seen_rate:
            break
        time.sleep(0.1)
    lo, hi = _wait_terminal(cluster, low_id), _wait_terminal(cluster, high_id)
    assert (lo.status, lo.counts.completed, hi.status, hi.counts.completed) == ("completed", EARLY, "completed", LATE)
    assert hi.completed_at < lo.completed_at  # submitted later, finished first
    # FIFO would run all 768 low requests before the high batch's; priority lets it in after what the engine holds.
    assert low_done_when_high_finished is not None
    print(f"low requests done when the high batch finished: {low_done_when_high_finished} of {EARLY}")
    assert low_done_when_high_finished < EARLY - 2 * ENGINE_BATCH // 2, low_done_when_high_finished
    assert seen_rate > 0, "tokens/s metric never moved during the run"


def test_equal_priority_batches_share_workers(cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    _warm_big(cluster)
    a_id = _submit_now(cluster, "a.jsonl", _tiny_lines(EARLY, "a"))
    b_id = _submit_now(cluster, "b.jsonl", _tiny_lines(LATE, "b"))
    a_before = None
    deadline = time.time() + 300
    while time.time() < deadline:
        a_done = _done(url, a_id)
        if _done(url, b_id):
            a_before = a_done
            break
        time.sleep(0.05)
    assert a_before is not None, f"batch B never started\n{_logs(cluster)}"
    print(f"A's requests done before B's first: {a_before} of {EARLY}")
    assert _wait_terminal(cluster, a_id).status == _wait_terminal(cluster, b_id).status == "completed"
    # FIFO would hand the worker all of A's chunks first, so B's first answer would come after at least
    # 768 - 256 of A's; round-robin (A1 B1 A2 B2 ...) starts B with the engine's first batch.
    assert a_before < EARLY - ENGINE_BATCH - 2 * 16, f"{a_before} of A's {EARLY} requests finished before B's first"


def _running_on_w16(cluster: dict[str, Any], name: str, rows: list[dict[str, Any]]) -> str | None:
    """Submit ``rows``; return the batch id once w16 has written some of it and not all, or None when the batch
    finished before the poll saw it half done (on two busy cores a poll can miss a window of seconds)."""
    batch_id = _submit(cluster, name, rows)
    deadline = time.time() + 300
    while time.time() < deadline:
        if any(m["meta"]["worker"] == W16 for m in _meta(batch_id) if m["response"]):
            return batch_id if _done(cluster["url"], batch_id) < len(rows) else None
        time.sleep(0.2)
    pytest.fail(f"w16 never ran any of the batch\n{_logs(cluster)}")


def test_killed_worker_work_moves(cluster: dict[str, Any]) -> None:
    w16 = cluster["w16"]
    # Answers of 8 to 184 tokens (ignore_eos: exactly that long), so the first is written seconds before the last
    # and w16 is caught mid-batch.
    rows = [{"custom_id": f"k{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "test-small-8gb", "messages": [{"role": "user", "content": f"Say {i}."}],
                      "max_tokens": 8 + 16 * (i % 12), "ignore_eos": True}} for i in range(24)]
    for attempt in range(3):  # the precondition (caught mid-batch) is a race with the clock; the test is what follows
        batch_id = _running_on_w16(cluster, f"kill{attempt}.jsonl", rows)
        if batch_id:
            break
    else:
        pytest.fail(f"three batches finished before w16 could be killed\n{_logs(cluster)}")
    w16.stop(sig=signal.SIGKILL)
    killed_at = time.time()
    b = _wait_terminal(cluster, batch_id)
    recovered = time.time() - killed_at
    assert b.status == "completed" and (b.counts.completed, b.counts.failed) == (24, 0), _logs(cluster)
    out = cluster["tmp"] / "kill-out.jsonl"
    assert run_cli(["results", batch_id, "--meta", "-o", str(out)], cluster["env"]).returncode == 0
    lines = read_jsonl(out)
    assert [m["custom_id"] for m in lines] == [f"k{i}" for i in range(24)]  # every request answered exactly once
    for m in lines:  # and every one succeeded, the recovered ones included
        check_output_line({k: v for k, v in m.items() if k != "meta"}, "/v1/chat/completions")
    assert W24 in {m["meta"]["worker"] for m in lines}  # the surviving worker took over
    print(f"batch finished {recovered:.1f}s after the worker was killed")


def test_schedule_fired_once_and_wrote_its_output(cluster: dict[str, Any]) -> None:
    from batchllm.store import batches

    outdir = cluster["outdir"]
    deadline = time.time() + 200
    files: list[Path] = []
    while time.time() < deadline and not files:
        files = sorted(p for p in outdir.glob("next-minute-*.jsonl") if not p.name.endswith(".errors.jsonl")) \
            if outdir.exists() else []
        time.sleep(1)
    assert run_cli(["schedule", "remove", "next-minute"], cluster["env"]).returncode == 0
    assert files, f"no output file after the schedule's minute\n{_logs(cluster)}"
    lines = read_jsonl(files[0])
    assert [x["custom_id"] for x in lines] == [f"n{i}" for i in range(5)]
    for x in lines:
        check_output_line(x, "/v1/completions")
    fired = [b for b in batches.listing(cluster["url"], limit=1000) if (b.name or "").startswith("next-minute ")]
    assert len(fired) == 1 and len(files) == 1, (fired, files)  # one firing, one batch, one output file
