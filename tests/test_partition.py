"""A network partition: two workers on their own "hosts" (Linux network namespaces), one cut off mid-chunk.

Each worker runs in its own network namespace, joined to this host by a veth pair; it reaches the private
PostgreSQL and Redis (tests/fault_cluster.py) over its veth address, not loopback, and the test checks that
in ``pg_stat_activity``. Mid-chunk the test takes one worker's link down (``ip link set … down``) for longer
than the heartbeat timeout, then heals it. The partitioned worker keeps generating and retrying its writes
meanwhile; the scheduler declares it lost and the other worker re-runs its chunks under a new attempt. On
heal, the partitioned worker's late writes must be refused by fencing (counted in its ``stale_writes``),
every request answered exactly once with 200, and no answer changed: requests run at temperature 1.0 with
no seed, so an overwrite would show as different text. Needs root and ``ip`` (this suite runs as root).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fault_cluster import MODEL, Cluster, chat, require, staggered, start_services, stop_services, unchanged, wait_until

pytest_plugins = ["tests.reliability_report"]
pytestmark = [pytest.mark.faults, pytest.mark.slow]

HEARTBEAT_TIMEOUT_S = 6.0
LEASE_S = 8.0
PARTITION_S = 25.0
DB_RETRY_S = 90.0  # longer than the partition: the cut-off worker is still retrying its write when the link heals
WORKER_ARGS = ["--cpu", "--model", MODEL, "--loglevel", "INFO"]
ENV = {
    "BATCHLLM_LEASE_SECONDS": str(LEASE_S), "BATCHLLM_HEARTBEAT_INTERVAL": "1",
    "BATCHLLM_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S), "BATCHLLM_DB_RETRY_SECONDS": str(DB_RETRY_S),
    "BATCHLLM_CHUNK_SIZE": "8",
}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Hosts:
    """Two network namespaces, each joined to this host by a veth pair on its own /24."""

    def __init__(self) -> None:
        tag = secrets.token_hex(2)
        self.ns = [f"blp{tag}{i}" for i in (1, 2)]
        self.host_if = [f"blh{tag}{i}" for i in (1, 2)]
        self.subnet = [f"10.{200 + i}.{int(tag, 16) % 250}" for i in (1, 2)]

    def host_addr(self, i: int) -> str:
        return f"{self.subnet[i]}.1"

    def peer_addr(self, i: int) -> str:
        return f"{self.subnet[i]}.2"

    def up(self) -> None:
        for i, ns in enumerate(self.ns):
            peer = f"blq{self.host_if[i][3:]}"
            ip("netns", "add", ns)
            ip("link", "add", self.host_if[i], "type", "veth", "peer", "name", peer)
            ip("link", "set", peer, "netns", ns)
            ip("addr", "add", f"{self.host_addr(i)}/24", "dev", self.host_if[i])
            ip("link", "set", self.host_if[i], "up")
            ip("-n", ns, "addr", "add", f"{self.peer_addr(i)}/24", "dev", peer)
            ip("-n", ns, "link", "set", peer, "up")
            ip("-n", ns, "link", "set", "lo", "up")  # vLLM talks to its engine core over local sockets

    def cut(self, i: int) -> None:
        ip("link", "set", self.host_if[i], "down")

    def heal(self, i: int) -> None:
        ip("link", "set", self.host_if[i], "up")

    def down(self) -> None:
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)  # takes its veth pair along


@pytest.fixture(scope="module")
def parted(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Hosts]]:
    """Private services on loopback and both veth addresses; the scheduler here, a worker in each namespace."""
    require("ip", "redis-server", "pg_ctl")
    if os.geteuid() != 0:
        pytest.fail("the partition test needs root (network namespaces); the test suite runs as root")
    hosts = Hosts()
    base = Path(tempfile.mkdtemp(prefix="batchllm-partition-"))
    logs = tmp_path_factory.mktemp("partition-logs")
    c: Cluster | None = None
    try:
        hosts.up()
        addrs = ["127.0.0.1", hosts.host_addr(0), hosts.host_addr(1)]
        redis, pg = start_services(base, redis_bind=" ".join(addrs), pg_listen=",".join(addrs))
        c = Cluster(base, logs, redis, pg, ENV)
        c.start_scheduler()
        for i, name in enumerate(("p1", "p2")):
            there = {k: c.env[k].replace("@127.0.0.1:", f"@{hosts.host_addr(i)}:")
                     for k in ("BATCHLLM_DATABASE_URL", "BATCHLLM_BROKER_URL")}
            c.start_worker(name, WORKER_ARGS, prefix=["ip", "netns", "exec", hosts.ns[i]], env=there)
        c.ready(["p1", "p2"], timeout=300)
        yield c, hosts
    finally:
        if c is not None:
            c.teardown()
            stop_services(c.redis, c.pg)
        print(f"\n[partition] logs: {logs}")
        hosts.down()
        shutil.rmtree(base, ignore_errors=True)


def test_partitioned_worker_is_fenced_and_the_batch_completes(parted: tuple[Cluster, Hosts], reliability: Any,
                                                             tmp_path: Path) -> None:
    c, hosts = parted
    clients = {r[0] for r in c.sql("SELECT DISTINCT host(client_addr) FROM pg_stat_activity WHERE client_addr IS NOT NULL")}
    assert {hosts.peer_addr(0), hosts.peer_addr(1)} <= clients, f"workers not on their veth addresses: {clients}"
    n = 64
    bid = c.submit(chat(n, "part", staggered))
    p1 = c.instance_of("p1")

    def p1_mid_chunk() -> list[str]:
        return [cid for cid, owner, done, size in c.leased_progress(bid) if owner == p1 and 0 < done < size]

    held = wait_until(p1_mid_chunk, 120, "p1 to hold a half-written chunk")
    before = c.answers(bid)
    stale_before = c.stale_writes("p1")
    hosts.cut(0)
    t_cut = time.time()
    try:
        wait_until(lambda: all(ck["attempt"] >= 2 for ck in c.chunks(bid) if ck["id"] in held), 90,
                   "p2 to re-claim p1's chunks")
        t_reclaimed = time.time()
        lost = c.worker_state("p1")
        # Long enough that p1's pending writes fail for sure (TCP keepalive ~11 s, tcp_user_timeout 10 s) and sit
        # in its retry loop, so the heal meets them: their next attempt is the late write fencing must refuse.
        time.sleep(max(0.0, PARTITION_S - (time.time() - t_cut)))
        mid = c.answers(bid)
    finally:
        hosts.heal(0)
    t_heal = time.time()
    assert lost is not None and lost[0] == "lost", f"p1 was not declared lost during the partition: {lost}"
    refused = wait_until(lambda: c.stale_writes("p1") - stale_before, 90, "p1's late writes to be refused")
    t_done = c.wait_batch(bid, 240)
    lines = c.check_exactly_once(bid, tmp_path / "out.jsonl", n)
    final = c.answers(bid)
    unchanged(before, final)
    unchanged(mid, final)
    # Of the chunks p1 held when cut off, every result written since came from p2's re-claim (attempt 2 or later).
    # Healed, p1 may rightly claim a chunk nobody had started (a message it had prefetched): those are its own.
    chunk_of = dict(c.sql("SELECT custom_id, chunk_id FROM requests WHERE batch_id = %s", bid))
    late = {k: v for k, v in final.items() if k not in mid and chunk_of[k] in held}
    stale_rows = [k for k, v in late.items() if v[3] == "p1" or v[2] < 2]
    assert not stale_rows, f"p1's late results were applied after it lost its lease: {stale_rows[:5]}"
    wait_until(lambda: (c.worker_state("p1") or ("", 0))[0] in ("ready", "busy"), 60, "p1 to heartbeat again")
    print(f"[partition] cut {t_heal - t_cut:.0f}s; re-claimed after {t_reclaimed - t_cut:.1f}s; {refused} stale "
          f"write(s) refused; batch done {t_done - t_heal:.1f}s after the heal")
    reliability.row(
        f"Worker p1 in its own network namespace cut off (`ip link set … down`) mid-chunk for {t_heal - t_cut:.0f} s "
        f"(heartbeat timeout {HEARTBEAT_TIMEOUT_S:.0f} s), then healed; p2 in another namespace",
        f"p1 was declared lost and p2 re-claimed its chunk(s) {t_reclaimed - t_cut:.1f} s after the cut; on heal p1's "
        f"{refused} late result write(s) were refused by fencing and counted; every request answered once with 200; "
        f"no answer read before or during the partition changed (temperature 1.0); p1 heartbeats again",
        recovery_s=t_done - t_heal, requests=n, results=len(lines), extra="recovery measured from the heal",
    )
