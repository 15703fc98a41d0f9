"""End to end on real parts: CLI submit → PostgreSQL + Redis/Celery → a real vLLM CPU worker → SQL → results.

One warm worker (``cpu_worker``, SmolLM2) serves the whole module; requests are few and short.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WorkerProc, run_cli
from tests.openai_shapes import SMOLLM2, check_batch_object, check_error_line, check_output_line, read_jsonl, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.services]

TOPICS = ["the ocean", "a bicycle", "coffee", "mountains", "a library", "rain"]


def mixed_lines(n: int = 24) -> list[dict[str, Any]]:
    """A file mixing the short form and the OpenAI form, chat and completions."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        if i % 4 == 0:
            out.append({"id": f"s{i}", "prompt": f"Write one sentence about {topic}.", "max_tokens": 12, "temperature": 0})
        elif i % 4 == 1:
            out.append({"id": f"s{i}", "messages": [{"role": "user", "content": f"Describe {topic} in five words."}],
                        "max_tokens": 12})
        elif i % 4 == 2:
            out.append({"custom_id": f"o{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": SMOLLM2, "messages": [{"role": "user", "content": f"Name a color of {topic}."}],
                                 "max_tokens": 12, "temperature": 0}})
        else:
            out.append({"custom_id": f"o{i}", "method": "POST", "url": "/v1/completions",
                        "body": {"model": SMOLLM2, "prompt": f"A short poem about {topic}:", "max_tokens": 12}})
    return out


def batch_id_of(proc: Any) -> str:
    batch_id = str(proc.stdout.strip().splitlines()[0])
    assert batch_id.startswith("batch_"), proc.stdout
    return batch_id


def test_mixed_file_end_to_end(cpu_worker: WorkerProc, cluster_env: dict[str, str], tmp_path: Path) -> None:
    rows = mixed_lines()
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    out = tmp_path / "out.jsonl"
    proc = run_cli(["submit", str(src), "--model", SMOLLM2, "--wait", "-o", str(out)], cluster_env)
    assert proc.returncode == 0, proc.stderr
    batch_id = batch_id_of(proc)
    got = read_jsonl(out)
    assert [g["custom_id"] for g in got] == [r.get("id") or r.get("custom_id") for r in rows]  # one per line, in order
    assert read_jsonl(tmp_path / "out.errors.jsonl") == []  # no failure: the error file is empty
    prompt_tokens = completion_tokens = 0
    for g, r in zip(got, rows, strict=True):
        chat = "messages" in r or r.get("url") == "/v1/chat/completions"
        obj = check_output_line(g, "/v1/chat/completions" if chat else "/v1/completions")
        assert obj.object == ("chat.completion" if chat else "text_completion") and obj.model == SMOLLM2
        assert obj.usage.prompt_tokens > 3 and 1 <= obj.usage.completion_tokens <= 12
        prompt_tokens += obj.usage.prompt_tokens
        completion_tokens += obj.usage.completion_tokens
    # real generation: the model says different things to different prompts
    texts = {(g["response"]["body"]["choices"][0].get("message") or {}).get("content")
             or g["response"]["body"]["choices"][0].get("text") for g in got}
    assert len(texts) > len(rows) // 2
    view = json.loads(run_cli(["status", batch_id, "--json"], cluster_env).stdout)
    batch = check_batch_object(view)
    assert batch.status == "completed" and view["request_counts"] == {"total": 24, "completed": 24, "failed": 0}
    # usage adds up to what the lines say
    assert (view["usage"]["input_tokens"], view["usage"]["output_tokens"]) == (prompt_tokens, completion_tokens)
    assert view["in_progress_at"] <= view["finalizing_at"] <= view["completed_at"]
    assert view["output_file_id"] and view["error_file_id"] is None  # OpenAI names no error file without errors


