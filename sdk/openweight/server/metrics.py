"""The server's Prometheus metrics (``GET /metrics``, behind the API key like ``/v1``).

One ``CollectorRegistry`` per app, so several apps in one process (tests, tools) keep
apart. prometheus_client is imported when an app is built, never by ``import openweight``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

__all__ = ["Metrics", "RecordRequests"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Requests by route and status, tokens generated, the queue's depth, time to first
    token, and errors by type (an error's code, else its type)."""

    def __init__(self, routes: Iterable[str]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.routes = frozenset(routes)  # other paths count as "other": bounded labels
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("openweight_requests", "HTTP requests answered, by route "
                                "and status", ["route", "status"], registry=reg)
        self.tokens = Counter("openweight_generated_tokens", "Tokens generated, by model",
                              ["model"], registry=reg)
        self.queue = Gauge("openweight_queue_depth", "Generation requests running or waiting",
                           registry=reg)
        self.ttft = Histogram("openweight_time_to_first_token_seconds", "Seconds from a "
                              "generation request's arrival to its first chunk",
                              buckets=TTFT_BUCKETS, registry=reg)
        self.errors = Counter("openweight_errors", "Errors answered, by type (the error's "
                              "code, else its type)", ["type"], registry=reg)

    def route(self, path: str) -> str:
        return path if path in self.routes else "other"

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def first_token(self, started: float) -> None:
        self.ttft.observe(time.monotonic() - started)

    def generated(self, model: str, tokens: int) -> None:
        if tokens > 0:
            self.tokens.labels(model).inc(tokens)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RecordRequests:
    """ASGI wrapper counting every HTTP request by route and status (refusals included)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what a request that raised past every handler answers

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(self.metrics.route(scope.get("path", "")),
                                         str(status)).inc()
