"""One error hierarchy for the whole package.

Every error a user can cause or meet carries an exit code and a one-line message; the CLI prints the
message and exits with the code, never a traceback. The retryable/fatal split tells workers whether to
back off and try again (a database or broker blip) or give up on the work (bad weights, bad input).
"""

from __future__ import annotations

import re

_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.\-]*://")
_URL_END = re.compile(r"[\s'\"<>]")


def mask_url(text: str) -> str:
    """Replace the passwords of any URLs in ``text`` with ``***``, whatever characters they hold.

    A password may contain ``/``, ``@``, ``:`` or ``?`` (base64 secrets do), so the user part of a URL is taken
    up to its *last* ``@``, and everything after the first ``:`` of it is masked.

    Args:
        text: a URL or any message that may contain URLs.

    Returns:
        The text with ``scheme://user:password@host`` rewritten to ``scheme://user:***@host``.
    """
    out: list[str] = []
    pos = 0
    for m in _SCHEME.finditer(text):
        if m.start() < pos:
            continue
        end_m = _URL_END.search(text, m.end())
        end = end_m.start() if end_m else len(text)
        rest = text[m.end() : end]
        at = rest.rfind("@")
        colon = rest.find(":", 0, at) if at > 0 else -1
        if colon < 0:
            continue
        out.append(text[pos : m.end() + colon + 1])
        out.append("***")
        pos = m.end() + at
    out.append(text[pos:])
    return "".join(out)


class BatchLLMError(Exception):
    """Base of every batchllm error; ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(mask_url(message))

    @property
    def message(self) -> str:
        """The one-line message shown to the user."""
        return str(self)


class FatalError(BatchLLMError):
    """Retrying cannot help (bad input, missing weights, a model that cannot fit)."""


class RetryableError(BatchLLMError):
    """A transient failure (service restarting, lost connection): back off and try again."""


class InputError(FatalError):
    """Bad user input: a file, a flag, a line. Exit code 2."""

    exit_code = 2


class ModelNotFound(InputError):
    """A model name that is neither in the catalog nor a local model directory."""


class NoCapacity(InputError):
    """No known worker can ever host the requested model."""


class ModelLoadError(FatalError):
    """The engine could not load a model (missing weights, out of memory, bad config)."""


class NotFound(InputError):
    """A batch, schedule or worker that does not exist."""


class ServiceUnavailable(RetryableError):
    """Redis or the database cannot be reached. Exit code 5; the message names the (masked) URL."""

    exit_code = 5

    def __init__(self, what: str, url: str, detail: str = "") -> None:
        self.url = mask_url(url)
        self.service = "database" if _env(what) == "DATABASE_URL" else "broker"
        tail = f" ({detail})" if detail else ""
        super().__init__(f"cannot reach {what} at {self.url}{tail}; is it running? check BATCHLLM_{_env(what)}")


def _env(what: str) -> str:
    return "BROKER_URL" if what.lower().startswith(("redis", "broker")) else "DATABASE_URL"


class StateError(InputError):
    """An action the object's current state does not allow (retry a running batch, cancel a finished one)."""


class NotLeader(RetryableError):
    """This scheduler is not (or no longer) the active one; it stands by."""


class NameTaken(InputError):
    """A worker name a live worker already uses."""


class BatchFailed(BatchLLMError):
    """A waited-for batch ended failed, cancelled or expired (exit 4)."""

    exit_code = 4


class BatchPartiallyFailed(BatchLLMError):
    """A waited-for batch finished with some failed requests (exit 3)."""

    exit_code = 3
