"""The server's errors in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from typing import Any

from .. import wire
from ..errors import (
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    OpenWeightError,
)

__all__ = ["ApiError", "api_error"]


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``;
    ``headers`` go out with it (``Retry-After`` on a 429, ...)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        if status == 401:
            self.headers.setdefault("WWW-Authenticate", "Bearer")

    def body(self) -> dict[str, Any]:
        return wire.error_body(self.message, self.type, self.param, self.code)

    def kind(self) -> str:
        """What went wrong, in one word for the metrics: the code, else the type."""
        return self.code or self.type


def api_error(exc: BaseException, param: str | None = None) -> ApiError:
    """Map any exception to the status and body an OpenAI client expects."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ModelNotFoundError):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), param=_param_of(exc, param))
    if isinstance(exc, ModelLoadError):
        return ApiError(500, str(exc), type="server_error", code="model_load_error")
    if isinstance(exc, OpenWeightError):  # GenerationError and the rest
        return ApiError(500, str(exc), type="server_error")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


def _param_of(exc: BaseException, default: str | None) -> str | None:
    """The request field the SDK's error names, else ``default``."""
    return getattr(exc, "param", None) or default
