"""The embedded default: ``batchllm run`` with SQLite, no broker and a local worker — no Redis, no database server.

The OpenAI-fidelity file of issue 12 (every url and field, tests/openai_shapes.py) runs once for the module, with
Korean lines and an invalid line mixed in; the embedded runner loads SmolLM2, then all-MiniLM-L6-v2 (OpenAI's and
vLLM's documentation example files run on the distributed path, tests/test_openai_batch.py). A run killed with
SIGKILL resumes without recomputing what was finished. ``models import-gguf`` converts and registers a GGUF file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli
from tests.openai_shapes import (
    MINILM,
    SMOLLM2,
    check_batch_object,
    check_error_line,
    check_fidelity,
    check_output_line,
    fidelity_lines,
    read_jsonl,
    write_jsonl,
)

# Text that vLLM, torch or the CPU backend print at start-up, which a newcomer must not see without -v.
NOISE = ("Triton", "FutureWarning", "NUMA", "LD_PRELOAD", "UserWarning", "DeprecationWarning", "Traceback", "INFO ")
KOREAN = [
    {"id": "ko", "messages": [{"role": "user", "content": "안녕하세요! 한국어로 인사해 주세요."}], "max_tokens": 16},
    {"id": "한국어-아이디", "prompt": "오늘 날씨는", "max_tokens": 8},
]
INVALID = {"id": "bad", "prompt": "x", "max_tokens": "many"}  # a wrong type: refused at submit, with its line number


def embedded_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["BATCHLLM_DATA_DIR"] = str(tmp / "data")
    env["BATCHLLM_BROKER_URL"] = "redis://127.0.0.1:1/0"  # a closed port: proves the broker is not used
    env["BATCHLLM_DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/none"  # and no database server either
    env.pop("BATCHLLM_MODELS_FILE", None)
    env.update(extra)
    return env


def test_help_shows_the_quick_start_on_separate_lines() -> None:
    proc = subprocess.run([sys.executable, "-m", "batchllm", "--help"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, COLUMNS="200"))
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stdout.splitlines()]
    for cmd in ("batchllm models pull smollm2-135m-instruct", "batchllm run examples/jobs.jsonl -o out.jsonl",
                "batchllm db upgrade", "batchllm submit jobs.jsonl --wait -o out.jsonl"):
        assert any(line == cmd or line.startswith(cmd + " ") for line in lines), (cmd, proc.stdout)


@dataclass
class Run:
    rows: list[Any]
    proc: subprocess.CompletedProcess[str]
    out: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    env: dict[str, str]
    batch_id: str


@pytest.fixture(scope="module")
def fidelity_run(model_dir: Path, embed_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The fidelity file + Korean lines + an invalid line, through one ``batchllm run`` (two models, in turn)."""
    tmp = tmp_path_factory.mktemp("embedded")
    rows: list[Any] = [*fidelity_lines(), *KOREAN, INVALID]
    src = write_jsonl(tmp / "mixed.jsonl", rows)
    db = tmp / "run.db"
    env = embedded_env(tmp)
    proc = run_cli(["run", str(src), "-o", str(tmp / "out.jsonl"), "--db", str(db)], env, timeout=900)
    batch_id = next((w for w in proc.stderr.split() if w.startswith("batch_")), "").rstrip(":")
    return Run(rows, proc, read_jsonl(tmp / "out.jsonl"), read_jsonl(tmp / "out.errors.jsonl"),
               dict(env, BATCHLLM_DATABASE_URL=f"sqlite:///{db}"), batch_id)


