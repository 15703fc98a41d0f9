"""SQLAlchemy 2.0 tables: the SQL store is the source of truth for batches, requests, chunks and results.

Times are float epoch seconds (UTC) read from the *database's* clock (``store.clock.db_now``), never from a
host's: leases, heartbeats, dispatch and expiry then agree across machines whose clocks disagree.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only autoincrements INTEGER PRIMARY KEY columns; PostgreSQL wants BIGINT for million-line batches.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base of all batchllm tables."""


class Batch(Base):
    """One submitted file (or stdin stream), with OpenAI's batch lifecycle timestamps."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), index=True)
    endpoint: Mapped[str | None] = mapped_column(String(64))  # the batch's url; None when its lines mix urls
    model: Mapped[str | None] = mapped_column(String(200))  # the --model default, if any
    priority: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)  # API key id; None: the CLI
    input_file_id: Mapped[str | None] = mapped_column(String(64))
    input_name: Mapped[str | None] = mapped_column(Text)
    input_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    on_invalid: Mapped[str] = mapped_column(String(16), default="run_valid")
    total: Mapped[int] = mapped_column(Integer, default=0)
    invalid: Mapped[int] = mapped_column(Integer, default=0)
    blank_lines: Mapped[int] = mapped_column(Integer, default=0)
    models: Mapped[dict | None] = mapped_column(JSON)  # {"model name": "model@variant"} resolved at submit
    completion_window: Mapped[str] = mapped_column(String(16), default="24h")
    meta: Mapped[dict | None] = mapped_column(JSON)  # the user's metadata (OpenAI: up to 16 string pairs)
    errors: Mapped[list | None] = mapped_column(JSON)  # file-level errors of a failed batch: [{code, message, line, param}]
    # Sealed at the end (finalizing → completed): counts and usage then never change.
    completed_count: Mapped[int | None] = mapped_column(Integer)
    failed_count: Mapped[int | None] = mapped_column(Integer)
    input_tokens: Mapped[int | None] = mapped_column(BigInteger)
    output_tokens: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)
    in_progress_at: Mapped[float | None] = mapped_column(Float)
    finalizing_at: Mapped[float | None] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float)
    failed_at: Mapped[float | None] = mapped_column(Float)
    cancelling_at: Mapped[float | None] = mapped_column(Float)
    cancelled_at: Mapped[float | None] = mapped_column(Float)
    expired_at: Mapped[float | None] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)


class Request(Base):
    """One input line. Invalid lines are stored too, with their error, so every line is accounted for."""

    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("batch_id", "line_no", name="uq_requests_batch_line"),
        Index("ix_requests_chunk", "chunk_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(String(64), ForeignKey("batches.id", ondelete="CASCADE"))
    line_no: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(200))
    endpoint: Mapped[str | None] = mapped_column(String(64))  # status.Endpoint value
    chunk_id: Mapped[str | None] = mapped_column(String(64))
    body: Mapped[str | None] = mapped_column(Text)  # the OpenAI request body JSON, as the user wrote it
    error_code: Mapped[str | None] = mapped_column(String(64))  # set for lines rejected at validation
    error_message: Mapped[str | None] = mapped_column(Text)
    error_param: Mapped[str | None] = mapped_column(Text)


class Chunk(Base):
    """A slice of one batch's requests for one model: the unit that is queued, leased and run.

    ``(lease_owner, attempt)`` is the fencing token: each claim increments ``attempt``, and every write of a
    lease holder is conditional on both, so a process that lost the lease can never write again.
    """

    __tablename__ = "chunks"
    __table_args__ = (Index("ix_chunks_status_queue", "status", "queue"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(64), ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(200))  # "name@variant"
    queue: Mapped[str] = mapped_column(String(240))
    seq: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))
    lease_owner: Mapped[str | None] = mapped_column(String(200), index=True)  # the worker process's instance id
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    dispatched_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)


class Result(Base):
    """The outcome of one request; the first applied write wins (insert-only), so no answer ever changes.

    ``body`` is the HTTP response body as JSON text: a chat.completion, text_completion or embedding list for
    status 200, OpenAI's ``{"error": {...}}`` for 4xx/5xx. A request that never got a response (the batch
    expired or was cancelled first) has no status code and carries ``error_code``/``error_message`` only.
    """

    __tablename__ = "results"
    __table_args__ = (Index("ix_results_batch_ok", "batch_id", "ok"),)

    request_id: Mapped[int] = mapped_column(BigId, ForeignKey("requests.id", ondelete="CASCADE"), primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(64))
    ok: Mapped[bool] = mapped_column(Boolean)
    status_code: Mapped[int | None] = mapped_column(Integer)
    body: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    model: Mapped[str | None] = mapped_column(String(200))
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(200))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)


class Worker(Base):
    """A worker's heartbeat row: what it has, what it runs, when it was last seen.

    ``name`` is unique while its holder lives; ``instance`` identifies the process holding it and owns its leases.
    """

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    instance: Mapped[str | None] = mapped_column(String(64), unique=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # "cuda" | "cpu"
    devices: Mapped[list | None] = mapped_column(JSON)
    memory_total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    memory_free_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    advertised_bytes: Mapped[int | None] = mapped_column(BigInteger)
    tensor_parallel: Mapped[int] = mapped_column(Integer, default=1)
    model: Mapped[str | None] = mapped_column(String(200))  # loaded "name@variant"
    assigned_model: Mapped[str | None] = mapped_column(String(200))  # set by the scheduler
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)  # for people: the last problem, one line
    load_failed_ref: Mapped[str | None] = mapped_column(String(200))  # for the scheduler: the ref it could not load
    tokens_generated: Mapped[int] = mapped_column(BigInteger, default=0)
    requests_done: Mapped[int] = mapped_column(BigInteger, default=0)
    stale_writes: Mapped[int] = mapped_column(BigInteger, default=0)  # result writes refused by fencing
    started_at: Mapped[float] = mapped_column(Float)
    last_heartbeat: Mapped[float] = mapped_column(Float, index=True)


class SchedulerLease(Base):
    """The leader lease: the one active scheduler holds row 1; ``term`` grows at every change of holder."""

    __tablename__ = "scheduler_lease"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(64))
    host: Mapped[str | None] = mapped_column(String(200))
    pid: Mapped[int | None] = mapped_column(Integer)
    term: Mapped[int] = mapped_column(BigInteger, default=0)
    acquired_at: Mapped[float | None] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)


class Schedule(Base):
    """A recurring (nightly) run: cron + input glob + model + output directory."""

    __tablename__ = "schedules"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    cron: Mapped[str] = mapped_column(String(100))
    input_glob: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(200))
    output_dir: Mapped[str] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    last_fired_at: Mapped[float | None] = mapped_column(Float)
    last_batch_id: Mapped[str | None] = mapped_column(String(64))
    pending_batches: Mapped[list | None] = mapped_column(JSON)  # batches whose output is not written yet
    created_at: Mapped[float] = mapped_column(Float)


# ------------------------------------------------------------------------------------ the HTTP API (0003)


class File(Base):
    """A file of the HTTP API: an upload (``POST /v1/files``, its bytes in ``file_parts``), or the tombstone of
    a deleted output/error file (``status`` "deleted": those files are read from the results, never stored).

    An upload is ``uploading`` (invisible) until its last part is written, then ``processed``.
    """

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_owner_created", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(64))  # API key id; None: a server without auth
    filename: Mapped[str] = mapped_column(Text)
    purpose: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), index=True)  # uploading | processed | deleted
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    parts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)  # last part written (stale uploads are swept)
    expires_at: Mapped[float | None] = mapped_column(Float)


class FilePart(Base):
    """About 1 MiB of an uploaded file; parts are numbered from 0."""

    __tablename__ = "file_parts"

    file_id: Mapped[str] = mapped_column(String(64), ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ApiKey(Base):
    """An API key of ``batchllm serve``: only its hash is stored; ``prefix`` lets people tell keys apart."""

    __tablename__ = "api_keys"
    __table_args__ = (
        Index("uq_api_keys_active_name", "name", unique=True, postgresql_where=text("revoked_at IS NULL"),
              sqlite_where=text("revoked_at IS NULL")),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    pepper_tag: Mapped[str | None] = mapped_column(String(16))  # which pepper hashed it (None: none)
    created_at: Mapped[float] = mapped_column(Float)
    last_used_at: Mapped[float | None] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)
