"""Device discovery and worker naming (NVML absent here: the CPU path and the error for unknown GPUs), and the
unique names workers take (``worker.identity.claim_name``) on a real SQLite store."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from batchllm.errors import InputError, NameTaken
from batchllm.settings import Settings
from batchllm.status import WorkerState
from batchllm.store import leases
from batchllm.store import workers as worker_rows
from batchllm.store.db import upgrade
from batchllm.worker.devices import DeviceInfo, card_size_gb, discover, worker_name
from batchllm.worker.identity import claim_name
from batchllm.worker.runtime import WorkerIdentity

MIB = 2**20


@pytest.mark.parametrize(
    ("mib", "gb"),
    [(23028, 24), (23034, 24), (24564, 24), (16384, 16), (15360, 16), (81559, 80), (81920, 80), (143771, 141),
     (8192, 8), (32510, 32), (2048, 2), (4096, 4), (3911, 4)],
)
def test_card_size_is_the_marketed_size(mib: int, gb: int) -> None:
    assert card_size_gb(mib * MIB) == gb


def test_worker_names_say_what_the_worker_is() -> None:
    a10g = DeviceInfo(index=1, name="NVIDIA A10G", total_bytes=23028 * MIB, free_bytes=0, kind="cuda")
    assert worker_name([a10g], a10g.total_bytes, host="lab1") == "gpu1-a10g-24gb@lab1"
    cpu = DeviceInfo(index=0, name="cpu", total_bytes=25 * 10**9, free_bytes=0, kind="cpu")
    assert worker_name([cpu], 16 * 10**9, host="lab1") == "cpu-16gb@lab1"


def test_unknown_gpu_index_is_an_error_not_a_silent_cpu_fallback() -> None:
    with pytest.raises(InputError, match="--gpus 7: no GPU 7"):
        discover(cpu=False, gpus=[7])
    assert discover(cpu=True, gpus=None)[0].kind == "cpu"


def _identity(name: str = "cpu-16gb@lab1", host: str = "lab1") -> WorkerIdentity:
    return WorkerIdentity(name=name, instance=uuid.uuid4().hex, kind="cpu", devices=[{"name": "cpu", "kind": "cpu"}],
                          memory_total_bytes=16 * 10**9, memory_free_bytes=8 * 10**9, advertised_bytes=None, host=host)


def test_default_names_never_collide_and_taken_explicit_names_are_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(url)
    st = Settings(database_url=url, data_dir=tmp_path, heartbeat_timeout=30)
    # Live workers (other processes: our parent, which surely runs) hold the default name and its first variant.
    first, second = _identity(), _identity("cpu-16gb-2@lab1")
    for w in (first, second):
        assert worker_rows.register(url, w.name, w.instance, w.row(os.getppid()), WorkerState.READY, 30)
    # Started with the same flags on the same host (or a cloned machine), the next one takes the next free name.
    assert claim_name(st, _identity(), explicit=False) == "cpu-16gb-3@lab1"
    # An explicit --name a live worker holds is refused, naming the holder.
    with pytest.raises(NameTaken, match=r"'cpu-16gb@lab1' is held by a live worker \(pid \d+ on lab1\)"):
        claim_name(st, _identity(), explicit=True)
    # Once the holder stopped, the name is free again: taken over, and the dead holder's leases go back to the queue.
    worker_rows.mark_stopped(url, first.instance)
    again = _identity()
    assert claim_name(st, again, explicit=True) == "cpu-16gb@lab1"
    names = {w.name: w.instance for w in worker_rows.all_workers(url)}
    assert names["cpu-16gb@lab1"] == again.instance and len(names) == 3
    assert leases.release_owner(url, first.instance) == 0
