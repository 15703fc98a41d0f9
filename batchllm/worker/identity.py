"""A worker's unique name.

Default names say what the worker is (``gpu0-a10g-24gb@host``) and never collide: when a live worker holds
one, the next free ``-2``, ``-3`` … is taken, so several workers started with the same flags on one host, or
cloned machines with one host name, each get their own. An explicit ``--name`` that a live worker holds is
refused. A name whose holder is dead — its heartbeat lapsed, it stopped, or it is this host's earlier process
that is no longer running (a restart by systemd or compose) — is taken over, and that predecessor's leases
are given back at once so its chunks run again without waiting for their leases to lapse.
"""

from __future__ import annotations

import logging
import os

from batchllm.errors import NameTaken
from batchllm.settings import Settings
from batchllm.status import WorkerState
from batchllm.store import leases
from batchllm.store import workers as worker_rows
from batchllm.worker.runtime import WorkerIdentity

log = logging.getLogger(__name__)
MAX_SUFFIX = 64


def _predecessor_gone(row: worker_rows.WorkerInfo, identity: WorkerIdentity) -> bool:
    """This host's earlier process of that name, no longer running (our pid reused counts: containers)."""
    if row.host != identity.host or row.pid is None:
        return False
    if row.pid == os.getpid():
        return True
    try:
        os.kill(row.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        return False
    return False


def claim_name(settings: Settings, identity: WorkerIdentity, explicit: bool) -> str:
    """Register ``identity`` under its name (or the first free variant of a default name); returns the name.

    Raises:
        NameTaken: an explicit name a live worker holds.
    """
    url = settings.database_url
    rows = {w.name: w for w in worker_rows.all_workers(url)}
    base, at, host = identity.name.partition("@")
    candidates = [identity.name] if explicit else [identity.name] + [f"{base}-{i}{at}{host}" for i in range(2, MAX_SUFFIX)]
    row_values = identity.row(os.getpid())
    for name in candidates:
        old = rows.get(name)
        timeout = settings.heartbeat_timeout
        if old is not None and old.instance != identity.instance and _predecessor_gone(old, identity):
            timeout = 0.0  # it is dead for sure: no need to wait for its heartbeat to lapse
        if worker_rows.register(url, name, identity.instance, row_values, WorkerState.STARTING, timeout):
            if old is not None and old.instance and old.instance != identity.instance:
                n = leases.release_owner(url, old.instance)
                if n:
                    log.warning("worker %s: re-queued %d chunk(s) its previous process held", name, n)
            return name
        if explicit:
            holder = rows.get(name)
            where = f" (pid {holder.pid} on {holder.host})" if holder else ""
            raise NameTaken(f"worker name {name!r} is held by a live worker{where}; choose another --name or stop that worker")
    raise NameTaken(f"no free worker name like {identity.name!r} after {MAX_SUFFIX} tries; give one with --name")
