"""`openweight serve`'s app: local engines behind an OpenAI-compatible HTTP API.

FastAPI and uvicorn are imported only when the server is built, so ``import openweight``
and the rest of the CLI stay cheap.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run
# time, and they name classes imported inside create_app
import hmac
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import aclosing, asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any

from .. import wire
from ..errors import OpenWeightError
from ..types import Chunk, Usage
from .embeddings import add_embeddings_route
from .errors import ApiError, api_error
from .guards import GENERATION_PATHS, Guards, read_json
from .limits import ServerLimits
from .metrics import Metrics, RecordRequests
from .pool import ModelPool
from .responses import ResponseStore, add_responses_route

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from starlette.responses import Response

    from ..local import LocalEngine
    from ..local.batching import Batching
    from ..local.engine import TokenSource

__all__ = ["ApiError", "api_error", "create_app"]

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions API
GENERATION_THREADS = 64
ROUTES = ("/health", "/metrics", "/v1/models", *sorted(GENERATION_PATHS))
log = logging.getLogger("openweight.server")


def _stop(it: Iterator[Chunk], idle: threading.Event) -> None:
    """Stop a generation and wait for its thread, even while a token is being awaited."""
    close = getattr(it, "close", lambda: None)
    with suppress(ValueError):  # a plain generator running in another thread: wait for it
        close()  # sets the engine's cancel flag at once, even mid-next in another thread
    if idle.wait(timeout=60):  # the pending next() returns at the engine's next step
        close()  # now it can run the generator's cleanup, which joins the thread


# -- continuous batching: concurrent requests of a local model share decode steps ---------

def _batching(enabled: bool | None) -> "Batching | None":
    from ..local.batching import Batching, batching_enabled

    return Batching() if (batching_enabled() if enabled is None else enabled) else None


class _Generation:
    """Runs answers off the event loop: the engine's chunks one thread hop each, stopped
    when the client leaves, the server stops or the request's deadline passes; whole or as
    server-sent events."""

    def __init__(self, limits: ServerLimits, metrics: Metrics) -> None:
        import anyio

        self.limiter = anyio.CapacityLimiter(GENERATION_THREADS)  # /health stays free
        self.stopping = threading.Event()  # set on Ctrl-C: answers end at their next token
        self.timeout = limits.request_timeout
        self.metrics = metrics

    async def in_thread(self, func: Callable[..., Any], *args: Any) -> Any:
        import anyio.to_thread

        return await anyio.to_thread.run_sync(func, *args, limiter=self.limiter)

    async def _next(self, step: Callable[[], object], started: float) -> object:
        """One chunk from the engine's thread, or a 504 once the request's deadline passed."""
        import anyio
        import anyio.to_thread

        if self.timeout is None:
            return await anyio.to_thread.run_sync(step, limiter=self.limiter,
                                                  abandon_on_cancel=True)
        with anyio.move_on_after(started + self.timeout - time.monotonic()):
            return await anyio.to_thread.run_sync(step, limiter=self.limiter,
                                                  abandon_on_cancel=True)
        raise ApiError(504, f"the answer took longer than this server's request timeout "
                       f"({self.timeout:g} s); ask for fewer tokens (max_tokens)",
                       type="server_error", code="request_timeout")

    async def chunks(self, it: Iterator[Chunk], request: "Request", started: float,
                     model: str) -> AsyncGenerator[Chunk, None]:
        """The engine's chunks, one thread hop each; stops generating when the client leaves."""
        import anyio
        import anyio.to_thread

        done = object()
        idle = threading.Event()  # no thread is inside next(it)
        idle.set()
        usage: Usage | None = None
        first = True

        def step() -> object:
            idle.clear()
            try:
                return next(it, done)
            finally:
                idle.set()

        try:
            while True:
                item = await self._next(step, started)
                if item is done:
                    return
                assert isinstance(item, Chunk)
                if first:
                    self.metrics.first_token(started)
                    first = False
                usage = item.usage or usage
                yield item
                if self.stopping.is_set():
                    raise ApiError(503, "the server is shutting down; send the request again "
                                   "once it is back", type="server_error",
                                   code="server_shutting_down")
                if await request.is_disconnected():
                    return
        finally:
            self.metrics.generated(model, usage.completion_tokens if usage else 0)
            # shielded, so a cancelled request (the client left, Ctrl-C) still does this
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_stop, it, idle)

    async def respond(self, request: "Request", stream: bool, shape: wire.ChatShape,
                      open_stream: Callable[[], Iterator[Chunk]], param: str) -> "Response":
        from fastapi.responses import JSONResponse, StreamingResponse

        started = time.monotonic()
        try:
            it: Iterator[Chunk] = await self.in_thread(open_stream)  # validates; may load
        except OpenWeightError as exc:  # a prompt too long for the context window, ...
            raise api_error(exc, param=param) from exc
        if not stream:
            answer = wire.Answer()
            async with aclosing(self.chunks(it, request, started, shape.model)) as gen:
                async for chunk in gen:
                    answer.add(chunk)
            return JSONResponse(shape.whole(answer))
        return StreamingResponse(self._events(it, request, shape, started),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, it: Iterator[Chunk], request: "Request", shape: wire.ChatShape,
                      started: float) -> AsyncIterator[str]:
        try:
            first = shape.first()
            if first is not None:
                yield wire.sse(first)
            usage = None
            async with aclosing(self.chunks(it, request, started, shape.model)) as gen:
                async for chunk in gen:
                    usage = chunk.usage or usage
                    for event in shape.events(chunk):
                        yield wire.sse(event)
            if shape.include_usage and usage is not None:
                yield wire.sse(shape.usage_event(usage))
            yield "data: [DONE]\n\n"
        except Exception as exc:  # headers are sent: the error goes out as an event
            if not isinstance(exc, OpenWeightError | ApiError):
                log.exception("error while streaming an answer")
            err = api_error(exc)
            self.metrics.error(err.kind())
            yield wire.sse(err.body())


