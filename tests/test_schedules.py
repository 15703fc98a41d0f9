"""Recurring runs (``batchllm.services.schedules``) and the scheduler's commands, on real PostgreSQL.

Schedules fire on the database's clock, once per cron time, with idempotency keys and output names unique
per input path; one failing file, schedule or export never stops the others. Submitting and exporting go
through the real services (``services.submit.submit_file``, ``services.export.export``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from batchllm.cli import BatchLLMGroup
from batchllm.cli.scheduler import COMMANDS
from batchllm.services import schedules
from batchllm.settings import Settings, get_settings
from batchllm.store import batches
from batchllm.store import schedules as rows
from batchllm.store.db import now, session_scope
from tests.test_scheduler import complete

# The scheduler tests' fixtures (a database of this module's own, per-test settings), re-exported for pytest.
from tests.test_scheduler import db_url as db_url
from tests.test_scheduler import st as st

pytestmark = pytest.mark.services


def _jobs(path: Path, n: int = 3, extra: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"{path.stem}{i}", "prompt": "x"}) + "\n" for i in range(n)) + extra)


def test_schedule_fires_once_and_writes_output_once(st: Settings, tmp_path: Path) -> None:
    _jobs(tmp_path / "in" / "jobs.jsonl", extra="not json\n")
    out_dir = tmp_path / "out"
    schedules.add_schedule(st, "nightly", "0 2 * * *", str(tmp_path / "in" / "*.jsonl"), "small-smol", str(out_dir))
    hook = schedules.Schedules(st)
    later = now(st.database_url) + 3 * 86400  # the database's "now", three nights on
    assert hook.tick(None, later)["schedules_fired"] == ["nightly"]
    assert hook.tick(None, later)["schedules_fired"] == []
    rec = rows.get(st.database_url, "nightly")
    rows.record_firing(st.database_url, "nightly", 0.0, [], None)  # no-op: the firing time only grows
    with session_scope(st.database_url) as s:  # fire again for the same night (e.g. a restored database)
        s.execute(text("UPDATE schedules SET last_fired_at = NULL"))
    assert hook.tick(None, later)["schedules_fired"] == ["nightly"]
    assert len(batches.listing(st.database_url)) == 1  # the idempotency key kept it to one batch
    (batch_id,) = [e["batch_id"] for e in rows.get(st.database_url, "nightly").pending]
    assert rec.last_fired_at is not None
    date = schedules.stamp(rec.cron, rec.last_fired_at)
    assert hook.tick(None, later)["exports_written"] == 0  # not finished: nothing written
    complete(st, batch_id)
    assert hook.tick(None, later)["exports_written"] == 1
    out, err = out_dir / f"nightly-{date}.jsonl", out_dir / f"nightly-{date}.errors.jsonl"
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()] == ["jobs0", "jobs1", "jobs2"]
    assert len(err.read_text().splitlines()) == 1
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([out.name, err.name])  # no temporary files left
    first = out.stat().st_mtime_ns
    with session_scope(st.database_url) as s:
        s.execute(text("UPDATE schedules SET last_fired_at = NULL"))
    hook.tick(None, later)
    assert hook.tick(None, later)["exports_written"] == 0 and out.stat().st_mtime_ns == first  # written once
    assert rows.get(st.database_url, "nightly").pending == []


def test_schedule_cron_runs_on_the_database_clock(st: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The firing time comes from ``store.db.now``, never from this host's clock."""
    _jobs(tmp_path / "in" / "a.jsonl")
    schedules.add_schedule(st, "hourly", "0 * * * *", str(tmp_path / "in" / "*.jsonl"), "small-smol", str(tmp_path / "o"))
    db_later = now(st.database_url) + 5 * 3600  # the database is 5 h ahead of this host
    monkeypatch.setattr(schedules.db, "now", lambda url: db_later)
    assert schedules.run_due(st, None)["schedules_fired"] == ["hourly"]
    fired = rows.get(st.database_url, "hourly").last_fired_at
    assert fired is not None and db_later - 3600 < fired <= db_later and fired > time.time() + 3 * 3600


def test_schedule_keys_and_outputs_are_unique_per_path(st: Settings, tmp_path: Path) -> None:
    root = tmp_path / "in"
    for rel in ("a.jsonl", "a.json", "x/a.jsonl", "y/a.jsonl", "x_a.jsonl"):
        _jobs(root / rel, n=2)
    out_dir = tmp_path / "out"
    schedules.add_schedule(st, "n", "0 2 * * *", str(root / "**" / "*"), "small-smol", str(out_dir))
    hook = schedules.Schedules(st)
    later = time.time() + 3 * 86400
    hook.tick(None, later)
    pending = rows.get(st.database_url, "n").pending
    assert len(pending) == 5 and len({e["batch_id"] for e in pending}) == 5  # same basename, different paths
    outputs = {Path(e["input"]).relative_to(root).as_posix(): e["output"] for e in pending}
    date = outputs["a.jsonl"].split("-", 1)[1].rsplit("-", 1)[0]
    labels = {rel: out.removeprefix(f"n-{date}-") for rel, out in outputs.items()}
    assert labels["a.jsonl"] == "a" and labels["a.json"] == "a.json" and labels["y/a.jsonl"] == "y_a"
    assert labels["x/a.jsonl"].startswith("x_a-") and labels["x_a.jsonl"].startswith("x_a-")  # would collide: hashed
    assert len(set(labels.values())) == 5
    for e in pending:
        complete(st, e["batch_id"])
    assert hook.tick(None, later)["exports_written"] == 5
    assert len(list(out_dir.glob("*.errors.jsonl"))) == 5 and len(list(out_dir.glob("*.jsonl"))) == 10


