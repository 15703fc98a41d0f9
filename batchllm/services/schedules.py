"""Recurring runs ("nightly jobs"): a cron expression, an input glob, a model and an output directory.

The active scheduler fires them (``batchllm scheduler`` hands :meth:`Schedules.tick` in as a hook), so Celery
beat is not needed. Each tick:

* a schedule whose most recent cron time is later than its ``last_fired_at`` fires once for that time, even
  if no scheduler ran for days (missed runs are not replayed). Cron is evaluated on the **database's clock**
  (``store.db.now``), read in the scheduler host's local timezone, like cron;
* each file matching the glob is submitted with the idempotency key ``NAME:DATE:REL``, where ``REL`` is the
  file's path relative to the glob's fixed prefix (the directories before the first wildcard). Keys are
  therefore unique per input *path* — two ``a.jsonl`` in different directories of a ``**`` glob are two
  batches — and a schedule that fires twice for the same time never makes a second batch;
* the batches are recorded as pending; when one ends, ``DIR/NAME-DATE[-LABEL].jsonl`` and
  ``.errors.jsonl`` are written atomically (temporary file, then rename), once. ``LABEL`` (only when the
  glob matched several files) is ``REL`` without ``.jsonl``, sanitized; labels that would collide
  (``a.jsonl``/``a.json`` do not, ``x/a.jsonl``/``x_a.jsonl`` would) get a short hash of ``REL``.

``DATE`` is ``YYYY-MM-DD`` for schedules that fire at most once a day, else ``YYYY-MM-DDTHHMM``.
Failures are isolated: an unreadable file, or any unexpected error in one schedule or one export, is logged
with the schedule's name and the others go on. Only an outage stops the tick's share (next tick retries).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from croniter import croniter

from batchllm.catalog import load_catalog
from batchllm.errors import BatchLLMError, InputError, NotFound, NotLeader
from batchllm.outages import is_outage
from batchllm.services import export as export_service
from batchllm.services import submit as submit_service
from batchllm.settings import Settings
from batchllm.store import db
from batchllm.store import schedules as rows
from batchllm.store.leader import LeaderFence
from batchllm.store.schedules import ScheduleRecord

log = logging.getLogger(__name__)

NAME_MAX = 100
KEY_MAX = 200  # the idempotency key column
LABEL_MAX = 80
_MAGIC = re.compile(r"[*?\[]")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# ------------------------------------------------------------------------------------------------ cron


def validate_cron(expr: str) -> str:
    """Check a five-field cron expression (or ``@daily``-style alias) and return it normalized.

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
    """The first cron time after ``after`` (epoch seconds), in this host's local time like cron."""
    return float(croniter(cron, _local(after)).get_next(float))


def due_time(rec: ScheduleRecord, now: float) -> float | None:
    """The cron time this schedule should fire for at ``now`` (database time), or None if it already did."""
    last = float(croniter(rec.cron, _local(now)).get_prev(float))
    base = rec.last_fired_at if rec.last_fired_at is not None else rec.created_at
    return last if last > base else None


def stamp(cron: str, fire_time: float) -> str:
    """``DATE`` of a firing: the day for at-most-daily schedules, else day and time (unique per firing)."""
    minutes, hours = croniter(cron).expanded[:2]
    daily = len(minutes) == 1 and len(hours) == 1 and "*" not in (minutes[0], hours[0])
    return _local(fire_time).strftime("%Y-%m-%d" if daily else "%Y-%m-%dT%H%M")


# ------------------------------------------------------------------------------------------------ names


