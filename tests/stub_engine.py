"""A stand-in engine for control-plane tests: the :class:`~batchllm.worker.engine.Engine` protocol, no model.

Like dramatiq's ``StubBroker``: it behaves like the vLLM engine from the outside (results per group on its
own thread, ``group_done`` exactly once, abort, health) and answers every request after one engine
"step" with an OpenAI-shaped body (chat.completion, text_completion or an embedding list) whose text is
a deterministic function of ``(seed, public_id)``. It can be told to fail given requests (400), to hang
(all requests, or given ones), or to die (health FAILED, in-flight requests answered 500). It records
what it received. Thousands of requests a second on one core; every method is thread-safe.

    engine = StubEngine(step_s=0.01, fail={"batch_req_000000000007"})
    engine.submit("chunk-1", requests, on_results)
    engine.drain(5)
"""

from __future__ import annotations

import base64
import random
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Any

import msgspec

from batchllm.status import Endpoint
from batchllm.worker.engine import EngineHealth, EngineRequest, EngineResult, Group, GroupLedger, OnResults, error_result

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima")


class StubEngine:
    """A model-free engine. ``capacity`` requests are answered per step of ``step_s`` seconds.

    Args:
        step_s: seconds each engine step takes (0: as fast as possible).
        capacity: requests answered per step (the protocol's ``capacity``).
        seed: varies the generated words; the same seed gives the same bodies.
        completion_tokens: words per answer (capped by the body's max_tokens / max_completion_tokens).
        embedding_dim: length of each embedding vector.
        model: the ``model`` field of every response.
        fail: request ids (public ``batch_req_…`` or store row ids) answered with a 400 error.
        hang: request ids that are never answered (until aborted or the engine dies / stops).
        reject: a check of each decoded request body; a message it returns is answered with a 400 error (as
            vLLM rejects bad parameters), e.g. ``lambda body: "too long" if body.get("max_tokens", 0) > 1000 else None``.
    """

    def __init__(self, *, step_s: float = 0.0, capacity: int = 256, seed: int = 0, completion_tokens: int = 8,
                 embedding_dim: int = 8, model: str = "stub-model", fail: Collection[str | int] = (),
                 hang: Collection[str | int] = (), reject: Callable[[dict[str, Any]], str | None] | None = None) -> None:
        self.capacity = capacity
        self.shutdown_grace_s = 0.0  # the Engine protocol's; the stub has no processes to wait for
        self.reject = reject
        self.step_s = step_s
        self.seed = seed
        self.completion_tokens = completion_tokens
        self.embedding_dim = embedding_dim
        self.model = model
        self.fail: set[str | int] = set(fail)
        self.hang_ids: set[str | int] = set(hang)
        self.received: list[tuple[str, EngineRequest]] = []  # (group, request) in submit order
        self.aborted: list[str] = []
        self.steps = 0
        self._ledger = GroupLedger()
        self._cond = threading.Condition()
        self._queue: deque[tuple[Group, EngineRequest | None]] = deque()
        self._held: list[tuple[Group, EngineRequest]] = []  # hung requests
        self._hanging = False
        self._dead: str | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="stub-engine", daemon=True)
        self._thread.start()

    # --- the Engine protocol -------------------------------------------------------------------------

    def submit(self, group: str, requests: Sequence[EngineRequest], on_results: OnResults) -> None:
        """Queue a group; results arrive on the stub's thread after the next step."""
        grp = self._ledger.open(group, len(requests), on_results)
        with self._cond:
            self.received.extend((group, r) for r in requests)
            if requests:
                self._queue.extend((grp, r) for r in requests)
            else:
                self._queue.append((grp, None))
            self._cond.notify_all()

    def abort(self, group: str) -> int:
        """Drop ``group``; no callback for it afterwards. Returns its unreported request count."""
        groups = self._ledger.abort(group)
        with self._cond:
            self.aborted.append(group)
            self._held = [(g, r) for g, r in self._held if not g.aborted]
        return sum(g.remaining for g in groups)

    def pending(self) -> int:
        """Requests submitted and not yet reported or aborted."""
        return self._ledger.pending()

    def wait_below(self, n: int, timeout: float | None = None) -> bool:
        """Block while ``pending() > n``; False on timeout or when stopped first."""
        return self._ledger.wait_below(n, timeout)

    def drain(self, timeout: float | None = None) -> bool:
        """Block until everything submitted was reported; False on timeout."""
        return self._ledger.wait_below(0, timeout)

    def health(self) -> tuple[EngineHealth, str | None]:
        """FAILED after :meth:`die`."""
        return (EngineHealth.FAILED, self._dead) if self._dead else (EngineHealth.OK, None)

    def stop(self) -> None:
        """Stop the stub's thread; unreported requests are dropped."""
        self._ledger.close()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # --- test controls -------------------------------------------------------------------------------

    def set_hanging(self, hanging: bool) -> None:
        """While hanging, no step runs: everything submitted stays pending."""
        with self._cond:
            self._hanging = hanging
            self._cond.notify_all()

    def die(self, reason: str = "vLLM engine core died (stub)") -> None:
        """Health turns FAILED; queued, running and hung requests, and any submitted later, get 500 errors."""
        with self._cond:
            self._dead = reason
            self._queue.extend(self._held)
            self._held.clear()
            self._cond.notify_all()

    def requests_of(self, group: str) -> list[EngineRequest]:
        """What was submitted under ``group``."""
        with self._cond:
            return [r for g, r in self.received if g == group]

    # --- the stub's thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or (self._queue and (not self._hanging or self._dead)))
                if self._stopping:
                    return
                n = len(self._queue) if self._dead else self.capacity
                batch = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
                step = 0.0 if self._dead else self.step_s
            if step:
                with self._cond:  # an interruptible sleep: stop() must not wait a whole step
                    self._cond.wait_for(lambda: self._stopping, step)
            self.steps += 1
            by_group: dict[Group, list[EngineResult]] = {}
            for grp, req in batch:
                if grp.aborted:
                    continue
                results = by_group.setdefault(grp, [])
                if req is None:
                    continue
                if not self._dead and (req.public_id in self.hang_ids or req.request_id in self.hang_ids):
                    with self._cond:
                        self._held.append((grp, req))
                    continue
                results.append(self._answer(grp, req))
            for grp, results in by_group.items():
                if results or grp.size == 0:
                    self._ledger.deliver(grp, results)

    def _answer(self, grp: Group, req: EngineRequest) -> EngineResult:
        since = grp.submitted_at
        if self._dead:
            return error_result(req.request_id, 500, f"engine error: {self._dead}", since)
        if req.public_id in self.fail or req.request_id in self.fail:
            return error_result(req.request_id, 400, f"stub engine told to fail {req.public_id}", since,
                                param="messages")
        try:
            data = msgspec.json.decode(req.body)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except (msgspec.DecodeError, ValueError) as exc:
            return error_result(req.request_id, 400, f"request body is not a JSON object ({exc})", since)
        problem = self.reject(data) if self.reject is not None else None
        if problem:
            return error_result(req.request_id, 400, problem, since)
        body, prompt, completion = self._body(Endpoint(req.endpoint), req.public_id, data)
        return EngineResult(request_id=req.request_id, status_code=200, body=msgspec.json.encode(body),
                            prompt_tokens=prompt, completion_tokens=completion,
                            latency_ms=(time.monotonic() - since) * 1000.0)

    def _body(self, endpoint: Endpoint, public_id: str, data: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
        rng = random.Random(f"{self.seed}:{public_id}")
        created = int(time.time())
        if endpoint is Endpoint.EMBEDDINGS:
            raw = data.get("input", "")
            inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
            prompt = sum(max(1, len(str(x).split())) for x in inputs)
            items = []
            for i, _ in enumerate(inputs):
                vec = [rng.uniform(-1, 1) for _ in range(self.embedding_dim)]
                emb: Any = (base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
                            if data.get("encoding_format") == "base64" else vec)
                items.append({"object": "embedding", "index": i, "embedding": emb})
            usage = {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0}
            return {"id": f"embd-{public_id}", "object": "list", "created": created, "model": self.model,
                    "data": items, "usage": usage}, prompt, 0
        limit = data.get("max_completion_tokens") or data.get("max_tokens") or self.completion_tokens
        words = max(1, min(self.completion_tokens, int(limit)))
        n = int(data.get("n") or 1)
        texts = [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]
        source = data.get("messages") if endpoint is Endpoint.CHAT else data.get("prompt")
        prompt = max(1, len(str(source).split()))
        usage = {"prompt_tokens": prompt, "completion_tokens": words * n, "total_tokens": prompt + words * n}
        finish = "length" if words < self.completion_tokens or words == int(limit) else "stop"
        if endpoint is Endpoint.CHAT:
            choices: list[dict[str, Any]] = [
                {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": finish}
                for i, t in enumerate(texts)
            ]
            return {"id": f"chatcmpl-{public_id}", "object": "chat.completion", "created": created,
                    "model": self.model, "choices": choices, "usage": usage}, prompt, words * n
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": finish} for i, t in enumerate(texts)]
        return {"id": f"cmpl-{public_id}", "object": "text_completion", "created": created, "model": self.model,
                "choices": choices, "usage": usage}, prompt, words * n
