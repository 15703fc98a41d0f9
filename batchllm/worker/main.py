"""``batchllm worker``: one process per GPU (or GPU group) that hosts one model under vLLM.

The process first takes a unique name (``identity.claim_name``), then loads its model — pinned with
``--model``, or the one the scheduler assigns — and consumes that model's queue. Switching models restarts
the process (``exec``), so the old engine's memory is surely gone before the new one loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery.signals import worker_ready

from batchllm.catalog import ModelSpec, Variant, load_catalog
from batchllm.errors import BatchLLMError, InputError, ModelLoadError
from batchllm.queue import make_celery, queue_name
from batchllm.settings import Settings
from batchllm.status import WorkerState
from batchllm.store import workers as worker_rows
from batchllm.store.db import check_database, end_idle_transactions_after
from batchllm.worker.identity import claim_name
from batchllm.worker.runtime import Hooks, WorkerIdentity, WorkerRuntime, set_runtime
from batchllm.worker.tasks import register_tasks

log = logging.getLogger(__name__)
IDLE_TX_LIMIT_S = 10.0  # a worker's transactions take milliseconds; one idle this long is frozen or cut off


def resolve_weights(settings: Settings, spec: ModelSpec, variant: Variant | None) -> str:
    """Where the engine loads weights from: a local directory, or a hub id vLLM resolves.

    Raises:
        ModelLoadError: a local model that was never pulled (the message says how to pull it).
    """
    source = spec.weights_for(variant) if variant else spec.source
    local = Path(source).expanduser()
    if local.is_dir():
        return str(local)
    if spec.pull:
        raise ModelLoadError(f"{spec.name} is not installed at {local}; run: batchllm models pull {spec.name}")
    if source.startswith(("/", "./", "~")):
        raise ModelLoadError(f"weights for {spec.name} not found at {source}; check the catalog entry or BATCHLLM_MODEL_DIR")
    return source  # a hub repo id; vLLM resolves it (offline machines need it in the HF cache)


def build_engine(settings: Settings, model_ref: str, kind: str, tp: int) -> Any:
    """Create and start the engine for ``model_ref`` (raises ``ModelLoadError``)."""
    from batchllm.worker.vllm_engine import VllmEngine
    from batchllm.worker.vllm_setup import EngineOptions

    spec, variant = load_catalog(settings).resolve(model_ref)
    cpu = kind == "cpu"
    engine = VllmEngine(EngineOptions(
        model_dir=resolve_weights(settings, spec, variant),
        served_name=spec.name,
        device="cpu" if cpu else "cuda",
        dtype=(variant.dtype if variant else "bfloat16") or "bfloat16",
        max_model_len=settings.engine_max_model_len or (spec.max_len_for(variant) if variant else spec.max_model_len),
        tensor_parallel=spec.engine_gpus(tp) if not cpu else 1,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enforce_eager=cpu if settings.enforce_eager is None else settings.enforce_eager,
        quantization=variant.quantization if variant else None,
        cpu_offload_gb=variant.cpu_offload_gb if variant else 0.0,
        cpu_kvcache_gb=settings.cpu_kvcache_gb if cpu else None,
        task=spec.task,
        log_level=settings.engine_log_level,
        max_num_seqs=settings.engine_max_num_seqs,
        trust_remote_code=spec.trust_remote_code,
    ))
    engine.start()  # loads the model
    return engine


def wait_for_assignment(settings: Settings, identity: WorkerIdentity, stop: threading.Event) -> str | None:
    """Heartbeat as idle until the scheduler writes an assignment into this worker's row."""
    log.info("worker %s idle, waiting for the scheduler to assign a model", identity.name)
    while not stop.is_set():
        try:
            beat = worker_rows.heartbeat(settings.database_url, identity.instance, state=WorkerState.IDLE)
            if not beat.registered:
                raise InputError(f"worker {identity.name}: another process took over this name; stopping")
            if beat.assigned_model:
                return beat.assigned_model
        except BatchLLMError as e:
            if isinstance(e, InputError):
                raise
            log.warning("heartbeat failed: %s", e)
        stop.wait(settings.heartbeat_interval)
    return None