def test_invalid_lines_and_overlong_prompt_fail_alone(cpu_worker: WorkerProc, cluster_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    rows: list[Any] = [
        {"id": "ok1", "prompt": "Say hello.", "max_tokens": 5},
        "{not json",
        {"id": "bad-temp-type", "prompt": "x", "temperature": "hot"},  # a wrong type: refused at submit
        {"id": "long", "messages": [{"role": "user", "content": "word " * 9000}], "max_tokens": 5},  # > 8192 tokens
        {"id": "ok1", "prompt": "duplicate id", "max_tokens": 5},
        {"id": "nomodel", "prompt": "x", "model": "no-such-model"},
        {"id": "bad-temp-range", "prompt": "x", "temperature": -1, "max_tokens": 5},  # a range: vLLM's to refuse
        {"id": "ok2", "messages": [{"role": "user", "content": "Say bye."}], "max_tokens": 5},
    ]
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    proc = run_cli(["submit", str(src), "-m", SMOLLM2, "--wait", "-o", str(out), "--errors", str(err)], cluster_env)
    assert proc.returncode == 3, proc.stderr  # finished, some requests failed
    assert "bad.jsonl:2:" in proc.stderr  # the summary names file and line
    ok = read_jsonl(out)
    assert [o["custom_id"] for o in ok] == ["ok1", "ok2"]
    errors = read_jsonl(err)
    assert [e["custom_id"] for e in errors] == ["line-2", "bad-temp-type", "long", "ok1", "nomodel", "bad-temp-range"]
    by_line = {}
    for e in errors:
        status, body = check_error_line(e)
        assert status == 400, e  # an HTTP-level failure: OpenAI's error body, error null
        by_line[e["custom_id"] if e["custom_id"] != "ok1" else "dup"] = body
    assert by_line["line-2"]["code"] == "invalid_json" and "line 2" in by_line["line-2"]["message"]
    assert by_line["bad-temp-type"]["param"] == "temperature" and "line 3" in by_line["bad-temp-type"]["message"]
    assert by_line["long"]["code"] == "context_length_exceeded" and "8192" in by_line["long"]["message"]
    assert by_line["dup"]["code"] == "duplicate_custom_id" and "line 5" in by_line["dup"]["message"]
    assert by_line["nomodel"]["code"] == "model_not_found"
    assert "temperature" in by_line["bad-temp-range"]["message"]  # vLLM's own message, this request alone


def _answers(lines: list[dict[str, Any]]) -> dict[str, str]:
    return {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"] for o in lines}


def _readable_now(batch_id: str) -> dict[str, str]:
    """The answers a reader would see now (``results --partial``), by custom_id."""
    import io

    from batchllm.services.export import export
    from batchllm.settings import get_settings

    buf = io.BytesIO()
    export(get_settings(), batch_id, buf, None)
    return _answers([json.loads(x) for x in buf.getvalue().splitlines()])


def test_chunk_run_twice_keeps_the_first_answers(cpu_worker: WorkerProc, cluster_env: dict[str, str], tmp_path: Path) -> None:
    """The chunks lose their lease mid-run and run again while the first run is still generating, and every
    message is delivered twice more. At temperature 1 with no seed a second write would carry different text,
    so an answer that never changes after it was first readable proves that nothing was written twice."""
    from batchllm.queue import dispatch, producer
    from batchllm.settings import get_settings
    from batchllm.store import batches, leases
    from batchllm.store import dispatch as dispatch_rows

    rows = [{"custom_id": f"t{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": SMOLLM2, "messages": [{"role": "user", "content": f"Tell a story about the number {i}."}],
                      "max_tokens": 48 + 24 * i, "temperature": 1.0, "ignore_eos": True}}
            for i in range(16)]  # two chunks of 8; vLLM's ignore_eos makes each answer exactly max_tokens long
    # Long enough (48 to 408 tokens) that the batch is still running after `submit` returns: a warm worker ran
    # 6-to-96-token answers to the end within the CLI's exit.
    src = write_jsonl(tmp_path / "twice.jsonl", rows)
    proc = run_cli(["submit", str(src), "-m", SMOLLM2], cluster_env)
    assert proc.returncode == 0, proc.stderr
    batch_id = batch_id_of(proc)
    url = cluster_env["BATCHLLM_DATABASE_URL"]
    first_seen: dict[str, str] = {}
    deadline = time.time() + 120
    released = 0
    instance = cpu_worker.row(url).instance
    # What the scheduler does for a lost lease: the chunks are queued again. Taken once some answers are written;
    # between two chunks the worker may briefly hold no lease (it claims the next as the engine drains), so retry.
    while time.time() < deadline and not released and len(first_seen) < 16:
        for cid, text in _readable_now(batch_id).items():
            first_seen.setdefault(cid, text)
        if len(first_seen) >= 3:
            released = leases.release_owner(url, instance)
        time.sleep(0.1)
    assert released >= 1, f"no lease was ever taken away; {len(first_seen)} answers were readable"
    # ...and their messages are sent again, twice.
    refs = dispatch_rows.of_batch(url, batch_id, only_unsent=False)
    assert refs, "no chunk was re-queued: the batch finished before its lease could be taken away"
    app = producer(get_settings())
    dispatch(app, refs)
    dispatch(app, refs)
    assert 3 <= len(first_seen) < 16, len(first_seen)
    while time.time() < deadline and not batches.refresh(url, batch_id).terminal:
        for cid, text in _readable_now(batch_id).items():
            first_seen.setdefault(cid, text)
        time.sleep(0.2)
    b = batches.get(url, batch_id)
    assert (b.status, b.counts.completed, b.counts.failed) == ("completed", 16, 0)
    dispatch(app, refs)  # and once more after the batch completed: the done chunks are not run again
    time.sleep(2)
    out = tmp_path / "out.jsonl"
    assert run_cli(["results", batch_id, "-o", str(out)], cluster_env).returncode == 0
    lines = read_jsonl(out)
    assert [o["custom_id"] for o in lines] == [r["custom_id"] for r in rows]  # exactly one line per request
    final = _answers(lines)
    changed = [cid for cid, text in first_seen.items() if final[cid] != text]
    assert not changed, f"answers changed after they were readable: {changed}"
    assert len(set(final.values())) == 16
    for o, r in zip(lines, rows, strict=True):  # every answer succeeded, with the length it asked for
        assert check_output_line(o, "/v1/chat/completions").usage.completion_tokens == r["body"]["max_tokens"]
    assert batches.get(url, batch_id).counts.completed == 16
    print(f"stale writes refused by fencing so far: {cpu_worker.row(url).stale_writes}")


def test_workers_lists_live_worker(cpu_worker: WorkerProc, cluster_env: dict[str, str]) -> None:
    proc = run_cli(["workers", "--json"], cluster_env)
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    w = {w["name"]: w for w in listing["workers"]}[cpu_worker.name]
    assert w["model"] == f"{SMOLLM2}@bf16" and w["pid"] == cpu_worker.proc.pid
    assert w["state"] in ("ready", "busy")
    assert w["memory_total_bytes"] > 1e9 and w["devices"][0]["kind"] == "cpu"
    assert w["heartbeat_age_s"] < 6
    assert listing["active_scheduler"] is None  # this module runs no scheduler: workers alone finish batches


# Base64 secrets hold '/' and '+'; people paste passwords with '@' and ':' too. Each piece is distinctive, so a
# leaked fragment of the password would be found in the output.
@pytest.mark.parametrize("password", ["s3cretZq9", "b64Zq9x/Kp4w+Vt7m==", "Zq9x@Kp4w:Vt7m/Hy2c", "Qw3r:Ty6u@Io9p/As1d@Fg4h"])
def test_services_down_exit_5(cluster_env: dict[str, str], tmp_path: Path, password: str) -> None:
    src = write_jsonl(tmp_path / "one.jsonl", [{"id": "a", "prompt": "hi"}])
    pieces = {password, *password.replace("@", "/").replace(":", "/").replace("+", "/").split("/")} - {"", "=="}
    # port 1: refused at once
    for var, url, shown in (("BATCHLLM_BROKER_URL", f"redis://:{password}@127.0.0.1:1/0", "redis://:***@127.0.0.1:1/0"),
                            ("BATCHLLM_DATABASE_URL", f"postgresql://u:{password}@127.0.0.1:1/x",
                             "postgresql://u:***@127.0.0.1:1/x")):
        proc = run_cli(["submit", str(src), "-m", SMOLLM2], dict(cluster_env, **{var: url}), timeout=60)
        assert proc.returncode == 5, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and shown in lines[0] and var in lines[0], lines  # one line, the URL named, no traceback
        leaked = [p for p in pieces if p in proc.stderr + proc.stdout]
        assert not leaked, (leaked, proc.stderr)  # neither the password nor any piece of it


def test_idempotency_key_returns_existing_batch(cpu_worker: WorkerProc, cluster_env: dict[str, str], tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "idem.jsonl", [{"id": "a", "prompt": "hi", "max_tokens": 3}])
    a = run_cli(["submit", str(src), "-m", SMOLLM2, "--idempotency-key", "nightly-1"], cluster_env)
    b = run_cli(["submit", str(src), "-m", SMOLLM2, "--idempotency-key", "nightly-1"], cluster_env)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert batch_id_of(a) == batch_id_of(b)
    assert "existing batch" in b.stderr
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "b", "prompt": "bye", "max_tokens": 3}])
    c = run_cli(["submit", str(other), "-m", SMOLLM2, "--idempotency-key", "nightly-1", "--json"], cluster_env)
    assert c.returncode == 0 and json.loads(c.stdout)["batch_id"] == batch_id_of(a) and json.loads(c.stdout)["existing"]


def test_stdin_submit_and_strict(cpu_worker: WorkerProc, cluster_env: dict[str, str]) -> None:
    data = (json.dumps({"id": "x", "prompt": "hello", "max_tokens": 3}) + "\n" + "{broken\n").encode()
    proc = run_cli(["submit", "-", "-m", SMOLLM2, "--strict"], cluster_env, input=data)
    assert proc.returncode == 2 and "<stdin>:2:" in proc.stderr and "nothing was stored" in proc.stderr
    assert proc.stdout == ""  # no batch id: nothing was stored
    proc = run_cli(["submit", "-", "-m", SMOLLM2, "--wait", "--json"], cluster_env, input=data)
    assert proc.returncode == 3, proc.stderr
    view = json.loads(proc.stdout)
    check_batch_object(view)
    assert view["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert view["error_file_id"] and view["output_file_id"]
