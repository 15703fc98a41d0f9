"""The engine protocol: its bookkeeping, the stand-in StubEngine, and the vLLM engine's lifecycle on SmolLM2.

The fast tests need no model. The ``slow`` ones share one real SmolLM2 engine (tests/conftest_engine.py).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("tests.conftest_engine", "tests.stub_engine", "tests.test_engine")
from openai.types import Completion, CreateEmbeddingResponse  # noqa: E402
from openai.types.chat import ChatCompletion  # noqa: E402

from batchllm.errors import ModelLoadError  # noqa: E402
from batchllm.worker.engine import EngineHealth, EngineResult, GroupLedger, openai_error_body  # noqa: E402
from batchllm.worker.vllm_engine import VllmEngine  # noqa: E402
from batchllm.worker.vllm_setup import EngineOptions, engine_argv  # noqa: E402
from tests.conftest_engine import (  # noqa: E402
    ENGINE_MAX_MODEL_LEN,
    ResultCollector,
    Run,
    body_of,
    chat,
    completion,
    embedding,
    is_running,
    run_group,
)
from tests.stub_engine import StubEngine  # noqa: E402

pytest_plugins = ["tests.conftest_engine"]  # engine/model fixtures, registered once per session
# vLLM warns (DeprecationWarning) on every chat request that uses OpenAI's max_tokens.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:vllm")
ROOT = Path(__file__).resolve().parent.parent


def assert_openai_error(result: EngineResult, status: int) -> dict[str, Any]:
    """``result`` is an HTTP-level failure with exactly OpenAI's error shape; returns the ``error`` object."""
    assert result.status_code == status, result
    body = body_of(result)
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    assert result.error_message == err["message"] and result.error_code == (err["code"] or err["type"])
    return dict(err)


# --- no model ---------------------------------------------------------------------------------------------

