"""vLLM's serving answers as EngineResults: parsing request bodies, mapping responses and errors.

Helpers of :mod:`batchllm.worker.vllm_engine`; vLLM is imported lazily, inside functions.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from batchllm.status import Endpoint
from batchllm.worker.engine import EngineRequest, EngineResult, error_result, one_line
from batchllm.worker.engine_procs import log_tail_reason
from batchllm.worker.vllm_setup import EngineOptions


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int | None = 0


class _UsageOnly(msgspec.Struct):
    usage: _Usage | None = None


def to_result(req: EngineRequest, response: Any, since: float) -> EngineResult:
    """A serving object's answer (a pydantic response or a starlette Response) as an EngineResult."""
    if hasattr(response, "model_dump_json"):
        body, status = response.model_dump_json().encode(), 200
    elif isinstance(getattr(response, "body", None), (bytes, bytearray, memoryview)):
        body, status = bytes(response.body), int(getattr(response, "status_code", 200))
    else:  # a stream: cannot happen with stream forced off
        return error_result(req.request_id, 500, f"unexpected {type(response).__name__} from vLLM", since)
    if status != 200:
        try:
            err = msgspec.json.decode(body).get("error") or {}
            message, param = str(err.get("message") or body[:200]), err.get("param")
        except Exception:
            message, param = body[:200].decode(errors="replace"), None
        return error_result(req.request_id, status, message, since, param=param)
    try:
        usage = msgspec.json.decode(body, type=_UsageOnly).usage or _Usage()
    except msgspec.DecodeError:
        usage = _Usage()
    return EngineResult(request_id=req.request_id, status_code=200, body=body, prompt_tokens=usage.prompt_tokens,
                        completion_tokens=usage.completion_tokens or 0,
                        latency_ms=(time.monotonic() - since) * 1000.0)


def protocol_parsers() -> dict[Endpoint, Any]:
    from pydantic import TypeAdapter
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

    embedding: TypeAdapter[Any] = TypeAdapter(EmbeddingRequest)  # a union: completion- or chat-style input
    return {
        Endpoint.CHAT: ChatCompletionRequest.model_validate,
        Endpoint.COMPLETIONS: CompletionRequest.model_validate,
        Endpoint.EMBEDDINGS: embedding.validate_python,
    }


def validation_message(exc: Exception) -> tuple[str, str | None]:
    """One line and the field at fault for a request body vLLM's protocol model refused."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
        except Exception:
            first = None
        if first:
            loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith(("function-", "Embedding"))]
            msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
            where = ".".join(loc)
            return (f"{where}: {msg}" if where else msg), (loc[0] if loc else getattr(exc, "parameter", None))
    return one_line(exc), getattr(exc, "parameter", None)


def dead_reason(llm: Any) -> str:
    codes: dict[str, Any] = {}
    try:
        manager = llm.engine_core.resources.engine_manager
        codes = manager.finished_procs() if manager is not None else {}
    except Exception:  # the shape of vLLM's internals is best effort here
        pass
    detail = ", ".join(f"{name} exit code {code}" for name, code in codes.items())
    return f"vLLM engine core died ({detail})" if detail else "vLLM engine core died"


def load_error(opts: EngineOptions, model: str, exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {one_line(exc, 300)}"
    if "Engine core initialization failed" in text:
        log_path = opts.engine_log_path()
        reason = log_tail_reason(log_path)
        where = f"see {log_path}" if log_path else "its log above says why"
        text = f"the engine-core process failed to start ({reason + '; ' if reason else ''}{where})"
    return f"model {opts.served_name}: vLLM could not load {model}: {text}"
