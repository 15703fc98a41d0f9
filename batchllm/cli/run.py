"""``batchllm run``: the embedded default (no Redis, no database server)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from batchllm.cli.common import EXIT_NOW, err_console, json_option, print_json, progress, set_settings, settings


@click.command()
@click.argument("file")
@click.option("-o", "--output", help="Write the successes here (default stdout).")
@click.option("--errors", help="Write the failures here (default: OUTPUT with .errors.jsonl).")
@click.option("--combined", is_flag=True, help="Failures go into the output too, in input order.")
@click.option("--model", "-m", help="Default model for lines that name none.", default="smollm2-135m-instruct", show_default=True)
@click.option("--db", help="SQLite file (or database URL) to keep the batch in; default under the data dir.")
@click.option("--idempotency-key", help="Resume key (default: the file's content hash plus model).")
@json_option
def run(file: str, output: str | None, errors: str | None, combined: bool, model: str, db: str | None,
        idempotency_key: str | None, as_json: bool) -> None:
    """Run FILE to completion on this machine: SQLite + in-process queue + local GPU (or CPU).

    Interrupt it and run the same command again: finished requests are not recomputed.
    """
    import logging

    from batchllm.cli.batch import write_results
    from batchllm.services.embedded import embedded_settings, run_file
    from batchllm.services.status import raise_for_outcome, to_openai

    st = embedded_settings(settings(), db)
    if not logging.getLogger().isEnabledFor(logging.INFO):
        # One person at a terminal: vLLM's start-up chatter and warnings stay out of the progress bar (-v shows them).
        st = st.model_copy(update={"engine_log_level": "ERROR"})
    set_settings(st)
    with progress() as bar:
        task = bar.add_task("starting", total=None, detail="")

        def stage(text: str) -> None:
            bar.update(task, description=text)

        def update(b: Any) -> None:
            c = b.counts
            bar.update(task, total=c.total, completed=c.completed + c.failed, detail=f"{c.failed} failed")

        outcome = run_file(st, file, model=model, idempotency_key=idempotency_key, on_update=update, on_stage=stage)
    b = outcome.batch
    write_results(b.id, output, errors, combined)
    c = b.counts
    if as_json:
        print_json(to_openai(b))
    else:
        where = f" → {output}" if output else ""
        resumed = " (resumed)" if outcome.resumed else ""
        err_console.print(f"batch {b.id}{resumed}: {c.completed} completed, {c.failed} failed of {c.total}{where}")
        if output and output != "-":
            _preview(output)
    if "vllm" in sys.modules:  # no idle tail: vLLM's and torch's interpreter teardown takes seconds
        click.get_current_context().meta[EXIT_NOW] = True
    raise_for_outcome(b)


def _preview(path: str, n: int = 3) -> None:
    """Show the first few answers so a person sees real output at once."""
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= n:
                    break
                rec = json.loads(line)
                body = (rec.get("response") or {}).get("body") or {}
                choice = (body.get("choices") or [{}])[0]
                text = (
                    (choice.get("message") or {}).get("content")
                    or choice.get("text")
                    or (rec.get("error") or {}).get("message", "")
                )
                err_console.print(f"  [bold]{rec['custom_id']}[/bold]: {' '.join(str(text).split())[:160]}", highlight=False)
    except (OSError, ValueError):
        pass


COMMANDS = [run]
