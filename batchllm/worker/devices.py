"""What this worker has: GPUs through NVML (name, total and free memory), or the CPU and its RAM."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import asdict, dataclass
from typing import Any

from batchllm.errors import InputError


@dataclass
class DeviceInfo:
    """One device as the heartbeat row and the scheduler see it (bytes, not MiB)."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    kind: str  # "cuda" | "cpu"

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON for the workers table."""
        return asdict(self)


def discover_gpus(indices: list[int] | None = None) -> list[DeviceInfo]:
    """List NVIDIA GPUs through NVML; an empty list when there is no driver or no GPU.

    Args:
        indices: only these GPU indices (``--gpus 0,1``); None means all.
    """
    try:
        import pynvml  # nvidia-ml-py: tiny, no CUDA needed, safe outside worker processes too
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded: a CPU machine
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            if indices is not None and i not in indices:
                continue
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append(DeviceInfo(index=i, name=name, total_bytes=int(mem.total), free_bytes=int(mem.free), kind="cuda"))
        return out
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def cpu_device() -> DeviceInfo:
    """The CPU as a device: its RAM is what the KV cache and weights live in."""
    import psutil

    vm = psutil.virtual_memory()
    return DeviceInfo(
        index=0, name=f"cpu ({os.cpu_count()} cores)", total_bytes=int(vm.total), free_bytes=int(vm.available), kind="cpu"
    )


def discover(cpu: bool, gpus: list[int] | None) -> list[DeviceInfo]:
    """The devices this worker will use: the GPUs asked for (or all), else the CPU.

    Raises:
        InputError: ``--gpus`` names a GPU that NVML does not see (never silently fall back to the CPU).
    """
    if cpu:
        return [cpu_device()]
    found = discover_gpus(gpus)
    if gpus is not None:
        missing = sorted(set(gpus) - {d.index for d in found})
        if missing:
            seen = [d.index for d in discover_gpus(None)]
            raise InputError(
                f"--gpus {','.join(map(str, gpus))}: no GPU {','.join(map(str, missing))} "
                f"(NVML sees {seen or 'no GPUs'}); use --cpu to run on the CPU"
            )
    return found or [cpu_device()]


def short_gpu_name(name: str) -> str:
    """``NVIDIA A10G`` → ``a10g``; ``NVIDIA GeForce RTX 4090`` → ``rtx4090``."""
    n = name.lower().replace("nvidia", "").replace("geforce", "").replace("tesla", "")
    n = re.sub(r"\b(pcie|sxm\d?|hbm\d?e?|\d+gb)\b", "", n)
    return re.sub(r"[^a-z0-9]+", "", n) or "gpu"


# Memory sizes cards are sold with (GB); NVML reports a little less (an A10G has 23,028 MiB).
_CARD_SIZES = (1, 2, 3, 4, 6, 8, 10, 11, 12, 16, 20, 24, 32, 40, 48, 64, 80, 94, 96, 128, 141, 180, 192, 288)


def card_size_gb(total_bytes: int) -> int:
    """The size a card is sold as: 23,028 MiB (A10G) and 24,564 MiB (RTX 4090) → 24; 81,559 MiB (H100) → 80."""
    gib = total_bytes / 2**30
    return next((s for s in _CARD_SIZES if s >= gib * 0.99), round(gib))


def worker_name(devices: list[DeviceInfo], capacity_bytes: int, model: str | None = None, host: str | None = None) -> str:
    """A name that says what the worker is: ``gpu0-a10g-24gb@host`` or ``cpu-24gb@host``."""
    host = host or socket.gethostname()
    gb = card_size_gb(capacity_bytes) if devices and devices[0].kind == "cuda" else round(capacity_bytes / 1e9)
    if devices and devices[0].kind == "cuda":
        idx = ",".join(str(d.index) for d in devices)
        return f"gpu{idx}-{short_gpu_name(devices[0].name)}-{gb}gb@{host}"
    return f"cpu-{gb}gb@{host}"
