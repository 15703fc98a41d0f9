"""Load on the real ``batchllm serve`` process (PostgreSQL + Redis, loopback): a 100 MB upload with flat server
memory, 8 clients uploading and polling at once with nothing lost, and no key ever in the server's log.

The server's RSS is read from ``/proc/<pid>/status`` every 20 ms; the figures are printed (``pytest -s``) and
written to ``$BATCHLLM_API_LOAD_REPORT`` when set.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.test_api_support import chat_line, cli_argv, free_port, jsonl, wait_health

# isort: split
from batchllm.services.api.keys import create_key
from batchllm.settings import Settings

pytestmark = pytest.mark.services
UPLOAD_MB = 100
REPORT: dict[str, Any] = {}


@dataclass
class Served:
    """The server process, its log, and the keys handed out."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log: Path
    settings: Settings
    keys: list[str] = field(default_factory=list)

    def key(self, name: str) -> str:
        k = create_key(self.settings, name)[1]
        self.keys.append(k)
        return k

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=300)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


class Sampler:
    """The server's peak RSS while a block runs."""

    def __init__(self, served: Served) -> None:
        self.served, self.peak, self._stop = served, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.served.rss())
            time.sleep(0.02)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from tests.conftest import _drop_pg_database, purge_queues, scratch_pg

    url, name = scratch_pg("api_load")
    st = Settings(database_url=url, broker_url=redis_url)
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "BATCHLLM_DATABASE_URL": url, "BATCHLLM_BROKER_URL": redis_url}
    first = create_key(st, "first")[1]  # serve refuses to start without a key
    s = Served(subprocess.Popen(cli_argv("serve", "--port", str(port)), env=env, stdout=log.open("wb"),
                                stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}/v1", log, st, [first])
    try:
        wait_health(f"http://127.0.0.1:{port}", proc=s.proc)
        yield s
    finally:
        s.proc.terminate()
        s.proc.wait(30)
        _drop_pg_database(name)
        purge_queues(redis_url)
        if os.environ.get("BATCHLLM_API_LOAD_REPORT"):
            Path(os.environ["BATCHLLM_API_LOAD_REPORT"]).write_text(json.dumps(REPORT, indent=2))


def test_100mb_upload_keeps_server_memory_flat(served: Served, tmp_path: Path) -> None:
    key = served.key("big")
    c = served.client(key)
    path = tmp_path / "big.jsonl"
    line = json.dumps(chat_line("x", "y" * 900)).encode() + b"\n"
    sha = hashlib.sha256()
    with path.open("wb") as f:
        for i in range(UPLOAD_MB * 10**6 // len(line) + 1):
            row = line.replace(b'"x"', f'"r{i}"'.encode(), 1)
            f.write(row)
            sha.update(row)
    size = path.stat().st_size
    c.files.create(file=("warm.jsonl", b"{}\n"), purpose="batch")  # imports and pools warmed up
    baseline = served.rss()
    with Sampler(served) as up:
        t0 = time.monotonic()
        with path.open("rb") as fh:
            f = c.files.create(file=("big.jsonl", fh), purpose="batch")
        upload_s = time.monotonic() - t0
    assert f.bytes == size
    with Sampler(served) as down:
        t0 = time.monotonic()
        got = hashlib.sha256()
        with c.files.with_streaming_response.content(f.id) as resp:
            for chunk in resp.iter_bytes(1 << 20):
                got.update(chunk)
        download_s = time.monotonic() - t0
    assert got.hexdigest() == sha.hexdigest()
    REPORT["upload"] = {"bytes": size, "upload_s": round(upload_s, 2), "download_s": round(download_s, 2),
                        "rss_baseline_mb": round(baseline / 1e6, 1), "rss_peak_upload_mb": round(up.peak / 1e6, 1),
                        "rss_peak_download_mb": round(down.peak / 1e6, 1)}
    print("\n100 MB upload:", REPORT["upload"])
    # Flat: the server holds about a part (1 MiB) per stream, never the file; allow allocator noise.
    assert up.peak - baseline < 40e6 and down.peak - baseline < 40e6, REPORT["upload"]


def test_large_error_file_streams_with_flat_server_memory(served: Served) -> None:
    """100,000 requests with 500-character ids, cancelled before any ran: the error file (~70 MB) is generated
    from the results while it streams out."""
    c = served.client(served.key("errors"))
    pad = "i" * 490
    data = jsonl([chat_line(f"{pad}{j:08d}", "x") for j in range(100_000)])
    f = c.files.create(file=("many.jsonl", data), purpose="batch")
    t0 = time.monotonic()
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    create_s = time.monotonic() - t0
    c.batches.cancel(b.id)
    b = c.batches.retrieve(b.id)
    assert b.status == "cancelled" and b.error_file_id is not None and b.request_counts is not None
    assert b.request_counts.failed == 100_000
    baseline = served.rss()
    with Sampler(served) as down:
        t0 = time.monotonic()
        n = size = 0
        with c.files.with_streaming_response.content(b.error_file_id) as resp:
            for line in resp.iter_lines():
                rec = json.loads(line)
                assert rec["custom_id"] == f"{pad}{n:08d}" and rec["error"]["code"] == "batch_cancelled"
                n += 1
                size += len(line) + 1
        download_s = time.monotonic() - t0
    assert n == 100_000 and c.files.retrieve(b.error_file_id).bytes == size
    REPORT["error_file"] = {"lines": n, "bytes": size, "create_s": round(create_s, 2), "download_s": round(download_s, 2),
                            "rss_before_mb": round(baseline / 1e6, 1), "rss_peak_mb": round(down.peak / 1e6, 1)}
    print("\nerror file:", REPORT["error_file"])
    assert size > 60e6 and down.peak - baseline < 40e6, REPORT["error_file"]


def test_eight_clients_upload_and_poll_at_once(served: Served) -> None:
    keys = [served.key("team-a"), served.key("team-b")]
    n_clients, n_lines = 8, 500
    made: dict[int, tuple[str, str, str, bytes]] = {}
    failures: list[str] = []

    def client_run(i: int) -> None:
        try:
            key = keys[i % 2]
            c = served.client(key)
            data = jsonl([chat_line(f"c{i}-{j}", f"client {i} line {j}") for j in range(n_lines)])
            f = c.files.create(file=(f"client{i}.jsonl", data), purpose="batch")
            b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                 metadata={"client": str(i)})
            for _ in range(10):
                got = c.batches.retrieve(b.id)
                assert got.request_counts is not None and got.request_counts.total == n_lines
                assert b.id in [x.id for x in c.batches.list(limit=100)]
                time.sleep(0.05)
            made[i] = (key, f.id, b.id, data)
        except Exception as e:  # reported below with the client number
            failures.append(f"client {i}: {type(e).__name__}: {e}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=client_run, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.monotonic() - t0
    assert not failures, failures
    assert len(made) == n_clients
    for i, (key, file_id, batch_id, data) in made.items():
        c = served.client(key)
        b = c.batches.retrieve(batch_id)
        assert b.metadata == {"client": str(i)} and b.input_file_id == file_id and b.request_counts is not None
        assert b.request_counts.total == n_lines and b.request_counts.failed == 0
        assert c.files.content(file_id).read() == data
    for k, key in enumerate(keys):
        mine = {b.id for b in served.client(key).batches.list(limit=100)}
        assert mine == {made[i][2] for i in made if i % 2 == k}
    REPORT["eight_clients"] = {"clients": n_clients, "lines_each": n_lines, "seconds": round(elapsed, 2)}
    print("\n8 clients:", REPORT["eight_clients"])
    assert elapsed < 240


def test_keys_never_appear_in_the_log(served: Served) -> None:
    wrong = "bl-" + "W" * 43
    with pytest.raises(openai.AuthenticationError):
        served.client(wrong).batches.list()
    served.client(served.keys[0]).batches.list()
    time.sleep(0.5)
    text = served.log.read_text(errors="replace")
    assert '"GET /v1/batches HTTP/1.1" 401' in text and '"POST /v1/files HTTP/1.1" 200' in text  # the access log is on
    for key in [*served.keys, wrong]:
        assert key not in text and key[3:15] not in text
    assert "Bearer" not in text and "authorization" not in text.lower()
