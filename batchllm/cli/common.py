"""Helpers shared by the commands: settings, JSON output, progress bars, output files."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NoReturn
from urllib.parse import quote, unquote

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from batchllm.errors import InputError
from batchllm.settings import Settings, get_settings

err_console = Console(stderr=True)

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")


_OVERRIDE: list[Settings] = []


def settings() -> Settings:
    """The process settings (environment + batchllm.toml), or what a command set for itself (``run``).

    Broker and database URLs whose password holds ``/``, ``@``, ``:``, ``?`` or ``#`` as written (base64 secrets
    do) are percent-encoded here, so Redis and the database get the password the user meant and every message
    can mask it, instead of the URL parser cutting the password in two and printing a piece of it.
    """
    if _OVERRIDE:
        return _OVERRIDE[-1]
    st = get_settings()
    urls = {k: quote_password(getattr(st, k)) for k in ("broker_url", "database_url")}
    if any(urls[k] != getattr(st, k) for k in urls):
        st = st.model_copy(update=urls)
    return st


# host (name, IPv4 or [IPv6]), then a port or a path: what follows the password of a server URL.
_SERVER = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._\-]+)(:\d+)?([/?].*)?$")


def quote_password(url: str) -> str:
    """``url`` with the user and password percent-encoded when the password holds characters URLs reserve.

    The password runs from the first ``:`` after ``scheme://`` to the *last* ``@`` (as ``errors.mask_url`` reads
    it). A URL whose password needs no quoting, or that has no password, is returned as it is.
    """
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return url
    userinfo, server = rest[:at], rest[at + 1 :]
    user, colon, password = userinfo.partition(":")
    if not colon or not re.search(r"[/@:?#\[\]]", password) or re.search(r"[/@?#]", user):
        return url
    m = _SERVER.match(server)
    if m is None or not (m.group(2) or m.group(3)):  # e.g. a query value holding '@', not a password
        return url
    return f"{scheme}://{quote(unquote(user), safe='')}:{quote(unquote(password), safe='')}@{server}"


def set_settings(st: Settings) -> None:
    """Use ``st`` for the rest of this command (the embedded mode's SQLite settings)."""
    _OVERRIDE.append(st)


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
def open_out(path: str | None) -> Iterator[IO[bytes] | None]:
    """Open an output file for bytes (``-`` → stdout, None → nothing), written atomically (temp file, rename)."""
    if path is None:
        yield None
        return
    if path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{target} is a directory; give a file path for the output")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    try:
        with tmp.open("wb") as f:
            yield f
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def errors_path(output: str | None, errors: str | None, combined: bool) -> str | None:
    """Where error lines go: ``--errors``, else OUT with an ``.errors.jsonl`` suffix (None: stdout output)."""
    if errors or combined or output in (None, "-"):
        return errors
    out = Path(output)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.stem
    return str(out.with_name(f"{stem}.errors.jsonl"))


def parse_pairs(pairs: tuple[str, ...], flag: str) -> dict[str, str] | None:
    """``k=v`` flags as a dict (``--metadata team=nlp``)."""
    out: dict[str, str] = {}
    for p in pairs:
        key, eq, value = p.partition("=")
        if not eq or not key:
            raise InputError(f"{flag} {p!r}: expected KEY=VALUE")
        out[key] = value
    return out or None


#: ``ctx.meta`` key a command sets when the process should skip the interpreter's teardown when it ends
#: (the CLI group then calls ``exit_now`` with the command's exit code).
EXIT_NOW = "batchllm.exit_now"


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` at once: flush the streams and logs, then skip the interpreter's teardown.

    After vLLM and torch were loaded the teardown (module and heap clean-up, library destructors) takes
    seconds and does nothing the caller needs: files and database transactions are closed, the engine is
    stopped. Only for commands that are done (``batchllm run``, through ``EXIT_NOW``); never call it from
    library code.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)
