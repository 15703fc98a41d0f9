"""fencing tokens, worker instances, leader lease, OpenAI batch lifecycle and response bodies

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Existing data is carried over: stored request bodies become OpenAI request bodies, stored answers become
OpenAI response bodies, and each finished batch gets the timestamp of its end state.
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ENDPOINTS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
_PAGE = 5000


def upgrade() -> None:
    with op.batch_alter_table("batches") as b:
        b.alter_column("started_at", new_column_name="in_progress_at")
        for col in ("finalizing_at", "completed_at", "failed_at", "cancelling_at", "cancelled_at", "expired_at"):
            b.add_column(sa.Column(col, sa.Float(), nullable=True))
        b.add_column(sa.Column("endpoint", sa.String(64), nullable=True))
        b.add_column(sa.Column("owner", sa.String(64), nullable=True))
        b.add_column(sa.Column("input_file_id", sa.String(64), nullable=True))
        b.add_column(sa.Column("on_invalid", sa.String(16), nullable=False, server_default="run_valid"))
        b.add_column(sa.Column("completion_window", sa.String(16), nullable=False, server_default="24h"))
        b.add_column(sa.Column("errors", sa.JSON(), nullable=True))
        b.add_column(sa.Column("completed_count", sa.Integer(), nullable=True))
        b.add_column(sa.Column("failed_count", sa.Integer(), nullable=True))
        b.add_column(sa.Column("input_tokens", sa.BigInteger(), nullable=True))
        b.add_column(sa.Column("output_tokens", sa.BigInteger(), nullable=True))
        b.create_index("ix_batches_owner", ["owner"])
    for status, col in (("completed", "completed_at"), ("cancelled", "cancelled_at"), ("expired", "expired_at"),
                        ("failed", "failed_at")):
        op.execute(f"UPDATE batches SET {col} = finished_at WHERE status = '{status}'")
    with op.batch_alter_table("batches") as b:
        b.drop_column("finished_at")
        b.drop_column("error")

    with op.batch_alter_table("requests") as b:
        b.alter_column("kind", new_column_name="endpoint", type_=sa.String(64), existing_type=sa.String(16))
        b.add_column(sa.Column("error_param", sa.Text(), nullable=True))
    _convert_requests()

    with op.batch_alter_table("chunks") as b:
        b.alter_column("attempts", new_column_name="attempt")
        b.create_index("ix_chunks_lease_owner", ["lease_owner"])

    with op.batch_alter_table("results") as b:
        b.add_column(sa.Column("body", sa.Text(), nullable=True))
        b.alter_column("status_code", existing_type=sa.Integer(), nullable=True)
    _convert_results()
    with op.batch_alter_table("results") as b:
        b.drop_column("text")
        b.drop_column("finish_reason")

    with op.batch_alter_table("workers") as b:
        b.add_column(sa.Column("instance", sa.String(64), nullable=True))
        b.add_column(sa.Column("load_failed_ref", sa.String(200), nullable=True))
        b.add_column(sa.Column("stale_writes", sa.BigInteger(), nullable=False, server_default="0"))
        b.create_unique_constraint("uq_workers_instance", ["instance"])

    op.create_table(
        "scheduler_lease",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("host", sa.String(200), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("term", sa.BigInteger(), nullable=False),
        sa.Column("acquired_at", sa.Float(), nullable=True),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("INSERT INTO scheduler_lease (id, term) VALUES (1, 0)")


def _convert_requests() -> None:
    """Old bodies were ``{"messages", "prompt", "params"}``; now the OpenAI request body itself."""
    conn = op.get_bind()
    for old, new in _ENDPOINTS.items():
        conn.execute(sa.text("UPDATE requests SET endpoint = :new WHERE endpoint = :old"), {"new": new, "old": old})
    last = 0
    while True:
        rows = conn.execute(sa.text("SELECT id, body FROM requests WHERE id > :last AND body IS NOT NULL ORDER BY id "
                                    "LIMIT :n"), {"last": last, "n": _PAGE}).all()
        if not rows:
            return
        updates = []
        for rid, body in rows:
            data = json.loads(body)
            if isinstance(data, dict) and "params" in data and ("messages" in data or "prompt" in data):
                new_body = {k: v for k, v in (("messages", data.get("messages")), ("prompt", data.get("prompt"))) if v}
                new_body.update(data.get("params") or {})
                updates.append({"id": rid, "body": json.dumps(new_body, ensure_ascii=False)})
        if updates:
            conn.execute(sa.text("UPDATE requests SET body = :body WHERE id = :id"), updates)
        last = rows[-1][0]


def _convert_results() -> None:
    """Old answers were text + finish reason; now the whole response body (chat.completion / text_completion)."""
    conn = op.get_bind()
    conn.execute(sa.text("UPDATE results SET status_code = NULL WHERE status_code = 0"))
    last = 0
    while True:
        rows = conn.execute(sa.text(
            "SELECT r.request_id, r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.model, r.created_at, "
            "q.endpoint FROM results r JOIN requests q ON q.id = r.request_id "
            "WHERE r.request_id > :last AND r.ok ORDER BY r.request_id LIMIT :n"), {"last": last, "n": _PAGE}).all()
        if not rows:
            return
        conn.execute(sa.text("UPDATE results SET body = :body WHERE request_id = :id"),
                     [{"id": r[0], "body": json.dumps(_body(*r), ensure_ascii=False)} for r in rows])
        last = rows[-1][0]


def _body(rid, text, finish, ptok, ctok, model, created, endpoint):  # type: ignore[no-untyped-def]
    rid_s = f"batch_req_{rid:012d}"
    usage = {"prompt_tokens": ptok or 0, "completion_tokens": ctok or 0, "total_tokens": (ptok or 0) + (ctok or 0)}
    name = (model or "").split("@", 1)[0]
    if endpoint == _ENDPOINTS["completion"]:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": f"cmpl-{rid_s}", "object": "text_completion", "created": int(created or 0), "model": name,
                "choices": [choice], "usage": usage}
    choice = {"index": 0, "message": {"role": "assistant", "content": text or ""}, "logprobs": None, "finish_reason": finish}
    return {"id": f"chatcmpl-{rid_s}", "object": "chat.completion", "created": int(created or 0), "model": name,
            "choices": [choice], "usage": usage}


def downgrade() -> None:
    raise NotImplementedError("0002 converts stored bodies; restore a backup to go back to 0001")