@pytest.mark.slow
def test_run_prints_progress_and_answers_without_engine_noise(fidelity_run: Run) -> None:
    proc = fidelity_run.proc
    assert proc.returncode == 3, proc.stderr  # finished; three lines failed, each alone
    n = len(fidelity_run.rows)
    said = " ".join(proc.stderr.split())
    assert f"{n - 3} completed, 3 failed of {n}" in said, proc.stderr
    assert f"{n - 3} results → " in said and "3 errors → " in said and "out.errors.jsonl" in said
    assert "schema-1:" in said and "schema-2:" in said  # the first answers, shown at once
    noisy = [word for word in NOISE if word in proc.stderr]
    assert not noisy, f"engine noise on stderr without -v: {noisy}\n{proc.stderr[-3000:]}"
    assert proc.stdout == ""  # the results went to -o


@pytest.mark.slow
def test_run_serves_every_openai_field_and_url(fidelity_run: Run) -> None:
    fid = {r["custom_id"] for r in fidelity_run.rows if isinstance(r, dict) and "custom_id" in r}
    rows = [r for r in fidelity_run.rows if isinstance(r, dict) and r.get("custom_id") in fid]
    check_fidelity(rows, [o for o in fidelity_run.out if o["custom_id"] in fid],
                   [e for e in fidelity_run.errors if e["custom_id"] in fid])
    # the output and error files split the whole input between them, each in input order
    ids = [r.get("custom_id") or r.get("id") for r in fidelity_run.rows]
    out_ids, err_ids = [o["custom_id"] for o in fidelity_run.out], [e["custom_id"] for e in fidelity_run.errors]
    assert sorted(out_ids + err_ids) == sorted(ids) and not set(out_ids) & set(err_ids)
    assert out_ids == [i for i in ids if i in out_ids] and err_ids == [i for i in ids if i in err_ids]


@pytest.mark.slow
def test_run_round_trips_korean_and_reports_the_invalid_line(fidelity_run: Run, tmp_path: Path) -> None:
    out = {o["custom_id"]: o for o in fidelity_run.out}
    ko = check_output_line(out["ko"], "/v1/chat/completions")
    assert ko.choices[0].message.content and ko.usage.completion_tokens >= 1
    assert check_output_line(out["한국어-아이디"], "/v1/completions").object == "text_completion"
    assert [o["custom_id"] for o in fidelity_run.out][-2:] == ["ko", "한국어-아이디"]  # input order
    bad = next(e for e in fidelity_run.errors if e["custom_id"] == "bad")
    status, err = check_error_line(bad)
    assert status == 400 and err["param"] == "max_tokens" and f"line {len(fidelity_run.rows)}" in err["message"]
    # written as UTF-8, not as \\u escapes, by `results` as by `run`
    again = tmp_path / "again.jsonl"
    proc = run_cli(["results", fidelity_run.batch_id, "-o", str(again)], fidelity_run.env)
    assert proc.returncode == 0, proc.stderr
    assert "한국어-아이디" in again.read_text(encoding="utf-8")
    assert read_jsonl(again) == fidelity_run.out


@pytest.mark.slow
def test_run_batch_object(fidelity_run: Run) -> None:
    proc = run_cli(["status", fidelity_run.batch_id, "--json"], fidelity_run.env)
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    batch = check_batch_object(view)
    n = len(fidelity_run.rows)
    assert batch.status == "completed" and view["request_counts"] == {"total": n, "completed": n - 3, "failed": 3}
    assert view["finalizing_at"] is not None and view["finalizing_at"] <= view["completed_at"]
    usage = [o["response"]["body"]["usage"] for o in fidelity_run.out]
    assert view["usage"]["input_tokens"] == sum(u["prompt_tokens"] for u in usage)


# ----------------------------------------------------------------------------------------------- resume

