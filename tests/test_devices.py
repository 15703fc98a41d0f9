"""Device discovery and worker naming (NVML absent here: the CPU path and the error for unknown GPUs)."""

from __future__ import annotations

import pytest

from batchllm.errors import InputError
from batchllm.worker.devices import DeviceInfo, card_size_gb, discover, worker_name

MIB = 2**20


@pytest.mark.parametrize(
    ("mib", "gb"),
    [(23028, 24), (23034, 24), (24564, 24), (16384, 16), (81559, 80), (81920, 80), (143771, 141), (8192, 8), (32510, 32)],
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
