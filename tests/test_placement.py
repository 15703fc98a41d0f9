"""Assignment decisions as a table: (live workers, open work) → which worker loads which model, what fails.

Pure: no database, no broker. Workers are ``WorkerInfo`` rows with made-up cards (NVML's MiB), the fit rule
is the real one on the built-in catalog, so "16 GB cards never take Mixtral" is checked end to end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchllm.catalog import Catalog, builtin_models
from batchllm.placement.assign import AGE_WEIGHT_S, Demand, assign, demand_of, fit_predicate
from batchllm.settings import Settings
from batchllm.sizes import GB
from batchllm.store.cluster import OpenWork
from batchllm.store.workers import WorkerInfo

CATALOG = Catalog(builtin_models(Path("/models")))
FITS = fit_predicate(Settings(database_url="sqlite://"), CATALOG)
MIB = 2**20
T4, A10G, RTX4090, A100_80 = 16_384, 23_028, 24_564, 81_920  # what NVML reports for 16, 24, 24 and 80 GB cards
MIX = "mixtral-8x7b-instruct@awq-offload"  # 24 GB floor
MIS = "mistral-7b-instruct@awq"  # 8 GB floor
L7 = "llama-2-7b-chat@awq"  # 8 GB floor
L70 = "llama-2-70b-chat@bf16-tp2"  # two 80 GB cards in tensor parallel
L70Q = "llama-2-70b-chat@awq"  # one 80 GB card
SMOL = "smollm2-135m-instruct@bf16"  # the only CPU model


def gpu(name: str, *mib: int, state: str = "idle", model: str | None = None, assigned: str | None = None,
        pinned: bool = False, failed: str | None = None, error: str | None = None, tp: int | None = None,
        advertised_gb: float | None = None, kind: str = "cuda") -> WorkerInfo:
    """A worker row: one device per size (MiB), or a CPU worker with ``kind="cpu"`` and RAM in ``mib``."""
    devices: list[dict[str, Any]] = [{"index": i, "name": f"GPU {m}", "total_bytes": m * MIB, "kind": kind}
                                     for i, m in enumerate(mib)]
    total = sum(m * MIB for m in mib)
    return WorkerInfo(name=name, instance=f"inst-{name}", host="h", pid=1, kind=kind, devices=devices,
                      memory_total_bytes=total, memory_free_bytes=total,
                      advertised_bytes=int(advertised_gb * GB) if advertised_gb else None,
                      tensor_parallel=tp or (len(mib) if kind == "cuda" else 1), model=model, assigned_model=assigned,
                      pinned=pinned, state=state, error=error, load_failed_ref=failed, tokens_generated=0,
                      requests_done=0, stale_writes=0, heartbeat_age=0.5)


def cpu(name: str, ram_gb: int, **kw: Any) -> WorkerInfo:
    return gpu(name, ram_gb * 1000 * 1000 * 1000 // MIB, kind="cpu", **kw)


def q(ref: str, requests: int, chunks: int | None = None, priority: int = 0, age: float = 0.0,
      status: str = "queued") -> OpenWork:
    """Open work of one ref: ``requests`` in ``chunks`` (default: one chunk per 8 requests)."""
    return OpenWork(ref, status, priority, chunks if chunks is not None else max(1, requests // 8), requests, age)


CASES: list[tuple[str, list[WorkerInfo], list[OpenWork], dict[str, str | None], set[str]]] = [
    # (case, workers, open work, expected final assignment changes {worker: ref}, refs whose chunks fail)
    ("mixtral never on a 16 GB card: it waits", [gpu("w16", T4)], [q(MIX, 6)], {}, set()),
    ("mixtral on the 24 GB card (A10G)", [gpu("w16", T4), gpu("w24", A10G)], [q(MIX, 6)], {"w24": MIX}, set()),
    ("mixtral on an RTX 4090", [gpu("w16", T4), gpu("w4090", RTX4090)], [q(MIX, 6)], {"w4090": MIX}, set()),
    ("a small model takes the smallest card", [gpu("w24", A10G), gpu("w16", T4)], [q(MIS, 2, 1)], {"w16": MIS}, set()),
    ("small and big: each where it fits", [gpu("w24", A10G), gpu("w16", T4)], [q(MIS, 2, 1), q(MIX, 2, 1)],
     {"w16": MIS, "w24": MIX}, set()),
    ("no more workers than queued chunks", [gpu("a", T4), gpu("b", T4)], [q(MIS, 2, 1)], {"a": MIS}, set()),
    ("one worker per chunk while idle ones remain", [gpu("a", T4), gpu("b", T4)], [q(MIS, 16, 2)],
     {"a": MIS, "b": MIS}, set()),
    ("more requests win", [gpu("w24", A10G)], [q(MIS, 20), q(MIX, 6)], {"w24": MIS}, set()),
    ("priority wins: 6 x 10 > 20", [gpu("w24", A10G)], [q(MIS, 20), q(MIX, 6, priority=9)], {"w24": MIX}, set()),
    ("age wins: 15 x 2 > 20", [gpu("w16", T4)], [q(MIS, 20), q(L7, 15, age=AGE_WEIGHT_S)], {"w16": L7}, set()),
    ("an unserved model before a second worker for a served one",
     [gpu("a", T4, model=MIS, state="busy"), gpu("b", T4)], [q(MIS, 80, 10), q(L7, 2, 1)], {"b": L7}, set()),
    ("loaded worker keeps its model while its queue has work",
     [gpu("w24", A10G, model=MIS, state="ready")], [q(MIS, 20), q(MIX, 6, priority=9)], {}, set()),
    ("loaded worker moves once its queue is empty",
     [gpu("w24", A10G, model=MIS, state="ready")], [q(MIS, 8, 1, status="leased"), q(MIX, 6)], {"w24": MIX}, set()),
    ("a model that keeps another worker gives one up (the one that fits)",
     [gpu("w16", T4, model=MIS, state="busy"), gpu("w24", A10G, model=MIS, state="busy")], [q(MIS, 64), q(MIX, 2)],
     {"w24": MIX}, set()),
    ("the smaller of two movable workers moves",
     [gpu("w16", T4, model=MIS, state="busy"), gpu("w24", A10G, model=MIS, state="busy")], [q(MIS, 64), q(L7, 2)],
     {"w16": L7}, set()),
    ("a worker still loading is not moved",
     [gpu("w24", A10G, assigned=MIS, state="loading")], [q(MIX, 6)], {}, set()),
    ("a pinned worker is never reassigned",
     [gpu("w24", A10G, model=MIS, pinned=True, state="ready")], [q(MIX, 6)], {}, set()),
    ("failed load: not retried; its chunks fail when nobody else can host it",
     [gpu("w16", T4), gpu("w24", A10G, state="error", failed=MIX, error="CUDA out of memory")], [q(MIX, 3)], {}, {MIX}),
    ("failed load: another worker that fits takes it",
     [gpu("w24", A10G, state="error", failed=MIX, error="oom"), gpu("x24", RTX4090)], [q(MIX, 3)], {"x24": MIX}, set()),
    ("failed load: the worker may take another model",
     [gpu("w24", A10G, state="error", failed=MIX, error="oom")], [q(MIX, 3), q(MIS, 2)], {"w24": MIS}, {MIX}),
    ("failed load: an assignment to the failed ref is withdrawn",
     [gpu("w24", A10G, assigned=MIX, state="error", failed=MIX, error="oom")], [q(MIX, 3)], {"w24": None}, {MIX}),
    ("tensor parallel: 2 x 80 GB hosts llama-2-70b bf16, one 80 GB card does not",
     [gpu("one80", A100_80), gpu("two80", A100_80, A100_80)], [q(L70, 4)], {"two80": L70}, set()),
    ("tensor parallel: the 4-bit 70B goes to the smaller single card",
     [gpu("two80", A100_80, A100_80), gpu("one80", A100_80)], [q(L70Q, 4)], {"one80": L70Q}, set()),
    ("a CPU worker takes the CPU model", [cpu("c", 64)], [q(SMOL, 4)], {"c": SMOL}, set()),
    ("a CPU worker never takes a GPU model", [cpu("c", 64)], [q(MIS, 4)], {}, set()),
    ("the CPU model prefers the smallest worker, CPU or GPU", [gpu("w24", A10G), cpu("c", 16)], [q(SMOL, 4)],
     {"c": SMOL}, set()),
    ("a CPU worker advertising 24 GB stands in for a 24 GB card", [cpu("c", 64, advertised_gb=24)], [q(MIX, 4)],
     {"c": MIX}, set()),
    ("advertising 16 GB on a big card keeps it off mixtral", [gpu("w80", A100_80, advertised_gb=16)], [q(MIX, 4)], {}, set()),
]


@pytest.mark.parametrize(("workers", "work", "changes", "fail"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_assignment_table(workers: list[WorkerInfo], work: list[OpenWork], changes: dict[str, str | None],
                          fail: set[str]) -> None:
    d = assign(workers, work, FITS)
    assert dict(d.changes) == changes
    assert set(d.fail) == fail
    for name, ref in dict(d.changes).items():  # never a model a worker cannot fit
        w = next(w for w in workers if w.name == name)
        assert ref is None or FITS(w, ref), (name, ref)


def test_decisions_are_stable_once_applied() -> None:
    """Applying the decisions and deciding again changes nothing: no flapping."""
    workers = [gpu("w16", T4), gpu("w24", A10G), gpu("c", 1)]
    work = [q(MIS, 20), q(MIX, 6, priority=3), q(L7, 8, age=300)]
    d = assign(workers, work, FITS)
    applied = [_with(w, dict(d.changes).get(w.name, w.assigned_model)) for w in workers]
    assert assign(applied, work, FITS).changes == []


def test_failure_message_names_the_worker_and_its_error() -> None:
    d = assign([gpu("w24", A10G, state="error", failed=MIX, error="could not load: CUDA out of memory")], [q(MIX, 3)], FITS)
    assert d.fail == {MIX: f"no worker could load {MIX} (w24: could not load: CUDA out of memory)"}


def test_remembered_failures_count_like_the_rows() -> None:
    """The scheduler remembers earlier failures of a worker process (its row keeps only the last one)."""
    w = gpu("w24", A10G, state="error", failed=MIS, error="bad weights")
    d = assign([w], [q(MIX, 3)], FITS, failed={"w24": {MIX: "oom"}})
    assert d.changes == [] and d.fail == {MIX: f"no worker could load {MIX} (w24: oom)"}


def test_demand_score() -> None:
    work = [q(MIS, 10, 2, priority=0, age=0), q(MIS, 4, 1, priority=9, age=AGE_WEIGHT_S), q(MIS, 8, 1, status="leased")]
    assert demand_of(work) == {MIS: Demand(queued=3, score=10 * 1 * 1 + 4 * 10 * 2 + 8 * 1 * 1)}


def _with(w: WorkerInfo, assigned: str | None) -> WorkerInfo:
    from dataclasses import replace

    return replace(w, assigned_model=assigned, state="loading" if assigned else w.state)
