"""What this worker has: GPUs through NVML (name, total and free memory), or the CPU and its RAM."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import asdict, dataclass
from typing import Any


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
    """The devices this worker will use: the GPUs asked for (or all), else the CPU."""
    if not cpu:
        found = discover_gpus(gpus)
        if found:
            return found
    return [cpu_device()]


def short_gpu_name(name: str) -> str:
    """``NVIDIA A10G`` → ``a10g``; ``NVIDIA GeForce RTX 4090`` → ``rtx4090``."""
    n = name.lower().replace("nvidia", "").replace("geforce", "").replace("tesla", "")
    n = re.sub(r"\b(pcie|sxm\d?|hbm\d?e?|\d+gb)\b", "", n)
    return re.sub(r"[^a-z0-9]+", "", n) or "gpu"


def worker_name(devices: list[DeviceInfo], capacity_bytes: int, model: str | None = None, host: str | None = None) -> str:
    """A name that says what the worker is: ``gpu0-a10g-24gb@host`` or ``cpu-24gb@host``."""
    host = host or socket.gethostname()
    gb = round(capacity_bytes / 1e9)
    if devices and devices[0].kind == "cuda":
        idx = ",".join(str(d.index) for d in devices)
        return f"gpu{idx}-{short_gpu_name(devices[0].name)}-{gb}gb@{host}"
    return f"cpu-{gb}gb@{host}"
