"""Helpers shared by the commands: settings, JSON output, progress bars, output files."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from batchllm.errors import InputError
from batchllm.settings import Settings, get_settings

err_console = Console(stderr=True)

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")


def settings() -> Settings:
    """The process settings (environment + batchllm.toml)."""
    return get_settings()


def print_json(data: Any) -> None:
    """Print JSON to stdout (UTF-8 kept as is)."""
    click.echo(json.dumps(data, ensure_ascii=False, indent=2, default=str))


def progress() -> Progress:
    """A rich progress bar on stderr (hidden automatically when stderr is not a terminal... unless forced)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )


@contextlib.contextmanager
def open_out(path: str | None) -> Iterator[IO[str] | None]:
    """Open an output file (``-`` or None → stdout for the main output), UTF-8, written atomically."""
    if path is None:
        yield None
        return
    if path == "-":
        yield sys.stdout
        return
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{target} is a directory; give a file path for the output")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    with tmp.open("w", encoding="utf-8") as f:
        yield f
    tmp.replace(target)
