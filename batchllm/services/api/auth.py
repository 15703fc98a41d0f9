"""Bearer auth: every route depends on :func:`caller`, which answers 401 in OpenAI's shape or names the owner.

The token is read from the ``Authorization`` header only (never from the query string, which access logs
print), hashed, and looked up; it is never logged, and a 401's message never repeats it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from batchllm.services.api.config import ApiConfig
from batchllm.services.api.errors import ApiError
from batchllm.services.api.keys import authenticate

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="batchllm"'}
MISSING = ("You didn't provide an API key. You need to provide your API key in an Authorization header using "
           "Bearer auth (i.e. Authorization: Bearer YOUR_KEY). Keys are made with `batchllm keys create NAME`.")
INCORRECT = "Incorrect API key provided (unknown or revoked). Keys are made with `batchllm keys create NAME`."


@dataclass(frozen=True)
class Caller:
    """Who is calling: ``owner`` is the key's id (None on a server without auth: everything is visible)."""

    owner: str | None
    key_name: str | None = None


def config(request: Request) -> ApiConfig:
    """The server's configuration (set by the app factory)."""
    cfg: ApiConfig = request.app.state.api
    return cfg


def caller(request: Request) -> Caller:
    """The FastAPI dependency of every route (a sync function: FastAPI runs its lookup in a thread).

    Raises:
        ApiError: 401 for a missing, malformed, unknown or revoked key.
    """
    cfg = config(request)
    if not cfg.auth:
        return Caller(owner=None)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, MISSING, code="invalid_api_key", headers=_CHALLENGE)
    record = authenticate(cfg.settings, token.strip())
    if record is None:
        raise ApiError(401, INCORRECT, code="invalid_api_key", headers=_CHALLENGE)
    return Caller(owner=record.id, key_name=record.name)


CallerDep = Annotated[Caller, Depends(caller)]
ConfigDep = Annotated[ApiConfig, Depends(config)]
