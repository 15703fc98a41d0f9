"""Scheduler commands: ``batchllm scheduler`` (run it) and ``batchllm schedule add/list/remove`` (nightly runs)."""

from __future__ import annotations

import datetime as dt
import json
import logging

import click

from batchllm.cli.common import json_option, print_json, settings


@click.command()
@click.option("--interval", type=click.FloatRange(min=0.05), help="Seconds between ticks (default: BATCHLLM_SCHEDULER_INTERVAL).")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Prometheus /metrics port on BATCHLLM_METRICS_ADDRESS; 0 turns it off (default: BATCHLLM_METRICS_PORT).",
)
@click.option("--once", is_flag=True, help="Run one tick, print what it did as JSON, and exit.")
def scheduler(interval: float | None, metrics_port: int | None, once: bool) -> None:
    """Start the scheduler: assigns models to idle workers by demand, re-dispatches the work of lost
    workers and expired leases, finalizes and expires batches, fires `batchllm schedule` runs (no Celery
    beat needed) and serves Prometheus metrics.

    Several may run (on different hosts, for availability): one is active, the others stand by and take
    over within BATCHLLM_SCHEDULER_LEASE_SECONDS of it stopping.
    """
    from batchllm.queue import check_broker, producer
    from batchllm.scheduler.loop import Scheduler
    from batchllm.services.schedules import Schedules
    from batchllm.store.db import check_database

    st = settings()
    if interval is not None:
        st = st.model_copy(update={"scheduler_interval": interval})
    app = producer(st)
    sched = Scheduler(st, app, hooks=[("schedules", Schedules(st).tick)])
    if once:
        check_database(st.database_url)  # a one-shot run reports an outage with exit 5 instead of logging it
        check_broker(app)
        out = sched.tick()
        sched.resign()  # a one-shot run must not keep a daemon standing by for the lease's length
        click.echo(json.dumps(out, default=str, indent=2))
        return
    # A daemon outlives outages: it logs them and retries each tick rather than exiting.
    if logging.getLogger("batchllm").getEffectiveLevel() > logging.INFO:
        logging.getLogger("batchllm").setLevel(logging.INFO)  # role changes, placements and recoveries are its log
    port = st.metrics_port if metrics_port is None else metrics_port
    sched.run_forever(metrics_port=port or None)


@click.group()
def schedule() -> None:
    """Recurring runs: submit files matching a glob on a cron schedule and write NAME-DATE.jsonl when done.

    The running `batchllm scheduler` fires them; a run that fires twice never makes two batches.
    """


@schedule.command("add")
@click.argument("name")
@click.option("--cron", required=True, help='Five-field cron expression in local time, e.g. "0 2 * * *" (02:00 daily).')
@click.option("--input", "input_glob", required=True, help="Glob of JSONL files to submit, e.g. '/data/in/*.jsonl'.")
@click.option("--model", "-m", required=True, help="Model for lines that name none.")
@click.option(
    "--output",
    "output_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for NAME-DATE.jsonl and NAME-DATE.errors.jsonl.",
)
@json_option
def schedule_add(name: str, cron: str, input_glob: str, model: str, output_dir: str, as_json: bool) -> None:
    """Add a schedule NAME."""
    from batchllm.services.schedules import add_schedule, validate_cron
    from batchllm.store.db import check_database

    validate_cron(cron)  # a typo is a usage error (exit 2) even when the database is down
    st = settings()
    check_database(st.database_url)
    row = add_schedule(st, name, cron, input_glob, model, output_dir)
    if as_json:
        print_json(row)
        return
    click.echo(
        f"schedule {row['name']}: {row['cron']} → {row['input']} with {row['model']} into {row['output_dir']}; "
        f"next run {_when(row['next_fire_at'])}"
    )


@schedule.command("list")
@json_option
def schedule_list(as_json: bool) -> None:
    """List schedules with their next run and pending batches."""
    from batchllm.services.schedules import list_schedules
    from batchllm.store.db import check_database

    st = settings()
    check_database(st.database_url)
    rows = list_schedules(st)
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("no schedules (add one with `batchllm schedule add`)")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("name", "cron", "input", "model", "output", "last run", "next run", "pending")
    for r in rows:
        t.add_row(
            r["name"],
            r["cron"],
            r["input"],
            r["model"],
            r["output_dir"],
            _when(r["last_fired_at"]),
            _when(r["next_fire_at"]),
            ", ".join(r["pending_batches"]) or "-",
        )
    Console().print(t)


@schedule.command("remove")
@click.argument("name")
def schedule_remove(name: str) -> None:
    """Remove schedule NAME (its batches and written files stay)."""
    from batchllm.services.schedules import remove_schedule
    from batchllm.store.db import check_database

    st = settings()
    check_database(st.database_url)
    remove_schedule(st, name)
    click.echo(f"removed schedule {name}")


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M %Z") if ts else "-"


COMMANDS = [scheduler, schedule]
