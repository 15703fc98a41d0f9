"""``batchllm submit``: stream a JSONL file into SQL, split it into chunks per model, then dispatch them.

Storing and dispatching are two steps on purpose: the batch id is known (and printed) as soon as the batch is
committed, and a broker that fails afterwards loses nothing — the chunks wait in SQL with no message, and
the scheduler sends them when the broker is back.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from celery import Celery

from batchllm.catalog import Catalog, load_catalog
from batchllm.errors import InputError, ModelNotFound, StateError
from batchllm.formats import LineError, Parsed, iter_raw_lines, parse_line
from batchllm.placement.variants import KNOWN_WORKER_WINDOW_S, resolve_refs
from batchllm.queue import dispatch, queue_name
from batchllm.settings import Settings
from batchllm.status import BatchStatus, InvalidLines
from batchllm.store import batches, leader
from batchllm.store import dispatch as dispatch_rows
from batchllm.store import workers as worker_rows
from batchllm.store.batches import NewBatch, NewChunk, new_chunk_id

_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
FAIR_HEAD_CHUNKS = 2  # chunks a submit sends itself while a scheduler meters out the rest
MAX_METADATA = 16
MAX_ERRORS_IN_OBJECT = 100  # errors.data of a failed batch; every line's error is in the error file


def parse_window(text: str) -> float:
    """``24h`` / ``30m`` / ``7d`` / ``90s`` → seconds."""
    m = _WINDOW.match(text)
    if not m or float(m[1]) <= 0:
        raise InputError(f"completion window '{text}' is not like 24h, 30m, 7d or 90s")
    return float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


def check_metadata(meta: dict[str, str] | None) -> dict[str, str] | None:
    """OpenAI's metadata rules: at most 16 pairs, keys up to 64 characters, values up to 512."""
    if not meta:
        return None
    if len(meta) > MAX_METADATA:
        raise InputError(f"metadata has {len(meta)} pairs; at most {MAX_METADATA}")
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str) or not 0 < len(k) <= 64 or len(v) > 512:
            raise InputError(f"metadata {k!r}: keys are 1-64 characters and values at most 512 (strings)")
    return dict(meta)


@dataclass
class SubmitResult:
    """What a submit stored."""

    batch_id: str
    existing: bool = False
    status: str = BatchStatus.IN_PROGRESS
    total: int = 0
    valid: int = 0
    invalid: int = 0
    blank: int = 0
    chunks: int = 0
    dispatched: int = 0
    models: dict[str, str] = field(default_factory=dict)
    errors: list[LineError] = field(default_factory=list)  # the first few, for the summary


class _Hashing(io.RawIOBase):
    """Wraps a binary stream to hash what is read, so stdin can be fingerprinted while streamed."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self.raw = raw
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha.update(data)
        return n


def file_sha256(path: Path) -> str:
    """Hash a file in 1 MiB blocks (used by `batchllm run` to find the batch to resume)."""
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def open_input(source: str | Path | IO[bytes]) -> tuple[IO[bytes], str]:
    """Open a path, ``-`` (stdin) or an open binary stream; clear error when the file is missing."""
    if not isinstance(source, str | Path):
        return source, getattr(source, "name", "<upload>")
    if str(source) == "-":
        return sys.stdin.buffer, "<stdin>"
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file; give a JSONL file path or - for stdin")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give a JSONL file")
    return path.open("rb"), str(path)


def _model_checker(catalog: Catalog) -> Callable[[str], str | None]:
    cache: dict[str, str | None] = {}

    def check(name: str) -> str | None:
        if name not in cache:
            try:
                catalog.resolve(name)
                cache[name] = None
            except ModelNotFound as e:
                cache[name] = str(e)
        return cache[name]

    return check


@dataclass
class _Tally:
    """The hot loop's state while a file streams in."""

    chunk_size: int
    total: int = 0
    valid: int = 0
    invalid: int = 0
    blank: int = 0
    seen: set[str] = field(default_factory=set)
    chunks: list[list[Any]] = field(default_factory=list)  # [chunk id, model name, size]
    open_chunk: dict[str, list[Any]] = field(default_factory=dict)
    errors: list[LineError] = field(default_factory=list)
    endpoint: str | None = None

    def chunk_for(self, model: str) -> str:
        ck = self.open_chunk.get(model)
        if ck is None or ck[2] >= self.chunk_size:
            ck = self.open_chunk[model] = [new_chunk_id(), model, 0]
            self.chunks.append(ck)
        ck[2] += 1
        return str(ck[0])


