"""The vLLM engine: vLLM's own OpenAI serving code on an ``AsyncLLM`` whose engine core is another process.

This is what ``vllm run_batch`` does, kept alive across chunks. ``AsyncLLM`` runs the scheduler and the
model in vLLM's engine-core process, so the model's compute threads never wait for the worker's GIL
(Celery, heartbeats, result writes). This process keeps the OpenAI layer: one asyncio event loop in a
dedicated thread runs ``init_app_state``'s serving objects (``OpenAIServingChat``,
``OpenAIServingCompletion``, ``ServingEmbedding``), which parse, validate, render and tokenize each
request and build its response exactly as ``vllm serve`` would.

Every request body is parsed with vLLM's protocol model, so every field vLLM's server accepts works
(``response_format``, ``logprobs``, ``n``, ``logit_bias``, …) and a request vLLM rejects fails alone
with vLLM's message. vLLM is imported lazily; importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from batchllm.errors import ModelLoadError
from batchllm.status import Endpoint
from batchllm.worker.engine import (
    EngineHealth,
    EngineRequest,
    EngineResult,
    Group,
    GroupLedger,
    OnResults,
    error_result,
    one_line,
)
from batchllm.worker.engine_procs import descendants, engine_spawn_hooks, reaper_target, release_reaper
from batchllm.worker.vllm_responses import dead_reason, load_error, protocol_parsers, to_result, validation_message
from batchllm.worker.vllm_setup import (
    EngineOptions,
    check_device,
    check_weights,
    configure_environment,
    configure_noise,
    parse_engine_args,
)

log = logging.getLogger(__name__)

#: Seconds the engine-core process gets to exit on SIGTERM before vLLM kills it.
SHUTDOWN_GRACE_S = 2.0
#: OpenAI's embedding encodings (vLLM's extra "bytes" formats answer with binary, not one JSON object).
_EMBED_FORMATS = (None, "float", "base64")


class VllmEngine:
    """An :class:`~batchllm.worker.engine.Engine` on vLLM's ``AsyncLLM`` and OpenAI serving objects.

    Call :meth:`start` (blocking: loads the model) before :meth:`submit`. Results are reported on the
    engine's event-loop thread, one call per group for all of its requests that finished together.
    """

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self.capacity = 0
        self.max_model_len = 0
        self.load_seconds = 0.0
        self._ledger = GroupLedger()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._llm: Any = None
        self._handlers: dict[Endpoint, Any] = {}
        self._parsers: dict[Endpoint, Any] = {}
        self._error_response_type: Any = type(None)  # vLLM's ErrorResponse, once loaded
        self._error_response_for: Any = None  # vLLM's create_error_response(exc)
        self._ready: dict[Group, list[EngineResult]] = {}  # loop thread only: results not yet reported
        self._flush_scheduled = False
        self._stopped = False
        self._reapers: list[subprocess.Popen[bytes]] = []  # kill the engine core if this process dies
        #: Seconds ``stop()`` gives the engine-core process to exit on SIGTERM before it is killed. A process
        #: that exits right after ``stop()`` (``batchllm run``) sets 0: every result is already in SQL, and
        #: the engine core rarely exits within the grace anyway (it is then killed after waiting it out).
        self.shutdown_grace_s = SHUTDOWN_GRACE_S

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model in vLLM's engine-core process and build the serving objects (blocking).

        Raises:
            ModelLoadError: weights missing, wrong device, or vLLM failed to load (one-line message).
        """
        if self._thread is not None:
            raise RuntimeError("VllmEngine.start() called twice")
        opts, started = self.options, time.monotonic()
        model = check_weights(opts)
        configure_noise(opts.log_level)
        configure_environment(opts)
        args = parse_engine_args(opts, model)
        check_device(opts)
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._run_loop, name=f"engine-{opts.served_name}", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._load(args), loop).result()
        except BaseException as exc:
            self.stop()
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(load_error(opts, model, exc)) from None
        self.load_seconds = time.monotonic() - started
        log.info("engine %s loaded in %.1f s (max_model_len=%d, max_num_seqs=%d)", opts.served_name,
                 self.load_seconds, self.max_model_len, self.capacity)

    def _run_loop(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _load(self, args: Any) -> None:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_args = AsyncEngineArgs.from_cli_args(args)
        # LLM_CLASS: vLLM's offline defaults (max_num_seqs 256 on CPU, not the API server's 128): a batch
        # is offline work. AsyncLLM must be built inside the running loop (it starts its output handler).
        config = engine_args.create_engine_config(usage_context=UsageContext.LLM_CLASS)
        with engine_spawn_hooks(self.options.engine_log_path(), self._reapers):
            self._llm = llm = AsyncLLM.from_vllm_config(
                vllm_config=config, usage_context=UsageContext.LLM_CLASS, disable_log_stats=True,
            )
        tasks = await llm.get_supported_tasks()
        state = State()
        await init_app_state(llm, state, args, tasks)
        self.capacity = int(config.scheduler_config.max_num_seqs)
        self.max_model_len = int(config.model_config.max_model_len)
        self._handlers = {
            Endpoint.CHAT: getattr(getattr(state, "openai_serving_chat", None), "create_chat_completion", None),
            Endpoint.COMPLETIONS: getattr(getattr(state, "openai_serving_completion", None), "create_completion", None),
            Endpoint.EMBEDDINGS: getattr(state, "serving_embedding", None),  # the handler object is the callable
        }
        self._parsers = protocol_parsers()
        from vllm.entrypoints.serve import create_error_response
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        self._error_response_type, self._error_response_for = ErrorResponse, create_error_response

    def stop(self) -> None:
        """Cancel everything in flight, stop the engine-core process (SIGTERM, then SIGKILL of its process
        tree after ``shutdown_grace_s``) and end the loop thread. Unreported requests are dropped."""
        if self._stopped:
            return
        self._stopped = True
        self._ledger.close()
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            if thread is threading.current_thread():
                raise RuntimeError("VllmEngine.stop() cannot be called from an on_results callback")
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=30 + self.shutdown_grace_s)
            except Exception:  # best effort: the process is going away anyway
                log.warning("engine shutdown did not finish cleanly", exc_info=True)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        # The serving objects hold the AsyncLLM; drop them now so that its __del__ (a second shutdown)
        # runs here and not during interpreter teardown, where it raises.
        self._llm = None
        self._handlers.clear()
        gc.collect()
        multiprocessing.active_children()  # reap the engine core vLLM killed, so that reapers see no process
        for reaper in self._reapers:
            release_reaper(reaper)
        self._reapers.clear()

    async def _shutdown(self) -> None:
        tasks = [t for grp in self._ledger.live_groups() for t in grp.handles]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._llm is not None:
            self._llm.shutdown(timeout=self.shutdown_grace_s)

    def process_ids(self) -> list[int]:
        """PIDs of the engine's own processes: vLLM's engine core and everything it started (e.g. the CPU
        backend's model worker). Empty once stopped."""
        roots = [pid for reaper in self._reapers if (pid := reaper_target(reaper)) is not None]
        return [pid for root in roots for pid in descendants(root)]

    def health(self) -> tuple[EngineHealth, str | None]:
        """FAILED with a one-line reason once the engine core died or the loop thread ended."""
        llm = self._llm
        if llm is not None and llm.errored:
            return EngineHealth.FAILED, dead_reason(llm)
        if self._thread is not None and not self._thread.is_alive() and not self._stopped:
            return EngineHealth.FAILED, "the engine's event-loop thread exited"
        return EngineHealth.OK, None

    # --- the Engine protocol -------------------------------------------------------------------------

    def submit(self, group: str, requests: Sequence[EngineRequest], on_results: OnResults) -> None:
        """Queue ``requests`` and return at once (thread-safe); see :class:`~batchllm.worker.engine.Engine`.

        Raises:
            RuntimeError: the engine was not started, or is stopped.
        """
        if self._stopped:
            raise RuntimeError("VllmEngine is stopped")
        if self._loop is None or self._llm is None:
            raise RuntimeError("VllmEngine.start() has not completed")
        grp = self._ledger.open(group, len(requests), on_results)
        self._loop.call_soon_threadsafe(self._start_group, grp, list(requests))

    def abort(self, group: str) -> int:
        """Drop ``group``: its requests are cancelled (vLLM aborts them) and no callback follows."""
        groups = self._ledger.abort(group)
        if groups and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._cancel, groups)
        return sum(g.remaining for g in groups)

    def pending(self) -> int:
        """Requests submitted and not yet reported or aborted."""
        return self._ledger.pending()

    def wait_below(self, n: int, timeout: float | None = None) -> bool:
        """Block while ``pending() > n``; False on timeout or when the engine stops first."""
        return self._ledger.wait_below(n, timeout)

    def drain(self, timeout: float | None = None) -> bool:
        """Block until every submitted request was reported; False on timeout."""
        return self._ledger.wait_below(0, timeout)

    # --- on the loop thread --------------------------------------------------------------------------

    def _start_group(self, grp: Group, requests: list[EngineRequest]) -> None:
        if grp.aborted:
            return
        if not requests:
            self._ledger.deliver(grp, [])
            return
        for req in requests:
            task = asyncio.ensure_future(self._run_one(grp, req))
            grp.handles.add(task)
            task.add_done_callback(grp.handles.discard)

    def _cancel(self, groups: list[Group]) -> None:
        for grp in groups:
            self._ready.pop(grp, None)
            for task in list(grp.handles):
                task.cancel()  # AsyncLLM.generate/encode abort the request in the engine core on cancel

    async def _run_one(self, grp: Group, req: EngineRequest) -> None:
        try:
            result = await self._serve(req, grp.submitted_at)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # a bug or an engine failure: this request fails, the others go on
            log.exception("request %s failed in the engine", req.public_id)
            result = error_result(req.request_id, 500, f"engine error: {type(exc).__name__}: {one_line(exc)}",
                                  grp.submitted_at)
        if grp.aborted:
            return
        self._ready.setdefault(grp, []).append(result)
        if not self._flush_scheduled:
            # Results that finish in the same engine step wake in the same loop iteration: one report each.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        ready, self._ready = self._ready, {}
        for grp, results in ready.items():
            self._ledger.deliver(grp, results)

    async def _serve(self, req: EngineRequest, since: float) -> EngineResult:
        """Run one request through vLLM's serving code and turn the answer into an EngineResult."""
        try:
            data = msgspec.json.decode(req.body)
        except msgspec.DecodeError as exc:
            return error_result(req.request_id, 400, f"request body is not valid JSON: {exc}", since)
        if not isinstance(data, dict):
            return error_result(req.request_id, 400, "request body must be a JSON object", since)
        endpoint = Endpoint(req.endpoint)
        handler = self._handlers.get(endpoint)
        if handler is None:
            kind = "an embedding" if self.options.task == "embed" else "a generative"
            return error_result(req.request_id, 400, f"model {self.options.served_name} is {kind} model and does "
                                f"not serve {endpoint.value}", since, param="url", code="unsupported_endpoint")
        if data.get("stream"):
            return error_result(req.request_id, 400, "stream is not supported in a batch; remove it or set it "
                                "to false", since, param="stream")
        if endpoint is Endpoint.EMBEDDINGS and data.get("encoding_format") not in _EMBED_FORMATS:
            return error_result(req.request_id, 400, "encoding_format must be 'float' or 'base64' "
                                f"(got {data.get('encoding_format')!r})", since, param="encoding_format")
        data["model"] = self.options.served_name
        data["request_id"] = req.public_id  # vLLM's id: the response id is chatcmpl-/cmpl-/embd-<public_id>
        try:
            request = self._parsers[endpoint](data)
        except Exception as exc:  # pydantic.ValidationError or vLLM's own checks in validators
            message, param = validation_message(exc)
            return error_result(req.request_id, 400, message, since, param=param)
        response: Any
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the server's exception handlers do exactly this
            response = self._error_response_for(exc)
        if isinstance(response, self._error_response_type):
            err = response.error
            return error_result(req.request_id, int(err.code), err.message, since, param=err.param)
        return to_result(req, response, since)
