"""The fit rule: can a worker host a model variant, and the numbers that say why.

A worker can host ``model@variant`` iff

* its capacity (VRAM summed over the GPUs it runs in tensor parallel, capped by ``--advertise-vram``)
  is at least the variant's floor (decimal GB, compared bytes to bytes), AND
* weights + KV cache + overhead <= gpu_memory_utilization x capacity, AND
* it has at least ``variant.tensor_parallel`` GPUs over which the model's attention heads split evenly
  (vLLM refuses otherwise; a model that splits over fewer of the worker's GPUs than it has counts only
  those: Falcon-7B's 71 heads run on one GPU), AND
* a CPU-only worker takes only ``cpu_ok`` models, unless it advertises VRAM (``--advertise-vram``),
  in which case it stands in for a GPU of that size (placement tests on machines without GPUs).

The estimate, in bytes:

* weights  = params x bits_per_weight / 8 - cpu_offload_gb x GiB x GPUs (vLLM's offload is GiB per GPU)
* kv       = 2 x layers x max(kv_heads, GPUs) x head_dim x dtype_bytes x max_model_len: one sequence
  of full context, the least vLLM starts with (with more GPUs than KV heads, vLLM replicates heads)
* overhead = 1 GB per GPU (CUDA context, CUDA graphs, the activation peak of vLLM's profiling run)
  + 5 % of the weights (activation buffers grow with the model); 0.25 GB per CPU device (no CUDA)

A worker runs its engine with ``tensor_parallel_size = FitEstimate.tensor_parallel``: as many of its GPUs
as the model splits over; ``variant.tensor_parallel`` is only the least number the variant needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from batchllm.catalog import ModelSpec, Variant
from batchllm.sizes import GB, GIB, fmt_gb, fmt_mib

GPU_OVERHEAD_BYTES = 1 * GB
CPU_OVERHEAD_BYTES = GB // 4
WEIGHT_OVERHEAD_FRACTION = 0.05


class Device(BaseModel):
    """One device a worker owns, as discovered (NVML reports MiB; store bytes)."""

    model_config = ConfigDict(frozen=True)

    index: int = 0
    name: str = "GPU"  # "NVIDIA A10G", or "cpu"
    total_bytes: int = Field(ge=0)
    free_bytes: int | None = Field(default=None, ge=0)  # informational: a loaded engine holds most of it
    kind: Literal["cuda", "cpu"] = "cuda"


class WorkerCapacity(BaseModel):
    """What a worker offers for placement: its devices, an optional advertised cap, its GPU group size.

    A CPU worker reports one ``Device(kind="cpu")`` whose ``total_bytes`` is its RAM.
    """

    model_config = ConfigDict(frozen=True)

    devices: list[Device] = Field(default_factory=list)
    advertised_bytes: int | None = Field(default=None, ge=0)  # --advertise-vram
    tensor_parallel: int | None = Field(default=None, ge=1)  # GPUs used together; None: all its GPUs
    cpu: bool = False
    name: str = ""  # the worker's id, for messages

    @model_validator(mode="after")
    def _check(self) -> WorkerCapacity:
        if not self.cpu and self.tensor_parallel and self.tensor_parallel > len(self.gpus):
            raise ValueError(f"tensor_parallel {self.tensor_parallel} > the worker's {len(self.gpus)} GPUs")
        return self

    @classmethod
    def of_gpus(cls, *sizes_mib: float, advertised_bytes: int | None = None, name: str = "") -> WorkerCapacity:
        """A GPU worker with one GPU per size in ``sizes_mib`` (NVML's unit), all in one tensor-parallel group."""
        devices = [Device(index=i, total_bytes=int(s * 2**20)) for i, s in enumerate(sizes_mib)]
        return cls(devices=devices, advertised_bytes=advertised_bytes, name=name)

    @classmethod
    def of_cpu(cls, ram_bytes: int, advertised_bytes: int | None = None, name: str = "") -> WorkerCapacity:
        """A CPU worker with ``ram_bytes`` of memory, optionally standing in for a GPU of ``advertised_bytes``."""
        device = Device(name="cpu", total_bytes=ram_bytes, kind="cpu")
        return cls(devices=[device], advertised_bytes=advertised_bytes, cpu=True, name=name)

    @property
    def gpus(self) -> list[Device]:
        """The worker's CUDA devices."""
        return [d for d in self.devices if d.kind == "cuda"]

    @property
    def stands_in_for_gpu(self) -> bool:
        """A CPU worker advertising VRAM is placed as if it were a GPU of that size."""
        return self.cpu and self.advertised_bytes is not None

    @property
    def cpu_only(self) -> bool:
        """Runs on the CPU backend and is placed as such (hosts only ``cpu_ok`` models)."""
        return self.cpu and self.advertised_bytes is None

    @property
    def engine_devices(self) -> int:
        """How many devices the engine runs on: its tensor-parallel size (1 on the CPU backend)."""
        if self.cpu:
            return (self.tensor_parallel or 1) if self.stands_in_for_gpu else 1
        return self.tensor_parallel or len(self.gpus)

    @property
    def capacity_bytes(self) -> int:
        """Memory placement may count on: summed over the tensor-parallel GPUs, capped by the advertised size."""
        return self.capacity_for(self.engine_devices)

    def capacity_for(self, gpus: int) -> int:
        """Capacity when the engine runs on the first ``gpus`` GPUs (a model whose heads do not split over all)."""
        if self.cpu:
            ram = sum(d.total_bytes for d in self.devices if d.kind == "cpu")
            return ram if self.advertised_bytes is None else self.advertised_bytes
        physical = sum(d.total_bytes for d in self.gpus[:gpus])
        return physical if self.advertised_bytes is None else min(physical, self.advertised_bytes)

    def describe(self, gpus: int | None = None) -> str:
        """E.g. ``"24.1 GB (23,028 MiB)"``, ``"2 GPUs, 48.3 GB (46,056 MiB)"``, ``"64.0 GB of RAM (CPU)"``."""
        gpus = gpus or self.engine_devices
        cap = self.capacity_for(gpus)
        if self.cpu_only:
            return f"{fmt_gb(cap)} of RAM (CPU)"
        text = f"{fmt_gb(cap)} ({fmt_mib(cap)})"
        if self.stands_in_for_gpu:
            return f"{text} advertised by a CPU worker"
        if gpus > 1:
            text = f"{gpus} GPUs, {text}"
        return f"{text} advertised" if cap < sum(d.total_bytes for d in self.gpus[:gpus]) else text


def engine_gpus(spec: ModelSpec, available: int) -> int:
    """GPUs the engine can split ``spec`` over (see ``ModelSpec.engine_gpus``)."""
    return spec.engine_gpus(available)


class FitEstimate(BaseModel):
    """The memory estimate of one model variant on one worker, and whether it fits."""

    model_config = ConfigDict(frozen=True)

    model: str
    variant: str
    fits: bool
    reason: str  # one line, with the numbers
    weights_bytes: int  # on the GPUs, after CPU offload
    offload_bytes: int
    kv_bytes: int
    overhead_bytes: int
    total_bytes: int
    capacity_bytes: int
    budget_bytes: int
    floor_bytes: int
    max_model_len: int
    tensor_parallel: int  # what the engine should run with on this worker
    gpu_memory_utilization: float

    @property
    def ref(self) -> str:
        """``model@variant``."""
        return f"{self.model}@{self.variant}"

    def table_row(self) -> dict[str, str]:
        """Display columns (``batchllm models`` / ``plan``), formatted in decimal GB."""
        return {
            "model": self.model,
            "variant": self.variant,
            "floor": fmt_gb(self.floor_bytes, 0),
            "weights": fmt_gb(self.weights_bytes),
            "kv": fmt_gb(self.kv_bytes),
            "overhead": fmt_gb(self.overhead_bytes),
            "total": fmt_gb(self.total_bytes),
            "budget": fmt_gb(self.budget_bytes),
            "ctx": str(self.max_model_len),
            "tp": str(self.tensor_parallel),
            "fits": "yes" if self.fits else "no",
        }


def estimate(
    spec: ModelSpec,
    variant: Variant,
    capacity: WorkerCapacity,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    cpu_kvcache_bytes: int | None = None,
) -> FitEstimate:
    """Estimate the memory ``spec@variant`` needs on ``capacity`` and apply the fit rule (module docstring).

    Args:
        spec: the catalog entry.
        variant: one of ``spec.variants``.
        capacity: the worker.
        gpu_memory_utilization: the fraction of device memory the engine may use.
        max_model_len: context length override (e.g. ``settings.engine_max_model_len``);
            default the variant's, else the model's.
        cpu_kvcache_bytes: on the CPU backend, the KV space the engine reserves (``settings.cpu_kvcache_gb``).

    Returns:
        The estimate; ``fits`` and a one-line ``reason`` with the numbers.
    """
    available = capacity.engine_devices
    n = engine_gpus(spec, available)
    on_cpu = capacity.cpu_only
    ctx = max_model_len or spec.max_len_for(variant)
    full = variant.weight_bytes(spec.params_b)
    offload = 0 if on_cpu else min(full, round(variant.cpu_offload_gb * GIB * n))
    weights = full - offload
    kv = 2 * spec.layers * max(spec.kv_heads, n) * spec.head_dim * variant.dtype_bytes * ctx
    if on_cpu and cpu_kvcache_bytes:
        kv = max(kv, cpu_kvcache_bytes)  # the CPU backend reserves its whole KV space up front
    overhead = (CPU_OVERHEAD_BYTES if on_cpu else GPU_OVERHEAD_BYTES) * n + round(WEIGHT_OVERHEAD_FRACTION * weights)
    total = weights + kv + overhead
    cap = capacity.capacity_for(n)
    budget = int(gpu_memory_utilization * cap)
    ref = f"{spec.name}@{variant.name}"
    sums = f"weights {fmt_gb(weights)} + KV {fmt_gb(kv)} + overhead {fmt_gb(overhead)} = {fmt_gb(total)}"
    fits = False
    if on_cpu and not spec.cpu_ok:
        reason = f"{ref} needs a GPU; the worker runs on CPU ({spec.name} is not marked cpu_ok)"
    elif variant.tensor_parallel > available:
        reason = f"{ref} needs {variant.tensor_parallel} GPUs in tensor parallel; the worker has {available}"
    elif variant.tensor_parallel > n:
        reason = f"{ref}: its {spec.heads} attention heads do not split over {variant.tensor_parallel} GPUs"
    elif cap < variant.floor_bytes:
        reason = f"{ref} needs ≥ {variant.floor_gb:g} GB; the worker has {capacity.describe(n)}"
    elif total > budget:
        reason = f"{ref}: {sums} > {gpu_memory_utilization:g} × {fmt_gb(cap)}"
    else:
        fits = True
        reason = f"{ref}: {sums} ≤ {gpu_memory_utilization:g} × {fmt_gb(cap)} = {fmt_gb(budget)}"
    return FitEstimate(
        model=spec.name,
        variant=variant.name,
        fits=fits,
        reason=reason,
        weights_bytes=weights,
        offload_bytes=offload,
        kv_bytes=kv,
        overhead_bytes=overhead,
        total_bytes=total,
        capacity_bytes=cap,
        budget_bytes=budget,
        floor_bytes=variant.floor_bytes,
        max_model_len=ctx,
        tensor_parallel=n,
        gpu_memory_utilization=gpu_memory_utilization,
    )


def fits(spec: ModelSpec, variant: Variant, capacity: WorkerCapacity, gpu_memory_utilization: float = 0.9) -> bool:
    """Whether ``capacity`` can host ``spec@variant`` (``estimate(...).fits``)."""
    return estimate(spec, variant, capacity, gpu_memory_utilization).fits


def best_variant(
    spec: ModelSpec,
    capacity: WorkerCapacity,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    cpu_kvcache_bytes: int | None = None,
) -> tuple[Variant, FitEstimate] | None:
    """The highest-precision variant of ``spec`` that fits ``capacity`` (variants are ordered best first).

    Returns:
        ``(variant, estimate)``, or None when no variant fits.
    """
    for variant in spec.variants:
        est = estimate(spec, variant, capacity, gpu_memory_utilization, max_model_len, cpu_kvcache_bytes)
        if est.fits:
            return variant, est
    return None


def explain(
    spec: ModelSpec,
    capacities: Iterable[WorkerCapacity],
    gpu_memory_utilization: float = 0.9,
    variant: Variant | None = None,
) -> str:
    """Why no worker in ``capacities`` can host ``spec`` (or the pinned ``variant``): one line.

    E.g. ``"mixtral-8x7b-instruct needs ≥ 24 GB; the largest worker has 17.2 GB (16,384 MiB)"``.
    """
    variants = [variant] if variant is not None else list(spec.variants)
    ref = spec.name if variant is None else f"{spec.name}@{variant.name}"
    least = min(variants, key=lambda v: v.floor_bytes)
    workers = list(capacities)
    if not workers:
        return f"{ref} needs ≥ {least.floor_gb:g} GB; no workers are known"
    eligible = [w for w in workers if spec.cpu_ok or not w.cpu_only]
    if not eligible:
        return f"{ref} needs a GPU worker with ≥ {least.floor_gb:g} GB; only CPU workers are known"
    usable = {id(w): engine_gpus(spec, w.engine_devices) for w in eligible}
    largest = max(eligible, key=lambda w: w.capacity_for(usable[id(w)]))
    if largest.capacity_for(usable[id(largest)]) < least.floor_bytes:
        return f"{ref} needs ≥ {least.floor_gb:g} GB; the largest worker has {largest.describe(usable[id(largest)])}"
    reasons = "; ".join(estimate(spec, v, largest, gpu_memory_utilization).reason for v in variants)
    return f"{ref} fits no known worker; on the largest ({largest.describe(usable[id(largest)])}): {reasons}"