def glob_root(pattern: str) -> str:
    """The fixed prefix of a glob: its directories before the first one with a wildcard."""
    parts = Path(pattern).parts
    fixed: list[str] = []
    for part in parts[:-1]:
        if _MAGIC.search(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else os.sep


def relative_name(pattern: str, path: str) -> str:
    """``path`` relative to the glob's fixed prefix, with ``/`` separators."""
    return Path(os.path.relpath(path, glob_root(pattern))).as_posix()


def idempotency_key(name: str, date: str, rel: str) -> str:
    """``NAME:DATE:REL``; a hash of ``REL`` when it is too long or not plain printable text."""
    key = f"{name}:{date}:{rel}"
    if len(key) <= KEY_MAX and rel.isprintable() and _encodes(rel):
        return key
    return f"{name}:{date}:#{_hash(rel, 24)}"


def output_labels(rels: list[str]) -> dict[str, str]:
    """A file-name-safe label per relative path, unique among ``rels`` (also on case-insensitive disks)."""
    labels: dict[str, str] = {}
    exact: dict[str, bool] = {}
    for rel in rels:
        stem = rel[: -len(".jsonl")] if rel.endswith(".jsonl") else rel
        label = _UNSAFE.sub("_", stem.replace("/", "_")).strip("._") or "file"
        exact[rel] = len(label) <= LABEL_MAX
        labels[rel] = label[:LABEL_MAX]
    seen: dict[str, int] = {}
    for label in labels.values():
        seen[label.lower()] = seen.get(label.lower(), 0) + 1
    unique = {rel for rel, label in labels.items() if exact[rel] and seen[label.lower()] == 1}
    return {rel: label if rel in unique else f"{label}-{_hash(rel, 8)}" for rel, label in labels.items()}


def _hash(text: str, n: int) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:n]


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8 (surrogate escapes): the database cannot hold it
        return False
    return True


# ------------------------------------------------------------------------------------------------ CRUD


def add_schedule(settings: Settings, name: str, cron: str, input_glob: str, model: str, output_dir: str) -> dict[str, Any]:
    """Store a new schedule; relative paths are made absolute here, since the scheduler runs elsewhere.

    Raises:
        InputError: bad name or cron, an existing schedule of that name, an unknown model.
    """
    if not name or len(name) > NAME_MAX or _UNSAFE.search(name):
        raise InputError(f"schedule name {name!r} must be 1-{NAME_MAX} characters of letters, digits, '.', '_' or '-'")
    cron = validate_cron(cron)
    load_catalog(settings).resolve(model)  # ModelNotFound (exit 2) now rather than at 2 am
    out = Path(output_dir).expanduser().absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output directory {out}: {e.strerror}") from e
    pattern = os.path.expanduser(input_glob)
    if not os.path.isabs(pattern):
        pattern = os.path.join(os.getcwd(), pattern)
    rec = rows.add(settings.database_url, name, cron, pattern, model, str(out))
    return describe(rec, db.now(settings.database_url))


def remove_schedule(settings: Settings, name: str) -> None:
    """Delete a schedule (its batches and written files stay).

    Raises:
        NotFound: no such schedule.
    """
    rows.remove(settings.database_url, name)


def list_schedules(settings: Settings) -> list[dict[str, Any]]:
    """Every schedule, with its next fire time."""
    now = db.now(settings.database_url)
    return [describe(r, now) for r in rows.listing(settings.database_url)]


def describe(rec: ScheduleRecord, now: float) -> dict[str, Any]:
    """A schedule as plain data (``schedule list --json``); ``now`` is database time."""
    return {
        "name": rec.name, "cron": rec.cron, "input": rec.input_glob, "model": rec.model, "output_dir": rec.output_dir,
        "enabled": rec.enabled, "last_fired_at": rec.last_fired_at, "last_batch_id": rec.last_batch_id,
        "pending_batches": [e["batch_id"] for e in rec.pending],
        "next_fire_at": next_fire(rec.cron, max(now, rec.last_fired_at or 0.0)) if rec.enabled else None,
    }


# ------------------------------------------------------------------------------------------------ firing


