"""Alembic migrations on a fresh PostgreSQL database and a fresh SQLite file, through the real CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from tests.conftest import _create_pg_database, _drop_pg_database, run_cli

TABLES = {"batches", "requests", "chunks", "results", "workers", "schedules", "alembic_version"}


@pytest.mark.services
def test_upgrade_fresh_postgresql() -> None:
    name = "batchllm_migrate_" + os.urandom(4).hex()
    url = _create_pg_database(name)
    try:
        env = dict(os.environ, BATCHLLM_DATABASE_URL=url)
        before = run_cli(["db", "current"], env)
        assert before.returncode == 0 and "not migrated" in before.stdout
        up = run_cli(["db", "upgrade"], env)
        assert up.returncode == 0, up.stderr
        cur = run_cli(["db", "current"], env)
        assert cur.stdout.strip().endswith("0001")
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        assert set(inspect(engine).get_table_names()) >= TABLES
        engine.dispose()
        assert run_cli(["db", "upgrade"], env).returncode == 0  # idempotent
    finally:
        _drop_pg_database(name)


def test_upgrade_fresh_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"
    env = dict(os.environ, BATCHLLM_DATABASE_URL=f"sqlite:///{db}")
    up = run_cli(["db", "upgrade"], env)
    assert up.returncode == 0, up.stderr
    assert set(inspect(create_engine(f"sqlite:///{db}")).get_table_names()) >= TABLES
    assert run_cli(["db", "current"], env).stdout.strip().endswith("0001")
