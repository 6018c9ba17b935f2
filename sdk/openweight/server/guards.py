"""What the server checks before a route runs: the Host header (DNS rebinding), a JSON
content type (no browser can send one without a CORS preflight), the body's size, and how
many generation requests are in flight. Also the capped, checked read of a JSON body.

A pure ASGI wrapper (not Starlette's BaseHTTPMiddleware), so streams pass through as they
are and the queue slot is given back whatever way a request ends.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

from .. import wire
from ..remote_http import is_loopback_host
from .errors import ApiError
from .limits import RETRY_AFTER_S, ServerLimits

if TYPE_CHECKING:
    from fastapi import Request

    from .metrics import Metrics

__all__ = ["GENERATION_PATHS", "Guards", "host_allowed", "read_json"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                              "/v1/responses"})
# what a request that came in on a loopback address may call the server ("0.0.0.0" and
# "::": the URL `openweight serve --host 0.0.0.0` prints, which reaches this machine)
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"})


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``(name, port)`` of a Host header (``[::1]:8000`` -> ``("::1", 8000)``); None when
    it is not one."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] or None
    elif value.count(":") > 1:
        return None  # an IPv6 address must be in brackets
    else:
        name, _, port_text = value.partition(":")
        port_text = port_text or None
    name = name.removesuffix(".")
    if not name:
        return None
    if port_text is None:
        return name, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return name, int(port_text)


def host_allowed(header: str, server: tuple[str, int] | None, extra: Iterable[str] = (),
                 ) -> bool:
    """May a request with this Host header reach a server bound at ``server`` (the ASGI
    scope's local address)? The bound address itself, and for a loopback address
    localhost, 127.0.0.1 and [::1], with the bound port; plus ``extra`` (``--allowed-host``:
    ``NAME`` on any port, ``NAME:PORT``, or ``*`` for any Host)."""
    parsed = _split_host(header)
    if parsed is None:
        return False
    name, port = parsed
    for entry in extra:
        if entry.strip() == "*":
            return True
        allowed = _split_host(entry)
        if allowed is not None and allowed[0] == name and allowed[1] in (None, port):
            return True
    if server is None:  # the ASGI server did not say where it listens
        return name in LOOPBACK_NAMES
    bound_host, bound_port = str(server[0]).lower(), server[1]
    if (port or 80) != bound_port:
        return False
    return name == bound_host or (is_loopback_host(bound_host) and name in LOOPBACK_NAMES)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if bytes(key).lower() == name:
            return bytes(value).decode("latin-1")
    return None


class Guards:
    """ASGI wrapper: Host header (when the server has no API key), JSON content type on
    POST, body size by Content-Length, and the bounded queue of generation requests."""

    def __init__(self, app: ASGIApp, limits: ServerLimits, metrics: Metrics, *,
                 check_host: bool, allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        self.limits = limits
        self.metrics = metrics
        self.check_host = check_host
        self.allowed_hosts = tuple(allowed_hosts)
        self.in_flight = 0  # generation requests running or waiting (the queue's depth)

    def refusal(self, scope: Scope) -> ApiError | None:
        """Why this request is refused before any route runs, or None."""
        host = _header(scope, b"host") or ""
        if self.check_host and not host_allowed(host, scope.get("server"), self.allowed_hosts):
            return ApiError(421, f"this server does not answer for Host {host[:100]!r}: it "
                            "answers for the address it listens on; start it with "
                            "--allowed-host NAME to allow another name, or with --api-key",
                            code="host_not_allowed")
        if scope.get("method") != "POST":
            return None
        media = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if media != "application/json":
            return ApiError(415, "send the request body as JSON with 'Content-Type: "
                            f"application/json' (got {media[:100]!r})",
                            code="unsupported_media_type")
        length = _header(scope, b"content-length")
        if length is not None and (not length.strip().isdigit()
                                   or int(length) > self.limits.max_body_bytes):
            return too_large(self.limits)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        err = self.refusal(scope)
        queued = scope.get("method") == "POST" and scope.get("path") in GENERATION_PATHS
        if err is None and queued and self.in_flight >= self.limits.max_queue:
            err = ApiError(429, f"the server is busy ({self.in_flight} requests in flight); "
                           f"retry in {RETRY_AFTER_S} s", type="server_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        if err is not None:
            self.metrics.error(err.kind())
            await send_error(send, err)
            return
        self._queue(queued)
        try:
            await self.app(scope, receive, send)
        finally:
            self._queue(-queued)

    def _queue(self, change: int) -> None:
        self.in_flight += change
        self.metrics.queue.set(self.in_flight)


def too_large(limits: ServerLimits) -> ApiError:
    return ApiError(413, f"the request body is over {limits.max_body_mb:g} MB; send less "
                    "(the server's --max-body-mb)", code="request_too_large")


async def send_error(send: Send, err: ApiError) -> None:
    raw = json.dumps(err.body()).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


async def read_json(request: Request, limits: ServerLimits) -> dict[str, Any]:
    """The request's JSON object, read no further than the size cap (a chunked body has
    no Content-Length to refuse it by), nested no deeper and with text only."""
    size, parts = 0, []
    async for part in request.stream():
        size += len(part)
        if size > limits.max_body_bytes:
            raise too_large(limits)
        parts.append(part)
    try:
        body = json.loads(b"".join(parts))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the request body is not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    wire.check_json(body)
    return body
