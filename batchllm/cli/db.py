"""``batchllm db upgrade`` / ``batchllm db current`` (Alembic)."""

from __future__ import annotations

import click

from batchllm.cli.common import settings
from batchllm.errors import mask_url


@click.group()
def db() -> None:
    """Database schema (Alembic migrations); works on SQLite and PostgreSQL."""


@db.command()
@click.option("--revision", default="head", show_default=True)
def upgrade(revision: str) -> None:
    """Create or migrate the schema to REVISION."""
    from batchllm.store.db import current
    from batchllm.store.db import upgrade as run_upgrade

    url = settings().database_url
    run_upgrade(url, revision)
    click.echo(f"{mask_url(url)}: at revision {current(url)}")


@db.command(name="current")
def current_cmd() -> None:
    """Print the schema revision of the configured database."""
    from batchllm.store.db import current

    url = settings().database_url
    click.echo(f"{mask_url(url)}: {current(url) or 'not migrated (run `batchllm db upgrade`)'}")


COMMANDS = [db]
