"""The deployment files (deploy/) and ``batchllm flower``: fast checks that need no running services.

What is held here: the compose file and the env examples configure batchllm only through variables that
``Settings`` really reads; every worker owns exactly one GPU; Redis, PostgreSQL and Flower are behind
passwords that come from the environment, never from the files; the systemd units are well-formed;
``batchllm flower`` refuses to start without a password; and the API service (``batchllm serve``) is never
open, listens on loopback unless told otherwise, is health-checked on a route that exists, and is given
longer to stop than it takes to drain.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner
from pydantic import TypeAdapter

from batchllm.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
SYSTEMD = DEPLOY / "systemd"
SYSTEMD_ENV = SYSTEMD / "batchllm.env.example"
UNITS = sorted(SYSTEMD.glob("*.service"))
DEPLOY_FILES = [COMPOSE, ENV_EXAMPLE, DEPLOY / "Dockerfile", SYSTEMD_ENV, *UNITS]

# Values a secret may have in a shipped file: a placeholder, empty, or a ${VAR} interpolation.
PLACEHOLDERS = {"", "change-me"}
# BATCHLLM_CONFIG names the settings file; it is read before Settings exists, so it is no field.
NON_FIELD_VARS = {"BATCHLLM_CONFIG"}
WORKER_SERVICE = re.compile(r"^worker-gpu(\d+)$")


# --------------------------------------------------------------------------------------------- helpers


def compose() -> dict[str, Any]:
    """The compose file, with YAML anchors and ``<<`` merges resolved."""
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    """Compose services by name."""
    return compose()["services"]


def env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of an env file (docker compose .env or systemd EnvironmentFile)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        out[key.strip()] = value.strip().strip("'\"")
    return out


_INTERP = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose-style ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` against ``env``."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        current = env.get(name)
        if op in (":-", "-") and not current:
            return arg
        if op in (":?", "?") and not current:
            raise AssertionError(f"{name} must be set: {arg}")
        return current or ""

    return _INTERP.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment`` as a dict (compose accepts a mapping or a list of KEY=VALUE)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    """A service's ``command`` as argv."""
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as ``{section: [(key, value), ...]}`` (keys may repeat, e.g. ``Environment=``)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not Key=Value: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(u: dict[str, list[tuple[str, str]]], section: str, key: str) -> str | None:
    """The last value of ``key`` in ``section`` (systemd's rule for single-valued keys)."""
    values = [v for k, v in u.get(section, []) if k == key]
    return values[-1] if values else None


