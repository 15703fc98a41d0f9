"""``batchllm flower``: the Celery monitoring UI against the configured broker, behind basic auth.

Flower runs in this process (``flower.command.flower`` under a Celery CLI context built around our own
Celery app), not as a ``celery flower`` subprocess, for two reasons:

* the password never appears on a command line, so it cannot leak through ``ps`` or ``/proc/*/cmdline``;
  it goes straight into Flower's option object, which also keeps commas and colons in it intact
  (Flower's ``--basic-auth`` flag splits its value on commas);
* Flower sees the app from ``batchllm.queue.make_celery`` (JSON only, our transport options, queue names),
  exactly what the workers and the scheduler use.

Flower, Tornado and Celery's CLI are imported inside the command so that ``batchllm --help`` stays fast.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from batchllm.cli.common import settings
from batchllm.errors import InputError, mask_url

DEFAULT_PORT = 5555
# Loopback by default: Flower can revoke tasks and shut workers down, so exposing it is a deliberate act
# (``--address 0.0.0.0`` in the compose file and the systemd unit, where auth is always on).
DEFAULT_ADDRESS = "127.0.0.1"

NO_PASSWORD = (
    "set BATCHLLM_FLOWER_PASSWORD (and optionally BATCHLLM_FLOWER_USER) to start Flower with basic auth, "
    "or pass --no-auth to run it without authentication"
)


def _setting(name: str, fallback: Any) -> Any:
    # flower_port / flower_address are not Settings fields (yet); reading them this way lets the lead add
    # them to settings.py without this module changing, and keeps the flags' defaults sane until then.
    value = getattr(settings(), name, None)
    return fallback if value in (None, "") else value


def basic_auth_credential(user: str, password: str | None) -> str | None:
    """The ``user:password`` string Flower compares against the decoded ``Authorization`` header.

    Args:
        user: the basic-auth user name (``BATCHLLM_FLOWER_USER``).
        password: the password, or None/empty when none is configured.

    Returns:
        ``"user:password"``, or None when there is no password.

    Raises:
        InputError: the user name is empty or contains a colon (basic auth cannot carry it).
    """
    if not password:
        return None
    if not user or ":" in user:
        raise InputError("BATCHLLM_FLOWER_USER must be non-empty and must not contain ':' (HTTP basic auth)")
    return f"{user}:{password}"


def flower_argv(port: int, address: str, url_prefix: str | None) -> list[str]:
    """Tornado-style arguments for Flower (never the password: that is set on Flower's options directly).

    Args:
        port: the HTTP port.
        address: the address to bind.
        url_prefix: a path prefix when Flower sits behind a reverse proxy, or None.

    Returns:
        The argument list handed to ``flower.command.flower``.
    """
    argv = [f"--port={port}", f"--address={address}"]
    if url_prefix:
        argv.append(f"--url_prefix={url_prefix.strip('/')}")
    return argv


def _run_flower(app: Any, argv: list[str], credential: str | None) -> None:
    """Run Flower in this process until SIGTERM/SIGINT.

    Args:
        app: the Celery app whose broker Flower watches.
        argv: Flower's own (Tornado) options, see ``flower_argv``.
        credential: ``user:password`` for basic auth, or None for no auth.
    """
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery as celery_group
    from flower.command import flower as flower_cmd
    from tornado.options import options

    # Flower's parser only overwrites the options named on its command line, env (FLOWER_*) or
    # flowerconfig.py, so this survives its parsing; an operator's explicit FLOWER_BASIC_AUTH still wins.
    options.basic_auth = [credential] if credential else []

    # Flower's banner (URL, masked broker, registered tasks) is logged at INFO; the CLI's root logger sits at
    # WARNING unless -v, so raise only Flower's own logger so the journal shows where it listens.
    flower_log = logging.getLogger("flower")
    if not flower_log.isEnabledFor(logging.INFO):
        flower_log.setLevel(logging.INFO)

    # The flower command reads ``ctx.obj.app`` and inspects its parent (the ``celery`` group) to warn about
    # misplaced Celery flags, so it must run as a subcommand of a celery context that carries our app.
    obj = CLIContext(app=app, no_color=True, workdir=None, quiet=False)
    with click.Context(celery_group, info_name="celery", obj=obj) as parent:
        sub = flower_cmd.make_context("flower", list(argv), parent=parent)
        with sub:
            flower_cmd.invoke(sub)


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), default=None, help=f"HTTP port.  [default: {DEFAULT_PORT}]")
@click.option(
    "--address",
    default=None,
    help=f"Address to bind; 0.0.0.0 to reach it from other machines.  [default: {DEFAULT_ADDRESS}]",
)
@click.option("--url-prefix", default=None, help="Path prefix when Flower is served behind a reverse proxy (e.g. flower).")
@click.option(
    "--no-auth",
    is_flag=True,
    help="Allow starting without BATCHLLM_FLOWER_PASSWORD, i.e. with no authentication (anyone who can reach the "
    "port can revoke tasks and shut workers down). A configured password is still enforced.",
)
def flower(port: int | None, address: str | None, url_prefix: str | None, no_auth: bool) -> None:
    """Start Flower (Celery monitoring UI) against BATCHLLM_BROKER_URL.

    Basic auth is BATCHLLM_FLOWER_USER / BATCHLLM_FLOWER_PASSWORD; without a password Flower refuses to
    start unless --no-auth is given.
    """
    s = settings()
    password = s.flower_password.get_secret_value() if s.flower_password is not None else None
    credential = basic_auth_credential(s.flower_user, password)
    if credential is None and not no_auth:
        raise InputError(NO_PASSWORD)

    from batchllm.queue import check_broker, make_celery

    app = make_celery(s)
    # Fail fast with exit 5 and the masked URL instead of Flower retrying silently behind a blank page;
    # systemd / compose restart it once Redis is up.
    check_broker(app)

    port = port or int(_setting("flower_port", DEFAULT_PORT))
    address = address or str(_setting("flower_address", DEFAULT_ADDRESS))
    auth = f"basic auth as {s.flower_user!r}" if credential else "NO authentication (--no-auth)"
    url = f"http://{address or '0.0.0.0'}:{port}/{(url_prefix or '').strip('/')}"
    click.echo(f"Flower on {url} ({auth}); broker {mask_url(s.broker_url)}", err=True)
    if credential is None:
        click.echo("warning: Flower is running without authentication", err=True)
    _run_flower(app, flower_argv(port, address, url_prefix), credential)


COMMANDS = [flower]
