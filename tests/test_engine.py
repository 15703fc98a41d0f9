"""EngineLoop on the real SmolLM2-135M-Instruct under vLLM (CPU): one engine load for the whole file."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchllm.errors import ModelLoadError
from batchllm.worker.engine import EngineConfig, EngineLoop, EngineRequest, EngineResult

pytest_plugins = ["tests.conftest_engine"]  # engine/model fixtures, registered once per session
ENGINE_MAX_MODEL_LEN = 1024  # what the engine_loop fixture starts with (checked in the first test)

Run = Callable[..., dict[int, EngineResult]]


def chat(rid: int, text: str, **params: object) -> EngineRequest:
    return EngineRequest(request_id=rid, kind="chat", messages=[{"role": "user", "content": text}], prompt=None,
                         params={"max_tokens": 16, "temperature": 0, **params})


def completion(rid: int, text: str, **params: object) -> EngineRequest:
    return EngineRequest(request_id=rid, kind="completion", messages=None, prompt=text,
                         params={"max_tokens": 16, "temperature": 0, **params})


def test_import_is_cheap() -> None:
    """The engine/gguf modules must not pull in vllm, torch, transformers or gguf at import time."""
    code = (
        "import sys, batchllm.worker, batchllm.worker.engine, batchllm.worker.gguf;"
        "heavy = [m for m in ('vllm', 'torch', 'transformers', 'gguf') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_missing_weights_raise_model_load_error(tmp_path: Path) -> None:
    loop = EngineLoop(EngineConfig(model_dir=str(tmp_path / "nope"), served_name="ghost"))
    with pytest.raises(ModelLoadError, match=r"ghost: no weights at .*nope"):
        loop.start()


@pytest.mark.slow
def test_chat_and_completion_generate_real_tokens(engine_loop: EngineLoop, engine_run: Run) -> None:
    assert engine_loop.max_model_len == ENGINE_MAX_MODEL_LEN
    res = engine_run([chat(1, "What is the capital of France?", max_tokens=24),
                      completion(2, "The capital of France is", max_tokens=8)])
    for r in res.values():
        assert r.ok, r
        assert r.text and r.text.strip()
        assert r.prompt_tokens > 0 and r.completion_tokens > 0
        assert r.finish_reason in ("stop", "length")
        assert r.latency_ms > 0 and r.error_code is None
    assert res[2].completion_tokens <= 8
    assert res[2].finish_reason == "stop" or res[2].completion_tokens == 8
    assert "paris" in (res[1].text or "").lower() + (res[2].text or "").lower()
    assert engine_loop.pending() == 0


@pytest.mark.slow
def test_two_groups_back_to_back_both_complete(engine_loop: EngineLoop, collector: Any) -> None:
    engine_loop.submit("a", [completion(10 + i, f"Count to {i}:") for i in range(4)], collector)
    engine_loop.submit("b", [chat(20 + i, f"Say the word {w}.") for i, w in enumerate(["red", "blue", "green"])], collector)
    engine_loop.submit("empty", [], collector)
    assert engine_loop.pending() <= 7
    assert engine_loop.drain(timeout=120)
    assert engine_loop.pending() == 0
    a, b = collector.wait_done("a", 1), collector.wait_done("b", 1)
    assert sorted(a) == [10, 11, 12, 13] and sorted(b) == [20, 21, 22]
    assert all(r.ok for r in [*a.values(), *b.values()])
    for group in ("a", "b", "empty"):
        flags = collector.done_flags(group)
        assert flags.count(True) == 1 and flags[-1] is True, (group, flags)
    assert collector.wait_done("empty", 1) == {}


@pytest.mark.slow
def test_wait_below_lets_the_next_chunk_in_while_busy(engine_loop: EngineLoop, collector: Any) -> None:
    engine_loop.submit("w1", [completion(30 + i, "Once upon a time", max_tokens=32) for i in range(6)], collector)
    assert engine_loop.wait_below(3, timeout=120)
    assert engine_loop.pending() <= 3
    assert engine_loop.drain(timeout=120)
    assert not engine_loop.wait_below(-1, timeout=0.05)  # times out: pending can never drop below 0


@pytest.mark.slow
def test_overlong_prompt_fails_alone(engine_run: Run) -> None:
    long_text = "hello " * (ENGINE_MAX_MODEL_LEN + 50)
    res = engine_run([
        completion(40, "The sky is"),
        completion(41, long_text),
        chat(42, long_text),
        chat(43, "Name a colour."),
    ])
    assert res[40].ok and res[43].ok
    for rid in (41, 42):
        assert not res[rid].ok and res[rid].text is None
        assert res[rid].error_code == "context_length_exceeded"
        assert "context" in (res[rid].error_message or "")


@pytest.mark.slow
def test_max_tokens_is_capped_to_the_context(engine_run: Run) -> None:
    # About 1000 prompt tokens leave ~24 for the completion: max_tokens=500 is capped, not rejected.
    prompt = "one two three four five six seven eight nine ten " * 100
    res = engine_run([completion(50, prompt, max_tokens=500, temperature=0)])
    r = res[50]
    assert r.ok, r
    assert ENGINE_MAX_MODEL_LEN - 100 < r.prompt_tokens < ENGINE_MAX_MODEL_LEN
    assert r.prompt_tokens + r.completion_tokens <= ENGINE_MAX_MODEL_LEN


@pytest.mark.slow
def test_bad_sampling_params_fail_alone(engine_run: Run) -> None:
    res = engine_run([
        completion(60, "Hello", temperature=-1),
        completion(61, "Hello", top_p=5),
        completion(62, "Hello", n=2),
        completion(63, "Hello", max_tokens=0),
        completion(64, "Hello", temperature="hot"),
        completion(65, "Hello", logit_bias={"1": 5}),
        completion(66, "Hello"),
    ])
    assert res[66].ok
    for rid in range(60, 66):
        assert not res[rid].ok, res[rid]
        assert res[rid].error_code == "invalid_sampling_params", res[rid]
        assert res[rid].error_message
    assert "temperature" in (res[60].error_message or "")
    assert "top_p" in (res[61].error_message or "")


@pytest.mark.slow
def test_invalid_requests_fail_alone(engine_run: Run) -> None:
    res = engine_run([
        EngineRequest(request_id=70, kind="chat", messages=[], prompt=None, params={}),
        EngineRequest(request_id=71, kind="embedding", messages=None, prompt="x", params={}),
        EngineRequest(request_id=72, kind="completion", messages=None, prompt=None, params={}),
        completion(73, "Fine"),
    ])
    assert res[73].ok
    assert all(res[r].error_code == "invalid_request" for r in (70, 71, 72))


@pytest.mark.slow
def test_temperature_zero_is_deterministic(engine_run: Run) -> None:
    first = engine_run([chat(80, "Write one sentence about cats.", max_tokens=24)])[80]
    second = engine_run([chat(81, "Write one sentence about cats.", max_tokens=24),
                         chat(82, "Write one sentence about dogs.", max_tokens=24)])[81]
    assert first.ok and second.ok
    assert first.text == second.text
    assert first.completion_tokens == second.completion_tokens


@pytest.mark.slow
def test_stop_strings_and_seeded_sampling(engine_run: Run) -> None:
    res = engine_run([
        completion(90, "1, 2, 3, 4,", max_tokens=16, stop=[","]),
        completion(91, "A story:", max_tokens=12, temperature=0.8, seed=7),
        completion(92, "A story:", max_tokens=12, temperature=0.8, seed=7),
    ])
    assert res[90].ok and res[90].finish_reason == "stop" and "," not in (res[90].text or "")
    assert res[91].text == res[92].text


@pytest.mark.slow
def test_callback_errors_and_step_failures_keep_the_loop_alive(
    engine_loop: EngineLoop, engine_run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(group: str, results: list[EngineResult], done: bool) -> None:
        raise RuntimeError("store is down")

    engine_loop.submit("raising", [completion(100, "Hi")], boom)
    assert engine_loop.drain(timeout=60)
    assert engine_run([completion(101, "Still alive?")])[101].ok

    engine = engine_loop._engine
    real_step = engine.step
    calls = {"n": 0}

    def failing_step() -> list[object]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device error")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    res = engine_run([completion(102, "Doomed"), completion(103, "Doomed too")])
    assert all(not r.ok and r.error_code == "engine_error" for r in res.values())
    assert "simulated device error" in (res[102].error_message or "")
    assert engine_run([completion(104, "Recovered")])[104].ok
    assert engine_loop.error is None


@pytest.mark.slow
def test_throughput_smoke(engine_loop: EngineLoop, collector: Any) -> None:
    """32 chat prompts x 32 tokens all finish; prints tokens/s for the record."""
    reqs = [chat(1000 + i, f"Tell me a fact about the number {i}.", max_tokens=32) for i in range(32)]
    start = time.monotonic()
    engine_loop.submit("tp", reqs, collector)
    res = collector.wait_done("tp", 120)
    elapsed = time.monotonic() - start
    assert all(r.ok for r in res.values())
    tokens = sum(r.completion_tokens for r in res.values())
    print(f"\n{len(res)} requests, {tokens} tokens in {elapsed:.1f}s = {tokens / elapsed:.0f} tok/s")
