"""Alembic migrations on fresh PostgreSQL and SQLite through the real CLI, and data carried over from 0001."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest
from openai.types import Batch
from openai.types.chat import ChatCompletion
from sqlalchemy import create_engine, inspect, text

from batchllm.services.export import export
from batchllm.services.status import to_openai
from batchllm.settings import Settings
from batchllm.store import batches
from batchllm.store.db import head_revision, upgrade
from tests.conftest import _create_pg_database, _drop_pg_database, run_cli

TABLES = {"batches", "requests", "chunks", "results", "workers", "schedules", "scheduler_lease", "alembic_version"}


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
        assert cur.stdout.strip().endswith(str(head_revision()))
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
    assert run_cli(["db", "current"], env).stdout.strip().endswith(str(head_revision()))


def test_batches_of_the_first_schema_survive_the_upgrade(tmp_path: Path) -> None:
    """A completed batch stored by 0001 (old body and answer columns) exports as OpenAI output after upgrading."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0001")
    engine = create_engine(url)
    old_body = {"messages": [{"role": "user", "content": "Hi"}], "prompt": None, "params": {"max_tokens": 8}}
    with engine.begin() as c:
        c.execute(text("INSERT INTO batches (id, status, priority, total, invalid, blank_lines, created_at, started_at, "
                       "finished_at, models) VALUES ('batch_old', 'completed', 0, 2, 1, 0, 100.0, 101.0, 105.0, "
                       "'{\"smollm2\": \"smollm2@bf16\"}')"))
        c.execute(text("INSERT INTO requests (id, batch_id, line_no, custom_id, model, kind, chunk_id, body) VALUES "
                       "(1, 'batch_old', 1, 'a', 'smollm2', 'chat', 'ck1', :b)"), {"b": json.dumps(old_body)})
        c.execute(text("INSERT INTO requests (id, batch_id, line_no, custom_id, model, error_code, error_message) VALUES "
                       "(2, 'batch_old', 2, 'b', 'smollm2', 'invalid_json', 'line 2: invalid JSON')"))
        c.execute(text("INSERT INTO chunks (id, batch_id, model, queue, seq, size, priority, status, attempts, created_at) "
                       "VALUES ('ck1', 'batch_old', 'smollm2@bf16', 'q', 1, 1, 0, 'done', 1, 100.0)"))
        c.execute(text("INSERT INTO results (request_id, batch_id, ok, status_code, text, finish_reason, prompt_tokens, "
                       "completion_tokens, model, attempt, created_at) VALUES (1, 'batch_old', 1, 200, 'Hello!', 'stop', "
                       "5, 3, 'smollm2@bf16', 1, 104.0)"))
    engine.dispose()
    upgrade(url)
    with create_engine(url).connect() as c:
        body = json.loads(c.execute(text("SELECT body FROM requests WHERE id = 1")).scalar_one())
    assert body == {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    b = batches.get(url, "batch_old")
    Batch.model_validate(to_openai(b))
    assert b.completed_at == 105.0 and b.in_progress_at == 101.0
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    with out.open("wb") as fo, err.open("wb") as fe:
        counts = export(Settings(database_url=url, data_dir=tmp_path), "batch_old", fo, fe)
    assert (counts.outputs, counts.errors) == (1, 1)
    line = msgspec.json.decode(out.read_bytes().splitlines()[0])
    completion = ChatCompletion.model_validate(line["response"]["body"])
    assert completion.choices[0].message.content == "Hello!" and completion.usage is not None
    assert completion.usage.total_tokens == 8
    assert json.loads(err.read_text())["response"]["status_code"] == 400
