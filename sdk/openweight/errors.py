"""The exception tree. Every message says what was wrong and what to do next."""

from __future__ import annotations

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
]


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
