"""Batch commands: submit, status, results, cancel, retry."""

from __future__ import annotations

import time
from typing import Any

import click

from batchllm.cli.common import err_console, errors_path, json_option, open_out, parse_pairs, print_json, progress, settings
from batchllm.errors import ServiceUnavailable


def write_results(batch_id: str, out: str | None, errors: str | None, combined: bool = False, meta: bool = False,
                  partial: bool = False) -> Any:
    """Write a batch's output (and error) lines; say where they went."""
    from batchllm.services.export import check_finished, export

    st = settings()
    check_finished(st, batch_id, partial)
    err_to = errors_path(out, errors, combined)
    with open_out(out or "-") as fo, open_out(err_to) as fe:
        counts = export(st, batch_id, fo, fe, meta=meta, combined=combined)
    where = "" if out in (None, "-") else f" → {out}"
    err_where = (" (in the output)" if combined else f" → {err_to}" if err_to
                 else " (not written: give --errors FILE or --combined)")
    msg = f"{counts.outputs} results{where}, {counts.errors} errors{err_where if counts.errors else ''}"
    err_console.print(msg + (f", {counts.pending} still pending" if counts.pending else ""), highlight=False)
    return counts


def _wait_with_bar(batch_id: str, quiet: bool) -> Any:
    from batchllm.services.status import wait

    if quiet:
        return wait(settings(), batch_id)
    with progress() as bar:
        task = bar.add_task(batch_id, total=None, detail="")

        def update(b: Any) -> None:
            c = b.counts
            bar.update(task, total=c.total, completed=c.completed + c.failed, detail=f"{b.status} · {c.failed} failed")

        return wait(settings(), batch_id, update)


@click.command()
@click.argument("file")
@click.option("--model", "-m", help="Default model for lines that name none (catalog name, alias or local dir).")
@click.option("--name", help="A label for the batch.")
@click.option("--priority", type=click.IntRange(0, 9), default=0, show_default=True, help="9 overtakes 0.")
@click.option("--strict", is_flag=True, help="Reject the whole file (exit 2, nothing stored) if any line is invalid.")
@click.option("--idempotency-key", help="Same key → the existing batch is returned, not a second one.")
@click.option("--completion-window", help="Expire the batch after this long, e.g. 24h (default from settings).")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="OpenAI batch metadata (up to 16 pairs).")
@click.option("--queue-anyway", is_flag=True, help="Queue work even if no known worker can host its model.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the batch to finish (exit 3 some failed, 4 failed).")
@click.option("-o", "--output", help="With --wait: write the successes here.")
@click.option("--errors", help="With --wait: write the failures here (default: OUTPUT with .errors.jsonl).")
@click.option("--combined", is_flag=True, help="With --wait: failures go into the output too, in input order.")
@json_option
def submit(file: str, model: str | None, name: str | None, priority: int, strict: bool, idempotency_key: str | None,
           completion_window: str | None, metadata: tuple[str, ...], queue_anyway: bool, wait_: bool, output: str | None,
           errors: str | None, combined: bool, as_json: bool) -> None:
    """Submit a JSONL FILE (or - for stdin) of requests; prints the batch id as soon as it is stored."""
    from batchllm.queue import check_broker, producer
    from batchllm.services.status import raise_for_outcome, to_openai
    from batchllm.services.submit import dispatch_new, submit_file
    from batchllm.store.db import check_database

    if (output or errors or combined) and not wait_:
        raise click.UsageError("-o/--errors/--combined need --wait (or use `batchllm results BATCH -o FILE`)")
    st = settings()
    check_database(st.database_url)
    app = producer(st)
    check_broker(app)  # refuse before storing anything when Redis is down
    res = submit_file(st, file, model=model, name=name, priority=priority, strict=strict, idempotency_key=idempotency_key,
                      queue_anyway=queue_anyway, completion_window=completion_window,
                      metadata=parse_pairs(metadata, "--metadata"))
    if not as_json:
        click.echo(res.batch_id)  # first, so a script has the id whatever happens next
        _summary(file, res)
    if not res.existing:
        try:
            res.dispatched = dispatch_new(st, app, res.batch_id)
        except ServiceUnavailable as e:
            raise ServiceUnavailable("Redis", st.broker_url, f"batch {res.batch_id} is stored; its chunks are sent "
                                     f"when Redis is back (by `batchllm scheduler`) — {e.message}") from e
    if not wait_:
        if as_json:
            print_json({"batch_id": res.batch_id, "existing": res.existing, "status": res.status, "total": res.total,
                        "invalid": res.invalid, "blank_lines": res.blank, "chunks": res.chunks, "models": res.models})
        else:
            _warn_if_unserved(res.models.values())
        return
    final = _wait_with_bar(res.batch_id, as_json)
    if output or errors:
        write_results(res.batch_id, output, errors, combined)
    if as_json:
        print_json(to_openai(final))
    raise_for_outcome(final)


def _summary(file: str, res: Any) -> None:
    if res.existing:
        err_console.print(f"idempotency key matches existing batch {res.batch_id}; nothing new stored")
        return
    models = ", ".join(f"{k} → {v}" for k, v in res.models.items()) or "none"
    err_console.print(f"{res.total} requests ({res.invalid} invalid, {res.blank} blank lines skipped), {res.chunks} chunks; "
                      f"models: {models}", highlight=False)
    for e in res.errors[:5]:
        err_console.print(f"  {file}:{e.line_no}: {e.message}", markup=False, highlight=False)
    if res.invalid > 5:
        err_console.print(f"  … and {res.invalid - 5} more; see the errors output")
    if res.status == "failed":
        err_console.print("no valid line: the batch failed (its errors are in `batchllm status BATCH --json`)")


