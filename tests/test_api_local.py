"""``batchllm serve --local``: the SDK flow to the end on SQLite with no Redis and no PostgreSQL.

The in-process worker (``services.local.LocalWorker``) runs the real worker code path — fenced claims,
``WorkerRuntime.run_chunk``, the result writer, finalization — with the test's ``StubEngine`` injected into an
in-thread server (the CLI cannot reach it). ``test_serve_local_real_model`` runs the real ``serve --local``
subprocess on SmolLM2 (``slow``); it needs the vLLM engine of the worker rework.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.shared import ErrorObject

from tests.test_api_support import (
    ThreadServer,
    chat_line,
    cli_argv,
    free_port,
    jsonl,
    readme_snippet,
    stub_engine_factory,
    wait_health,
)

# isort: split
from batchllm.services.api.app import create_app  # after test_api_support (it installs the stand-ins)
from batchllm.services.api.config import ApiConfig, local_settings
from batchllm.services.api.keys import create_key
from batchllm.services.local import LocalWorker
from batchllm.settings import Settings
from batchllm.store.db import check_database

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = ("completed", "failed", "cancelled", "expired")
# Unreachable on purpose: --local must use neither.
NO_SERVICES = {"BATCHLLM_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "BATCHLLM_BROKER_URL": "redis://127.0.0.1:1/0"}


@dataclass
class Local:
    """A local server with its stub-engine worker."""

    base_url: str
    key: str
    settings: Settings
    worker: LocalWorker

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=self.key, max_retries=0, timeout=60)


def local_server(tmp: Path, delay: float, capacity: int = 4) -> Any:
    st = local_settings(Settings(data_dir=tmp, **{k.removeprefix("BATCHLLM_").lower(): v for k, v in NO_SERVICES.items()}))
    assert st.database_url.startswith("sqlite:///") and st.broker_url == "memory://"
    check_database(st.database_url)
    _, key = create_key(st, "local")
    worker = LocalWorker(st, engine_factory=stub_engine_factory(delay, capacity), poll_s=0.1)
    server = ThreadServer(create_app(ApiConfig(st, auth=True, local=True), on_start=worker.start, on_stop=worker.stop))
    return server, key, st, worker


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    server, key, st, worker = local_server(tmp_path, delay=0.005)
    with server:
        yield Local(server.base_url, key, st, worker)


def wait(client: openai.OpenAI, batch_id: str, timeout: float = 120) -> Any:
    deadline = time.time() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in TERMINAL or time.time() > deadline:
            return b
        time.sleep(0.2)


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_sdk_flow_upload_create_poll_read(local: Local) -> None:
    c = local.client()
    rows: list[Any] = [chat_line(f"q{i}", f"question {i}") for i in range(30)]
    rows += ["{broken", chat_line("unknown-model", model="no-such-model"), chat_line("too-long", max_tokens=5000)]
    data = jsonl(rows)
    f = c.files.create(file=("batchinput.jsonl", data), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"description": "nightly eval job"})
    b = wait(c, b.id)
    assert b.status == "completed", b
    assert b.request_counts is not None
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (33, 30, 3)
    assert b.in_progress_at and b.finalizing_at and b.completed_at and b.usage is not None
    outputs, errors = lines_of(c, b.output_file_id), lines_of(c, b.error_file_id)
    assert b.usage.output_tokens == sum(ln["response"]["body"]["usage"]["completion_tokens"] for ln in outputs) > 0
    assert [ln["custom_id"] for ln in outputs] == [f"q{i}" for i in range(30)]
    for ln in outputs:
        assert ln["error"] is None and ln["response"]["status_code"] == 200
        ChatCompletion.model_validate(ln["response"]["body"])
        assert ln["response"]["request_id"] == ln["id"]
    assert [ln["custom_id"] for ln in errors] == ["line-31", "unknown-model", "too-long"]
    for ln in errors:
        assert ln["error"] is None and ln["response"]["status_code"] == 400
        ErrorObject.model_validate(ln["response"]["body"]["error"])
    assert c.files.content(f.id).read() == data  # the input is still readable
    out_file = c.files.retrieve(b.output_file_id or "")
    assert out_file.purpose == "batch_output" and out_file.bytes == len(c.files.content(out_file.id).read())
    c.files.delete(out_file.id)
    with pytest.raises(openai.NotFoundError):
        c.files.content(out_file.id)


def test_embeddings_batch(local: Local) -> None:
    c = local.client()
    rows = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": "smollm2-135m-instruct", "input": f"sentence {i}"}} for i in range(5)]
    f = c.files.create(file=("emb.jsonl", jsonl(rows)), purpose="batch")
    b = wait(c, c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h").id)
    assert b.status == "completed" and b.endpoint == "/v1/embeddings"
    for ln in lines_of(c, b.output_file_id):
        CreateEmbeddingResponse.model_validate(ln["response"]["body"])


def test_cancel_mid_batch_keeps_finished_results(tmp_path: Path) -> None:
    server, key, _, _ = local_server(tmp_path, delay=0.03, capacity=2)
    with server:
        c = openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)
        f = c.files.create(file=("many.jsonl", jsonl([chat_line(f"m{i}") for i in range(300)])), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.time() + 60
        while (c.batches.retrieve(b.id).request_counts or b.request_counts).completed < 20 and time.time() < deadline:  # type: ignore[union-attr]
            time.sleep(0.05)
        seen = c.batches.retrieve(b.id).request_counts
        assert seen is not None and seen.completed >= 20
        c.batches.cancel(b.id)
        b = wait(c, b.id)
        assert b.status == "cancelled" and b.cancelled_at is not None and b.request_counts is not None
        counts = b.request_counts
        assert seen.completed <= counts.completed < 300 and counts.completed + counts.failed == counts.total == 300
        outputs, errors = lines_of(c, b.output_file_id), lines_of(c, b.error_file_id)
        assert len(outputs) == counts.completed and len(errors) == counts.failed
        for ln in outputs:
            ChatCompletion.model_validate(ln["response"]["body"])
        assert all(ln["response"] is None and ln["error"]["code"] == "batch_cancelled" for ln in errors)
        assert sorted(ln["custom_id"] for ln in outputs + errors) == sorted(f"m{i}" for i in range(300))


def test_readme_snippet_runs_as_written(local: Local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = readme_snippet(ROOT)
    # The snippet is OpenAI's documented flow; its only change is these two values, which point it here.
    assert code.count('base_url="http://127.0.0.1:8000/v1"') == 1 and code.count('api_key="bl-..."') == 1
    code = code.replace("http://127.0.0.1:8000/v1", local.base_url).replace("bl-...", local.key)
    (tmp_path / "batchinput.jsonl").write_bytes(jsonl([chat_line("request-1", "Hello world!"), chat_line("request-2")]))
    monkeypatch.chdir(tmp_path)
    printed: list[str] = []
    exec(compile(code, "README.md", "exec"), {"print": lambda *a, **k: printed.append(" ".join(map(str, a)))})
    out = [json.loads(x) for x in "\n".join(printed).splitlines() if x.strip()]
    assert [ln["custom_id"] for ln in out] == ["request-1", "request-2"]
    for ln in out:
        ChatCompletion.model_validate(ln["response"]["body"])


def _serve(tmp_path: Path, env_extra: dict[str, str], *args: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    env = {**os.environ, **NO_SERVICES, "BATCHLLM_DATA_DIR": str(tmp_path / "data"), **env_extra}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(cli_argv("serve", "--local", "--port", str(port), *args),
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def test_serve_local_cli_without_redis_or_postgres(tmp_path: Path) -> None:
    """The real CLI: refuses to start without a key, then serves with --no-auth; a model that cannot load fails
    its requests with a clear 503 record and the batch still ends (no model weights in this data dir)."""
    env = {"BATCHLLM_MODEL_DIR": str(tmp_path / "no-models")}
    refused = subprocess.run(cli_argv("serve", "--local", "--port", str(free_port())),
                             env={**os.environ, **NO_SERVICES, "BATCHLLM_DATA_DIR": str(tmp_path / "data"), **env},
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "batchllm keys create" in refused.stderr and "--no-auth" in refused.stderr
    proc, base, _ = _serve(tmp_path, env, "--no-auth")
    try:
        wait_health(base, proc=proc)
        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        f = c.files.create(file=("in.jsonl", jsonl([chat_line("a"), chat_line("b")])), purpose="batch")
        b = wait(c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id)
        assert b.status == "completed" and b.request_counts is not None and b.request_counts.failed == 2
        errors = lines_of(c, b.error_file_id)
        assert {ln["response"]["status_code"] for ln in errors} == {503}
        assert all("could not load" in ln["response"]["body"]["error"]["message"] for ln in errors)
    finally:
        _stop(proc)
    assert (tmp_path / "data" / "serve.db").is_file()


@pytest.mark.slow
def test_serve_local_real_model(tmp_path: Path, model_dir: Path) -> None:
    """The SDK flow against the real ``serve --local`` subprocess, SmolLM2 on this machine's CPU or GPU."""
    proc, base, log = _serve(tmp_path, {"BATCHLLM_MODEL_DIR": str(model_dir.parent)}, "--no-auth")
    try:
        wait_health(base, proc=proc)
        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        rows = [chat_line(f"r{i}", f"Say the number {i}.", max_tokens=16, temperature=0) for i in range(6)]
        f = c.files.create(file=("in.jsonl", jsonl(rows)), purpose="batch")
        b = wait(c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id, 900)
        counts = b.request_counts
        assert b.status == "completed" and counts is not None and counts.completed == 6, log.read_text()[-3000:]
        for ln in lines_of(c, b.output_file_id):
            completion = ChatCompletion.model_validate(ln["response"]["body"])
            assert completion.choices[0].message.content
        assert b.usage is not None and b.usage.output_tokens > 0
    finally:
        _stop(proc)
