"""Which model each worker should host: a pure function of workers, open work and the fit rule.

The scheduler reads the live workers (``store.workers.WorkerInfo``) and the open work per model ref
(``store.cluster.OpenWork``) and hands them to :func:`assign`, which returns decisions only — it reads
and writes nothing — so the policy is tested as a table of (workers, work) → decisions:

* **Demand** of a ref is the sum over its open (queued or leased) chunks of
  ``requests × (1 + priority) × (1 + age / AGE_WEIGHT_S)``: urgent work first, but old low-priority work
  gains weight as it waits, so it is never starved.
* **Idle workers** (no model, none assigned, unpinned) go to the ref with most unserved demand — refs
  nobody serves before a second worker for a served one — and each ref takes the *smallest* idle worker
  that fits it, so big cards stay free for big models. A ref gets no more workers than it has queued chunks.
* **A loaded worker moves** only to a ref that has queued work and no worker, and only when its own
  queue is empty or its model keeps another worker (so no model with work is ever left unserved);
  workers with an empty queue move first, then the smallest.
* **Never a model a worker cannot fit** (``fits``), and never a ref the worker failed to load.
* **Failed loads**: a ref whose queued chunks no live worker can take — every worker able to host it
  failed to load it — is returned in ``fail`` with the workers' message, so its requests fail with a
  clear error instead of waiting forever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from batchllm.catalog import Catalog
from batchllm.errors import BatchLLMError
from batchllm.placement.fit import estimate
from batchllm.placement.variants import fit_kwargs, row_capacity
from batchllm.settings import Settings
from batchllm.status import ChunkStatus, WorkerState
from batchllm.store.cluster import OpenWork
from batchllm.store.workers import WorkerInfo

AGE_WEIGHT_S = 600.0  # a chunk waiting this long counts double
# A worker in one of these states without a model can take one; ERROR is a worker whose load failed.
IDLE_STATES = frozenset({WorkerState.IDLE, WorkerState.ERROR, WorkerState.STARTING})
# Only a worker that finished loading may be moved: moving one mid-load would waste the load.
MOVABLE_STATES = frozenset({WorkerState.READY, WorkerState.BUSY})

Fits = Callable[[WorkerInfo, str], bool]


@dataclass(frozen=True)
class Demand:
    """Open work of one model ref."""

    queued: int = 0  # chunks waiting for a worker
    score: float = 0.0  # requests × (1 + priority) × (1 + age / AGE_WEIGHT_S), summed


@dataclass
class Decisions:
    """What the scheduler should do; ``changes`` is what ``store.workers.apply_assignments`` writes."""

    changes: list[tuple[str, str | None]] = field(default_factory=list)  # (worker, ref or None), in order
    assigned: list[tuple[str, str]] = field(default_factory=list)  # idle worker → ref
    moved: list[tuple[str, str, str]] = field(default_factory=list)  # (worker, from ref, to ref)
    withdrawn: list[tuple[str, str]] = field(default_factory=list)  # (worker, ref it failed to load)
    fail: dict[str, str] = field(default_factory=dict)  # ref → message: fail its queued chunks
    demand: dict[str, Demand] = field(default_factory=dict)


def demand_of(work: Iterable[OpenWork]) -> dict[str, Demand]:
    """Demand per model ref from ``store.cluster.open_work`` rows (one per ref, status and priority)."""
    queued: dict[str, int] = {}
    score: dict[str, float] = {}
    for w in work:
        queued[w.model] = queued.get(w.model, 0) + (w.chunks if w.status == ChunkStatus.QUEUED else 0)
        weight = (1 + max(0, w.priority)) * (1 + max(0.0, w.oldest_age) / AGE_WEIGHT_S)
        score[w.model] = score.get(w.model, 0.0) + w.requests * weight
    return {ref: Demand(queued[ref], score[ref]) for ref in queued}


def failed_loads(workers: Iterable[WorkerInfo],
                 earlier: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, dict[str, str]]:
    """Refs each worker failed to load (worker → ref → message): its row's ``load_failed_ref`` plus ``earlier``."""
    out = {name: dict(refs) for name, refs in (earlier or {}).items()}
    for w in workers:
        if w.load_failed_ref:
            out.setdefault(w.name, {})[w.load_failed_ref] = w.error or f"could not load {w.load_failed_ref}"
    return out


