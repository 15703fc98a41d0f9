"""``batchllm keys``: API keys of ``batchllm serve`` (create prints the key once; only its hash is stored)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from batchllm.cli.common import json_option, print_json, settings
from batchllm.settings import Settings


def _where(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--db", help="With --local: the SQLite file (or URL) `serve --local --db` uses.")(f)
    return click.option("--local", is_flag=True, help="The keys of `batchllm serve --local` (its own SQLite file).")(f)


def _settings(local: bool, db: str | None) -> Settings:
    from batchllm.services.api.config import local_settings
    from batchllm.store.db import check_database

    st = local_settings(settings(), db) if local or db else settings()
    check_database(st.database_url)
    return st


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


@click.group()
def keys() -> None:
    """API keys for `batchllm serve` (Authorization: Bearer <key>)."""


@keys.command("create")
@click.argument("name")
@_where
@json_option
def create(name: str, local: bool, db: str | None, as_json: bool) -> None:
    """Create a key named NAME and print it once (it cannot be shown again: store it now)."""
    from batchllm.services.api.keys import create_key

    record, key = create_key(_settings(local, db), name)
    if as_json:
        print_json({"id": record.id, "name": record.name, "key": key})
        return
    click.echo(key)
    click.echo(f"created API key {record.name!r} ({record.id}); this is the only time it is shown", err=True)


@keys.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@_where
@json_option
def list_(include_revoked: bool, local: bool, db: str | None, as_json: bool) -> None:
    """The keys: name, id, prefix, created, last used (never the keys themselves)."""
    from batchllm.services.api.keys import list_keys

    rows = list_keys(_settings(local, db), include_revoked)
    if as_json:
        print_json([{"id": k.id, "name": k.name, "prefix": k.prefix, "created_at": int(k.created_at),
                     "last_used_at": None if k.last_used_at is None else int(k.last_used_at),
                     "revoked_at": None if k.revoked_at is None else int(k.revoked_at)} for k in rows])
        return
    if not rows:
        click.echo("no API keys; create one with `batchllm keys create NAME`", err=True)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("name", "id", "key", "created", "last used", *(["revoked"] if include_revoked else []))
    for k in rows:
        t.add_row(k.name, k.id, f"{k.prefix}…", _when(k.created_at), _when(k.last_used_at),
                  *([_when(k.revoked_at)] if include_revoked else []))
    Console().print(t)


@keys.command("revoke")
@click.argument("name_or_id")
@_where
def revoke(name_or_id: str, local: bool, db: str | None) -> None:
    """Revoke a key by NAME or ID; requests with it get 401 at once."""
    from batchllm.services.api.keys import revoke_key

    record = revoke_key(_settings(local, db), name_or_id)
    click.echo(f"revoked API key {record.name!r} ({record.id})", err=True)


COMMANDS = [keys]
