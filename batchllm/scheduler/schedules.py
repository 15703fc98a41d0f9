"""Recurring runs ("nightly jobs"): a cron expression, an input glob, a model and an output directory.

The scheduler loop fires them, so Celery beat is not needed (beat would be a second process holding the
same state, and firing here shares the loop's store session and outage handling). Each tick:

* a schedule whose most recent cron time (local time, like cron) is later than its ``last_fired_at``
  fires once for that time, even if the scheduler was down for days (missed runs are not replayed);
* each file matching the glob (sorted) is submitted with the idempotency key ``NAME:DATE`` (or
  ``NAME:DATE:FILE`` when the glob matches several files), so a schedule that fires twice for the same
  time never makes a second batch;
* the batches are recorded in ``schedules.pending_batches``; when one ends, ``DIR/NAME-DATE.jsonl`` and
  ``DIR/NAME-DATE.errors.jsonl`` are written atomically (temporary file, then rename), once.

``DATE`` is ``YYYY-MM-DD`` for schedules that fire at most once a day, else ``YYYY-MM-DDTHHMM``.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from croniter import croniter
from sqlalchemy import select

from batchllm.errors import BatchLLMError, InputError, NotFound, ServiceUnavailable
from batchllm.settings import Settings
from batchllm.status import BatchStatus
from batchllm.store.db import session_scope
from batchllm.store.models import Batch, Schedule

log = logging.getLogger(__name__)


def validate_cron(expr: str) -> str:
    """Check a five-field cron expression (or ``@daily``-style alias) and return it stripped.

    Raises:
        InputError: not a valid expression (exit 2).
    """
    expr = " ".join(expr.split())
    fields = expr.split(" ")
    if not expr or (not expr.startswith("@") and len(fields) != 5) or not croniter.is_valid(expr):
        raise InputError(f"invalid cron expression {expr!r}: expected 5 fields 'minute hour day month weekday', e.g. '0 2 * * *'")
    return expr


def _local(ts: float) -> datetime:
    return datetime.fromtimestamp(ts).astimezone()


def next_fire(cron: str, after: float) -> float:
    """The first cron time after ``after`` (epoch seconds, evaluated in local time like cron)."""
    return float(croniter(cron, _local(after)).get_next(float))


def due_time(row: Schedule, now: float) -> float | None:
    """The cron time this schedule should fire for now, or None if it already fired for it."""
    last = croniter(row.cron, _local(now)).get_prev(float)
    base = row.last_fired_at if row.last_fired_at is not None else row.created_at
    return float(last) if last > base else None


def stamp(cron: str, fire_time: float) -> str:
    """``DATE`` of a firing: the day for at-most-daily schedules, else day and time (unique per firing)."""
    minutes, hours = croniter(cron).expanded[:2]
    daily = len(minutes) == 1 and len(hours) == 1 and "*" not in (minutes[0], hours[0])
    return _local(fire_time).strftime("%Y-%m-%d" if daily else "%Y-%m-%dT%H%M")


def add_schedule(settings: Settings, name: str, cron: str, input_glob: str, model: str, output_dir: str) -> dict[str, Any]:
    """Store a new schedule; relative paths are made absolute here, since the scheduler runs elsewhere.

    Raises:
        InputError: bad name or cron, an existing schedule of that name, an unknown model.
    """
    from batchllm.catalog import load_catalog

    if not name or any(c.isspace() or c in "/:" for c in name):
        raise InputError(f"schedule name {name!r} must be non-empty, without spaces, '/' or ':'")
    cron = validate_cron(cron)
    load_catalog(settings).resolve(model)  # ModelNotFound (exit 2) now rather than at 2 am
    out = Path(output_dir).expanduser().absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output directory {out}: {e.strerror}") from e
    pattern = str(Path(input_glob).expanduser()) if input_glob.startswith("~") else input_glob
    if not os.path.isabs(pattern):
        pattern = os.path.join(os.getcwd(), pattern)
    with session_scope(settings.database_url) as s:
        if s.get(Schedule, name) is not None:
            raise InputError(f"schedule {name!r} exists; `batchllm schedule remove {name}` first")
        row = Schedule(name=name, cron=cron, input_glob=pattern, model=model, output_dir=str(out), enabled=True,
                       created_at=time.time(), pending_batches=[])
        s.add(row)
        s.flush()
        return describe(row)


def remove_schedule(settings: Settings, name: str) -> None:
    """Delete a schedule (its batches and written files stay).

    Raises:
        NotFound: no such schedule.
    """
    with session_scope(settings.database_url) as s:
        row = s.get(Schedule, name)
        if row is None:
            raise NotFound(f"no schedule {name!r}; `batchllm schedule list` shows them")
        s.delete(row)


def list_schedules(settings: Settings) -> list[dict[str, Any]]:
    """Every schedule, with its next fire time."""
    with session_scope(settings.database_url) as s:
        return [describe(r) for r in s.scalars(select(Schedule).order_by(Schedule.name))]


def describe(row: Schedule) -> dict[str, Any]:
    """A schedule as plain data (``schedule list --json``)."""
    now = time.time()
    return {
        "name": row.name, "cron": row.cron, "input": row.input_glob, "model": row.model, "output_dir": row.output_dir,
        "enabled": row.enabled, "last_fired_at": row.last_fired_at, "last_batch_id": row.last_batch_id,
        "pending_batches": [e.get("batch_id") for e in row.pending_batches or [] if isinstance(e, dict)],
        "next_fire_at": next_fire(row.cron, max(now, row.last_fired_at or 0.0)) if row.enabled else None,
    }


def run_due(settings: Settings, now: float | None = None) -> dict[str, int]:
    """Fire the schedules that are due and export the batches that ended (one scheduler tick's share).

    Raises:
        ServiceUnavailable: the database is down (the loop logs it and tries again next tick).
    """
    now = time.time() if now is None else now
    with session_scope(settings.database_url) as s:
        rows = list(s.scalars(select(Schedule).where(Schedule.enabled.is_(True)).order_by(Schedule.name)))
    fired = 0
    for row in rows:
        when = due_time(row, now)
        if when is not None:
            fire(settings, row.name, when)
            fired += 1
    return {"schedules_fired": fired, "exports_written": export_finished(settings)}


def fire(settings: Settings, name: str, fire_time: float) -> list[str]:
    """Submit the schedule's input files for ``fire_time`` (idempotent) and record them as pending.

    Returns:
        The batch ids (existing ones when it already fired for this time).
    """
    from batchllm.services.submit import submit_file  # services sit above the scheduler: import at use

    with session_scope(settings.database_url) as s:
        row = s.get(Schedule, name)
        if row is None:
            return []
        cron, pattern, model = row.cron, row.input_glob, row.model
    date = stamp(cron, fire_time)
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        log.warning("schedule %s (%s): no file matches %s", name, date, pattern)
    entries: list[dict[str, str]] = []
    for path in files:
        one = len(files) == 1
        key = f"{name}:{date}" if one else f"{name}:{date}:{os.path.basename(path)}"
        output = f"{name}-{date}" if one else f"{name}-{date}-{Path(path).stem}"
        try:
            res = submit_file(settings, path, app=None, model=model, name=f"{name} {date}", idempotency_key=key)
        except ServiceUnavailable:
            raise  # fire again next tick: the idempotency key makes that safe
        except BatchLLMError as e:  # a bad file must not stop the others, nor the loop
            log.error("schedule %s (%s): %s not submitted: %s", name, date, path, e)
            continue
        entries.append({"batch_id": res.batch_id, "output": output})
        log.info("schedule %s (%s): %s → batch %s%s", name, date, path, res.batch_id, " (existing)" if res.existing else "")
    with session_scope(settings.database_url) as s:
        row = s.get(Schedule, name, with_for_update=True)
        if row is None:
            return [e["batch_id"] for e in entries]
        pending = [e for e in row.pending_batches or [] if isinstance(e, dict)]
        known = {e.get("batch_id") for e in pending}
        row.pending_batches = pending + [e for e in entries if e["batch_id"] not in known]
        row.last_fired_at = max(row.last_fired_at or 0.0, fire_time)
        if entries:
            row.last_batch_id = entries[-1]["batch_id"]
    return [e["batch_id"] for e in entries]


def export_finished(settings: Settings) -> int:
    """Write the output files of pending batches that have ended; returns how many batches were written."""
    with session_scope(settings.database_url) as s:
        todo: list[tuple[str, str, dict[str, str]]] = []
        for row in s.scalars(select(Schedule)):
            for entry in row.pending_batches or []:
                if not isinstance(entry, dict) or "batch_id" not in entry:
                    continue
                batch = s.get(Batch, entry["batch_id"])
                if batch is None or BatchStatus(batch.status).terminal:
                    todo.append((row.name, row.output_dir, entry))
    written = 0
    done: dict[str, set[str]] = {}
    for name, out_dir, entry in todo:
        try:
            if _write_outputs(settings, Path(out_dir), entry):
                written += 1
        except NotFound:
            log.warning("schedule %s: batch %s no longer exists; nothing to write", name, entry["batch_id"])
        except OSError as e:  # a full or read-only disk: keep it pending and try again next tick
            log.error("schedule %s: cannot write %s/%s.jsonl: %s", name, out_dir, entry.get("output"), e)
            continue
        done.setdefault(name, set()).add(entry["batch_id"])
    if done:
        with session_scope(settings.database_url) as s:
            for name, ids in done.items():
                sched = s.get(Schedule, name, with_for_update=True)
                if sched is not None:
                    keep = [e for e in sched.pending_batches or [] if not (isinstance(e, dict) and e.get("batch_id") in ids)]
                    sched.pending_batches = keep
    return written


def _write_outputs(settings: Settings, out_dir: Path, entry: dict[str, str]) -> bool:
    """Write ``NAME-DATE.jsonl`` and ``.errors.jsonl`` atomically; False if the output already exists (written once)."""
    from batchllm.services.export import export

    out_dir.mkdir(parents=True, exist_ok=True)
    out, err = out_dir / f"{entry['output']}.jsonl", out_dir / f"{entry['output']}.errors.jsonl"
    if out.exists():
        return False
    tmp_out, tmp_err = out.with_name(f".{out.name}.part"), err.with_name(f".{err.name}.part")
    try:
        with tmp_out.open("w", encoding="utf-8") as fo, tmp_err.open("w", encoding="utf-8") as fe:
            counts = export(settings, entry["batch_id"], fo, fe)
        os.replace(tmp_err, err)
        os.replace(tmp_out, out)  # last: the main file appearing means both are complete
    finally:
        for tmp in (tmp_out, tmp_err):
            tmp.unlink(missing_ok=True)
    log.info("wrote %s (%d lines) and %s (%d lines)", out, counts.outputs, err, counts.errors)
    return True