def assign(workers: Sequence[WorkerInfo], work: Iterable[OpenWork], fits: Fits,
           failed: Mapping[str, Mapping[str, str]] | None = None) -> Decisions:
    """Decide which ref each live worker should host (see the module docstring).

    Args:
        workers: the live workers.
        work: open work per ref, status and priority (``store.cluster.open_work``).
        fits: whether a worker can host a ref (the fit rule; see :func:`fit_predicate`).
        failed: refs workers failed to load before (worker name → ref → message), besides what each
            row's ``load_failed_ref`` says; the scheduler remembers them per worker process.

    Returns:
        The decisions; nothing is written.
    """
    out = Decisions(demand=demand_of(work))
    demand = out.demand
    bad = failed_loads(workers, failed)

    def ok(w: WorkerInfo, ref: str) -> bool:
        return ref not in bad.get(w.name, {}) and fits(w, ref)

    serving: dict[str, list[str]] = {}
    idle: list[WorkerInfo] = []
    current: dict[str, str] = {}  # worker → the ref it serves after this pass
    for w in workers:
        assigned = w.assigned_model
        if not w.pinned and assigned and assigned in bad.get(w.name, {}):
            out.changes.append((w.name, None))  # it could not load this: never let it retry forever
            out.withdrawn.append((w.name, assigned))
            assigned = None
        ref = w.model if w.pinned else (assigned or w.model)
        if ref and w.state != WorkerState.ERROR:
            serving.setdefault(ref, []).append(w.name)
            current[w.name] = ref
        elif not w.pinned and not w.model and not assigned and w.state in IDLE_STATES:
            idle.append(w)

    def give(w: WorkerInfo, ref: str) -> None:
        out.changes.append((w.name, ref))
        serving.setdefault(ref, []).append(w.name)
        current[w.name] = ref

    # Idle workers: the ref with most unserved demand first; for it, the smallest idle worker that fits.
    while idle:
        best: tuple[tuple[bool, float, str], str, list[WorkerInfo]] | None = None
        for ref, d in demand.items():
            n = len(serving.get(ref, []))
            candidates = [w for w in idle if ok(w, ref)] if d.queued > n else []
            key = (n == 0, d.score / (n + 1), ref)  # the ref breaks ties, so the outcome never depends on order
            if candidates and (best is None or key > best[0]):
                best = (key, ref, candidates)
        if best is None:
            break
        _, ref, candidates = best
        w = min(candidates, key=_size_key)
        give(w, ref)
        idle.remove(w)
        out.assigned.append((w.name, ref))

    # Loaded workers move to refs with queued work and no worker, most demanded first.
    def queued(ref: str) -> int:
        return demand[ref].queued if ref in demand else 0

    def can_move(w: WorkerInfo, ref: str) -> bool:
        cur = current.get(w.name, "")
        if w.pinned or w.state not in MOVABLE_STATES or cur in ("", ref):
            return False
        return (queued(cur) == 0 or len(serving.get(cur, [])) > 1) and ok(w, ref)

    uncovered = sorted((r for r, d in demand.items() if d.queued and not serving.get(r)), key=lambda r: (-demand[r].score, r))
    for ref in uncovered:
        movable = [w for w in workers if can_move(w, ref)]
        if not movable:
            continue
        w = min(movable, key=lambda w: (queued(current[w.name]) > 0, *_size_key(w)))
        old = current[w.name]
        serving[old].remove(w.name)
        give(w, ref)
        out.moved.append((w.name, old, ref))

    # A ref nobody can take: every live worker that could host it failed to load it.
    live = {w.name for w in workers}
    for ref, d in sorted(demand.items()):
        if not d.queued or serving.get(ref):
            continue
        msgs = [f"{name}: {refs[ref]}" for name, refs in sorted(bad.items()) if ref in refs and name in live]
        hostable = any(ok(w, ref) for w in workers if not w.pinned or w.model == ref)
        if msgs and not hostable:
            out.fail[ref] = f"no worker could load {ref} ({'; '.join(msgs)})"
    return out


def fit_predicate(settings: Settings, catalog: Catalog) -> Fits:
    """The fit rule as a ``fits(worker, ref)`` predicate, memoized per worker process and ref.

    A ref the catalog no longer knows, or a malformed worker row, fits nowhere (it is never placed).
    """
    cache: dict[tuple[str, str | None, str], bool] = {}
    kw = fit_kwargs(settings)

    def fits(w: WorkerInfo, ref: str) -> bool:
        key = (w.name, w.instance, ref)
        if key not in cache:
            try:
                spec, variant = catalog.resolve(ref)
                cache[key] = variant is not None and estimate(spec, variant, row_capacity(w), **kw).fits
            except (BatchLLMError, ValueError, TypeError):
                cache[key] = False
        return cache[key]

    return fits


def _size_key(w: WorkerInfo) -> tuple[int, str]:
    """Smallest first; only called on workers that passed the fit check, so the row is well formed."""
    return (row_capacity(w).capacity_bytes, w.name)
