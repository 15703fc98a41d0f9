"""API keys of ``batchllm serve``: stored as hashes only; looked up by hash, named, revoked.

Hashing and key generation belong to ``services.api.keys``; this module only stores what it is given.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from batchllm.errors import NotFound, StateError
from batchllm.store.clock import db_now
from batchllm.store.db import session_scope
from batchllm.store.models import ApiKey

TOUCH_EVERY_S = 60.0  # last_used_at is refreshed at most this often (one conditional UPDATE)


@dataclass(frozen=True)
class KeyRecord:
    """An API key's row, without its hash."""

    id: str
    name: str
    prefix: str
    pepper_tag: str | None
    created_at: float
    last_used_at: float | None
    revoked_at: float | None

    @property
    def active(self) -> bool:
        """Not revoked."""
        return self.revoked_at is None


def _record(k: ApiKey) -> KeyRecord:
    return KeyRecord(k.id, k.name, k.prefix, k.pepper_tag, float(k.created_at), k.last_used_at, k.revoked_at)


def create(url: str, name: str, key_hash: str, prefix: str, pepper_tag: str | None) -> KeyRecord:
    """Store a new key's hash under ``name``.

    Raises:
        StateError: an active key already has this name.
    """
    key_id = f"key_{uuid.uuid4().hex[:16]}"
    try:
        with session_scope(url) as s:
            s.execute(insert(ApiKey).values(id=key_id, name=name, key_hash=key_hash, prefix=prefix, pepper_tag=pepper_tag,
                                            created_at=db_now()))
            k = s.get(ApiKey, key_id)
            assert k is not None
            return _record(k)
    except IntegrityError as e:
        raise StateError(f"an active API key is already named {name!r}; revoke it first or choose another name") from e


def find_by_hash(url: str, key_hash: str) -> KeyRecord | None:
    """The active key with this hash (its ``last_used_at`` refreshed now and then), or None."""
    with session_scope(url) as s:
        k = s.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None)))
        if k is None:
            return None
        s.execute(update(ApiKey).where(ApiKey.id == k.id, or_(ApiKey.last_used_at.is_(None),
                                                             ApiKey.last_used_at < db_now() - TOUCH_EVERY_S))
                  .values(last_used_at=db_now()))
        return _record(k)


def listing(url: str, include_revoked: bool = False) -> list[KeyRecord]:
    """Keys, oldest first."""
    q = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        q = q.where(ApiKey.revoked_at.is_(None))
    with session_scope(url) as s:
        return [_record(k) for k in s.scalars(q)]


def revoke(url: str, name_or_id: str) -> KeyRecord:
    """Revoke the active key with this name or id; it stops working at once.

    Raises:
        NotFound: no active key has this name or id.
    """
    with session_scope(url) as s:
        k = s.scalar(select(ApiKey).where(or_(ApiKey.id == name_or_id, ApiKey.name == name_or_id),
                                          ApiKey.revoked_at.is_(None)))
        if k is None:
            raise NotFound(f"no active API key named {name_or_id!r}; `batchllm keys list` shows them")
        s.execute(update(ApiKey).where(ApiKey.id == k.id).values(revoked_at=db_now()))
        s.flush()
        s.refresh(k)
        return _record(k)


def count_active(url: str) -> int:
    """Keys not revoked."""
    with session_scope(url) as s:
        return int(s.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None))) or 0)


def active_pepper_tags(url: str) -> set[str | None]:
    """The pepper tags of the active keys (a server whose pepper matches none of them can authenticate nobody)."""
    with session_scope(url) as s:
        return set(s.scalars(select(ApiKey.pepper_tag).where(ApiKey.revoked_at.is_(None)).distinct()))
