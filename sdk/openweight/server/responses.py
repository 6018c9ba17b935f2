"""``POST /v1/responses``: OpenAI's Responses API over the pool's chat models, whole or
as the typed events OpenAI's clients parse (``wire/responses.py`` builds both).

Errors before the answer starts are OpenAI-shaped 4xx/5xx bodies; once the stream has
started, an ``error`` event.
"""

# no `from __future__ import annotations`: FastAPI reads the handler's annotations
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from ..errors import OpenWeightError
from ..types import Message
from ..wire import model_from_json
from ..wire.responses import ResponseBuilder, responses_request_from_json
from .errors import ApiError, api_error
from .guards import read_json
from .limits import ServerLimits
from .pool import ModelPool

if TYPE_CHECKING:
    from fastapi import APIRouter

__all__ = ["ResponseStore", "add_responses_route"]

log = logging.getLogger("openweight.server")


def _sse(event: dict[str, Any]) -> str:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n"


class ResponseStore:
    """The last ``limit`` responses' conversations, in memory, least recently used out:
    what ``previous_response_id`` continues (``openweight serve --responses-store N``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[str, list[Message]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, response_id: str) -> list[Message] | None:
        with self._lock:
            found = self._items.get(response_id)
            if found is not None:
                self._items.move_to_end(response_id)
            return list(found) if found is not None else None

    def keep(self, body: Mapping[str, Any], earlier: list[Message],
             builder: ResponseBuilder) -> None:
        """Keep this response unless the request said ``store: false``."""
        if body.get("store") is False:
            return
        builder.stored = True
        with self._lock:
            self._items[builder.id] = [*earlier, builder.as_message()]
            while len(self._items) > self.limit:
                self._items.popitem(last=False)


def _reasoning_tokens(engine: Any, builder: ResponseBuilder) -> int:
    text = "".join("".join(i.text) for i in builder.items if i.kind == "reasoning")
    return len(engine.tokenize(text)) if text else 0


def add_responses_route(v1: "APIRouter", pool: ModelPool, gen: Any, limits: ServerLimits,
                        store: ResponseStore | None = None) -> None:
    """``gen`` is the app's generation runner (``in_thread``, ``chunks``); ``store`` keeps
    responses for ``previous_response_id`` (None: stateless)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    def finish(body: Mapping[str, Any], req: Any, builder: ResponseBuilder,
               engine: Any) -> list[dict[str, Any]]:
        builder.reasoning_tokens = _reasoning_tokens(engine, builder)
        if store is not None:
            store.keep(body, req.messages, builder)
        return builder.closing()

    async def events(it: Any, request: Request, builder: ResponseBuilder, engine: Any,
                     started: float, body: Mapping[str, Any], req: Any) -> AsyncIterator[str]:
        try:
            for event in builder.opening():
                yield _sse(event)
            async with aclosing(gen.chunks(it, request, started, engine.name)) as chunks:
                async for chunk in chunks:
                    for event in builder.feed(chunk):
                        yield _sse(event)
            for event in finish(body, req, builder, engine):
                yield _sse(event)
        except Exception as exc:  # headers are sent: the error goes out as an event
            if not isinstance(exc, OpenWeightError | ApiError):
                log.exception("error while streaming a response")
            err = api_error(exc)
            yield _sse(builder.event("error", code=err.code or err.type, message=err.message,
                                      param=err.param))

    async def responses(request: Request) -> Response:
        body = await read_json(request, limits)
        req = responses_request_from_json(body, store.get if store is not None else None)
        engine = await gen.in_thread(pool.chat, model_from_json(body))
        builder = ResponseBuilder(engine.name, req.echo)
        started = time.monotonic()
        try:
            it = await gen.in_thread(lambda: engine.stream(req.messages, req.options))
        except OpenWeightError as exc:
            raise api_error(exc, param="input") from exc
        if req.stream:
            return StreamingResponse(events(it, request, builder, engine, started, body, req),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        async with aclosing(gen.chunks(it, request, started, engine.name)) as chunks:
            async for chunk in chunks:
                builder.feed(chunk)
        finish(body, req, builder, engine)
        return JSONResponse(builder.whole())

    v1.add_api_route("/responses", responses, methods=["POST"])