def _warn_if_unserved(refs: Any) -> None:
    """Say so when no live worker runs (or can be assigned) the batch's models, instead of a silent wait."""
    from batchllm.store import workers as rows

    st = settings()
    live = rows.live_workers(st.database_url, st.heartbeat_timeout)
    unpinned = any(not w.pinned for w in live)
    for ref in sorted(set(refs)):
        if not any(w.model == ref for w in live) and not unpinned:
            err_console.print(f"note: no live worker runs {ref} yet; start `batchllm worker --model {ref.split('@')[0]}` "
                              "(or unpinned workers plus `batchllm scheduler`)", highlight=False)


@click.command()
@click.argument("batch_id", required=False)
@click.option("--watch", is_flag=True, help="Keep showing progress until the batch(es) finish.")
@click.option("--all", "show_all", is_flag=True, help="Show finished batches too (the default list shows the last 20).")
@json_option
def status(batch_id: str | None, watch: bool, show_all: bool, as_json: bool) -> None:
    """Show a batch (or recent batches) with request counts and progress; --json prints OpenAI's Batch object."""
    from batchllm.services.status import to_openai
    from batchllm.store import batches

    st = settings()
    if batch_id and watch and not as_json:
        b = _wait_with_bar(batch_id, False)
        click.echo(f"{b.id}: {b.status}")
        return
    while True:
        found = [batches.refresh(st.database_url, batch_id)] if batch_id else \
            batches.listing(st.database_url, limit=1000 if show_all else 20, active_only=watch and not show_all)
        if as_json:
            objs = [to_openai(b) for b in found]
            print_json(objs[0] if batch_id else objs)
        else:
            _show(found)
        if not watch or all(b.terminal for b in found):
            return
        time.sleep(2)


def _show(found: list[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("batch", "status", "progress", "completed", "failed", "total", "models", "name")
    for b in found:
        c = b.counts
        pct = 100.0 * (c.completed + c.failed) / c.total if c.total else 100.0
        filled = int(pct / 5)
        t.add_row(b.id, b.status, f"{'█' * filled}{'░' * (20 - filled)} {pct:5.1f}%", str(c.completed), str(c.failed),
                  str(c.total), ", ".join(sorted(set(b.models.values()))), b.name or "")
    Console().print(t)
    _show_scheduler()


def _show_scheduler() -> None:
    from batchllm.store import leader

    info = leader.current(settings().database_url)
    if info is not None and info.active:
        err_console.print(f"active scheduler: {info.host} pid {info.pid} (term {info.term})", highlight=False)
    else:
        err_console.print("no active scheduler (`batchllm scheduler` recovers lost work and fires schedules)", highlight=False)


@click.command()
@click.argument("batch_id")
@click.option("-o", "--output", help="Write the successes here (default stdout).")
@click.option("--errors", help="Write the failures here (default: OUTPUT with .errors.jsonl).")
@click.option("--combined", is_flag=True, help="Failures go into the output too, in input order.")
@click.option("--meta", is_flag=True, help="Add line, worker, device, model and latency to each line.")
@click.option("--partial", is_flag=True, help="Write what is done so far of a batch that is still running.")
@click.option("--embeddings-to", type=click.Path(dir_okay=False), help="Also write the embeddings as a .npy matrix "
              "(rows in input order; FILE.ids.txt names them).")
def results(batch_id: str, output: str | None, errors: str | None, combined: bool, meta: bool, partial: bool,
            embeddings_to: str | None) -> None:
    """Write a batch's results as OpenAI Batch JSONL, in input order (successes and failures apart)."""
    write_results(batch_id, output, errors, combined, meta, partial)
    if embeddings_to:
        from pathlib import Path

        from batchllm.services.embeddings import export_embeddings

        rows, dims = export_embeddings(settings(), batch_id, Path(embeddings_to))
        err_console.print(f"{rows} embeddings × {dims} dimensions → {embeddings_to}", highlight=False)


@click.command()
@click.argument("batch_id")
@json_option
def cancel(batch_id: str, as_json: bool) -> None:
    """Cancel a batch: dispatch stops at once; finished results stay readable."""
    from batchllm.services.status import to_openai
    from batchllm.store import batches

    b = batches.cancel(settings().database_url, batch_id)
    print_json(to_openai(b)) if as_json else click.echo(f"{batch_id}: {b.status}")


@click.command()
@click.argument("batch_id")
@json_option
def retry(batch_id: str, as_json: bool) -> None:
    """Run a finished batch's failed requests again (an expired batch gets a new completion window)."""
    from batchllm.queue import check_broker, producer, queue_name
    from batchllm.services.submit import dispatch_new, parse_window
    from batchllm.store import batches

    st = settings()
    app = producer(st)
    check_broker(app)
    window = parse_window(batches.get(st.database_url, batch_id).completion_window)
    r = batches.retry(st.database_url, batch_id, st.chunk_size, window, queue_name)
    dispatch_new(st, app, batch_id)
    if as_json:
        print_json({"batch_id": batch_id, "requeued": r.requests, "chunks": r.chunks})
    else:
        click.echo(f"{batch_id}: {r.requests} request(s) queued again")


COMMANDS = [submit, status, results, cancel, retry]
