"""One error hierarchy for the whole package.

Every error a user can cause or meet carries an exit code and a one-line message; the CLI prints the
message and exits with the code, never a traceback. The retryable/fatal split tells workers whether to
back off and try again (a database or broker blip) or give up on the work (bad weights, bad input).
"""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")


def mask_url(text: str) -> str:
    """Replace passwords inside any URLs of ``text`` with ``***``.

    Args:
        text: a URL or any message that may contain URLs.

    Returns:
        The text with ``scheme://user:password@`` rewritten to ``scheme://user:***@``.
    """
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


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
        tail = f" ({detail})" if detail else ""
        super().__init__(f"cannot reach {what} at {self.url}{tail}; is it running? check BATCHLLM_{_env(what)}")


def _env(what: str) -> str:
    return "BROKER_URL" if what.lower().startswith(("redis", "broker")) else "DATABASE_URL"


class BatchFailed(BatchLLMError):
    """A waited-for batch ended failed, cancelled or expired (exit 4)."""

    exit_code = 4


class BatchPartiallyFailed(BatchLLMError):
    """A waited-for batch finished with some failed requests (exit 3)."""

    exit_code = 3