def submit_file(settings: Settings, source: str | Path | IO[bytes], *, model: str | None = None, name: str | None = None,
                priority: int = 0, strict: bool = False, idempotency_key: str | None = None,
                queue_anyway: bool = False, completion_window: str | None = None,
                metadata: dict[str, str] | None = None, owner: str | None = None, input_file_id: str | None = None,
                on_invalid: InvalidLines = InvalidLines.RUN_VALID, endpoint: str | None = None,
                on_progress: Callable[[int], None] | None = None) -> SubmitResult:
    """Validate and store a JSONL batch (one transaction); nothing is dispatched here (see ``dispatch_new``).

    Args:
        settings: settings (database URL, chunk size, line size limit).
        source: file path, ``-`` or an open binary stream.
        model: default model for lines that name none.
        name: a label for the batch.
        priority: 0-9, 9 most urgent.
        strict: reject the whole file (exit 2, nothing stored) if any line is invalid.
        idempotency_key: same key → the existing batch is returned, nothing is stored twice.
        queue_anyway: queue work even if no known worker can host its model.
        completion_window: e.g. ``24h``; the batch expires after it.
        metadata: OpenAI metadata (up to 16 string pairs).
        owner: the API key that owns the batch (None: the CLI).
        input_file_id: the uploaded file it came from (the HTTP API).
        on_invalid: ``run_valid`` (default) or ``fail`` (OpenAI's rule: any invalid line fails the batch).
        endpoint: the batch's endpoint (the HTTP API): lines with another url are invalid.
        on_progress: called with the number of lines read so far (every few thousand lines).

    Raises:
        InputError: empty file, --strict with invalid lines, bad flag values.
        NoCapacity: a model no known worker can host (unless ``queue_anyway``).
        ServiceUnavailable: the database is down.
    """
    if not 0 <= priority <= 9:
        raise InputError(f"--priority must be 0-9 (got {priority})")
    window_text = completion_window or settings.completion_window
    window = parse_window(window_text)
    meta = check_metadata(metadata)
    url = settings.database_url
    if idempotency_key and (found := batches.find_by_key(url, idempotency_key)) is not None:
        return _existing(found)
    catalog = load_catalog(settings)
    check = _model_checker(catalog)
    stream, input_name = open_input(source)
    hashing = _Hashing(stream)
    reader = io.BufferedReader(hashing, buffer_size=1 << 20)
    spec = NewBatch(name=name, model=model, priority=priority, idempotency_key=idempotency_key, input_name=input_name,
                    completion_window=window_text, window_s=window, meta=meta, owner=owner, input_file_id=input_file_id,
                    on_invalid=str(on_invalid), endpoint=endpoint)
    tally = _Tally(settings.chunk_size)
    try:
        with batches.create(url, spec) as ing:
            _ingest(ing, reader, tally, settings.max_line_bytes, model, check, endpoint, on_progress)
            _check_file_level(tally, input_name, strict)
            names = list(dict.fromkeys(ck[1] for ck in tally.chunks))
            refs = _resolve(settings, catalog, names, queue_anyway) if names else {}
            status, errors = _status(tally, on_invalid)
            chunks = [] if status != BatchStatus.IN_PROGRESS else [
                NewChunk(str(ck[0]), refs[ck[1]], queue_name(refs[ck[1]]), seq, ck[2]) for seq, ck in enumerate(tally.chunks, 1)]
            ing.finish(chunks, total=tally.total, invalid=tally.invalid, blank=tally.blank,
                       models=refs, input_sha256=hashing.sha.hexdigest(), status=status, errors=errors,
                       endpoint=tally.endpoint)
    except StateError:  # the idempotency key was taken by a concurrent submit: that batch is the answer
        found = batches.find_by_key(url, idempotency_key or "")
        if found is None:
            raise
        return _existing(found)
    finally:
        if stream is not sys.stdin.buffer and isinstance(source, str | Path):
            stream.close()
    return SubmitResult(batch_id=ing.batch_id, status=status, total=tally.total, valid=tally.valid,
                        invalid=tally.invalid, blank=tally.blank, chunks=len(chunks), models=refs, errors=tally.errors[:20])


