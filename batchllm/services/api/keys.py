"""API keys: made here, shown once, stored only as a hash (``store.keys``).

A key is ``bl-`` and 32 random bytes (``secrets.token_urlsafe(32)``: 43 characters, 256 bits). It is stored as
HMAC-SHA256 under the server-side pepper ``BATCHLLM_API_KEY_PEPPER`` when one is set, else as plain SHA-256.

Why not scrypt: a slow hash protects *guessable* secrets (passwords) when the table leaks. A 256-bit random
key cannot be guessed whatever the hash costs, so a fast hash loses nothing there, while scrypt would cost tens
of milliseconds of CPU on every request and need a lookup id inside the key. A fixed-length digest also makes
the lookup one indexed equality query (no per-key comparison loop to time). The pepper adds that a copy of
the database alone cannot even confirm a key found elsewhere (a log, a shell history); changing it invalidates
every key, which the server warns about at start.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from batchllm.errors import InputError
from batchllm.settings import Settings
from batchllm.store import keys as key_rows
from batchllm.store.keys import KeyRecord

KEY_PREFIX = "bl-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}$")
_TOKEN = re.compile(r"^bl-[A-Za-z0-9_-]{43}$")


def _pepper(settings: Settings) -> bytes | None:
    secret = settings.api_key_pepper.get_secret_value() if settings.api_key_pepper is not None else ""
    return secret.encode() if secret else None


def hash_key(settings: Settings, key: str) -> str:
    """The stored form of a key: HMAC-SHA256 under the pepper, or SHA-256 without one (hex)."""
    pepper = _pepper(settings)
    if pepper is None:
        return hashlib.sha256(key.encode()).hexdigest()
    return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()


def pepper_tag(settings: Settings) -> str | None:
    """A short fingerprint of the pepper (None without one), stored with each key to detect a changed pepper."""
    pepper = _pepper(settings)
    return None if pepper is None else hmac.new(pepper, b"batchllm-pepper-tag", hashlib.sha256).hexdigest()[:12]


def create_key(settings: Settings, name: str) -> tuple[KeyRecord, str]:
    """Make a key named ``name``; returns its record and the key itself (to show once, never stored).

    Raises:
        InputError: a bad name.
        StateError: an active key already has this name.
    """
    if not _NAME.match(name) or name.startswith("key_"):
        raise InputError(f"key name {name!r}: 1-100 letters, digits or ._@+- (not starting with key_)")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = key_rows.create(settings.database_url, name, hash_key(settings, key), key[:7], pepper_tag(settings))
    return record, key


def authenticate(settings: Settings, token: str) -> KeyRecord | None:
    """The active key ``token`` is, or None (malformed tokens never reach the database)."""
    if not _TOKEN.match(token):
        return None
    return key_rows.find_by_hash(settings.database_url, hash_key(settings, token))


def list_keys(settings: Settings, include_revoked: bool = False) -> list[KeyRecord]:
    """The keys (active ones unless ``include_revoked``)."""
    return key_rows.listing(settings.database_url, include_revoked)


def revoke_key(settings: Settings, name_or_id: str) -> KeyRecord:
    """Revoke a key by name or id (raises ``NotFound``)."""
    return key_rows.revoke(settings.database_url, name_or_id)


def active_count(settings: Settings) -> int:
    """Active keys."""
    return key_rows.count_active(settings.database_url)


def pepper_warning(settings: Settings) -> str | None:
    """A warning when no active key was made under this server's pepper (so no key would work)."""
    tags = key_rows.active_pepper_tags(settings.database_url)
    if tags and pepper_tag(settings) not in tags:
        return ("no API key was created with this BATCHLLM_API_KEY_PEPPER: every request will get 401; set the "
                "pepper the keys were created with, or create new keys")
    return None
