"""A long-lived vLLM engine fed by Celery tasks (SPEC "Keep the engine fed").

One background thread owns the vLLM ``LLMEngine`` and runs ``add_request`` / ``step``. Celery tasks
call :meth:`EngineLoop.submit` (non-blocking) with a chunk's requests and then
:meth:`EngineLoop.wait_below` so the next chunk arrives before the engine runs dry. Every vLLM call
(rendering, tokenizing, add_request, step, abort) happens on the loop thread: the engine and the HF
tokenizer are not thread-safe, and this keeps the submit side a plain queue append.

vLLM is imported lazily in :meth:`EngineLoop.start`; importing this module costs nothing.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchllm.errors import ModelLoadError

log = logging.getLogger(__name__)

OnResults = Callable[[str, list["EngineResult"], bool], None]

#: OpenAI sampling names accepted in :attr:`EngineRequest.params` (same names in vLLM's SamplingParams).
SAMPLING_KEYS = frozenset({"max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed", "n",
                           "presence_penalty", "frequency_penalty", "repetition_penalty"})
#: After this many step() failures in a row the engine is declared broken (restart the worker).
MAX_STEP_FAILURES = 3
DEFAULT_CPU_KVCACHE_GB = 4.0  # vLLM's historical VLLM_CPU_KVCACHE_SPACE default


@dataclass
class EngineRequest:
    """One request for the engine; ``request_id`` is the store's request row id."""
    request_id: int
    kind: str  # "chat" or "completion"
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineResult:
    """The outcome of one request; ``ok=False`` carries ``error_code`` / ``error_message``."""
    request_id: int
    ok: bool
    text: str | None
    finish_reason: str | None  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    error_code: str | None = None  # context_length_exceeded | invalid_sampling_params | invalid_request | engine_error
    error_message: str | None = None


@dataclass
class EngineConfig:
    """How to start the engine. ``cpu_kvcache_gb`` sizes the KV cache on CPU (default 4 GiB)."""
    model_dir: str
    served_name: str
    device: str = "cpu"  # "cpu" | "cuda"
    dtype: str = "bfloat16"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = True
    quantization: str | None = None
    cpu_offload_gb: float = 0.0
    cpu_kvcache_gb: float | None = None
    seed: int = 0


class RequestRejected(Exception):
    """A request that cannot run; becomes an ``ok=False`` result."""
    def __init__(self, code: str, message: str, prompt_tokens: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.prompt_tokens = prompt_tokens


@dataclass
class _Group:
    name: str
    on_results: OnResults
    submitted_at: float
    requests: list[EngineRequest]
    remaining: int = 0  # requests accepted by the engine and not reported yet


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500] or type(exc).__name__