def _results(db: Path) -> dict[int, tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return {r[0]: r[1:] for r in conn.execute("SELECT request_id, ok, status_code, body, created_at, worker FROM results")}


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished(model_dir: Path, tmp_path: Path) -> None:
    n = 16
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": SMOLLM2, "messages": [{"role": "user", "content": f"Tell a story about the number {i}."}],
                      "max_tokens": 4 + 3 * i, "temperature": 0, "ignore_eos": True}}
            for i in range(n)]  # they finish one after another
    src = write_jsonl(tmp_path / "long.jsonl", rows)
    db = tmp_path / "run.db"
    env = embedded_env(tmp_path, BATCHLLM_CHUNK_SIZE="4")
    cmd = [sys.executable, "-m", "batchllm", "run", str(src), "-o", str(tmp_path / "out.jsonl"), "--db", str(db)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    partial: dict[int, tuple[Any, ...]] = {}
    try:
        while time.time() < deadline:
            if db.exists():
                try:
                    partial = _results(db)
                except sqlite3.OperationalError:
                    partial = {}
                if len(partial) >= 3:
                    break
            assert proc.poll() is None, "run finished before it could be interrupted"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: the engine core too
        proc.wait(30)
    partial = _results(db)
    assert 3 <= len(partial) < n, len(partial)

    # The rerun comes up as another host (a new container): its own UTS namespace with another hostname, so
    # nothing of its identity matches the killed run's, and the leases in its database file are still its to take.
    assert shutil.which("unshare"), "the resume test needs util-linux's unshare"
    elsewhere = ["unshare", "--uts", "sh", "-c", 'hostname resumed-elsewhere && exec "$@"', "sh"]
    second = subprocess.run([*elsewhere, *cmd], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "resumed" in second.stderr
    final = _results(db)
    assert len(final) == n
    for rid, row in partial.items():  # finished before the kill: kept as they were, not recomputed
        assert final[rid] == row
    recovered = {rid: row for rid, row in final.items() if rid not in partial}
    assert recovered and all(ok and status == 200 for ok, status, *_ in recovered.values())  # and they succeeded
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 1
        assert conn.execute("SELECT COUNT(*) FROM chunks WHERE status != 'done'").fetchone()[0] == 0
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [o["custom_id"] for o in out] == [r["custom_id"] for r in rows]
    for o, r in zip(out, rows, strict=True):
        assert check_output_line(o, "/v1/chat/completions").usage.completion_tokens == r["body"]["max_tokens"]


# ------------------------------------------------------------------------------------------- import-gguf

def test_import_gguf_registers_model(tmp_path: Path) -> None:
    # A tiny but complete llama GGUF converts in seconds; the real SmolLM2 GGUF goes through the same convert_gguf
    # when `models pull` prepares it (tests/test_gguf.py checks that directory).
    from tests.test_gguf import write_tiny_llama_gguf

    gguf = write_tiny_llama_gguf(tmp_path / "tiny-llama.Q8_0.gguf")
    env = embedded_env(tmp_path, BATCHLLM_MODEL_DIR=str(tmp_path / "models"),
                       BATCHLLM_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}")
    proc = run_cli(["models", "import-gguf", str(gguf), "--name", "my model"], env)
    assert proc.returncode == 2 and "not allowed" in proc.stderr, proc.stderr  # refused before any work
    assert not (tmp_path / "models").exists()
    proc = run_cli(["models", "import-gguf", str(gguf), "--name", "my-smol"], env)
    assert proc.returncode == 0, proc.stderr
    assert "my-smol" in proc.stdout and "registered" in proc.stdout
    assert (tmp_path / "models" / "my-smol" / "config.json").is_file()
    listing = json.loads(run_cli(["models", "--json"], env).stdout)
    entry = next(m for m in listing if m["name"] == "my-smol")
    assert entry["params_b"] == pytest.approx(4400 / 1e9, rel=0.2) and entry["task"] == "generate"  # by weight size
    assert entry["max_model_len"] == 128 and entry["source"] == str(tmp_path / "models" / "my-smol")
    assert next(m for m in listing if m["name"] == MINILM)["task"] == "embed"
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    proc = run_cli(["models", "import-gguf", str(bad), "--name", "x"], env)
    assert proc.returncode == 2 and "GGUF" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(["models", "import-gguf", str(tmp_path / "missing.gguf"), "--name", "x"], env)
    assert proc.returncode == 2 and "missing.gguf" in proc.stderr
