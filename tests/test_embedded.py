"""The embedded default: `batchllm run` with SQLite, the in-process broker and a local worker — no Redis needed."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["BATCHLLM_DATA_DIR"] = str(tmp_path / "data")
    env["BATCHLLM_BROKER_URL"] = "redis://127.0.0.1:1/0"  # a closed port: proves the broker is not used
    env["BATCHLLM_DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/none"  # and no database server either
    return env


def test_run_without_redis_korean_round_trip(model_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "mixed.jsonl"
    lines = [
        {"id": "ko", "messages": [{"role": "user", "content": "안녕하세요! 한국어로 인사해 주세요."}], "max_tokens": 16},
        {
            "custom_id": "oa",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": "What is 2+2?"}],
                "max_tokens": 8,
                "temperature": 0,
            },
        },
        {"id": "한국어-아이디", "prompt": "The weather today is", "max_tokens": 8},
        {"id": "bad", "prompt": "x", "max_tokens": -1},
    ]
    src.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    proc = run_cli(["run", str(src), "-o", str(out)], _env(tmp_path))
    assert proc.returncode == 3, proc.stderr  # one invalid line → finished with failures
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [g["custom_id"] for g in got] == ["ko", "oa", "한국어-아이디", "bad"]  # UTF-8 ids round-trip, input order
    assert got[0]["response"]["body"]["choices"][0]["message"]["content"]
    assert got[0]["response"]["body"]["usage"]["completion_tokens"] >= 1
    assert got[2]["response"]["body"]["object"] == "text_completion"
    assert got[3]["error"]["code"] == "invalid_request" and "max_tokens" in got[3]["error"]["message"]
    assert "한국어-아이디" in out.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes


def _results(db: Path) -> dict[int, tuple]:
    with sqlite3.connect(db) as conn:
        return {r[0]: r[1:] for r in conn.execute("SELECT request_id, text, created_at, worker FROM results")}


def test_killed_run_resumes_without_redoing_finished(model_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "long.jsonl"
    rows = [
        {
            "id": f"r{i}",
            "messages": [{"role": "user", "content": f"Tell a long story about the number {i}."}],
            "max_tokens": 4 + 6 * i,
            "temperature": 0,
            "stop": [],
        }
        for i in range(48)
    ]  # finish one after another
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    db = tmp_path / "run.db"
    env = _env(tmp_path)
    env["BATCHLLM_CHUNK_SIZE"] = "4"
    cmd = [sys.executable, "-m", "batchllm", "run", str(src), "-o", str(tmp_path / "out.jsonl"), "--db", str(db)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    partial: dict[int, tuple] = {}
    while time.time() < deadline:
        if db.exists():
            try:
                partial = _results(db)
            except sqlite3.OperationalError:
                partial = {}
            if len(partial) >= 8:
                break
        assert proc.poll() is None, "run finished before it could be interrupted"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    partial = _results(db)
    assert 8 <= len(partial) < 48, len(partial)

    second = run_cli(["run", str(src), "-o", str(tmp_path / "out.jsonl"), "--db", str(db)], env)
    assert second.returncode == 0, second.stderr
    assert "resumed" in second.stderr
    final = _results(db)
    assert len(final) == 48
    for rid, row in partial.items():  # finished before the kill: kept as they were, not recomputed
        assert final[rid] == row
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 1
        assert conn.execute("SELECT COUNT(DISTINCT request_id), COUNT(*) FROM results").fetchone() == (48, 48)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == [r["id"] for r in rows]


def test_import_gguf_registers_model(model_dir: Path, tmp_path: Path) -> None:
    from batchllm.worker.gguf import smollm2_gguf_path

    env = _env(tmp_path)
    env["BATCHLLM_MODEL_DIR"] = str(tmp_path / "models")
    proc = run_cli(["models", "import-gguf", str(smollm2_gguf_path()), "--name", "my-smol"], env)
    assert proc.returncode == 0, proc.stderr
    assert "my-smol" in proc.stdout and "registered" in proc.stdout
    assert (tmp_path / "models" / "my-smol" / "config.json").is_file()
    listing = json.loads(run_cli(["models", "--json"], dict(env, BATCHLLM_DATABASE_URL=f"sqlite:///{tmp_path}/x.db")).stdout)
    entry = next(m for m in listing if m["name"] == "my-smol")
    assert entry["params_b"] > 0.1
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    proc = run_cli(["models", "import-gguf", str(bad), "--name", "x"], env)
    assert proc.returncode == 2 and "GGUF" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(["models", "import-gguf", str(tmp_path / "missing.gguf"), "--name", "x"], env)
    assert proc.returncode == 2 and "missing.gguf" in proc.stderr
