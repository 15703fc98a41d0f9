"""The ``batchllm`` command line (click). Commands are thin: they parse flags and call services.

Every user-facing failure is a ``BatchLLMError`` with an exit code; this group turns it into one line
on stderr and that exit code, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from batchllm import __version__
from batchllm.cli.common import EXIT_NOW, exit_now
from batchllm.errors import BatchLLMError, mask_url


class BatchLLMGroup(click.Group):
    """A click group that maps batchllm errors to exit codes and one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            rv = super().invoke(ctx)
        except BatchLLMError as e:
            click.echo(f"error: {e.message}", err=True)
            _end(ctx, e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:  # an unexpected bug: still one line, full trace only with -v
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            click.echo(
                f"error: {type(e).__name__}: {mask_url(str(e)).splitlines()[0] if str(e) else ''} (rerun with -v for details)",
                err=True,
            )
            ctx.exit(1)
        _end(ctx, None)
        return rv


def _end(ctx: click.Context, code: int | None) -> None:
    """End a command: skip the interpreter's teardown when the command asked for it (``EXIT_NOW``), else exit
    with ``code`` (None: return normally)."""
    if ctx.meta.get(EXIT_NOW):
        exit_now(code or 0)
    if code is not None:
        ctx.exit(code)


@click.group(cls=BatchLLMGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchllm")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
def main(verbose: bool) -> None:
    """batchllm: batch inference for local LLMs (JSONL in, OpenAI Batch JSONL out).

    \b
    Quick start on one machine (no Redis, no database server):
      batchllm models pull smollm2-135m-instruct
      batchllm run examples/jobs.jsonl -o out.jsonl

    \b
    A cluster (PostgreSQL + Redis, workers on GPU hosts):
      batchllm db upgrade
      batchllm worker --gpus 0            # one per GPU; add `batchllm scheduler` once
      batchllm submit jobs.jsonl --wait -o out.jsonl
    """
    level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _register() -> None:
    from batchllm.cli import batch, db, keys, models, ops, run, scheduler, serve, workers

    for mod in (batch, db, keys, models, ops, run, scheduler, serve, workers):
        for cmd in mod.COMMANDS:
            main.add_command(cmd)


_register()
