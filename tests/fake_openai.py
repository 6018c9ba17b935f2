"""A scripted OpenAI-compatible server for the remote backend's tests: the answers real
servers give (SSE events, whole answers), replayed with httpx.MockTransport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx

from openweight.remote import AsyncRemoteBackend, RemoteBackend

URL = "http://gpu-box:8000/v1"


def sse(*events: Any, done: bool = True) -> bytes:
    out = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
    return (out + ("data: [DONE]\n\n" if done else "")).encode()


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


USAGE = {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}
SSE_HEADERS = {"content-type": "text/event-stream"}


def whole(message: dict[str, Any], finish: str = "stop") -> bytes:
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                       "model": "m", "choices": [{"index": 0, "message": message,
                                                  "finish_reason": finish}],
                       "usage": USAGE}).encode()


class FakeServer:
    """A MockTransport handler: answers from a script, records what it was sent."""

    def __init__(self, *responses: httpx.Response | Callable[[httpx.Request], httpx.Response],
                 models: list[str] | None = None) -> None:
        self.responses = list(responses)
        self.models = ["m"] if models is None else models
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": m, "object": "model"} for m in self.models]})
        item = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        if callable(item):
            return item(request)
        # a fresh copy each time: a client wraps the stream of a response it has sent
        return httpx.Response(item.status_code, headers=item.headers, content=item.content)

    @property
    def bodies(self) -> list[Any]:
        return [json.loads(r.content) for r in self.requests if r.method == "POST"]

    def backend(self, model: str | None = "m", **kw: Any) -> RemoteBackend:
        return RemoteBackend(URL, model=model, transport=httpx.MockTransport(self), **kw)

    def abackend(self, model: str | None = "m", **kw: Any) -> AsyncRemoteBackend:
        return AsyncRemoteBackend(URL, model=model, transport=httpx.MockTransport(self), **kw)


def resp(status: int, body: Any = None, headers: dict[str, str] | None = None,
         content: bytes | None = None) -> httpx.Response:
    if content is None:
        content = json.dumps(body).encode()
        headers = {"content-type": "application/json", **(headers or {})}
    return httpx.Response(status, headers=headers, content=content)


class Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that yields events one by one, then fails or stalls, and records close."""

    def __init__(self, parts: list[bytes], fail: Exception | None = None) -> None:
        self.parts = parts
        self.fail = fail
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.parts
        if self.fail is not None:
            raise self.fail

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part
        if self.fail is not None:
            raise self.fail

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True
