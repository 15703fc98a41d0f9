"""``GET /v1/models``: the catalog in OpenAI's model list shape, with what live workers can serve now.

Each model carries a ``batchllm`` extension object: ``loaded_on`` (live workers with it loaded: served at
once), ``hostable_by`` (live workers it fits, with the variant they would load), ``variants`` and ``aliases``.
``created`` is 0: the catalog does not record when a model was published.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from batchllm.catalog import ModelSpec, load_catalog
from batchllm.placement.fit import best_variant
from batchllm.placement.variants import fit_kwargs, row_capacity
from batchllm.services.api.auth import CallerDep, ConfigDep
from batchllm.services.api.errors import ApiError
from batchllm.settings import Settings
from batchllm.store import workers as worker_rows
from batchllm.store.workers import WorkerInfo

router = APIRouter(prefix="/v1/models")


def model_object(st: Settings, spec: ModelSpec, live: list[WorkerInfo]) -> dict[str, Any]:
    """OpenAI's Model object of a catalog entry, with the ``batchllm`` hosting extension."""
    loaded = [w.name for w in live if w.model and w.model.split("@", 1)[0] == spec.name]
    hostable = []
    for w in live:
        found = best_variant(spec, row_capacity(w), **fit_kwargs(st))
        if found:
            hostable.append({"worker": w.name, "variant": found[0].name})
    return {
        "id": spec.name, "object": "model", "created": 0, "owned_by": "batchllm",
        "batchllm": {
            "loaded_on": loaded, "hostable_by": hostable, "aliases": list(spec.aliases),
            "variants": [{"name": v.name, "floor_gb": v.floor_gb, "tensor_parallel": v.tensor_parallel,
                          "quantization": v.quantization} for v in spec.variants],
            "max_model_len": spec.max_model_len,
        },
    }


@router.get("")
def list_models(who: CallerDep, cfg: ConfigDep) -> dict[str, Any]:
    """Every catalog model, and where it can run now."""
    st = cfg.settings
    live = worker_rows.live_workers(st.database_url, st.heartbeat_timeout)
    return {"object": "list", "data": [model_object(st, spec, live) for spec in load_catalog(st)]}


@router.get("/{model_id}")
def retrieve_model(model_id: str, who: CallerDep, cfg: ConfigDep) -> dict[str, Any]:
    """One catalog model (by name or alias)."""
    st = cfg.settings
    spec = load_catalog(st).find(model_id)
    if spec is None:
        raise ApiError(404, f"The model '{model_id[:80]}' does not exist; GET /v1/models lists them.", param="model",
                       code="model_not_found")
    return model_object(st, spec, worker_rows.live_workers(st.database_url, st.heartbeat_timeout))
