"""The ASGI wrapper a keep-alive server runs its app in: the token on every request,
the idle clock and the status endpoint."""

from __future__ import annotations

import contextlib
import hmac
import json
import math
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from ..settings import (
    keep_alive_from_json,
    keep_alive_to_json,
)
from .process import (
    _gpu_bytes,
    _own_rss,
)
from .records import (
    STATUS_PATH,
    _proof,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class KeepAliveApp:
    """ASGI wrapper: the token on every request, the idle clock, and the status endpoint.

    ``GET /_openweight/keepalive`` answers the daemon's status (``?touch=1`` counts as a
    request; ``?keep_alive=S`` sets the idle timeout). Every path, ``/health`` included,
    needs ``Authorization: Bearer TOKEN``, except the proof: ``?challenge=C`` on the status
    path, without the token, answers ``{"proof": HMAC(token, C)}``, so that a client can
    check that it talks to a daemon holding the token before it sends the token.
    """

    def __init__(self, app: ASGIApp, *, token: str, key: str, model: str,
                 keep_alive: float) -> None:
        self.app = app
        self.token = token.encode()
        self._token = token
        self.key = key
        self.model = model
        self.keep_alive = keep_alive
        self.in_flight = 0
        self.last = time.monotonic()
        self.started = time.time()

    def idle_seconds(self) -> float:
        return 0.0 if self.in_flight else time.monotonic() - self.last

    def expired(self) -> bool:
        return not math.isinf(self.keep_alive) and self.idle_seconds() >= self.keep_alive

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "key": self.key, "model": self.model, "state": "ready",
                "idle_s": round(self.idle_seconds(), 3), "in_flight": self.in_flight,
                "keep_alive_s": keep_alive_to_json(self.keep_alive), "started": self.started,
                "rss_bytes": _own_rss(), "gpu_bytes": _gpu_bytes()}

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                scheme, _, given = bytes(value).partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    given.strip(), self.token)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == STATUS_PATH:
            query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
            challenge = query.get("challenge", [""])[0]
            if 16 <= len(challenge) <= 128:
                await _send_json(send, 200, {"proof": _proof(self._token, challenge)})
                return
        if not self._authorized(scope):
            await _send_json(send, 401, {"error": {
                "message": "missing or wrong API key: this keep-alive server answers only its "
                           "user's token (the file run/token in the openweight store)",
                "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}},
                {"www-authenticate": "Bearer"})
            return
        if scope["path"] == STATUS_PATH:
            query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
            if "keep_alive" in query:
                with contextlib.suppress(ValueError):
                    self.keep_alive = keep_alive_from_json(float(query["keep_alive"][0]))
            if query.get("touch") == ["1"]:
                self.last = time.monotonic()
            await _send_json(send, 200, self.status())
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.last = time.monotonic()


async def _send_json(send: Send, status: int, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})