def test_schedule_failures_are_isolated(st: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreadable file, or any unexpected error in one schedule or one export, never stops the others."""
    for name in ("aaa", "bbb", "ccc"):
        _jobs(tmp_path / name / "one.jsonl")
        _jobs(tmp_path / name / "two.jsonl")
        schedules.add_schedule(st, name, "0 2 * * *", str(tmp_path / name / "*.jsonl"), "small-smol", str(tmp_path / "out"))
    real_submit, real_record = schedules.submit_service.submit_file, rows.record_firing

    def submit(settings: Settings, path: str, **kw: Any) -> Any:
        if path.endswith("aaa/one.jsonl"):
            raise PermissionError(13, "Permission denied", path)  # an unreadable file
        if path.endswith("ccc/two.jsonl"):
            raise KeyError("a bug")  # not a batchllm error at all
        return real_submit(settings, path, **kw)

    def record(url: str, name: str, *args: Any) -> None:
        if name == "bbb":
            raise RuntimeError("unexpected")
        real_record(url, name, *args)

    monkeypatch.setattr(schedules.submit_service, "submit_file", submit)
    monkeypatch.setattr(rows, "record_firing", record)
    out = schedules.Schedules(st).tick(None, time.time() + 3 * 86400)
    assert out["schedules_fired"] == ["aaa", "ccc"] and out["schedule_errors"] == ["bbb"]
    got = {name: [Path(e["input"]).name for e in rows.get(st.database_url, name).pending] for name in ("aaa", "bbb", "ccc")}
    assert got == {"aaa": ["two.jsonl"], "bbb": [], "ccc": ["one.jsonl"]}
    # Exports: one that fails stays pending; the others are written.
    monkeypatch.setattr(rows, "record_firing", real_record)
    real_export = schedules.export_service.export
    broken = rows.get(st.database_url, "aaa").pending[0]["batch_id"]

    def export(settings: Settings, batch_id: str, *a: Any, **kw: Any) -> Any:
        if batch_id == broken:
            raise ValueError("a bug in export")
        return real_export(settings, batch_id, *a, **kw)

    monkeypatch.setattr(schedules.export_service, "export", export)
    for b in batches.listing(st.database_url):
        complete(st, b.id)
    out = schedules.Schedules(st).tick(None, time.time() + 3 * 86400)
    # bbb's firing was never recorded, so it fires again (its batches exist: same keys) and is written too.
    assert out["schedules_fired"] == ["bbb"] and len(batches.listing(st.database_url)) == 4
    assert out["exports_written"] == 3 and out["schedule_errors"] == ["aaa"]
    assert [e["batch_id"] for e in rows.get(st.database_url, "aaa").pending] == [broken]
    assert rows.get(st.database_url, "bbb").pending == rows.get(st.database_url, "ccc").pending == []


def test_cli_schedule_commands(st: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in (("DATABASE_URL", st.database_url), ("BROKER_URL", st.broker_url), ("MODELS_FILE", str(st.models_file)),
                       ("DATA_DIR", str(st.data_dir))):
        monkeypatch.setenv(f"BATCHLLM_{key}", value)
    get_settings.cache_clear()
    cli = BatchLLMGroup("t", commands={c.name: c for c in COMMANDS if c.name})
    run = CliRunner().invoke
    try:
        bad = run(cli, ["schedule", "add", "n", "--cron", "0 2 * *", "--input", "x", "--model", "small-smol", "--output", "o"])
        assert bad.exit_code == 2 and "invalid cron expression" in bad.output
        bad = run(cli, ["schedule", "add", "a/b", "--cron", "0 2 * * *", "--input", "x", "--model", "small-smol",
                        "--output", "o"])
        assert bad.exit_code == 2 and "schedule name" in bad.output
        ok = run(cli, ["schedule", "add", "n", "--cron", "0 2 * * *", "--input", str(tmp_path / "*.jsonl"),
                       "--model", "small-smol", "--output", str(tmp_path / "o")])
        assert ok.exit_code == 0, ok.output
        listed = run(cli, ["schedule", "list", "--json"])
        assert [r["name"] for r in json.loads(listed.output)] == ["n"]
        assert run(cli, ["schedule", "remove", "n"]).exit_code == 0
        assert run(cli, ["schedule", "remove", "n"]).exit_code == 2
        once = run(cli, ["scheduler", "--once"])
        assert once.exit_code == 0, once.output
        out = json.loads(once.output)
        assert out["errors"] == [] and out["leader"] is True and out["schedules_fired"] == []
        assert json.loads(run(cli, ["scheduler", "--once"]).output)["leader"] is True  # the first one resigned
    finally:
        get_settings.cache_clear()
