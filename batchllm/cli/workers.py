"""Worker commands: ``batchllm worker`` (start one) and ``batchllm workers`` (list them)."""

from __future__ import annotations

from typing import Any

import click

from batchllm.cli.common import err_console, json_option, print_json, settings
from batchllm.errors import InputError


def _parse_gpus(gpus: str | None) -> list[int] | None:
    if not gpus:
        return None
    try:
        return [int(x) for x in gpus.split(",") if x.strip()]
    except ValueError as e:
        raise InputError(f"--gpus '{gpus}' is not a comma-separated list of GPU indices like 0,1") from e


@click.command()
@click.option("--gpus", help="GPU indices this worker uses together (tensor parallel), e.g. 0 or 0,1. Default: all.")
@click.option("--model", "-m", help="Pin a model (name or name@variant); without it the scheduler assigns one.")
@click.option("--cpu", is_flag=True, help="Run on the CPU (vLLM CPU backend) even if a GPU is present.")
@click.option(
    "--advertise-vram",
    help="Cap the memory this worker advertises, e.g. 16GB (a shared GPU, or a CPU "
    "standing in for a GPU of that size in placement tests).",
)
@click.option("--name", help="Worker name (default says what it is, e.g. gpu0-a10g-24gb@host).")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(gpus: str | None, model: str | None, cpu: bool, advertise_vram: str | None, name: str | None, loglevel: str) -> None:
    """Start a worker: one process per GPU (or GPU group) hosting one model under vLLM."""
    import socket
    import uuid

    from batchllm.placement.variants import identity_capacity, variant_for_worker
    from batchllm.sizes import parse_size
    from batchllm.store.db import check_database
    from batchllm.worker.devices import discover, worker_name
    from batchllm.worker.main import run_worker
    from batchllm.worker.runtime import WorkerIdentity

    st = settings()
    check_database(st.database_url)
    try:
        advertised = parse_size(advertise_vram) if advertise_vram else None
    except ValueError as e:
        raise InputError(f"--advertise-vram: {e}") from e
    devices = discover(cpu, _parse_gpus(gpus))
    total = sum(d.total_bytes for d in devices)
    capacity = min(total, advertised) if advertised else total
    identity = WorkerIdentity(
        name=name or worker_name(devices, capacity),
        instance=uuid.uuid4().hex,
        host=socket.gethostname(),
        kind=devices[0].kind,
        devices=[d.as_dict() for d in devices],
        memory_total_bytes=total,
        memory_free_bytes=sum(d.free_bytes for d in devices),
        advertised_bytes=advertised,
        tensor_parallel=len(devices) if devices[0].kind == "cuda" else 1,
        pinned=bool(model),
    )
    ref = None
    if model:
        from batchllm.catalog import load_catalog

        ref, est = variant_for_worker(st, load_catalog(st), model, identity_capacity(identity))
        err_console.print(f"{identity.name}: hosting {ref} ({est.reason})", highlight=False)
    else:
        err_console.print(f"{identity.name}: waiting for the scheduler to assign a model", highlight=False)
    raise SystemExit(run_worker(st, identity, ref, explicit_name=bool(name), loglevel=loglevel))


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Include workers whose heartbeat lapsed.")
@json_option
def workers(show_all: bool, as_json: bool) -> None:
    """List workers: host, devices, memory total/free, model, state, heartbeat age."""
    from batchllm.store import leader
    from batchllm.store import workers as rows
    from batchllm.store.db import check_database

    st = settings()
    check_database(st.database_url)
    recent = None if show_all else st.heartbeat_timeout * 10
    found = rows.all_workers(st.database_url, seen_within=recent)
    data: list[dict[str, Any]] = [
        {
            "name": w.name, "host": w.host, "pid": w.pid, "kind": w.kind, "devices": w.devices,
            "memory_total_bytes": w.memory_total_bytes, "memory_free_bytes": w.memory_free_bytes,
            "advertised_bytes": w.advertised_bytes, "model": w.model, "assigned_model": w.assigned_model,
            "state": w.state if w.heartbeat_age <= st.heartbeat_timeout or w.state == "stopped" else "lost",
            "error": w.error, "heartbeat_age_s": round(w.heartbeat_age, 1), "tokens_generated": w.tokens_generated,
            "requests_done": w.requests_done, "stale_writes_refused": w.stale_writes,
        }
        for w in found
    ]
    info = leader.current(st.database_url)
    scheduler = None if info is None or not info.active else {"host": info.host, "pid": info.pid, "term": info.term}
    if as_json:
        print_json({"workers": data, "active_scheduler": scheduler})
        return
    sched = f"active scheduler: {scheduler['host']} pid {scheduler['pid']}" if scheduler else "no active scheduler"
    if not data:
        click.echo(f"no live workers (start one with `batchllm worker`); {sched}")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("worker", "devices", "memory total", "free", "advertised", "model", "state", "heartbeat", "tokens")
    for w in data:
        devs = ", ".join(d.get("name", "?") for d in w["devices"])
        adv = f"{w['advertised_bytes'] / 1e9:.1f} GB" if w["advertised_bytes"] else "-"
        state = w["state"] + (f" ({w['error']})" if w["error"] else "")
        t.add_row(
            w["name"],
            devs,
            f"{w['memory_total_bytes'] / 1e9:.1f} GB",
            f"{w['memory_free_bytes'] / 1e9:.1f} GB",
            adv,
            w["model"] or "-",
            state,
            f"{w['heartbeat_age_s']:.0f}s ago",
            str(w["tokens_generated"]),
        )
    Console().print(t)
    err_console.print(sched, highlight=False)


COMMANDS = [worker, workers]