def test_import_is_cheap() -> None:
    """The engine modules import neither vllm, torch, transformers nor gguf at import time."""
    code = (
        "import sys, batchllm.worker.engine, batchllm.worker.vllm_engine, batchllm.worker.vllm_setup, "
        "batchllm.worker.engine_procs, batchllm.worker.pull, batchllm.worker.gguf;"
        "heavy = [m for m in ('vllm', 'torch', 'transformers', 'gguf') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_missing_weights_say_how_to_pull(tmp_path: Path) -> None:
    engine = VllmEngine(EngineOptions(model_dir=str(tmp_path / "nope"), served_name="ghost"))
    with pytest.raises(ModelLoadError, match=r"ghost: no weights at .*nope.*run: batchllm models pull ghost"):
        engine.start()


def test_stop_gives_the_engine_core_the_engine_s_own_grace() -> None:
    """``batchllm run`` exits right after stopping its engine: a grace of 0 kills the engine core at once
    (no idle tail) instead of waiting ``SHUTDOWN_GRACE_S`` for a process that is killed anyway."""
    import asyncio
    from types import SimpleNamespace

    from batchllm.worker.vllm_engine import SHUTDOWN_GRACE_S

    engine = VllmEngine(EngineOptions(model_dir="/m", served_name="s"))
    assert engine.shutdown_grace_s == SHUTDOWN_GRACE_S
    seen: list[float | None] = []
    engine._llm = SimpleNamespace(shutdown=lambda timeout=None: seen.append(timeout))
    engine.shutdown_grace_s = 0.0
    asyncio.run(engine._shutdown())
    assert seen == [0.0]


def test_engine_argv_carries_every_option() -> None:
    argv = engine_argv(EngineOptions(model_dir="/m", served_name="bge", device="cuda", dtype="float16", max_model_len=512,
                                     tensor_parallel=2, quantization="awq", cpu_offload_gb=4, seed=7, task="embed",
                                     enforce_eager=False, log_level="ERROR", max_num_seqs=64), "/m")
    flags = dict(zip(argv[::2], argv[1::2], strict=False))
    assert argv[:4] == ["--model", "/m", "--served-model-name", "bge"]
    assert "--runner" in argv and argv[argv.index("--runner") + 1] == "pooling"
    assert argv[argv.index("--quantization") + 1] == "awq" and argv[argv.index("--max-num-seqs") + 1] == "64"
    assert flags["--tensor-parallel-size"] == "2" and flags["--dtype"] == "float16" and flags["--seed"] == "7"
    assert "--enforce-eager" not in argv and "--kv-cache-memory-bytes" not in argv  # GPU: vLLM sizes the cache
    assert "--no-use-tqdm-on-load" in argv  # quiet: no progress bars
    cpu = engine_argv(EngineOptions(model_dir="/m", served_name="s", cpu_kvcache_gb=1.5, log_level="INFO"), "/m")
    assert cpu[cpu.index("--kv-cache-memory-bytes") + 1] == str(int(1.5 * 2**30)) and "--enforce-eager" in cpu
    assert "--no-use-tqdm-on-load" not in cpu and cpu[cpu.index("--log-level") + 1] == "INFO"


def test_openai_error_body_shape() -> None:
    body, code = openai_error_body(400, "This model's maximum context length is 1024 tokens.", "input_tokens")
    assert json.loads(body) == {"error": {"message": "This model's maximum context length is 1024 tokens.",
                                          "type": "invalid_request_error", "param": "input_tokens",
                                          "code": "context_length_exceeded"}}
    assert code == "context_length_exceeded"
    body, code = openai_error_body(500, "engine died")
    assert json.loads(body)["error"] == {"message": "engine died", "type": "server_error", "param": None, "code": None}
    assert code == "server_error"


def test_ledger_reports_done_once_and_silences_aborted_groups() -> None:
    ledger, col = GroupLedger(), ResultCollector()
    a, empty = ledger.open("a", 2, col), ledger.open("empty", 0, col)
    ledger.open("b", 3, col)
    assert ledger.pending() == 5
    r = [EngineResult(i, 200, b"{}", 1, 1, 1.0) for i in range(3)]
    ledger.deliver(a, [r[0]])
    ledger.deliver(empty, [])
    ledger.deliver(a, [r[1]])
    ledger.deliver(a, [r[2]])  # after done: ignored
    assert col.done_flags("a") == [False, True] and col.done_flags("empty") == [True]
    assert not ledger.wait_below(2, timeout=0.01) and ledger.pending() == 3
    (b,) = ledger.abort("b")
    ledger.deliver(b, [r[0]])  # after abort: no callback
    assert col.done_flags("b") == [] and ledger.pending() == 0 and ledger.wait_below(0, timeout=0)
    ledger.close()
    with pytest.raises(RuntimeError, match="stopped"):
        ledger.open("late", 1, col)


def test_ledger_abort_waits_for_a_callback_in_progress() -> None:
    ledger, entered, release, seen = GroupLedger(), threading.Event(), threading.Event(), []

    def slow(group: str, results: list[EngineResult], done: bool) -> None:
        entered.set()
        release.wait(5)
        seen.append(done)

    grp = ledger.open("g", 2, slow)
    t = threading.Thread(target=ledger.deliver, args=(grp, [EngineResult(1, 200, b"{}", 0, 0, 0.0)]))
    t.start()
    assert entered.wait(5)
    aborter = threading.Thread(target=ledger.abort, args=("g",))
    aborter.start()
    time.sleep(0.1)
    assert aborter.is_alive()  # blocked until the callback returns
    release.set()
    aborter.join(5)
    t.join(5)
    ledger.deliver(grp, [EngineResult(2, 200, b"{}", 0, 0, 0.0)])
    assert seen == [False] and ledger.pending() == 0


def test_ledger_survives_a_raising_callback() -> None:
    ledger = GroupLedger()

    def boom(group: str, results: list[EngineResult], done: bool) -> None:
        raise RuntimeError("store is down")

    grp = ledger.open("g", 1, boom)
    ledger.deliver(grp, [EngineResult(1, 200, b"{}", 0, 0, 0.0)])
    assert ledger.pending() == 0


def test_stub_engine_answers_with_openai_shapes() -> None:
    engine = StubEngine(seed=3, embedding_dim=4)
    try:
        reqs = [chat("hi", 1, n=2), completion("Once", 2, max_tokens=3), embedding(["a b", "c"], 3),
                embedding("x", 4, encoding_format="base64")]
        res = run_group(engine, reqs, timeout=5)
        chat_body = ChatCompletion.model_validate(body_of(res[1]))
        assert chat_body.id == "chatcmpl-batch_req_000000000001" and len(chat_body.choices) == 2
        assert Completion.model_validate(body_of(res[2])).usage.completion_tokens == 3  # type: ignore[union-attr]
        emb = CreateEmbeddingResponse.model_validate(body_of(res[3]))
        assert [len(d.embedding) for d in emb.data] == [4, 4] and emb.usage.prompt_tokens == 3
        assert isinstance(body_of(res[4])["data"][0]["embedding"], str)
        again = run_group(engine, [chat("hi", 1, n=2)], timeout=5)
        assert body_of(again[1])["choices"] == body_of(res[1])["choices"]  # deterministic per (seed, id)
        assert [r.request_id for _, r in engine.received] == [1, 2, 3, 4, 1]
    finally:
        engine.stop()


def test_stub_engine_fails_hangs_aborts_and_dies() -> None:
    engine = StubEngine(step_s=0.01, fail={"batch_req_000000000002"}, hang={3})
    try:
        col = ResultCollector()
        engine.submit("g", [chat("a", 1), chat("b", 2), chat("c", 3)], col)
        assert engine.wait_below(1, timeout=5) and engine.pending() == 1  # 3 hangs
        answered = {r.request_id: r for _, results, _ in col.calls for r in results}
        assert set(answered) == {1, 2} and answered[1].status_code == 200
        assert_openai_error(answered[2], 400)
        assert engine.abort("g") == 1 and engine.pending() == 0 and engine.aborted == ["g"]
        engine.set_hanging(True)
        engine.submit("h", [chat("d", 4)], col)
        assert not engine.drain(timeout=0.1)
        engine.die("core gone")
        assert engine.health() == (EngineHealth.FAILED, "core gone")
        assert engine.drain(timeout=5)
        assert_openai_error(col.wait_done("h", 5)[4], 500)
        assert col.done_flags("g") == [False]  # nothing for the aborted group, ever
    finally:
        engine.stop()


def test_stub_engine_is_fast_and_thread_safe() -> None:
    engine, col, n_threads, per_thread = StubEngine(), ResultCollector(), 4, 50
    try:
        started = time.perf_counter()

        def feed(t: int) -> None:
            for g in range(per_thread):
                engine.submit(f"t{t}-g{g}", [chat("x", t * 100_000 + g * 10 + i) for i in range(10)], col)

        threads = [threading.Thread(target=feed, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert engine.drain(timeout=30)
        rate = n_threads * per_thread * 10 / (time.perf_counter() - started)
        assert rate > 2000, f"stub engine answered only {rate:.0f} requests/s"
        for t in range(n_threads):
            for g in range(per_thread):
                assert len(col.wait_done(f"t{t}-g{g}", 1)) == 10
    finally:
        engine.stop()


def _sleep_forever() -> None:
    time.sleep(600)


def test_reaper_kills_the_engine_process_when_the_worker_is_killed(tmp_path: Path) -> None:
    """A process started under engine_spawn_hooks dies with its starter, even on SIGKILL."""
    script = textwrap.dedent(f"""
        import multiprocessing, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from batchllm.worker.engine_procs import engine_spawn_hooks
        from tests.test_engine import _sleep_forever
        if __name__ == "__main__":
            reapers = []
            with engine_spawn_hooks({str(tmp_path / "engine.log")!r}, reapers):
                proc = multiprocessing.get_context("spawn").Process(target=_sleep_forever, daemon=True)
                proc.start()
            print(proc.pid, flush=True)
            time.sleep(600)
    """)
    starter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert starter.stdout is not None
        pid = int(starter.stdout.readline())
        os.kill(pid, 0)  # alive
        starter.kill()
        starter.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and is_running(pid):
            time.sleep(0.1)
        assert not is_running(pid), "the engine process outlived its killed starter"
    finally:
        starter.kill()
    assert multiprocessing.current_process().name == "MainProcess"


# --- the real engine (SmolLM2 on CPU) ------------------------------------------------------------------------

@pytest.mark.slow
def test_chat_and_completion_bodies_are_openai_objects(vllm_engine: VllmEngine, engine_run: Run) -> None:
    assert vllm_engine.max_model_len == ENGINE_MAX_MODEL_LEN and vllm_engine.capacity >= 1
    res = engine_run([chat("What is the capital of France?", 1, max_tokens=24),
                      completion("The capital of France is", 2, max_tokens=8)])
    c = ChatCompletion.model_validate(body_of(res[1]))
    assert c.id == "chatcmpl-batch_req_000000000001" and c.model == "smollm2-135m-instruct"
    assert c.choices[0].message.content and c.usage and c.usage.prompt_tokens == res[1].prompt_tokens
    k = Completion.model_validate(body_of(res[2]))
    assert k.id == "cmpl-batch_req_000000000002" and k.usage and k.usage.completion_tokens == res[2].completion_tokens <= 8
    assert "paris" in (c.choices[0].message.content + k.choices[0].text).lower()
    for r in res.values():
        assert r.status_code == 200 and r.error_code is None and r.latency_ms > 0 and r.prompt_tokens > 0
    assert vllm_engine.health() == (EngineHealth.OK, None)


@pytest.mark.slow
def test_groups_report_on_the_engine_thread(vllm_engine: VllmEngine, collector: ResultCollector) -> None:
    vllm_engine.submit("a", [completion(f"Count to {i}:", 10 + i, max_tokens=4) for i in range(3)], collector)
    vllm_engine.submit("b", [chat(f"Say {w}.", 20 + i, max_tokens=4) for i, w in enumerate(["red", "blue"])], collector)
    vllm_engine.submit("empty", [], collector)
    assert vllm_engine.wait_below(0, timeout=120) and vllm_engine.pending() == 0
    assert sorted(collector.wait_done("a", 1)) == [10, 11, 12] and sorted(collector.wait_done("b", 1)) == [20, 21]
    for group in ("a", "b", "empty"):
        flags = collector.done_flags(group)
        assert flags.count(True) == 1 and flags[-1] is True, (group, flags)
    assert collector.threads == {"engine-smollm2-135m-instruct"}
    assert not vllm_engine.wait_below(-1, timeout=0.05)  # pending can never drop below 0


@pytest.mark.slow
def test_abort_stops_a_group_and_no_callback_follows(vllm_engine: VllmEngine, engine_run: Run) -> None:
    col = ResultCollector()
    reqs = [completion("Write a long story about a dragon:", 30 + i, max_tokens=400, temperature=1, seed=i)
            for i in range(4)]
    vllm_engine.submit("doomed", reqs, col)
    time.sleep(1.0)
    dropped = vllm_engine.abort("doomed")
    calls_at_abort = len(col.calls)
    assert dropped == 4 - sum(len(r) for _, r in col.calls)
    assert dropped > 0 and vllm_engine.pending() == 0
    assert vllm_engine.abort("doomed") == 0
    deadline = time.monotonic() + 10  # vLLM aborts them in the engine core
    while vllm_engine._llm.get_num_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vllm_engine._llm.get_num_unfinished_requests() == 0
    assert len(col.calls) == calls_at_abort and True not in col.done_flags("doomed")
    assert engine_run([chat("Still there?", 39, max_tokens=4)])[39].status_code == 200
