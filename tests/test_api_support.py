"""Helpers of the API tests (no tests here): servers on loopback ports, scratch databases, the CLI, and the
test stand-in engine (``tests/stub_engine.py``, injected into ``LocalWorker(engine_factory=...)`` of an in-thread
server; never reachable from the CLI). The real model runs in the ``slow`` test.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from tests.stub_engine import StubEngine


def cli_argv(*args: str) -> list[str]:
    """The command line of the real ``batchllm`` CLI in a subprocess."""
    return [sys.executable, "-m", "batchllm", *args]


def _too_many_tokens(body: dict[str, Any]) -> str | None:
    return "max_tokens is too large for this model" if int(body.get("max_tokens") or 0) > 1000 else None


def stub_engine_factory(delay: float = 0.01, capacity: int = 4) -> Callable[..., StubEngine]:
    """An ``engine_factory`` for ``LocalWorker`` that builds the test stand-in engine (``tests/stub_engine.py``).

    A request asking for over 1000 ``max_tokens`` is rejected with a 400 and OpenAI's error body, as vLLM
    rejects bad parameters, so the error file has an HTTP-level failure to check.
    """

    def factory(_settings: Any, _ref: str, _kind: str, _tp: int) -> StubEngine:
        return StubEngine(step_s=delay, capacity=capacity, reject=_too_many_tokens)

    return factory


# ----------------------------------------------------------------------------------------- servers


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadServer:
    """A real uvicorn server for ``app`` in a thread, on a free loopback port."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        """The OpenAI SDK's ``base_url``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise AssertionError("the API server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def wait_health(base: str, timeout: float = 60, proc: Any = None) -> None:
    """Block until ``GET /health`` answers 200 (or the process died)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become healthy")


def jsonl(lines: Sequence[dict[str, Any] | str]) -> bytes:
    """JSONL bytes from dicts (or raw strings for invalid lines)."""
    return b"".join((ln if isinstance(ln, str) else json.dumps(ln)).encode() + b"\n" for ln in lines)


def chat_line(cid: str, text: str = "hello", model: str = "smollm2-135m-instruct", **extra: Any) -> dict[str, Any]:
    """One OpenAI Batch chat line."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def readme_snippet(root: Path) -> str:
    """The fenced Python block of the README's API section (the test runs exactly that code)."""
    text = (root / "README.md").read_text()
    section = text.split("## OpenAI-compatible API", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]

