"""What an API server runs with: settings, whether keys are required, and the local (in-process) mode."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from batchllm.settings import Settings, database_url_of

LOCAL_DB_FILE = "serve.db"


@dataclass(frozen=True)
class ApiConfig:
    """The server's configuration.

    Args:
        settings: settings (database and broker URLs, upload limit, key pepper).
        auth: bearer keys are required (False only with ``--no-auth`` and no key created).
        local: ``serve --local``: an in-process worker polls SQL, so nothing is sent to a broker, and a batch is
            queued for whatever model it names (this machine loads it).
    """

    settings: Settings
    auth: bool = True
    local: bool = False


def local_settings(settings: Settings, db: str | None = None) -> Settings:
    """Settings of ``serve --local`` (and of ``keys --local``): a SQLite file of its own, no broker.

    The file is ``<data dir>/serve.db`` unless ``db`` names another (a path or a database URL); it is not
    ``batchllm run``'s file, so a ``run`` started meanwhile never takes the server's work.
    """
    url = database_url_of(db) if db else f"sqlite:///{Path(settings.data_dir) / LOCAL_DB_FILE}"
    return settings.in_process(url)