def unit_environment(u: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    """The ``Environment=`` assignments of a unit's [Service] section."""
    out: dict[str, str] = {}
    for k, v in u.get("Service", []):
        if k == "Environment":
            for item in shlex.split(v):
                name, _, value = item.partition("=")
                out[name] = value
    return out


def is_placeholder(value: str) -> bool:
    """True for values a shipped file may hold where a secret goes."""
    value = value.strip().strip("'\"")
    return value in PLACEHOLDERS or value.startswith("${")


# ---------------------------------------------------------------------------------------- compose file


def test_compose_is_valid_yaml_with_the_expected_services() -> None:
    svc = services()
    for name in ("redis", "postgres", "migrate", "scheduler", "flower"):
        assert name in svc, f"compose has no {name} service"
    assert any(WORKER_SERVICE.match(n) for n in svc), "compose has no worker-gpuN service"
    for name, s in svc.items():
        assert "image" in s or "build" in s, f"{name}: neither image nor build"


def test_every_batchllm_variable_in_deploy_is_a_settings_field() -> None:
    fields = {f"BATCHLLM_{name.upper()}" for name in Settings.model_fields}
    seen: dict[str, set[str]] = {}
    for path in DEPLOY_FILES:
        for var in re.findall(r"\bBATCHLLM_[A-Z0-9_]+\b", path.read_text()):
            seen.setdefault(var, set()).add(str(path.relative_to(ROOT)))
    assert seen, "no BATCHLLM_* variables found in deploy/"
    unknown = {var: sorted(files) for var, files in seen.items() if var not in fields | NON_FIELD_VARS}
    assert not unknown, f"BATCHLLM_* variables that Settings does not read: {unknown}"


def test_compose_environment_sets_only_settings_fields_and_loads() -> None:
    fields = {f"BATCHLLM_{name.upper()}" for name in Settings.model_fields}
    dotenv = env_file(ENV_EXAMPLE)
    for name, s in services().items():
        env = {k: interpolate(v, dotenv) for k, v in environment(s).items()}
        batchllm_env = {k: v for k, v in env.items() if k.startswith("BATCHLLM_")}
        assert set(batchllm_env) <= fields, f"{name}: {set(batchllm_env) - fields}"
        if batchllm_env:
            # The values parse: what the container gets is a valid configuration.
            Settings(**{k.removeprefix("BATCHLLM_").lower(): v for k, v in batchllm_env.items()})


def test_env_examples_load_as_settings() -> None:
    fields = set(Settings.model_fields)
    for path in (ENV_EXAMPLE, SYSTEMD_ENV):
        values = {k.removeprefix("BATCHLLM_").lower(): v for k, v in env_file(path).items() if k.startswith("BATCHLLM_")}
        assert set(values) <= fields, f"{path.name}: {set(values) - fields}"
        Settings(**values)


def test_tunables_shown_in_deploy_files_equal_the_settings_defaults() -> None:
    # The deploy files show tunables only to document them; a drifted copy of a default would silently
    # override the real one, so every number (and the completion window) there must equal Settings'.
    checked = 0
    texts = "\n".join(p.read_text() for p in DEPLOY_FILES)
    pairs = re.findall(r"\$\{BATCHLLM_([A-Z0-9_]+):-([^}]*)\}", texts)  # compose fallbacks
    pairs += re.findall(r"^\s*#?\s*BATCHLLM_([A-Z0-9_]+)\s*[=:]\s*\"?([0-9.]+[a-z]*)\"?\s*$", texts, re.MULTILINE)
    for name, value in pairs:
        field = Settings.model_fields[name.lower()]
        if field.annotation not in (int, float, bool) and name != "COMPLETION_WINDOW":
            continue
        parsed = TypeAdapter(field.annotation).validate_python(value)
        assert parsed == field.default, f"BATCHLLM_{name}={value} in deploy/ but Settings' default is {field.default!r}"
        checked += 1
    assert checked, "no tunables found: did the deploy files stop documenting them?"


def test_each_worker_reserves_exactly_one_gpu_consistently() -> None:
    svc = services()
    workers = {name: s for name, s in svc.items() if WORKER_SERVICE.match(name)}
    indices = []
    for name, s in workers.items():
        index = WORKER_SERVICE.match(name)[1]  # type: ignore[index]
        devices = s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        assert len(devices) == 1, f"{name}: expected one device reservation, got {devices}"
        dev = devices[0]
        assert dev.get("driver") == "nvidia", f"{name}: {dev}"
        assert "gpu" in dev.get("capabilities", []), f"{name}: {dev}"
        assert "count" not in dev, f"{name}: reserve by device_ids, not count"
        assert [str(i) for i in dev.get("device_ids", [])] == [index], f"{name} must reserve host GPU {index}: {dev}"
        indices.append(index)
        # Inside the container the one reserved card is GPU 0 for CUDA and NVML alike.
        assert environment(s).get("CUDA_VISIBLE_DEVICES") == "0", f"{name}: CUDA_VISIBLE_DEVICES must be 0"
        argv = command(s)
        assert argv[:2] == ["batchllm", "worker"], f"{name}: {argv}"
        assert "--gpus" in argv and argv[argv.index("--gpus") + 1] == "0", f"{name}: needs --gpus 0, got {argv}"
        if "--name" in argv:
            assert argv[argv.index("--name") + 1].startswith(f"gpu{index}@"), f"{name}: worker name must say gpu{index}"
    assert len(indices) == len(set(indices))
    for name, s in svc.items():
        if name not in workers:
            assert "deploy" not in s and "CUDA_VISIBLE_DEVICES" not in environment(s), f"{name} must not take a GPU"


def test_api_service_is_authenticated_on_loopback_and_health_checked() -> None:
    api = services()["api"]
    argv = command(api)
    assert argv[:2] == ["batchllm", "serve"], argv
    assert "--no-auth" not in argv and "--local" not in argv  # the cluster's API, and never without keys
    port = argv[argv.index("--port") + 1]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"  # inside the container, so the published port reaches it
    # Published on the host's loopback unless API_BIND says otherwise (a TLS proxy on the host fronts it).
    dotenv = env_file(ENV_EXAMPLE)
    published = [interpolate(p, {}) for p in api["ports"]]
    assert published == [f"127.0.0.1:{port}:{port}"], published
    assert dotenv["API_BIND"] == "127.0.0.1"
    # The healthcheck asks the port the command listens on, on the route the app serves without a key.
    probe = " ".join(api["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/health" in probe, probe
    dep = api.get("depends_on", {})
    assert dep.get("migrate", {}).get("condition") == "service_completed_successfully"
    assert dep.get("redis", {}).get("condition") == "service_healthy"
    env = environment(api)
    assert {"BATCHLLM_DATABASE_URL", "BATCHLLM_BROKER_URL"} <= set(env)
    assert env["BATCHLLM_API_KEY_PEPPER"].startswith("${BATCHLLM_API_KEY_PEPPER")  # from deploy/.env, never literal


def test_api_unit_serves_loopback_with_keys() -> None:
    u = unit(SYSTEMD / "batchllm-api.service")
    argv = shlex.split(unit_value(u, "Service", "ExecStart") or "")
    assert argv[1:] == ["serve", "--host", "127.0.0.1", "--port", "8000"], argv
    assert unit_value(u, "Service", "User") == "batchllm"


def _serve_kwargs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str) -> tuple[Any, dict[str, Any]]:
    """Run the real ``batchllm serve`` on a SQLite file with uvicorn.run replaced; returns (result, uvicorn kwargs)."""
    import uvicorn

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    for var in list(os.environ):
        if var.startswith("BATCHLLM_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("BATCHLLM_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("BATCHLLM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BATCHLLM_DATABASE_URL", f"sqlite:///{tmp_path / 'api.db'}")
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(cli(), ["serve", *args]), seen
    finally:
        get_settings.cache_clear()


def test_api_stop_timeouts_outlast_its_drain_and_exit_2_is_final(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No key yet: `batchllm serve` refuses with exit 2, which the unit does not restart (RestartPreventExitStatus=2).
    result, seen = _serve_kwargs(monkeypatch, tmp_path)
    assert result.exit_code == 2 and "no API key exists" in result.output and not seen
    u = unit(SYSTEMD / "batchllm-api.service")
    assert unit_value(u, "Service", "RestartPreventExitStatus") == "2"
    # With --no-auth it gets as far as uvicorn: its graceful-shutdown drain must end before compose or systemd kill it.
    result, seen = _serve_kwargs(monkeypatch, tmp_path, "--no-auth", "--port", "8000")
    assert result.exit_code == 0, result.output
    drain = seen["timeout_graceful_shutdown"]
    grace = services()["api"]["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > drain, (grace, drain)
    assert int(unit_value(u, "Service", "TimeoutStopSec") or 0) > drain

    # The health route the compose healthcheck probes exists and answers without a key on a server that wants one.
    from fastapi.testclient import TestClient

    from batchllm.services.api.app import create_app
    from batchllm.services.api.config import ApiConfig

    st = Settings(database_url=f"sqlite:///{tmp_path / 'api.db'}", data_dir=tmp_path)
    with TestClient(create_app(ApiConfig(st, auth=True))) as client:
        assert client.get("/v1/batches").status_code == 401
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"


def test_migrate_runs_first() -> None:
    svc = services()
    assert command(svc["migrate"]) == ["batchllm", "db", "upgrade"]
    assert svc["migrate"].get("restart", "no") == "no"
    for name, s in svc.items():
        if name == "scheduler" or WORKER_SERVICE.match(name):
            dep = s.get("depends_on", {})
            assert dep.get("migrate", {}).get("condition") == "service_completed_successfully", name


def test_redis_and_postgres_require_passwords_from_the_environment() -> None:
    svc = services()
    redis_cmd = " ".join(command(svc["redis"]))
    m = re.search(r"--requirepass\s+(\S+)", redis_cmd)
    assert m and m[1].startswith("${REDIS_PASSWORD"), f"redis must run with --requirepass ${{REDIS_PASSWORD}}: {redis_cmd}"
    assert environment(svc["postgres"])["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")
    for name, s in svc.items():
        env = environment(s)
        if "BATCHLLM_BROKER_URL" in env:
            assert env["BATCHLLM_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD"), f"{name}: broker URL without password"
            assert "@${REDIS_HOST:-redis}:6379/" in env["BATCHLLM_BROKER_URL"], name
        if "BATCHLLM_DATABASE_URL" in env:
            assert ":${POSTGRES_PASSWORD" in env["BATCHLLM_DATABASE_URL"], f"{name}: database URL without password"


def test_flower_has_auth() -> None:
    s = services()["flower"]
    argv = command(s)
    assert argv[:2] == ["batchllm", "flower"] and "--no-auth" not in argv
    env = environment(s)
    # ":?" makes compose refuse to start Flower without a password, not run it open.
    assert env["BATCHLLM_FLOWER_PASSWORD"].startswith("${BATCHLLM_FLOWER_PASSWORD:?"), env
    for path in DEPLOY_FILES:
        assert "--no-auth" not in re.sub(r"#.*", "", path.read_text()), f"{path.name} runs Flower without auth"


def test_no_literal_secrets_in_deploy_files() -> None:
    problems = []
    secret_key = re.compile(r"^\s*#?\s*-?\s*([A-Z0-9_]*(?:PASSWORD|SECRET|TOKEN|_AUTH)[A-Z0-9_]*)\s*[=:]\s*(.*)$")
    url_password = re.compile(r"[a-z][a-z0-9+.\-]*://[^:/@\s]*:([^@\s]+)@")
    for path in DEPLOY_FILES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            m = secret_key.match(line)
            if m:
                value = re.sub(r"\s+#.*$", "", m[2]).strip()
                if not is_placeholder(value):
                    problems.append(f"{path.name}:{n}: {m[1]} has a literal value")
            for pw in url_password.findall(line):
                if not is_placeholder(pw):
                    problems.append(f"{path.name}:{n}: URL with a literal password")
            for pw in re.findall(r"--requirepass\s+(\S+)", line):
                if not is_placeholder(pw):
                    problems.append(f"{path.name}:{n}: literal --requirepass")
    assert not problems, "\n".join(problems)


def test_dockerfile_installs_the_gpu_extra_on_python_slim() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert re.search(r"^ARG EXTRAS=gpu$", text, re.MULTILINE)
    assert 'pip install ".[${EXTRAS}]"' in text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "gpu" in extras


# --------------------------------------------------------------------------------------------- systemd


def test_units_parse_and_restart_on_failure() -> None:
    assert {p.name for p in UNITS} >= {"batchllm-worker@.service", "batchllm-scheduler.service", "batchllm-flower.service"}
    for path in UNITS:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(path.read_text(), source=path.name)
        assert {"Unit", "Service", "Install"} <= set(parser.sections()), path.name
        u = unit(path)
        exec_start = unit_value(u, "Service", "ExecStart")
        assert exec_start and exec_start.startswith("/") and "batchllm" in exec_start, f"{path.name}: {exec_start}"
        assert unit_value(u, "Service", "Restart") == "on-failure", path.name
        assert unit_value(u, "Service", "RestartSec"), path.name
        assert unit_value(u, "Service", "KillSignal") == "SIGTERM", path.name
        assert unit_value(u, "Service", "TimeoutStopSec"), path.name
        assert unit_value(u, "Service", "EnvironmentFile") == "/etc/batchllm/batchllm.env", path.name
        # Exit 2 (usage/config error, e.g. Flower without a password) is not worth restarting.
        assert unit_value(u, "Service", "RestartPreventExitStatus") == "2", path.name
        env = unit_environment(u)
        assert not any(k.startswith("BATCHLLM_") for k in env), f"{path.name}: settings belong in the env file"


def test_worker_unit_pins_one_gpu() -> None:
    u = unit(SYSTEMD / "batchllm-worker@.service")
    env = unit_environment(u)
    assert env.get("CUDA_VISIBLE_DEVICES") == "%i"
    assert env.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
    argv = shlex.split(unit_value(u, "Service", "ExecStart") or "")
    assert argv[1:] == ["worker", "--gpus", "%i"], argv
    # Only the main process gets SIGTERM, so the vLLM engine outlives Celery's warm shutdown of the chunk.
    assert unit_value(u, "Service", "KillMode") == "mixed"
    assert int(unit_value(u, "Service", "TimeoutStopSec") or 0) >= 120, "too short to drain a chunk"


def test_flower_unit_has_no_auth_bypass() -> None:
    argv = shlex.split(unit_value(unit(SYSTEMD / "batchllm-flower.service"), "Service", "ExecStart") or "")
    assert argv[1] == "flower" and "--no-auth" not in argv


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed on this machine; unit files were only checked as INI")
    # verify insists that ExecStart's binary exists; point it at this checkout's batchllm instead of /opt.
    exe = Path(sys.executable).with_name("batchllm")
    if not exe.exists():
        exe = Path(shutil.which("true") or "/bin/true")
    names = []
    for path in UNITS:
        (tmp_path / path.name).write_text(path.read_text().replace("/opt/batchllm/venv/bin/batchllm", str(exe)))
        names.append(path.name.replace("@.service", "@2.service"))  # a template is verified as an instance
    (tmp_path / "batchllm-worker@2.service").write_text((tmp_path / "batchllm-worker@.service").read_text())
    proc = subprocess.run([tool, "verify", *(f"./{n}" for n in names)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    # Unknown keys and unparsable values are only warnings (exit 0), so stderr must be empty too.
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


# ----------------------------------------------------------------------------------- batchllm flower


def cli() -> click.Group:
    """The real ``batchllm`` command group."""
    from batchllm.cli import main

    return main


@pytest.fixture
def flower_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A clean settings environment: no Flower password, no batchllm.toml, a throwaway data dir."""
    for var in list(os.environ):
        if var.startswith(("BATCHLLM_FLOWER_", "FLOWER_")):
            monkeypatch.delenv(var)
    monkeypatch.setenv("BATCHLLM_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("BATCHLLM_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_flower_refuses_to_start_without_a_password(flower_env: pytest.MonkeyPatch) -> None:
    flower_env.setenv("BATCHLLM_BROKER_URL", "redis://:brokersecret@127.0.0.1:1/0")
    result = CliRunner().invoke(cli(), ["flower"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: set BATCHLLM_FLOWER_PASSWORD"), lines
    assert "brokersecret" not in result.output


def test_flower_empty_password_counts_as_none(flower_env: pytest.MonkeyPatch) -> None:
    flower_env.setenv("BATCHLLM_FLOWER_PASSWORD", "")
    result = CliRunner().invoke(cli(), ["flower"])
    assert result.exit_code == 2 and "BATCHLLM_FLOWER_PASSWORD" in result.output


def test_flower_unreachable_broker_exits_5_with_masked_url(flower_env: pytest.MonkeyPatch) -> None:
    flower_env.setenv("BATCHLLM_FLOWER_PASSWORD", "flowersecret")
    flower_env.setenv("BATCHLLM_BROKER_URL", "redis://:brokersecret@127.0.0.1:1/0")  # port 1: refused at once
    result = CliRunner().invoke(cli(), ["flower"])
    assert result.exit_code == 5, result.output
    assert "redis://:***@127.0.0.1:1/0" in result.output
    assert "brokersecret" not in result.output and "flowersecret" not in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(url: str, auth: str | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_flower_serves_only_with_basic_auth(tmp_path: Path) -> None:
    # A real Flower on the in-memory broker (no Redis needed). The password has a comma and a colon,
    # which Flower's own --basic-auth flag would mangle; it must also never reach the command line.
    port = _free_port()
    password = "pa,ss:word-123"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHLLM_", "FLOWER_"))}
    env.update(
        {
            "BATCHLLM_BROKER_URL": "memory://",
            "BATCHLLM_FLOWER_USER": "ops",
            "BATCHLLM_FLOWER_PASSWORD": password,
            "BATCHLLM_DATA_DIR": str(tmp_path),
            "BATCHLLM_CONFIG": str(tmp_path / "absent.toml"),
        }
    )
    code = "import sys; from batchllm.cli.ops import flower; flower.main(sys.argv[1:], prog_name='batchllm flower')"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/workers"
        deadline = time.monotonic() + 30
        while True:
            try:
                first = _status(url)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "Flower did not start"
                time.sleep(0.2)
        assert first == 401
        assert _status(url, "ops:wrong") == 401
        assert _status(url, f"ops:{password}") == 200
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        if cmdline.exists():
            assert password not in cmdline.read_bytes().decode(errors="replace")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert password not in out
    assert "basic auth as 'ops'" in out
