"""End to end on real parts: CLI submit → PostgreSQL + Redis/Celery → real vLLM worker → SQL → results."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.services]

TOPICS = ["the ocean", "a bicycle", "coffee", "mountains", "a library", "rain", "music", "a garden", "the moon", "bread"]


def mixed_lines(n: int = 52) -> list[dict]:
    """A file mixing the short form and the OpenAI form, chat and completions."""
    out: list[dict] = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        if i % 4 == 0:
            out.append({"id": f"s{i}", "prompt": f"Write one sentence about {topic}.", "max_tokens": 12, "temperature": 0})
        elif i % 4 == 1:
            out.append(
                {"id": f"s{i}", "messages": [{"role": "user", "content": f"Describe {topic} in five words."}], "max_tokens": 12}
            )
        elif i % 4 == 2:
            out.append(
                {
                    "custom_id": f"o{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": "smollm2-135m-instruct",
                        "messages": [{"role": "user", "content": f"Name a color of {topic}."}],
                        "max_tokens": 12,
                        "temperature": 0,
                    },
                }
            )
        else:
            out.append(
                {
                    "custom_id": f"o{i}",
                    "method": "POST",
                    "url": "/v1/completions",
                    "body": {"model": "smollm2-135m-instruct", "prompt": f"A short poem about {topic}:", "max_tokens": 12},
                }
            )
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_mixed_file_end_to_end(cpu_worker, cluster_env, tmp_path: Path) -> None:
    rows = mixed_lines(52)
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    out = tmp_path / "out.jsonl"
    proc = run_cli(["submit", str(src), "--model", "smollm2-135m-instruct", "--wait", "-o", str(out)], cluster_env)
    assert proc.returncode == 0, proc.stderr
    batch_id = proc.stdout.strip().splitlines()[0]
    assert batch_id.startswith("batch_")
    got = read_jsonl(out)
    assert [g["custom_id"] for g in got] == [r.get("id") or r.get("custom_id") for r in rows]  # one per line, in order
    for g, r in zip(got, rows, strict=True):
        assert g["error"] is None
        body = g["response"]["body"]
        assert g["response"]["status_code"] == 200
        chat = "messages" in r or r.get("url") == "/v1/chat/completions"
        assert body["object"] == ("chat.completion" if chat else "text_completion")
        text = body["choices"][0]["message"]["content"] if chat else body["choices"][0]["text"]
        assert isinstance(text, str)
        assert body["usage"]["prompt_tokens"] > 3
        assert 1 <= body["usage"]["completion_tokens"] <= 12
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        assert body["model"] == "smollm2-135m-instruct"
    # real generation: the model says different things to different prompts
    texts = {
        (g["response"]["body"]["choices"][0].get("message") or {}).get("content")
        or g["response"]["body"]["choices"][0].get("text")
        for g in got
    }
    assert len(texts) > 10
    status = run_cli(["status", batch_id, "--json"], cluster_env)
    view = json.loads(status.stdout)
    assert view["status"] == "completed"
    assert view["request_counts"] == {"total": 52, "completed": 52, "failed": 0}


def test_invalid_lines_and_overlong_prompt_fail_alone(cpu_worker, cluster_env, tmp_path: Path) -> None:
    rows: list = [
        {"id": "ok1", "prompt": "Say hello.", "max_tokens": 5},
        "{not json",
        {"id": "bad-temp", "prompt": "x", "temperature": 9},
        {"id": "long", "messages": [{"role": "user", "content": "word " * 20000}], "max_tokens": 5},
        {"id": "ok1", "prompt": "duplicate id", "max_tokens": 5},
        {"id": "nomodel", "prompt": "x", "model": "no-such-model"},
        {"id": "ok2", "messages": [{"role": "user", "content": "Say bye."}], "max_tokens": 5},
    ]
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    proc = run_cli(
        ["submit", str(src), "-m", "smollm2-135m-instruct", "--wait", "-o", str(out), "--errors", str(err)], cluster_env
    )
    assert proc.returncode == 3, proc.stderr  # finished, some requests failed
    assert "bad.jsonl:2:" in proc.stderr  # the summary names file and line
    ok = read_jsonl(out)
    errors = read_jsonl(err)
    assert [o["custom_id"] for o in ok] == ["ok1", "ok2"]
    by_id = {e["custom_id"]: e for e in errors}
    assert len(errors) == 5
    assert by_id["line-2"]["error"]["code"] == "invalid_json" and "line 2" in by_id["line-2"]["error"]["message"]
    assert "temperature" in by_id["bad-temp"]["error"]["message"] and "line 3" in by_id["bad-temp"]["error"]["message"]
    assert by_id["long"]["error"]["code"] == "context_length_exceeded"
    assert any(e["error"]["code"] == "duplicate_custom_id" and "line 5" in e["error"]["message"] for e in errors)
    assert by_id["nomodel"]["error"]["code"] == "model_not_found"
    for e in errors:
        assert "\n" not in e["error"]["message"] and "Traceback" not in e["error"]["message"]


def test_chunk_run_twice_leaves_one_result_per_request(cpu_worker, cluster_env, tmp_path: Path) -> None:
    from batchllm.queue import producer
    from batchllm.services.submit import dispatch_batch
    from batchllm.settings import get_settings
    from batchllm.store.db import session_scope
    from batchllm.store.models import Chunk, Request, Result

    src = write_jsonl(tmp_path / "twice.jsonl", [{"id": f"t{i}", "prompt": f"Count to {i}.", "max_tokens": 6} for i in range(16)])
    proc = run_cli(["submit", str(src), "-m", "smollm2-135m-instruct", "--wait"], cluster_env)
    assert proc.returncode == 0, proc.stderr
    batch_id = proc.stdout.strip().splitlines()[0]
    st = get_settings()
    url = cluster_env["BATCHLLM_DATABASE_URL"]
    with session_scope(url) as s:
        chunks = list(s.scalars(select(Chunk).where(Chunk.batch_id == batch_id)))
        assert len(chunks) == 2 and all(c.status == "done" for c in chunks)
        first = chunks[0]
        before = {
            rid: txt
            for rid, txt in s.execute(
                select(Result.request_id, Result.text)
                .join(Request, Request.id == Result.request_id)
                .where(Request.batch_id == batch_id)
            )
        }
        ids = [r for (r,) in s.execute(select(Request.id).where(Request.chunk_id == first.id).order_by(Request.line_no))]
        # Simulate a worker that died after writing half the chunk: its lease expired, half the results exist.
        s.execute(Result.__table__.delete().where(Result.request_id.in_(ids[:4])))
        s.execute(
            update(Chunk)
            .where(Chunk.id == first.id)
            .values(status="leased", lease_owner="dead-worker", lease_expires_at=time.time() - 1)
        )
        s.execute(
            update(Chunk).where(Chunk.id == chunks[1].id).values(status="queued", dispatched_at=None)
        )  # a done chunk redelivered
    from batchllm.store.models import Batch

    with session_scope(url) as s:
        s.execute(update(Batch).where(Batch.id == batch_id).values(status="in_progress", finished_at=None))
        s.execute(update(Chunk).where(Chunk.id == first.id).values(status="queued", dispatched_at=None))  # the reaper's step
    dispatch_batch(st, producer(st), batch_id)
    dispatch_batch(st, producer(st), batch_id, only_undispatched=False)  # and every message delivered twice
    deadline = time.time() + 120
    while time.time() < deadline:
        with session_scope(url) as s:
            n = s.scalar(select(func.count()).select_from(Result).where(Result.batch_id == batch_id))
            open_chunks = s.scalar(select(func.count()).where(Chunk.batch_id == batch_id, Chunk.status != "done"))
        if n == 16 and open_chunks == 0:
            break
        time.sleep(0.5)
    with session_scope(url) as s:
        per_request = s.execute(
            select(Result.request_id, func.count()).where(Result.batch_id == batch_id).group_by(Result.request_id)
        ).all()
        after = {rid: txt for rid, txt in s.execute(select(Result.request_id, Result.text).where(Result.batch_id == batch_id))}
    assert len(per_request) == 16 and all(c == 1 for _, c in per_request)
    # requests that kept their result were not recomputed; the 4 lost ones were recomputed
    assert {k: v for k, v in after.items() if k not in ids[:4]} == {k: v for k, v in before.items() if k not in ids[:4]}


def test_workers_lists_live_worker(cpu_worker, cluster_env) -> None:
    proc = run_cli(["workers", "--json"], cluster_env)
    assert proc.returncode == 0, proc.stderr
    rows = {w["name"]: w for w in json.loads(proc.stdout)}
    w = rows[cpu_worker.name]
    assert w["model"] == "smollm2-135m-instruct@bf16"
    assert w["state"] in ("ready", "busy")
    assert w["memory_total_bytes"] > 1e9 and w["devices"][0]["kind"] == "cpu"
    assert w["heartbeat_age_s"] < 6


def test_services_down_exit_5(cluster_env, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "one.jsonl", [{"id": "a", "prompt": "hi"}])
    env = dict(cluster_env, BATCHLLM_BROKER_URL="redis://:s3cret@127.0.0.1:1/0")
    proc = run_cli(["submit", str(src), "-m", "smollm2-135m-instruct"], env, timeout=60)
    assert proc.returncode == 5
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "redis://:***@127.0.0.1:1/0" in lines[0] and "s3cret" not in proc.stderr
    env = dict(cluster_env, BATCHLLM_DATABASE_URL="postgresql://u:pw@127.0.0.1:1/x")
    proc = run_cli(["submit", str(src), "-m", "smollm2-135m-instruct"], env, timeout=60)
    assert proc.returncode == 5 and "postgresql://u:***@127.0.0.1:1/x" in proc.stderr and "Traceback" not in proc.stderr


def test_idempotency_key_returns_existing_batch(cpu_worker, cluster_env, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "idem.jsonl", [{"id": "a", "prompt": "hi", "max_tokens": 3}])
    a = run_cli(["submit", str(src), "-m", "smollm2-135m-instruct", "--idempotency-key", "nightly-1"], cluster_env)
    b = run_cli(["submit", str(src), "-m", "smollm2-135m-instruct", "--idempotency-key", "nightly-1"], cluster_env)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout.strip() == b.stdout.strip()


def test_stdin_submit_and_strict(cpu_worker, cluster_env, tmp_path: Path) -> None:
    data = (json.dumps({"id": "x", "prompt": "hello", "max_tokens": 3}) + "\n" + "{broken\n").encode()
    proc = run_cli(["submit", "-", "-m", "smollm2-135m-instruct", "--strict"], cluster_env, input=data)
    assert proc.returncode == 2 and "<stdin>:2:" in proc.stderr and "nothing was stored" in proc.stderr
    proc = run_cli(["submit", "-", "-m", "smollm2-135m-instruct", "--wait", "--json"], cluster_env, input=data)
    assert proc.returncode == 3, proc.stderr
    view = json.loads(proc.stdout)
    assert view["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
