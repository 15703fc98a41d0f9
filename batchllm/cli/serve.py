"""``batchllm serve``: the OpenAI Files and Batches API on uvicorn (``--local``: with an in-process worker)."""

from __future__ import annotations

import logging

import click

from batchllm.cli.common import settings
from batchllm.errors import InputError, mask_url

NO_KEY = ("no API key exists: create one with `batchllm keys create NAME`{local} (it is printed once), or pass "
          "--no-auth to serve without authentication (anyone who can reach the port can read and run batches)")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 to reach it from other machines (put TLS in front: docs/api.md).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="HTTP port.")
@click.option("--local", is_flag=True,
              help="One machine: SQLite under the data dir and an in-process worker (no Redis, no database server).")
@click.option("--db", help="With --local: the SQLite file (or database URL) to use instead of <data dir>/serve.db.")
@click.option("--cpu", is_flag=True, help="With --local: run models on the CPU even when a GPU is present.")
@click.option("--no-auth", is_flag=True,
              help="Allow starting with no API key created, i.e. with no authentication. Keys that exist are enforced.")
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="uvicorn's access log on stderr.")
def serve(host: str, port: int, local: bool, db: str | None, cpu: bool, no_auth: bool, access_log: bool) -> None:
    """Serve OpenAI's /v1/files, /v1/batches and /v1/models: point the OpenAI SDK's base_url here.

    Every request needs `Authorization: Bearer <key>` (keys: `batchllm keys create NAME`); each key sees only
    its own files and batches. Without --local it runs batches on the cluster (BATCHLLM_DATABASE_URL and
    BATCHLLM_BROKER_URL, with the scheduler and workers running).
    """
    import uvicorn

    from batchllm.services.api.app import create_app
    from batchllm.services.api.config import ApiConfig, local_settings
    from batchllm.services.api.keys import active_count, pepper_warning
    from batchllm.store.db import check_database

    if (db or cpu) and not local:
        raise InputError("--db and --cpu go with --local")
    st = local_settings(settings(), db) if local else settings()
    check_database(st.database_url)  # exit 5 when unreachable; a SQLite file is brought up to date
    keys = active_count(st)
    if keys == 0 and not no_auth:
        raise InputError(NO_KEY.format(local=" --local" if local else ""))
    warning = pepper_warning(st) if keys else None
    if warning:
        click.echo(f"warning: {warning}", err=True)
    on_start = on_stop = None
    if local:
        from batchllm.services.local import LocalWorker

        worker = LocalWorker(st, cpu=cpu)
        on_start, on_stop = worker.start, worker.stop
    app = create_app(ApiConfig(st, auth=keys > 0, local=local), on_start=on_start, on_stop=on_stop)
    auth = f"{keys} API key(s)" if keys else "NO authentication (--no-auth)"
    mode = "local worker, " if local else ""
    click.echo(f"batchllm API on http://{host}:{port}/v1 ({mode}{auth}); database {mask_url(st.database_url)}", err=True)
    if not logging.getLogger("batchllm").isEnabledFor(logging.INFO):
        logging.getLogger("batchllm").setLevel(logging.INFO)  # the API's own lines (never keys) go to the journal
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info", server_header=False,
                timeout_graceful_shutdown=30)


COMMANDS = [serve]