def _ingest(ing: batches.BatchIngest, reader: IO[bytes], t: _Tally, max_line_bytes: int, model: str | None,
            check: Callable[[str], str | None], endpoint: str | None, on_progress: Callable[[int], None] | None) -> None:
    """The hot loop of a submit: validate every line and hand its row to the store's bulk writer."""
    add, batch_id = ing.add, ing.batch_id
    for line_no, text, error in iter_raw_lines(reader, max_line_bytes):
        if on_progress is not None and line_no % 5000 == 0:
            on_progress(line_no)
        if text is None and error is None:
            t.blank += 1
            continue
        t.total += 1
        parsed: Parsed | LineError = error if error is not None else parse_line(line_no, text or b"", model, check)
        if type(parsed) is Parsed:
            ep = parsed.endpoint.value
            if parsed.custom_id in t.seen:
                parsed = LineError(line_no=line_no, custom_id=parsed.custom_id, code="duplicate_custom_id",
                                   message=f"custom_id {json.dumps(parsed.custom_id, ensure_ascii=False)[:80]} is used by "
                                   "an earlier line; ids must be unique in a batch", param="custom_id")
            elif endpoint is not None and ep != endpoint:
                parsed = LineError(line_no=line_no, custom_id=parsed.custom_id, code="mismatched_endpoint",
                                   message=f"url {ep} does not match the batch's endpoint {endpoint}", param="url")
            else:
                t.seen.add(parsed.custom_id)
                t.valid += 1
                t.endpoint = t.endpoint or ep
                add((batch_id, line_no, parsed.custom_id, parsed.model, ep, t.chunk_for(parsed.model), parsed.body,
                     None, None, None))
                continue
        assert isinstance(parsed, LineError)
        t.invalid += 1
        if len(t.errors) < MAX_ERRORS_IN_OBJECT:
            t.errors.append(parsed)
        add((batch_id, parsed.line_no, parsed.custom_id, parsed.model, None, None, None, parsed.code,
             f"line {parsed.line_no}: {parsed.message}", parsed.param))


def _check_file_level(t: _Tally, input_name: str, strict: bool) -> None:
    if t.total == 0:
        raise InputError(f"{input_name}: no requests (the file is empty or has only blank lines)")
    if strict and t.invalid:
        first = t.errors[0]
        raise InputError(f"{input_name}:{first.line_no}: {first.message} "
                         f"({t.invalid} invalid line(s); --strict rejects the file, nothing was stored)")


def _status(t: _Tally, on_invalid: InvalidLines) -> tuple[BatchStatus, list[dict[str, Any]] | None]:
    """A batch with no valid line, or any invalid line under ``fail``, is ``failed`` with OpenAI's ``errors``."""
    if t.valid and not (t.invalid and on_invalid == InvalidLines.FAIL):
        return BatchStatus.IN_PROGRESS, None
    return BatchStatus.FAILED, [{"code": e.code, "message": e.message, "line": e.line_no, "param": e.param}
                                for e in t.errors[:MAX_ERRORS_IN_OBJECT]]


def _resolve(settings: Settings, catalog: Catalog, names: list[str], queue_anyway: bool) -> dict[str, str]:
    url = settings.database_url
    live = worker_rows.live_workers(url, settings.heartbeat_timeout)
    known = worker_rows.all_workers(url, seen_within=KNOWN_WORKER_WINDOW_S)
    return resolve_refs(settings, catalog, names, live, known, queue_anyway=queue_anyway)


def _existing(b: batches.BatchRecord) -> SubmitResult:
    return SubmitResult(batch_id=b.id, existing=True, status=b.status, total=b.total, invalid=b.invalid,
                        blank=b.blank_lines, models=dict(b.models))


def dispatch_new(settings: Settings, app: Celery, batch_id: str) -> int:
    """Send the new batch's first chunks. With an active scheduler it meters out the rest fairly (priority, then
    round-robin across batches); without one every chunk is sent now, so the batch runs on workers alone.

    Raises:
        ServiceUnavailable: the broker is down (the batch is stored; the scheduler sends it when Redis is back).
    """
    lead = leader.current(settings.database_url)
    limit = FAIR_HEAD_CHUNKS if lead is not None and lead.active else None
    refs = dispatch_rows.of_batch(settings.database_url, batch_id, limit=limit)
    sent = dispatch(app, refs)
    dispatch_rows.mark_sent(settings.database_url, [r.id for r in refs])
    return sent