class Schedules:
    """The scheduler's hook: fire due schedules and write the outputs of ended batches.

    Args:
        settings: settings (database URL, and what submitting needs).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.database_url
        self._reported: set[tuple[str, str]] = set()  # (what, detail) logged with a trace already

    def tick(self, fence: LeaderFence | None, now: float | None = None) -> dict[str, Any]:
        """One scheduler tick's share; ``now`` defaults to the database's clock.

        Raises:
            ServiceUnavailable: the database is down (the scheduler logs it; the next tick retries safely).
            NotLeader: another scheduler took over.
        """
        now = db.now(self.url) if now is None else now
        fired: list[str] = []
        failed: list[str] = []
        for rec in rows.listing(self.url, enabled_only=True):
            try:
                when = due_time(rec, now)
                if when is not None:
                    self.fire(rec, when, fence)
                    fired.append(rec.name)
            except Exception as e:
                if is_outage(e) or isinstance(e, NotLeader):
                    raise
                failed.append(rec.name)
                self._report(("fire", rec.name), f"schedule {rec.name}: firing failed, the other schedules go on", e)
        written, export_failed = self.export_finished(fence)
        return {"schedules_fired": fired, "exports_written": written, "schedule_errors": failed + export_failed}

    def fire(self, rec: ScheduleRecord, fire_time: float, fence: LeaderFence | None) -> list[str]:
        """Submit the schedule's input files for ``fire_time`` (idempotent) and record them as pending.

        A file that cannot be submitted (unreadable, invalid, any error but an outage) is logged and skipped.

        Returns:
            The batch ids (existing ones when it already fired for this time).
        """
        date = stamp(rec.cron, fire_time)
        files = sorted(p for p in glob.glob(rec.input_glob, recursive=True) if os.path.isfile(p))
        if not files:
            log.warning("schedule %s (%s): no file matches %s", rec.name, date, rec.input_glob)
        rels = {path: relative_name(rec.input_glob, path) for path in files}
        labels = output_labels(list(rels.values()))
        entries: list[dict[str, str]] = []
        for path, rel in rels.items():
            output = f"{rec.name}-{date}" if len(files) == 1 else f"{rec.name}-{date}-{labels[rel]}"
            try:
                res = submit_service.submit_file(self.settings, path, model=rec.model, name=f"{rec.name} {date}",
                                                 idempotency_key=idempotency_key(rec.name, date, rel))
            except Exception as e:
                if is_outage(e):
                    raise  # fire again next tick: the idempotency keys make that safe
                self._report(("file", path), f"schedule {rec.name} ({date}): {path} not submitted", e)
                continue
            entries.append({"batch_id": res.batch_id, "output": output, "input": path})
            log.info("schedule %s (%s): %s → batch %s%s", rec.name, date, path, res.batch_id,
                     " (existing)" if res.existing else "")
        rows.record_firing(self.url, rec.name, fire_time, entries, fence)
        return [e["batch_id"] for e in entries]

    def export_finished(self, fence: LeaderFence | None) -> tuple[int, list[str]]:
        """Write the outputs of pending batches that ended; returns (files written, schedules that failed)."""
        written = 0
        done: dict[str, Iterable[str]] = {}
        failed: list[str] = []
        for rec, entry, exists in rows.ended_pending(self.url):
            batch_id = entry["batch_id"]
            try:
                if not exists:
                    raise NotFound(f"batch {batch_id} no longer exists")
                written += write_outputs(self.settings, Path(rec.output_dir), entry)
            except NotFound:
                log.warning("schedule %s: batch %s no longer exists; nothing to write", rec.name, batch_id)
            except Exception as e:
                if is_outage(e):
                    raise
                # Kept pending: a full disk or a bug is retried next tick (a written file is never rewritten).
                failed.append(rec.name)
                self._report(("export", batch_id), f"schedule {rec.name}: cannot write the output of {batch_id}", e)
                continue
            done[rec.name] = [*done.get(rec.name, ()), batch_id]
        rows.drop_pending(self.url, done, fence)
        return written, failed

    def _report(self, key: tuple[str, str], what: str, e: Exception) -> None:
        """Log a failure in one line; an unexpected one with its trace the first time it is met."""
        if isinstance(e, BatchLLMError | OSError) or key in self._reported:
            log.error("%s: %s", what, e)
        else:
            self._reported.add(key)
            log.exception("%s: unexpected %s", what, type(e).__name__)


def run_due(settings: Settings, fence: LeaderFence | None, now: float | None = None) -> dict[str, Any]:
    """One tick's share with a fresh :class:`Schedules` (tests, ``scheduler --once``)."""
    return Schedules(settings).tick(fence, now)


def write_outputs(settings: Settings, out_dir: Path, entry: dict[str, str]) -> bool:
    """Write ``OUTPUT.jsonl`` and ``OUTPUT.errors.jsonl`` atomically; False if the output exists (written once)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out, err = out_dir / f"{entry['output']}.jsonl", out_dir / f"{entry['output']}.errors.jsonl"
    if out.exists():
        return False
    tmp_out = _temp(out)
    tmp_err = _temp(err)
    try:
        with tmp_out.open("wb") as fo, tmp_err.open("wb") as fe:
            counts = export_service.export(settings, entry["batch_id"], fo, fe)
            for f in (fo, fe):
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp_err, err)
        os.replace(tmp_out, out)  # last: the main file appearing means both are complete
    finally:
        for tmp in (tmp_out, tmp_err):
            tmp.unlink(missing_ok=True)
    log.info("wrote %s (%d lines) and %s (%d lines)", out, counts.outputs, err, counts.errors)
    return True


def _temp(target: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    return Path(name)
