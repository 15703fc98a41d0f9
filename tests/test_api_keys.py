"""API keys through the real CLI (printed once, stored as a hash, listed without secrets, revoked), the pepper,
the deployment files of the API, and the store's removal of abandoned uploads. SQLite only: no services."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

from pydantic import SecretStr

from tests.test_api_support import cli_argv

# isort: split
from batchllm.services.api.config import local_settings
from batchllm.services.api.keys import authenticate, create_key, hash_key, pepper_warning
from batchllm.settings import Settings
from batchllm.store import files as file_rows
from batchllm.store.db import session_scope, upgrade
from batchllm.store.models import ApiKey
from tests.test_deploy import SYSTEMD, command, environment, services, unit, unit_value

KEY = re.compile(r"^bl-[A-Za-z0-9_-]{43}$")


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_argv(*args), env=env, capture_output=True, text=True, timeout=120)


def test_keys_create_list_revoke_through_the_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    env = {**os.environ, "BATCHLLM_DATABASE_URL": url, "BATCHLLM_DATA_DIR": str(tmp_path)}
    made = _cli(env, "keys", "create", "pipeline")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert KEY.match(key) and made.stdout.count("\n") == 1 and key not in made.stderr
    assert "only time it is shown" in made.stderr
    with session_scope(url) as s:
        row = s.query(ApiKey).one()
        stored = {c.name: getattr(row, c.name) for c in ApiKey.__table__.columns}
    assert key not in json.dumps(stored, default=str) and stored["key_hash"] == hash_key(Settings(), key)
    listed = _cli(env, "keys", "list", "--json")
    assert listed.returncode == 0 and key not in listed.stdout and key[7:] not in listed.stdout
    [entry] = json.loads(listed.stdout)
    assert entry["name"] == "pipeline" and entry["prefix"] == key[:7]
    dup = _cli(env, "keys", "create", "pipeline")
    assert dup.returncode == 2 and "already named" in dup.stderr
    assert _cli(env, "keys", "create", "bad name").returncode == 2
    assert _cli(env, "keys", "revoke", "pipeline").returncode == 0
    assert json.loads(_cli(env, "keys", "list", "--json").stdout) == []
    assert _cli(env, "keys", "revoke", "pipeline").returncode == 2  # nothing active by that name
    again = _cli(env, "keys", "create", "pipeline")  # a revoked key's name can be used again
    assert again.returncode == 0 and again.stdout.strip() != key


def test_keys_local_use_the_serve_local_database(tmp_path: Path) -> None:
    env = {**os.environ, "BATCHLLM_DATA_DIR": str(tmp_path), "BATCHLLM_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x"}
    made = _cli(env, "keys", "create", "me", "--local")
    assert made.returncode == 0, made.stderr
    st = local_settings(Settings(data_dir=tmp_path))
    assert (tmp_path / "serve.db").is_file() and authenticate(st, made.stdout.strip()) is not None


def test_pepper_changes_the_hash_and_a_changed_pepper_is_reported(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(url)
    plain = Settings(database_url=url)
    peppered = plain.model_copy(update={"api_key_pepper": SecretStr("s3cret-pepper")})
    other = plain.model_copy(update={"api_key_pepper": SecretStr("another-pepper")})
    _, key = create_key(peppered, "peppered")
    assert hash_key(peppered, key) != hash_key(plain, key) != hash_key(other, key)
    assert authenticate(peppered, key) is not None
    assert authenticate(plain, key) is None and authenticate(other, key) is None
    assert pepper_warning(peppered) is None and pepper_warning(other) is not None
    assert authenticate(peppered, key + "x") is None and authenticate(peppered, "bl-short") is None


def test_abandoned_uploads_are_swept(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    upgrade(url)
    file_id = file_rows.begin_upload(url, None, "half.jsonl")
    file_rows.append_part(url, file_id, 0, b"x" * 1000)
    assert file_rows.sweep_uploads(url, idle_s=3600) == 0  # still being written
    assert file_rows.count_incomplete(url) == 1 and file_rows.listing(url, None) == []
    assert file_rows.sweep_uploads(url, idle_s=0) == 1
    assert file_rows.count_incomplete(url) == 0 and file_rows.count_parts(url) == 0


def test_deployment_runs_the_api_with_auth_on_loopback() -> None:
    api = services()["api"]
    argv = command(api)
    assert argv[:2] == ["batchllm", "serve"] and "--no-auth" not in argv and "--local" not in argv
    assert any(p.startswith("${API_BIND:-127.0.0.1}:8000") for p in api["ports"])
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "BATCHLLM_DATABASE_URL" in environment(api) and "healthcheck" in api
    u = unit(SYSTEMD / "batchllm-api.service")
    exec_argv = shlex.split(unit_value(u, "Service", "ExecStart") or "")
    assert exec_argv[1:] == ["serve", "--host", "127.0.0.1", "--port", "8000"]
    assert unit_value(u, "Service", "RestartPreventExitStatus") == "2"
