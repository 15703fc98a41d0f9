"""The one place configuration is read: environment (``BATCHLLM_*``) and an optional ``batchllm.toml``."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from platformdirs import user_data_dir
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

_DATA_DIR = Path(user_data_dir("batchllm", appauthor=False))


def _config_file() -> Path:
    # The config file is located before Settings exists, so this is the one env read outside the class.
    return Path(os.environ.get("BATCHLLM_CONFIG", "batchllm.toml"))


class Settings(BaseSettings):
    """All of batchllm's settings. Env vars use the ``BATCHLLM_`` prefix (e.g. ``BATCHLLM_BROKER_URL``)."""

    model_config = SettingsConfigDict(env_prefix="BATCHLLM_", extra="ignore", validate_default=True)

    broker_url: str = "redis://127.0.0.1:6379/0"
    data_dir: Path = _DATA_DIR
    database_url: str = ""  # default: SQLite under data_dir (declared after it so the validator sees it)
    model_dir: Path = Path("")  # default: <data_dir>/models
    models_file: Path | None = None

    # Work splitting and leases.
    chunk_size: int = Field(default=64, ge=1, le=100_000)
    heartbeat_interval: float = Field(default=5.0, gt=0)
    heartbeat_timeout: float = Field(default=30.0, gt=0)
    lease_seconds: float = Field(default=30.0, gt=0)
    # Leases, not Redis, protect a chunk from a second run, so any value is safe; tests use a few seconds to
    # exercise redelivery of a message whose task outlives it (tests/test_faults.py).
    visibility_timeout: int = Field(default=12 * 3600, ge=1)
    completion_window: str = "24h"
    max_line_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)

    # Engine.
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    cpu_kvcache_gb: float = Field(default=2.0, gt=0)
    enforce_eager: bool | None = None  # None: eager on CPU (fast start), CUDA graphs on GPU
    engine_max_model_len: int | None = None
    # Requests the engine runs at once (vLLM's max_num_seqs; None: vLLM's default, 256 on CPU). Work beyond it
    # waits in the broker, where priorities apply: a smaller engine batch makes priorities act sooner.
    engine_max_num_seqs: int | None = Field(default=None, ge=1)
    # Requests kept waiting in the engine before a worker takes its next chunk. Enough to keep the engine
    # full across chunk boundaries, small enough that the backlog stays in the broker, where priority works.
    engine_feed_depth: int | None = Field(default=None, ge=1)  # default: 2 x chunk_size
    engine_log_level: str = "WARNING"  # vLLM's own log level (VLLM_LOGGING_LEVEL)

    # Operations.
    flower_user: str = "admin"
    flower_password: SecretStr | None = None
    metrics_port: int = 9464
    # Loopback by default: the metrics page shows model names and worker hosts to whoever can reach it.
    metrics_address: str = "127.0.0.1"
    scheduler_interval: float = Field(default=2.0, gt=0)
    # The leader lease: a standby scheduler takes over this long after the active one stopped renewing it.
    scheduler_lease_seconds: float = Field(default=10.0, gt=0)
    # How long a worker retries a result write while the database is down before it gives the chunk up
    # (its lease then lapses and the chunk runs again elsewhere: nothing is lost, nothing stays leased).
    db_retry_seconds: float = Field(default=120.0, ge=0)

    # The HTTP API (``batchllm serve``).
    # Largest file ``POST /v1/files`` accepts (decimal bytes; OpenAI's limit is 200 MB, local batches run larger).
    api_max_upload_bytes: int = Field(default=2_000_000_000, ge=1024)
    # Optional server-side secret mixed into API key hashes (HMAC-SHA256); the same value must be set wherever
    # `batchllm keys` and `batchllm serve` run. Changing it invalidates every key.
    api_key_pepper: SecretStr | None = None

    @field_validator("database_url", mode="after")
    @classmethod
    def _default_db(cls, v: str, info: Any) -> str:
        if v:
            return v
        data_dir = info.data.get("data_dir") or _DATA_DIR
        return f"sqlite:///{Path(data_dir) / 'batchllm.db'}"

    @field_validator("model_dir", mode="after")
    @classmethod
    def _default_model_dir(cls, v: Path, info: Any) -> Path:
        if str(v) not in ("", "."):
            return v.expanduser()
        return Path(info.data.get("data_dir") or _DATA_DIR) / "models"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Order: explicit arguments, environment, then ``batchllm.toml`` (``BATCHLLM_CONFIG`` names another)."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file()
        if path.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def feed_depth(self) -> int:
        """Requests a worker keeps in its engine before it takes the next chunk."""
        return self.engine_feed_depth or 2 * self.chunk_size

    def in_process(self, database_url: str) -> Settings:
        """These settings for a process that runs its own worker (``run``, ``serve --local``): ``database_url``
        and no broker."""
        return self.model_copy(update={"database_url": database_url, "broker_url": "memory://"})


def database_url_of(db: str) -> str:
    """A ``--db`` value as a database URL: a URL stays as it is, a path names a SQLite file."""
    return db if "://" in db else f"sqlite:///{Path(db).expanduser().resolve()}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; tests call ``get_settings.cache_clear()`` after changing env)."""
    return Settings()