# -- the app ------------------------------------------------------------------------------

def create_app(model: str | None = None, *, api_key: str | None = None,
               device: str | None = None, dtype: str | None = None,
               quantize: str | None = None, preload: bool = True,
               batching: bool | None = None, limits: ServerLimits | None = None,
               allowed_hosts: Iterable[str] = (), allow_pull: bool = False,
               allow_image_urls: bool = False, responses_store: int = 0) -> "FastAPI":
    """The FastAPI app serving ``model`` (default: the store's default model).

    ``preload`` loads the weights now and runs one token, so the first request is fast
    and a broken model fails here rather than on a client. ``batching`` (default: on unless
    OPENWEIGHT_BATCH=0) decodes concurrent requests of a local model together (see
    ``openweight.local.batching``); its batchers start at the first request and stop with
    the app (its lifespan) or ``app.state.batching.close()``. ``limits``: body size, queue
    and deadline (``ServerLimits``); ``allowed_hosts``: Host names answered besides the
    bound address when there is no ``api_key``; ``allow_pull``: a request may name a
    catalog model not installed yet (it is pulled); ``allow_image_urls``: image parts may
    be http(s) URLs, fetched by the server (else data URLs only); ``responses_store``:
    keep the last N responses for ``previous_response_id`` (0: stateless).
    """
    from fastapi import FastAPI

    limits = limits or ServerLimits()
    pool = ModelPool(model, device=device, dtype=dtype, quantize=quantize,
                     allow_pull=allow_pull)
    if preload:
        pool.warm()
    metrics = Metrics(ROUTES)
    gen = _Generation(limits, metrics)

    @asynccontextmanager
    async def lifespan(app: "FastAPI") -> AsyncIterator[None]:
        try:
            yield
        finally:
            if app.state.batching is not None:
                import anyio.to_thread

                await anyio.to_thread.run_sync(app.state.batching.close)

    app = FastAPI(title="openweight", summary="OpenAI-compatible API over local models",
                  docs_url=None, redoc_url=None, lifespan=lifespan)
    _error_handlers(app, metrics)
    keys = _KeyCheck(api_key)
    store = ResponseStore(responses_store) if responses_store > 0 else None
    _routes(app, pool, gen, keys, limits, allow_image_urls, store)
    _health_and_metrics(app, pool, keys, metrics)
    app.add_middleware(Guards, limits=limits, metrics=metrics, check_host=api_key is None,
                       allowed_hosts=tuple(allowed_hosts))
    app.add_middleware(RecordRequests, metrics=metrics)  # outermost: refusals count too
    app.state.pool = pool
    app.state.stopping = gen.stopping
    app.state.batching = _batching(batching)
    app.state.metrics = metrics
    return app


