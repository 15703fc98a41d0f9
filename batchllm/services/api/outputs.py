"""Output and error files: ``file-output-<batch>`` / ``file-errors-<batch>``, read from the results when asked.

They are never stored as files. Their content is ``services.export.export`` run in a worker thread, writing
into a bounded pipe that the HTTP response drains, so a file of any size streams with a few MiB of memory;
a client that goes away stops the export. Their size (for the File object) is counted the same way once per
finished batch and remembered. A deleted one leaves a tombstone in the store and answers 404 afterwards.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO, Any, cast

import anyio

from batchllm.errors import NotFound
from batchllm.services.api.config import ApiConfig
from batchllm.services.export import export
from batchllm.services.status import file_ids
from batchllm.store import batches
from batchllm.store import files as file_rows
from batchllm.store.batches import BatchRecord

OUTPUT, ERRORS = "output", "errors"
PURPOSE = "batch_output"
_PREFIXES = {f"file-{OUTPUT}-": OUTPUT, f"file-{ERRORS}-": ERRORS}
_END = object()


@dataclass(frozen=True)
class Virtual:
    """A resolved output or error file: its batch and which of the two it is."""

    id: str
    batch: BatchRecord
    kind: str

    @property
    def filename(self) -> str:
        """OpenAI's name for it (``batch_<id>_output.jsonl``)."""
        return f"{self.batch.id}_{'output' if self.kind == OUTPUT else 'error'}.jsonl"

    @property
    def created_at(self) -> int:
        """When its batch ended."""
        b = self.batch
        ended = b.completed_at or b.failed_at or b.cancelled_at or b.expired_at or b.created_at
        return int(ended)


def parse_id(file_id: str) -> tuple[str, str] | None:
    """``(kind, batch id)`` of an output/error file id, else None."""
    for prefix, kind in _PREFIXES.items():
        if file_id.startswith(prefix) and len(file_id) > len(prefix):
            return kind, "batch_" + file_id[len(prefix):]
    return None


def resolve(cfg: ApiConfig, file_id: str, owner: str | None) -> Virtual | None:
    """The output/error file ``file_id`` of one of ``owner``'s batches; None when the id is not of that form.

    Raises:
        NotFound: no such file: not this owner's batch, not ended yet, no such lines, or deleted.
    """
    parsed = parse_id(file_id)
    if parsed is None:
        return None
    kind, batch_id = parsed
    missing = NotFound(f"No such File object: {file_id}")
    try:
        b = batches.get(cfg.settings.database_url, batch_id, owner)
    except NotFound:
        raise missing from None
    _, out_id, err_id = file_ids(b)
    if file_id != (out_id if kind == OUTPUT else err_id) or file_rows.is_tombstoned(cfg.settings.database_url, file_id):
        raise missing
    return Virtual(file_id, b, kind)


def file_object(cfg: ApiConfig, v: Virtual) -> dict[str, Any]:
    """OpenAI's File object of an output/error file."""
    return {"id": v.id, "object": "file", "bytes": size_of(cfg, v), "created_at": v.created_at, "filename": v.filename,
            "purpose": PURPOSE, "status": "processed", "expires_at": None, "status_details": None}


def size_of(cfg: ApiConfig, v: Virtual) -> int:
    """The file's size in bytes (counted by exporting once; a finished batch's lines never change)."""
    c = v.batch.counts
    key = (cfg.settings.database_url, v.batch.id, v.created_at, c.completed, c.failed)
    with _SIZES_LOCK:
        sizes = _SIZES.get(key)
    if sizes is None:
        out, err = _Counter(), _Counter()
        export(cfg.settings, v.batch.id, cast(IO[bytes], out), cast(IO[bytes], err))
        sizes = (out.n, err.n)
        with _SIZES_LOCK:
            _SIZES[key] = sizes
            while len(_SIZES) > _SIZES_KEPT:
                _SIZES.pop(next(iter(_SIZES)))
    return sizes[0] if v.kind == OUTPUT else sizes[1]


_SIZES: dict[tuple[Any, ...], tuple[int, int]] = {}
_SIZES_LOCK = threading.Lock()
_SIZES_KEPT = 4096


class _Counter:
    """A sink that only counts bytes."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        return len(data)


class _Closed(Exception):
    """The reader went away: the export stops."""


class _Pipe:
    """A bounded hand-over from the export thread to the response (a few ~1 MiB writes at most)."""

    def __init__(self, depth: int = 4) -> None:
        self.q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.closed = threading.Event()

    def put(self, item: Any) -> None:
        while not self.closed.is_set():
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        raise _Closed()

    def write(self, data: bytes) -> int:
        self.put(bytes(data))
        return len(data)


async def stream(cfg: ApiConfig, v: Virtual) -> AsyncIterator[bytes]:
    """The file's bytes, as the export thread produces them."""
    pipe = _Pipe()

    def run() -> None:
        sink = cast(IO[bytes], pipe)
        try:
            if v.kind == OUTPUT:
                export(cfg.settings, v.batch.id, sink, None)
            else:
                export(cfg.settings, v.batch.id, None, sink)
            pipe.put(_END)
        except _Closed:
            return
        except BaseException as e:  # handed to the response, which ends the stream
            try:
                pipe.put(e)
            except _Closed:
                return

    thread = threading.Thread(target=run, name="batchllm-api-export", daemon=True)
    thread.start()
    try:
        while True:
            item = await anyio.to_thread.run_sync(_get, pipe)
            if item is None:
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        pipe.closed.set()


def _get(pipe: _Pipe) -> Any:
    try:
        return pipe.q.get(timeout=1.0)
    except queue.Empty:
        return None