def run_worker(settings: Settings, identity: WorkerIdentity, model_ref: str | None, explicit_name: bool,
               loglevel: str = "INFO") -> int:
    """Run until stopped: take a unique name, load the model, consume its queue, drain on SIGTERM.

    Args:
        settings: settings.
        identity: devices and memory of this worker; ``name`` is the wanted (or default) name.
        model_ref: ``name@variant`` when pinned with ``--model``; None waits for the scheduler.
        explicit_name: ``--name`` was given: refuse rather than pick another when a live worker holds it.
        loglevel: Celery's log level.

    Returns:
        The process exit code.
    """
    # Frozen inside a transaction, this process must not hold locks past half a lease (see the function).
    end_idle_transactions_after(min(IDLE_TX_LIMIT_S, settings.lease_seconds / 2))
    check_database(settings.database_url)
    identity.name = claim_name(settings, identity, explicit_name)
    _pin_gpus(identity)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while True:
        ref = model_ref or wait_for_assignment(settings, identity, stop)
        if ref is None:
            worker_rows.mark_stopped(settings.database_url, identity.instance)
            return 0
        try:
            with _beating(settings, identity, ref):  # loading takes seconds to minutes
                engine = build_engine(settings, ref, identity.kind, identity.tensor_parallel)
            break
        except (ModelLoadError, InputError) as e:
            worker_rows.record_load_failure(settings.database_url, identity.instance, ref, f"could not load {ref}: {e}")
            if model_ref:
                raise ModelLoadError(f"could not load {ref}: {e}") from e  # pinned: the CLI prints one line, exits 1
            log.error("worker %s could not load %s: %s", identity.name, ref, e)
            stop.wait(settings.heartbeat_interval)  # no crash loop: idle until given something else
    if stop.is_set():  # SIGTERM arrived while the model loaded: stop now rather than start consuming
        engine.stop()
        worker_rows.mark_stopped(settings.database_url, identity.instance)
        return 0
    return _serve(settings, identity, ref, engine, loglevel)


def _serve(settings: Settings, identity: WorkerIdentity, ref: str, engine: Any, loglevel: str) -> int:
    app = make_celery(settings)
    register_tasks(app)
    restart: list[str] = []

    def stop_for(reason: str) -> None:
        if not restart:
            restart.append(reason)
            log.info("worker %s: %s; draining", identity.name, reason)
            os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown: finish the current task, stop consuming

    hooks = Hooks(
        reassigned=lambda new: stop_for(f"scheduler moved it from {ref} to {new}"),
        engine_failed=lambda why: stop_for(f"engine failed ({why})"),
        identity_lost=lambda: stop_for("name taken over by another process"),
    )
    # "ready" means messages reach it: the row says loading until Celery's consumer runs (worker_ready).
    rt = WorkerRuntime(settings, identity, ref, engine, feed_depth=settings.feed_depth(), hooks=hooks,
                       state=WorkerState.LOADING)
    set_runtime(rt)
    worker_rows.heartbeat(settings.database_url, identity.instance, state=WorkerState.LOADING, model=ref, error=None,
                          load_failed_ref=None)
    worker_ready.connect(lambda **_: rt.mark_consuming(), weak=False, dispatch_uid="batchllm-worker-ready")
    rt.start_heartbeat()
    base, _, host = identity.name.partition("@")
    worker = app.Worker(
        # Flower shows the Celery node name: say device, memory and model there too.
        hostname=f"{base}+{ref.replace('@', '.')}@{host or identity.host}",
        queues=[queue_name(ref)], pool="solo", concurrency=1, loglevel=loglevel, without_gossip=True, without_mingle=True,
    )
    worker.start()
    rt.shutdown()
    if restart and not restart[0].startswith("name taken"):
        log.info("restarting %s", identity.name)
        # orig_argv keeps "-m batchllm": re-running __main__.py as a script would shadow stdlib modules.
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    return int(worker.exitcode or 0)


@contextlib.contextmanager
def _beating(settings: Settings, identity: WorkerIdentity, ref: str) -> Iterator[None]:
    """Heartbeat as ``loading`` from a thread while the body blocks (a model load), so nobody thinks we died."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                worker_rows.heartbeat(settings.database_url, identity.instance, state=WorkerState.LOADING, model=ref)
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
