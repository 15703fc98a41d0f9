"""Batch commands: submit, status, results, cancel, retry."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from batchllm.cli.common import err_console, json_option, open_out, print_json, progress, settings


def _write_results(batch_id: str, out: str | None, errors: str | None, meta: bool = False) -> Any:
    from batchllm.services.export import export

    with open_out(out) as fo, open_out(errors) as fe:
        return export(settings(), batch_id, fo or sys.stdout, fe, meta=meta)


def _wait_with_bar(batch_id: str, quiet: bool) -> dict[str, Any]:
    from batchllm.services.status import wait

    if quiet:
        return wait(settings(), batch_id)
    with progress() as bar:
        task = bar.add_task(batch_id, total=None, detail="")

        def update(v: dict[str, Any]) -> None:
            c = v["request_counts"]
            bar.update(
                task, total=c["total"], completed=c["completed"] + c["failed"], detail=f"{v['status']} · {c['failed']} failed"
            )

        return wait(settings(), batch_id, update)


@click.command()
@click.argument("file")
@click.option("--model", "-m", help="Default model for lines that name none (catalog name, alias or local dir).")
@click.option("--name", help="A label for the batch.")
@click.option("--priority", type=click.IntRange(0, 9), default=0, show_default=True, help="9 overtakes 0.")
@click.option("--strict", is_flag=True, help="Reject the whole file (exit 2) if any line is invalid.")
@click.option("--idempotency-key", help="Same key → the existing batch is returned, not a second one.")
@click.option("--completion-window", help="Expire the batch after this long, e.g. 24h (default from settings).")
@click.option("--queue-anyway", is_flag=True, help="Queue work even if no known worker can host its model.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the batch to finish (exit 3 some failed, 4 failed).")
@click.option("-o", "--output", help="With --wait: write the results here.")
@click.option("--errors", help="With --wait: write error lines here (default: into the output).")
@json_option
def submit(
    file: str,
    model: str | None,
    name: str | None,
    priority: int,
    strict: bool,
    idempotency_key: str | None,
    completion_window: str | None,
    queue_anyway: bool,
    wait_: bool,
    output: str | None,
    errors: str | None,
    as_json: bool,
) -> None:
    """Submit a JSONL FILE (or - for stdin) of requests; prints the batch id."""
    from batchllm.queue import check_broker, producer
    from batchllm.services.status import batch_view, raise_for_outcome
    from batchllm.services.submit import submit_file
    from batchllm.store.db import check_database

    if (output or errors) and not wait_:
        raise click.UsageError("-o/--errors need --wait (or use `batchllm results BATCH -o FILE`)")
    st = settings()
    check_database(st.database_url)
    app = producer(st)
    check_broker(app)
    res = submit_file(
        st,
        file,
        app=app,
        model=model,
        name=name,
        priority=priority,
        strict=strict,
        idempotency_key=idempotency_key,
        queue_anyway=queue_anyway,
        completion_window=completion_window,
    )
    if not as_json:
        if res.existing:
            err_console.print(f"idempotency key matches existing batch {res.batch_id}; nothing new stored")
        else:
            models = ", ".join(f"{k} → {v}" for k, v in res.models.items()) or "none"
            err_console.print(
                f"{res.total} requests ({res.invalid} invalid, {res.blank} blank lines skipped), "
                f"{res.chunks} chunks; models: {models}"
            )
            for e in res.errors[:5]:
                err_console.print(f"  {file}:{e.line_no}: {e.message}", markup=False, highlight=False)
            if res.invalid > 5:
                err_console.print(f"  … and {res.invalid - 5} more; see the errors output")
        click.echo(res.batch_id)
        _warn_if_unserved(res.models.values())
    if not wait_:
        if as_json:
            print_json(
                {
                    "batch_id": res.batch_id,
                    "existing": res.existing,
                    "total": res.total,
                    "invalid": res.invalid,
                    "blank_lines": res.blank,
                    "chunks": res.chunks,
                    "models": res.models,
                }
            )
        return
    final = _wait_with_bar(res.batch_id, as_json)
    if output or errors:
        _write_results(res.batch_id, output, errors)
    if as_json:
        print_json(batch_view(st, res.batch_id))
    raise_for_outcome(final)


def _warn_if_unserved(refs: Any) -> None:
    """Say so when no live worker runs (or can be assigned) the batch's models, instead of a silent wait."""
    from batchllm.store import workers as rows
    from batchllm.store.db import session_scope

    st = settings()
    with session_scope(st.database_url) as s:
        live = rows.live_workers(s, st.heartbeat_timeout)
    unpinned = any(not w.pinned for w in live)
    for ref in sorted(set(refs)):
        if not any(w.model == ref for w in live) and not unpinned:
            err_console.print(
                f"note: no live worker runs {ref} yet; start `batchllm worker --model {ref.split('@')[0]}` "
                "(or unpinned workers plus `batchllm scheduler`)",
                highlight=False,
            )


