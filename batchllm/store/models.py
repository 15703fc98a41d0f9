"""SQLAlchemy 2.0 tables: the SQL store is the source of truth for batches, requests, chunks and results.

Times are stored as float epoch seconds (UTC): portable between SQLite and PostgreSQL and cheap to
compare for leases and heartbeats.
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
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only autoincrements INTEGER PRIMARY KEY columns; PostgreSQL wants BIGINT for million-line batches.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base of all batchllm tables."""


class Batch(Base):
    """One submitted file (or stdin stream)."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), index=True)
    model: Mapped[str | None] = mapped_column(String(200))  # the --model default, if any
    priority: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    input_name: Mapped[str | None] = mapped_column(Text)
    input_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    invalid: Mapped[int] = mapped_column(Integer, default=0)
    blank_lines: Mapped[int] = mapped_column(Integer, default=0)
    models: Mapped[dict | None] = mapped_column(JSON)  # {"model name": "model@variant"} resolved at submit
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)
    meta: Mapped[dict | None] = mapped_column(JSON)


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
    kind: Mapped[str | None] = mapped_column(String(16))  # "chat" | "completion"
    chunk_id: Mapped[str | None] = mapped_column(String(64))
    body: Mapped[str | None] = mapped_column(Text)  # JSON text: messages/prompt + sampling params
    error_code: Mapped[str | None] = mapped_column(String(64))  # set for lines rejected at validation
    error_message: Mapped[str | None] = mapped_column(Text)


class Chunk(Base):
    """A slice of one batch's requests for one model: the unit that is queued, leased and run."""

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
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    dispatched_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)


class Result(Base):
    """The outcome of one request, upserted by request id so a re-run never duplicates it."""

    __tablename__ = "results"
    __table_args__ = (Index("ix_results_batch_ok", "batch_id", "ok"),)

    request_id: Mapped[int] = mapped_column(BigId, ForeignKey("requests.id", ondelete="CASCADE"), primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(64))
    ok: Mapped[bool] = mapped_column(Boolean)
    status_code: Mapped[int] = mapped_column(Integer)
    text: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    model: Mapped[str | None] = mapped_column(String(200))
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(200))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[float] = mapped_column(Float)


class Worker(Base):
    """A worker's heartbeat row: what it has, what it runs, when it was last seen."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
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
    error: Mapped[str | None] = mapped_column(Text)
    tokens_generated: Mapped[int] = mapped_column(BigInteger, default=0)
    requests_done: Mapped[int] = mapped_column(BigInteger, default=0)
    started_at: Mapped[float] = mapped_column(Float)
    last_heartbeat: Mapped[float] = mapped_column(Float, index=True)


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
