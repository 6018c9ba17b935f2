"""What one server accepts: body size, requests in flight, time per request.

The bounds on what a request may hold (messages, stop strings, tools, schema size, JSON
nesting) are the SDK's and live in ``openweight.options``; these are the server's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_BODY_MB", "DEFAULT_MAX_QUEUE", "RETRY_AFTER_S", "ServerLimits"]

DEFAULT_MAX_BODY_MB = 4.0  # a request body past this gets 413 (the length is read first)
DEFAULT_MAX_QUEUE = 64     # generation requests running or waiting; one more gets 429
RETRY_AFTER_S = 1          # what a 429 tells the client to wait, in seconds


@dataclass(frozen=True)
class ServerLimits:
    """``max_body_mb``: largest request body, in MB (MiB); ``max_queue``: generation
    requests in flight (running or waiting) before 429; ``request_timeout``: seconds a
    generation may take before it is stopped and the client gets 504 (None: no deadline)."""

    max_body_mb: float = DEFAULT_MAX_BODY_MB
    max_queue: int = DEFAULT_MAX_QUEUE
    request_timeout: float | None = None

    def __post_init__(self) -> None:
        if not (self.max_body_mb > 0 and math.isfinite(self.max_body_mb)):
            raise ValueError(f"max_body_mb={self.max_body_mb!r} must be a positive number")
        if self.max_queue < 1:
            raise ValueError(f"max_queue={self.max_queue!r} must be at least 1")
        timeout = self.request_timeout
        if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"request_timeout={timeout!r} must be a positive number of "
                             "seconds (or None)")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