@click.command()
@click.argument("batch_id", required=False)
@click.option("--watch", is_flag=True, help="Keep showing progress until the batch(es) finish.")
@click.option("--all", "show_all", is_flag=True, help="Show finished batches too.")
@json_option
def status(batch_id: str | None, watch: bool, show_all: bool, as_json: bool) -> None:
    """Show a batch (or recent batches) with request counts and progress."""
    from batchllm.services.status import batch_view, recent

    st = settings()
    if batch_id and watch and not as_json:
        v = _wait_with_bar(batch_id, False)
        click.echo(f"{v['id']}: {v['status']}")
        return
    if watch:
        while True:
            views = [batch_view(st, batch_id)] if batch_id else recent(st, active_only=not show_all)
            _show(views, as_json)
            if all(v["status"] in ("completed", "failed", "cancelled", "expired") for v in views):
                return
            time.sleep(2)
    views = [batch_view(st, batch_id)] if batch_id else recent(st, active_only=False)
    _show(views if batch_id or show_all else views[:20], as_json)


def _show(views: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print_json(views[0] if len(views) == 1 else views)
        return
    from rich.table import Table

    t = Table("batch", "status", "progress", "completed", "failed", "total", "models", "name")
    for v in views:
        c = v["request_counts"]
        done = c["completed"] + c["failed"]
        pct = 100.0 * done / c["total"] if c["total"] else 100.0
        filled = int(pct / 5)
        t.add_row(
            v["id"],
            v["status"],
            f"{'█' * filled}{'░' * (20 - filled)} {pct:5.1f}%",
            str(c["completed"]),
            str(c["failed"]),
            str(c["total"]),
            ", ".join(sorted(set((v["models"] or {}).values()))),
            v["name"] or "",
        )
    from rich.console import Console

    Console().print(t)


@click.command()
@click.argument("batch_id")
@click.option("-o", "--output", help="Write output lines here (default stdout).")
@click.option("--errors", help="Write error lines here (default: into the output, in input order).")
@click.option("--meta", is_flag=True, help="Add worker, device, model and latency to each line.")
def results(batch_id: str, output: str | None, errors: str | None, meta: bool) -> None:
    """Write a batch's results as OpenAI Batch JSONL, in input order."""
    counts = _write_results(batch_id, output, errors, meta)
    if output and output != "-":
        err_console.print(
            f"{counts.outputs} results, {counts.errors} errors"
            + (f", {counts.pending} still pending" if counts.pending else "")
            + f" → {output}"
        )
    elif counts.pending:
        err_console.print(f"{counts.pending} requests still pending")


@click.command()
@click.argument("batch_id")
@json_option
def cancel(batch_id: str, as_json: bool) -> None:
    """Cancel a batch: dispatch stops at once; finished results stay readable."""
    from batchllm.services.status import batch_view
    from batchllm.store.batches import cancel as cancel_batch
    from batchllm.store.db import session_scope

    st = settings()
    with session_scope(st.database_url) as s:
        cancel_batch(s, batch_id)
    v = batch_view(st, batch_id)
    print_json(v) if as_json else click.echo(f"{batch_id}: {v['status']}")


@click.command()
@click.argument("batch_id")
@json_option
def retry(batch_id: str, as_json: bool) -> None:
    """Run a batch's failed requests again."""
    from batchllm.queue import check_broker, producer
    from batchllm.services.submit import dispatch_batch
    from batchllm.store.batches import retry_failed
    from batchllm.store.db import session_scope

    st = settings()
    app = producer(st)
    check_broker(app)
    with session_scope(st.database_url) as s:
        chunks = retry_failed(s, batch_id, st.chunk_size)
        n = sum(c.size for c in chunks)
    dispatch_batch(st, app, batch_id)
    print_json({"batch_id": batch_id, "requeued": n}) if as_json else click.echo(f"{batch_id}: {n} request(s) queued again")


COMMANDS = [submit, status, results, cancel, retry]