class EngineLoop:
    """Owns one vLLM engine (built from ``config``) and a thread that steps it while work is queued."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._llm: Any = None
        self._engine: Any = None
        self._max_model_len = 0
        self._defaults: dict[str, Any] = {}
        self._cond = threading.Condition()
        self._inbox: deque[_Group] = deque()
        self._pending = 0  # submitted and not yet reported (guarded by _cond)
        self._inflight: dict[str, tuple[EngineRequest, _Group, int]] = {}  # (request, group, prompt tokens); loop thread only
        self._ids = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._step_failures = 0
        self.error: str | None = None  # set when the engine is declared broken
        self.load_seconds = 0.0

    def start(self) -> None:
        """Load the model (blocking) and start the background step thread.

        Raises:
            ModelLoadError: weights directory missing/invalid, wrong device, or vLLM failed to load.
        """
        if self._thread is not None:
            raise RuntimeError("EngineLoop.start() called twice")
        cfg = self.config
        model_dir = Path(cfg.model_dir).expanduser()
        if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
            raise ModelLoadError(
                f"model {cfg.served_name}: no weights at {model_dir} (need a HF directory with config.json); "
                "run `batchllm models pull` / `models import-gguf` or fix BATCHLLM_MODEL_DIR"
            )
        # In-process engine core: we already live inside a Celery worker, and the engine must be
        # driven by our own thread. Must be set before vllm reads its env.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs: dict[str, Any] = {}
        if cfg.device == "cpu":
            # vLLM's CPU backend otherwise sizes the KV cache from gpu_memory_utilization x total RAM
            # and refuses to start on a busy host. VLLM_CPU_KVCACHE_SPACE (int GiB) would override
            # kv_cache_memory_bytes, so an explicit config value removes it; otherwise it is honoured.
            if cfg.cpu_kvcache_gb is not None:
                os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
                kwargs["kv_cache_memory_bytes"] = int(cfg.cpu_kvcache_gb * 2**30)
            elif not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                kwargs["kv_cache_memory_bytes"] = int(DEFAULT_CPU_KVCACHE_GB * 2**30)
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except Exception as exc:
            raise ModelLoadError(f"cannot import vllm ({_one_line(exc)}); install batchllm[gpu] or batchllm[cpu]") from exc
        if (cfg.device == "cuda") != current_platform.is_cuda_alike() or (cfg.device == "cpu") != current_platform.is_cpu():
            raise ModelLoadError(f"device {cfg.device!r} requested but this vLLM build targets {current_platform.device_type!r}")
        started = time.monotonic()
        kwargs.update(dtype=cfg.dtype, quantization=cfg.quantization)  # plain str; vLLM checks the Literal
        try:
            self._llm = LLM(
                model=str(model_dir), served_model_name=cfg.served_name,
                max_model_len=cfg.max_model_len, tensor_parallel_size=cfg.tensor_parallel_size,
                gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.enforce_eager,
                cpu_offload_gb=cfg.cpu_offload_gb, seed=cfg.seed, disable_log_stats=True, **kwargs,
            )
        except Exception as exc:  # vLLM raises anything from ValueError to RuntimeError
            why = f"{type(exc).__name__}: {_one_line(exc)}"
            raise ModelLoadError(f"model {cfg.served_name}: vLLM could not load {model_dir}: {why}") from exc
        self._engine = self._llm.llm_engine
        self._max_model_len = int(self._engine.model_config.max_model_len)
        # Model-author defaults (generation_config.json), as `vllm serve` applies them.
        self._defaults = dict(self._engine.model_config.get_diff_sampling_param() or {})
        self.load_seconds = time.monotonic() - started
        log.info("engine %s loaded in %.1f s (max_model_len=%d)", cfg.served_name, self.load_seconds, self._max_model_len)
        self._thread = threading.Thread(target=self._run, name=f"engine-{cfg.served_name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop thread and release the engine. Unreported requests are dropped (their
        chunk leases expire and the work is re-dispatched); call :meth:`drain` first to finish them."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        if self._engine is not None:
            try:
                self._engine.engine_core.shutdown()
            except Exception:  # best effort during teardown
                log.debug("engine shutdown failed", exc_info=True)
        self._llm = self._engine = None

    @property
    def max_model_len(self) -> int:
        """The context length the engine runs with (prompt + completion tokens); 0 before start()."""
        return self._max_model_len

    def submit(self, group: str, requests: list[EngineRequest], on_results: OnResults) -> None:
        """Queue ``requests`` for the engine and return at once.

        ``on_results(group, results, group_done)`` is called from the loop thread with every request
        of the group that finished in one engine step (rejected requests arrive in their own call
        first); ``group_done`` is True exactly once, on the last call (an empty group gets one
        call with no results). The callback must not block on this loop (no ``wait_below`` in it).
        """
        if self._thread is None:
            raise RuntimeError("EngineLoop.start() has not been called")
        with self._cond:
            if self._stopping:
                raise RuntimeError("EngineLoop is stopped")
            self._inbox.append(_Group(group, on_results, time.monotonic(), list(requests)))
            self._pending += len(requests)
            self._cond.notify_all()

    def pending(self) -> int:
        """Requests submitted and not reported yet (queued for validation or running in vLLM)."""
        with self._cond:
            return self._pending

    def wait_below(self, n: int, timeout: float | None = None) -> bool:
        """Block while ``pending() > n``. Returns False on timeout or when the loop stops first."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._pending <= n or self._stopping, timeout)
            return bool(ok) and self._pending <= n

    def drain(self, timeout: float | None = None) -> bool:
        """Block until every submitted request has been reported. Returns False on timeout."""
        return self.wait_below(0, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._inbox or self._inflight)
                if self._stopping:
                    return
                batch = list(self._inbox)
                self._inbox.clear()
            try:
                for grp in batch:
                    self._admit(grp)
                if self._inflight:
                    self._step()
            except Exception as exc:  # never let the thread die silently
                log.exception("engine loop iteration failed")
                self._fail_inflight(f"engine loop error: {type(exc).__name__}: {_one_line(exc)}")

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception as exc:
            self._step_failures += 1
            msg = f"engine step failed: {type(exc).__name__}: {_one_line(exc)}"
            log.exception("vLLM step failed (%d in a row)", self._step_failures)
            if self._step_failures >= MAX_STEP_FAILURES:
                self.error = msg
            self._fail_inflight(msg)
            return
        self._step_failures = 0
        now = time.monotonic()
        finished: list[tuple[_Group, EngineResult]] = []
        for out in outputs:
            item = self._inflight.pop(out.request_id, None) if out.finished else None
            if item is None:
                continue
            (req, grp, n_prompt), comp = item, out.outputs[0]
            if comp.finish_reason == "abort":  # vLLM gave up on it (e.g. preempted for good): not a success
                finished.append((grp, _error_result(req, "engine_error", "vLLM aborted the request", n_prompt, grp.submitted_at)))
                continue
            finished.append((grp, EngineResult(
                request_id=req.request_id, ok=True, text=comp.text, finish_reason=comp.finish_reason or "stop",
                prompt_tokens=len(out.prompt_token_ids or ()) or n_prompt, completion_tokens=len(comp.token_ids),
                latency_ms=(now - grp.submitted_at) * 1000.0)))
        self._report_by_group(finished)

    def _fail_inflight(self, message: str) -> None:
        """Fail every running request (engine state is unknown after an exception)."""
        items = list(self._inflight.items())
        self._inflight.clear()
        if items and self._engine is not None:
            try:
                self._engine.abort_request([rid for rid, _ in items])
            except Exception:
                log.debug("abort after failure failed", exc_info=True)
        self._report_by_group(
            [(grp, _error_result(req, "engine_error", message, n_prompt, grp.submitted_at)) for _, (req, grp, n_prompt) in items]
        )

    def _report_by_group(self, finished: list[tuple[_Group, EngineResult]]) -> None:
        """One callback per group for everything of it that finished together."""
        by_group: dict[int, tuple[_Group, list[EngineResult]]] = {}
        for grp, res in finished:
            by_group.setdefault(id(grp), (grp, []))[1].append(res)
        for grp, results in by_group.values():
            self._report(grp, results)

    def _report(self, grp: _Group, results: list[EngineResult], accepted: bool = True) -> None:
        """Hand results to the group's callback; ``accepted`` results were counted in ``remaining``."""
        if accepted:
            grp.remaining -= len(results)
        try:
            grp.on_results(grp.name, results, grp.remaining == 0)
        except Exception:  # the task layer retries at its own level
            log.exception("on_results callback for group %s raised; continuing", grp.name)
        finally:
            with self._cond:
                self._pending -= len(results)
                self._cond.notify_all()

    def _admit(self, grp: _Group) -> None:
        """Validate and add one submission's requests; report the rejected ones at once."""
        rejected: list[EngineResult] = []
        for req in grp.requests:
            n_prompt = 0
            try:
                if self.error is not None:
                    raise RequestRejected("engine_error", f"engine is broken ({self.error}); restart the worker")
                engine_input, params, n_prompt = self._prepare(req)
                rid = str(next(self._ids))
                try:
                    self._engine.add_request(rid, engine_input, params)
                except Exception as exc:  # vLLM's own checks; isolate the request
                    raise RequestRejected(*_classify(exc, "invalid_request"), n_prompt) from exc
                self._inflight[rid] = (req, grp, n_prompt)
                grp.remaining += 1
            except RequestRejected as rej:
                rejected.append(_error_result(req, rej.code, str(rej), rej.prompt_tokens or n_prompt, grp.submitted_at))
            except Exception as exc:  # a bug here must not leak pending counts
                log.exception("admitting request %s failed", req.request_id)
                rejected.append(_error_result(req, "engine_error", _one_line(exc), n_prompt, grp.submitted_at))
        grp.requests = []  # not needed any more; do not pin prompts in memory
        if rejected or grp.remaining == 0:
            self._report(grp, rejected, accepted=False)

    def _prepare(self, req: EngineRequest) -> tuple[Any, Any, int]:
        """Render + tokenize the prompt, check its length and build SamplingParams."""
        from vllm.renderers import ChatParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.utils.mistral import is_mistral_tokenizer

        renderer = self._engine.renderer
        try:
            if req.kind == "chat":
                if not isinstance(req.messages, list) or not req.messages:
                    raise RequestRejected("invalid_request", "chat request needs a non-empty messages list")
                chat_params = ChatParams(chat_template_kwargs={
                    "add_generation_prompt": True, "continue_final_message": False,
                    "tokenize": is_mistral_tokenizer(renderer.tokenizer),
                })
                _, (engine_input,) = renderer.render_chat([req.messages], chat_params, renderer.default_chat_tok_params)
            elif req.kind == "completion":
                if not isinstance(req.prompt, str):
                    raise RequestRejected("invalid_request", "completion request needs a string prompt")
                (engine_input,) = renderer.render_cmpl([{"prompt": req.prompt}], renderer.default_cmpl_tok_params)
            else:
                raise RequestRejected("invalid_request", f"unknown request kind {req.kind!r} (chat or completion)")
        except RequestRejected:
            raise
        except Exception as exc:  # template/tokenizer errors, over-long text
            raise RequestRejected(*_classify(exc, "invalid_request")) from exc
        n_prompt = len(engine_input["prompt_token_ids"])
        if n_prompt + 1 > self._max_model_len:
            why = f"prompt has {n_prompt} tokens; the model context is {self._max_model_len} (prompt + at least 1 output token)"
            raise RequestRejected("context_length_exceeded", f"{why}; shorten the prompt", n_prompt)
        params = self._sampling_params(req.params or {}, n_prompt)
        params.output_kind = RequestOutputKind.FINAL_ONLY  # we only need the finished text
        return engine_input, params, n_prompt

    def _sampling_params(self, raw: dict[str, Any], n_prompt: int) -> Any:
        from vllm import SamplingParams

        unknown = sorted(k for k, v in raw.items() if k not in SAMPLING_KEYS and v is not None)
        if unknown:
            raise RequestRejected("invalid_sampling_params", f"unsupported sampling parameter(s): {', '.join(unknown)}", n_prompt)
        values = {**self._defaults, **{k: v for k, v in raw.items() if v is not None}}
        if values.get("n", 1) != 1:
            raise RequestRejected("invalid_sampling_params", f"n must be 1 (got {values['n']!r})", n_prompt)
        room, max_tokens = self._max_model_len - n_prompt, values.get("max_tokens", self._max_model_len)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestRejected("invalid_sampling_params", f"max_tokens must be an integer >= 1 (got {max_tokens!r})", n_prompt)
        values["max_tokens"] = min(max_tokens, room)  # unset or too big: whatever fits the context
        try:
            return SamplingParams(**values)
        except Exception as exc:  # VLLMValidationError, or TypeError for wrong types
            raise RequestRejected("invalid_sampling_params", f"invalid sampling parameters: {_one_line(exc)}", n_prompt) from exc


def _classify(exc: BaseException, default: str) -> tuple[str, str]:
    """Map a vLLM validation error to (error_code, one-line message)."""
    msg = _one_line(exc)
    too_long = ("maximum context length" in msg or "longer than the maximum model length" in msg)
    return ("context_length_exceeded" if too_long or getattr(exc, "parameter", None) in ("input_text", "input_tokens")
            else default), msg


def _error_result(req: EngineRequest, code: str, message: str, prompt_tokens: int, since: float) -> EngineResult:
    return EngineResult(
        request_id=req.request_id, ok=False, text=None, finish_reason=None, prompt_tokens=prompt_tokens,
        completion_tokens=0, latency_ms=(time.monotonic() - since) * 1000.0, error_code=code, error_message=message,
    )
