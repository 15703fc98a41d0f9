"""Which variant a batch runs, which workers can host it, and refusing work nobody can host.

Pure functions of the catalog, the settings and worker descriptions (``WorkerInfo`` rows read by the caller).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchllm.catalog import Catalog, ModelSpec, Variant
from batchllm.errors import NoCapacity
from batchllm.placement.fit import Device, FitEstimate, WorkerCapacity, best_variant, estimate, explain
from batchllm.settings import Settings

# Workers seen within this window count as "known" for the submit-time capacity check.
KNOWN_WORKER_WINDOW_S = 7 * 24 * 3600


def capacity_from(kind: str, devices: list[dict[str, Any]], advertised: int | None, tensor_parallel: int) -> WorkerCapacity:
    """A worker's capacity from its heartbeat fields."""
    devs = [Device(**{k: d[k] for k in ("index", "name", "total_bytes", "free_bytes", "kind") if k in d}) for d in devices]
    return WorkerCapacity(devices=devs, advertised_bytes=advertised, tensor_parallel=max(1, tensor_parallel), cpu=kind == "cpu")


def row_capacity(w: Any) -> WorkerCapacity:
    """Capacity of a worker row (``store.workers.WorkerInfo``)."""
    return capacity_from(w.kind, list(w.devices or []), w.advertised_bytes, w.tensor_parallel)


def identity_capacity(identity: Any) -> WorkerCapacity:
    """Capacity of a starting worker (``batchllm.worker.runtime.WorkerIdentity``)."""
    return capacity_from(identity.kind, identity.devices, identity.advertised_bytes, identity.tensor_parallel)


def fit_kwargs(settings: Settings) -> dict[str, Any]:
    """The settings that change a fit estimate, as keyword arguments of ``fit.estimate``/``best_variant``."""
    return {
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "max_model_len": settings.engine_max_model_len,
        "cpu_kvcache_bytes": int(settings.cpu_kvcache_gb * 2**30),
    }


def ref_of(spec: ModelSpec, variant: Variant) -> str:
    """``name@variant``: the unit of placement and the queue key."""
    return f"{spec.name}@{variant.name}"


def variant_for_worker(settings: Settings, catalog: Catalog, model: str, cap: WorkerCapacity) -> tuple[str, FitEstimate]:
    """The variant a worker pinned with ``--model`` loads: the pinned one if it fits, else the best that fits.

    Raises:
        NoCapacity: nothing fits this worker; the message shows the numbers.
    """
    kw = fit_kwargs(settings)
    spec, pinned = catalog.resolve(model)
    if pinned is not None:
        est = estimate(spec, pinned, cap, **kw)
        if not est.fits:
            raise NoCapacity(f"{ref_of(spec, pinned)} does not fit this worker: {est.reason}")
        return ref_of(spec, pinned), est
    found = best_variant(spec, cap, **kw)
    if found is None:
        raise NoCapacity(explain(spec, [cap], settings.gpu_memory_utilization))
    variant, est = found
    return ref_of(spec, variant), est


def resolve_refs(settings: Settings, catalog: Catalog, names: list[str], live: Sequence[Any], known: Sequence[Any],
                 queue_anyway: bool = False) -> dict[str, str]:
    """Resolve each model name of a batch to one ``name@variant`` that all its requests will run.

    Default: the variant live workers already run, else the highest-precision variant a live worker can
    host. With no live worker that can host it: refuse (``NoCapacity``, exit 2) when workers are known,
    unless ``queue_anyway``; with no workers known at all, queue the most portable variant.

    Args:
        settings: settings (fit parameters).
        catalog: the model catalog.
        names: the model names the batch's lines use.
        live: live workers (``WorkerInfo``).
        known: workers seen recently (``KNOWN_WORKER_WINDOW_S``), live or not.
        queue_anyway: queue even when no known worker can host a model.
    """
    util = settings.gpu_memory_utilization
    kw = fit_kwargs(settings)
    out: dict[str, str] = {}
    for name in names:
        spec, pinned = catalog.resolve(name)
        if pinned is not None:
            out[name] = ref_of(spec, pinned)
            caps = [row_capacity(w) for w in known]
            if caps and not queue_anyway and not any(estimate(spec, pinned, c, **kw).fits for c in caps):
                raise NoCapacity(
                    f"{explain(spec, caps, util, variant=pinned)} (for variant {pinned.name}); "
                    "add --queue-anyway to queue it regardless"
                )
            continue
        loaded = sorted({w.model for w in live if w.model and w.model.split("@", 1)[0] == spec.name})
        if loaded:
            out[name] = loaded[0]
            continue
        chosen = None
        for variant in spec.variants:  # highest precision first
            if any(estimate(spec, variant, row_capacity(w), **kw).fits for w in live):
                chosen = variant
                break
        if chosen is None:
            caps = [row_capacity(w) for w in known]
            if caps and not queue_anyway and not any(best_variant(spec, c, **kw) for c in caps):
                raise NoCapacity(f"{explain(spec, caps, util)}; add --queue-anyway to queue it regardless")
            for w in known:  # a known (maybe stopped) worker that could host it decides the variant
                found = best_variant(spec, row_capacity(w), **kw)
                if found:
                    chosen = found[0]
                    break
            if chosen is None:
                chosen = min(spec.variants, key=lambda v: v.floor_gb)
        out[name] = ref_of(spec, chosen)
    return out