def _error_handlers(app: "FastAPI", metrics: Metrics) -> None:
    """Every error answered in OpenAI's shape, and counted by type."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def answer(err: ApiError) -> "Response":
        metrics.error(err.kind())
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)

    async def on_http_error(request: Request, exc: Exception) -> "Response":
        assert isinstance(exc, StarletteHTTPException)
        kind = "not_found" if exc.status_code == 404 else None
        return answer(ApiError(exc.status_code, str(exc.detail), code=kind))

    async def on_validation_error(request: Request, exc: Exception) -> "Response":
        return answer(ApiError(400, str(exc)))

    async def on_error(request: Request, exc: Exception) -> "Response":
        return answer(api_error(exc))  # ApiError, the SDK's errors, and a bug (a 500)

    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    for kind in (ApiError, OpenWeightError, Exception):
        app.add_exception_handler(kind, on_error)


class _KeyCheck:
    """The API key: ``require`` (a route dependency: 401 without it) and ``given``."""

    def __init__(self, api_key: str | None) -> None:
        from fastapi import Request

        self.api_key = api_key

        def require(request: Request) -> None:  # FastAPI reads this annotation at run time
            if not self.given(request):
                raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer "
                               "KEY' with the key the server was started with",
                               code="invalid_api_key")

        self.require: Callable[[Request], None] = require

    def given(self, request: "Request") -> bool:
        """Does the request carry the key (True when the server has none)?"""
        if self.api_key is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.api_key.encode())


def _health_and_metrics(app: "FastAPI", pool: ModelPool, keys: _KeyCheck,
                        metrics: Metrics) -> None:
    """/health (the model's name only with the key, when there is one) and /metrics."""
    from fastapi import Depends, Request
    from fastapi.responses import Response as PlainResponse

    async def health(request: Request) -> dict[str, Any]:
        return {"status": "ok", "model": pool.name} if keys.given(request) else {"status": "ok"}

    async def prometheus() -> PlainResponse:
        data, media_type = metrics.render()
        return PlainResponse(data, media_type=media_type)

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus, methods=["GET"],
                      dependencies=[Depends(keys.require)])


def _routes(app: "FastAPI", pool: ModelPool, gen: _Generation, keys: _KeyCheck,
            limits: ServerLimits, allow_image_urls: bool, store: ResponseStore | None) -> None:
    """/v1's models, chat completions, completions, embeddings and responses."""
    from fastapi import APIRouter, Depends, Request

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(keys.require)])

    def source() -> "TokenSource | None":
        batch = app.state.batching  # read per request: None turns batching off
        return batch.source if batch is not None else None

    async def engine_for(body: Mapping[str, Any]) -> "LocalEngine":
        engine: LocalEngine = await gen.in_thread(pool.chat, wire.model_from_json(body))
        return engine

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        names = await gen.in_thread(pool.names)
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "openweight"}
            for n in names]}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> "Response":
        body = await read_json(request, limits)
        messages = wire.messages_from_json(body)
        if not allow_image_urls and any(i.url for m in messages for i in m.images):
            raise ApiError(400, "this server takes images as data URLs only (data:image/png;"
                           "base64,...); start it with --allow-image-urls to let it fetch "
                           "http(s) URLs", param="messages")
        options = wire.options_from_json(body, None, chat=True)
        stream, include_usage = wire.stream_flags(body)
        engine = await engine_for(body)
        return await gen.respond(
            request, stream, wire.ChatShape(engine.name, include_usage),
            lambda: engine.stream(messages, options, source=source()), "messages")

    @v1.post("/completions")
    async def completions(request: Request) -> "Response":
        body = await read_json(request, limits)
        prompt = wire.prompt_from_json(body)
        options = wire.options_from_json(body, COMPLETIONS_DEFAULT_MAX_TOKENS).for_completion()
        stream, include_usage = wire.stream_flags(body)
        engine = await engine_for(body)
        return await gen.respond(
            request, stream, wire.CompletionShape(engine.name, include_usage),
            lambda: engine.complete(prompt, options, source=source()), "prompt")

    add_embeddings_route(v1, pool, gen.in_thread, limits)
    add_responses_route(v1, pool, gen, limits, store)
    app.include_router(v1)
