"""Flower on real parts: ``batchllm flower`` against the test Redis while a real CPU worker runs a real batch.

Checked through Flower's HTTP API (basic auth enforced, the worker listed under its Celery node name,
each chunk's task listed with its readable ``shadow`` name and its kwargs) and through a real browser:
headless Chromium (Debian's package, driven by Playwright) renders the workers page behind basic auth.
"""

from __future__ import annotations

import ast
import base64
import json
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.conftest import WorkerProc, run_cli, stop_group

pytestmark = [pytest.mark.slow, pytest.mark.services]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
USER = "nightly-ops"
# A colon and a comma on purpose: `batchllm flower` hands the credential to Flower's options directly, and
# Flower's own --basic-auth flag would have split this value on the comma.
PASSWORD = "s3cret:flower,pw"
MODEL = "smollm2-135m-instruct"
LINES = 11  # with BATCHLLM_CHUNK_SIZE=8 (conftest): two chunks, of 8 and 3 requests


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Flower:
    """A running ``batchllm flower`` subprocess."""

    proc: subprocess.Popen[bytes]
    base: str
    log: Path

    def get(self, path: str, auth: str | None = _auth(USER, PASSWORD), timeout: float = 15) -> tuple[int, Message, bytes]:
        """GET ``path``; returns (status, headers (case-insensitive), body) for any status, 4xx included."""
        req = urllib.request.Request(self.base + path, headers={"Authorization": auth} if auth else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def api(self, path: str) -> Any:
        status, _, body = self.get(path)
        assert status == 200, f"GET {path}: {status} {body[:500]!r}\n{self.tail()}"
        return json.loads(body)

    def tail(self) -> str:
        return "flower log:\n" + self.log.read_text(errors="replace")[-3000:]


def _wait(what: str, probe: Any, timeout: float, flower: Flower, interval: float = 0.5) -> Any:
    """Poll ``probe()`` until it returns something truthy; fail with Flower's log otherwise."""
    deadline = time.time() + timeout
    last: Any = None
    while time.time() < deadline:
        if flower.proc.poll() is not None:
            pytest.fail(f"flower exited {flower.proc.returncode} while waiting for {what}\n{flower.tail()}")
        try:
            last = probe()
        except (OSError, AssertionError) as e:  # not listening yet / a transient answer
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    pytest.fail(f"{what} not seen after {timeout}s (last: {str(last)[:500]})\n{flower.tail()}")


@pytest.fixture(scope="module")
def flower(cluster_env: dict[str, str], cpu_worker: WorkerProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    """``batchllm flower`` with basic auth on a free port, watching the test Redis; stopped at teardown."""
    port = _free_port()
    env = dict(cluster_env, BATCHLLM_FLOWER_USER=USER, BATCHLLM_FLOWER_PASSWORD=PASSWORD)
    env.pop("FLOWER_BASIC_AUTH", None)  # an operator's FLOWER_* override would win over our settings
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchllm", "flower", "--port", str(port), "--address", "127.0.0.1"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    fl = Flower(proc=proc, base=f"http://127.0.0.1:{port}", log=log)
    try:
        _wait("Flower's HTTP port", lambda: fl.get("/api/workers", timeout=3)[0] == 200, 60, fl)
        yield fl
    finally:
        stop_group(proc)
    assert proc.returncode is not None


@dataclass
class Seen:
    """What the module's batch left in the store and in Flower."""

    batch_id: str
    ref: str  # the resolved model@variant
    node: str  # the worker's Celery node name as Flower lists it
    chunks: list[tuple[str, int]]  # (chunk id, size) in seq order
    tasks: dict[str, dict[str, Any]]  # Flower's task dicts of this batch, by chunk id


@pytest.fixture(scope="module")
def seen(flower: Flower, cpu_worker: WorkerProc, cluster_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Seen:
    """Run a small batch through the real worker while Flower watches; wait until Flower has every task."""
    from batchllm.store.db import session_scope
    from batchllm.store.models import Chunk

    db = cluster_env["BATCHLLM_DATABASE_URL"]
    w = cpu_worker.row(db)  # batchllm.store.workers' view of the worker
    assert w is not None and w.model, "the cpu_worker fixture's row names no loaded model"
    ref, host = w.model, w.host
    prefix = f"{cpu_worker.name}+"

    def online_node() -> str | None:
        alive = flower.api("/api/workers?status=1")
        nodes = [n for n, up in alive.items() if n.startswith(prefix) and up]
        return nodes[0] if len(nodes) == 1 else None

    # Flower only knows tasks whose events it received: wait until its event receiver hears the worker.
    node = _wait(f"worker {prefix}* online in Flower", online_node, 60, flower)
    assert node.endswith(f"@{host}")

    src = tmp_path_factory.mktemp("flower-batch") / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"f{i}", "prompt": f"Count to {i + 1}.", "max_tokens": 4}) + "\n" for i in range(LINES)),
        encoding="utf-8",
    )
    proc = run_cli(["submit", str(src), "--model", MODEL, "--name", "flower-check", "--wait"], cluster_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    batch_id = proc.stdout.strip().splitlines()[0]
    with session_scope(db) as s:
        chunks = [(c.id, c.size) for c in s.scalars(select(Chunk).where(Chunk.batch_id == batch_id).order_by(Chunk.seq))]
    assert [size for _, size in chunks] == [8, LINES - 8]

    def all_tasks_succeeded() -> dict[str, dict[str, Any]] | None:
        tasks = flower.api("/api/tasks")
        mine = {}
        for t in tasks.values():
            kw = t.get("kwargs")
            if isinstance(kw, str) and batch_id in kw:
                mine[ast.literal_eval(kw)["chunk_id"]] = t
        done = len(mine) == len(chunks) and all(t.get("state") == "SUCCESS" for t in mine.values())
        return mine if done else None

    tasks = _wait(f"the {len(chunks)} tasks of {batch_id} succeeded in Flower", all_tasks_succeeded, 60, flower)
    return Seen(batch_id=batch_id, ref=ref, node=node, chunks=chunks, tasks=tasks)


def test_flower_requires_basic_auth(flower: Flower) -> None:
    wrong = [
        None,
        _auth(USER, "not-the-password"),
        _auth("admin", PASSWORD),
        _auth(USER, PASSWORD.split(",")[0]),
        "Bearer " + PASSWORD,
    ]
    for path in ("/api/workers", "/api/tasks", "/workers", "/tasks"):
        assert flower.get(path)[0] == 200, path
        for auth in wrong:
            status, headers, body = flower.get(path, auth=auth)
            assert status == 401, (path, auth, status)
            if path.startswith("/api/"):
                assert body == b"", body[:200]  # Flower's API answers a bare 401, nothing about the cluster
            else:
                # the pages send the challenge a browser needs to ask for (or be given) credentials
                assert body == b"Access denied", body[:200]
                assert headers.get("WWW-Authenticate") == 'Basic realm="flower"'


def test_flower_api_lists_worker(flower: Flower, seen: Seen, cpu_worker: WorkerProc) -> None:
    # The node name says which worker and which model@variant it hosts: <name>+<model>.<variant>@<host>.
    assert seen.node.startswith(f"{cpu_worker.name}+")
    assert seen.ref.replace("@", ".") in seen.node

    # ?refresh=1 asks the live worker itself (Celery inspect: stats, registered, active_queues, conf, ...)
    workers = flower.api("/api/workers?" + urllib.parse.urlencode({"refresh": 1, "workername": seen.node}))
    assert list(workers) == [seen.node]
    info = workers[seen.node]
    assert info["stats"]["pid"] == cpu_worker.proc.pid  # the `batchllm worker` process itself runs Celery
    assert info["stats"]["pool"]["max-concurrency"] == 1  # solo pool: one chunk at a time per engine
    assert info["stats"]["prefetch_count"] == 1
    assert info["registered"] == ["batchllm.run_chunk"]
    assert [q["name"] for q in info["active_queues"]] == [f"batchllm.{seen.ref}"]  # the queue of its model@variant
    assert info["active"] == [] and info["reserved"] == []  # the batch is done
    assert info["conf"].get("task_serializer") == "json" and info["conf"].get("accept_content") == ["json"]

    # Without refresh Flower answers from its cache, which now holds the same worker.
    assert seen.node in flower.api("/api/workers")
    assert flower.api("/api/workers?status=1")[seen.node] is True


def test_flower_api_lists_readable_tasks(flower: Flower, seen: Seen) -> None:
    assert sorted(seen.tasks) == sorted(cid for cid, _ in seen.chunks)
    for chunk_id, size in seen.chunks:
        t = seen.tasks[chunk_id]
        # the message carries ids only (kwargs), and a readable name made for Flower (the `shadow`)
        assert ast.literal_eval(t["kwargs"]) == {"chunk_id": chunk_id, "batch_id": seen.batch_id, "model": seen.ref, "size": size}
        assert t["args"] == "()"
        name = t["name"]
        assert name == f"run_chunk[{seen.ref}]", name  # one bounded name per model; ids are in the kwargs
        assert t["worker"] == seen.node
        assert t["routing_key"] == f"batchllm.{seen.ref}"  # the model@variant's own queue
        assert t["state"] == "SUCCESS"
        # task-sent comes from the submitting CLI (task_send_sent_event), the rest from the worker
        assert t["sent"] and t["received"] and t["started"] and t["succeeded"]
        assert t["sent"] <= t["received"] <= t["started"] <= t["succeeded"]

    # Flower's filters work on these: by worker, and by the shadow name
    by_worker = flower.api("/api/tasks?" + urllib.parse.urlencode({"workername": seen.node}))
    assert {t["uuid"] for t in seen.tasks.values()} <= set(by_worker)
    one = next(iter(seen.tasks.values()))
    by_name = flower.api("/api/tasks?" + urllib.parse.urlencode({"taskname": one["name"]}))
    assert {t["uuid"] for t in seen.tasks.values()} <= set(by_name)
    info = flower.api(f"/api/task/info/{one['uuid']}")
    assert info["name"] == one["name"] and info["worker"] == seen.node


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_flower_workers_page_in_browser(flower: Flower, seen: Seen, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (as root it installs Debian's chromium package)")
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import HttpCredentials, expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed in the venv: run scripts/setup.sh (pip install playwright)")

    shot = tmp_path / "flower-workers.png"
    with sync_playwright() as pw:

        def context(name: str, creds: HttpCredentials | None) -> Any:
            return pw.chromium.launch_persistent_context(
                str(tmp_path / name),
                executable_path=str(CHROMIUM),
                args=CHROMIUM_ARGS,
                headless=True,
                http_credentials=creds,
                viewport={"width": 1280, "height": 800},
                timeout=60_000,
            )

        # no credentials, or a wrong password: Flower's challenge is not met and Chromium refuses the page
        for name, creds in (("profile-anon", None), ("profile-wrong", HttpCredentials(username=USER, password="wrong"))):
            ctx = context(name, creds)
            try:
                page = ctx.new_page()
                try:
                    resp = page.goto(flower.base + "/workers")
                except PlaywrightError as e:  # Playwright cancels the auth prompt when it has nothing to answer
                    assert "ERR_INVALID_AUTH_CREDENTIALS" in str(e), str(e)
                else:  # it answered, wrongly, and shows the 401 page
                    assert resp is not None and resp.status == 401, (name, resp and resp.status)
                    assert seen.node not in page.content()
                    expect(page.locator("body")).to_have_text("Access denied")
            finally:
                ctx.close()

        ctx = context("profile", HttpCredentials(username=USER, password=PASSWORD))
        try:
            page = ctx.new_page()
            resp = page.goto(flower.base + "/workers", wait_until="networkidle")
            assert resp is not None and resp.status == 200
            row = page.locator("#workers-table tbody tr", has_text=seen.node)
            expect(row).to_have_count(1, timeout=30_000)
            expect(row.locator("td").first).to_have_text(seen.node)
            cells = row.locator("td")
            expect(cells.nth(1)).to_have_text("Online")
            # columns: worker, status, active, processed, failed, succeeded, load average
            expect(cells.nth(4)).to_have_text("0")
            assert int(cells.nth(3).inner_text().replace(",", "")) >= len(seen.chunks)
            assert int(cells.nth(5).inner_text().replace(",", "")) >= len(seen.chunks)
            page.screenshot(path=str(shot), full_page=True)

            # the worker's own page (the `+` and `@` of the node name survive the link) shows its model's queue
            row.get_by_role("link", name=seen.node).click()
            page.wait_for_load_state("networkidle")
            assert page.url.endswith("/worker/" + urllib.parse.quote(seen.node, safe="")), page.url
            expect(page.locator("body")).to_contain_text(f"batchllm.{seen.ref}", timeout=30_000)

            # the tasks page shows the readable names too (one per model; batch and chunk are in the kwargs)
            page.goto(flower.base + "/tasks", wait_until="networkidle")
            expect(page.locator("body")).to_contain_text(f"run_chunk[{seen.ref}]", timeout=30_000)
        finally:
            ctx.close()

    width, height = _png_size(shot)
    assert width >= 1000 and height >= 300
    assert shot.stat().st_size > 5_000
