"""The exception tree. Every message says what was wrong and what to do next."""

from __future__ import annotations

import re

__all__ = [
    "AuthenticationError",
    "GenerationError",
    "InvalidRequestError",
    "ModelLoadError",
    "ModelNotFoundError",
    "OpenWeightError",
    "RemoteConnectionError",
    "RemoteError",
    "RemoteStatusError",
    "RemoteTimeoutError",
    "excerpt",
    "redact_url",
]

MAX_QUOTED = 300  # characters of a server's text an error message quotes

# the ``user:password@`` of a URL, wherever it appears in a text
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]*@")


def redact_url(text: object) -> str:
    """``text`` (a URL, or a message holding URLs) without their ``user:password@`` part:
    what error messages and logs show of a base URL."""
    return _USERINFO.sub(r"\1", str(text))


def excerpt(text: str | bytes, limit: int = MAX_QUOTED) -> str:
    """A server's text as a message quotes it: one line of printable characters, at most
    ``limit`` of them (then an ellipsis), with no URL credentials."""
    if isinstance(text, bytes):
        text = text[:limit * 4].decode("utf-8", "replace")
    head = "".join(c if c.isprintable() else " " for c in text[:limit * 2])
    head = redact_url(" ".join(head.split()))
    return head if len(head) <= limit and len(text) <= limit * 2 else head[:limit] + "..."


class OpenWeightError(Exception):
    """Base class of every error the SDK raises."""


class ModelNotFoundError(OpenWeightError, LookupError):
    """An unknown model name: nothing installed under it and not in the catalog."""


class ModelLoadError(OpenWeightError):
    """Missing or corrupt model files, or not enough memory to load them."""


class InvalidRequestError(OpenWeightError, ValueError):
    """A bad option, message or prompt (for example one longer than the context window).

    ``param`` names the request field at fault (``"temperature"``, ``"messages"``, ...)
    when one is to blame; the server reports it in OpenAI's error shape."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class GenerationError(OpenWeightError):
    """The engine failed while generating; the original exception is the cause."""


class RemoteError(OpenWeightError):
    """A failure talking to a remote OpenAI-compatible server."""


class RemoteConnectionError(RemoteError):
    """The server could not be reached."""


class RemoteTimeoutError(RemoteError):
    """The server sent nothing for longer than the timeout."""


class AuthenticationError(RemoteError):
    """The server refused the API key (HTTP 401 or 403)."""


class RemoteStatusError(RemoteError):
    """Any other non-2xx answer."""

    def __init__(self, message: str, *, status_code: int, body: str = "") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body
