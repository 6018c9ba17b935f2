"""`openweight serve`'s app: local engines behind an OpenAI-compatible HTTP API.

FastAPI and uvicorn are imported only when the server is built, so ``import openweight``
and the rest of the CLI stay cheap.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run
# time, and they name classes imported inside create_app
import hmac
import json
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing, asynccontextmanager
from typing import TYPE_CHECKING, Any

from .. import wire
from ..errors import (
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    OpenWeightError,
)
from ..types import Chunk
from .pool import ModelPool

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from starlette.responses import Response

    from ..local import LocalEngine
    from ..local.batching import Batching
    from ..local.engine import TokenSource

__all__ = ["ApiError", "api_error", "create_app"]

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions API
GENERATION_THREADS = 64
log = logging.getLogger("openweight.server")


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return wire.error_body(self.message, self.type, self.param, self.code)


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


def _stop(it: Iterator[Chunk], idle: threading.Event) -> None:
    """Stop a generation and wait for its thread, even while a token is being awaited."""
    close = getattr(it, "close", lambda: None)
    close()  # sets the engine's cancel flag at once, even mid-next in another thread
    if idle.wait(timeout=60):  # the pending next() returns at the engine's next step
        close()  # now it can run the generator's cleanup, which joins the thread


# -- continuous batching: concurrent requests of a local model share decode steps ---------

def _batching(enabled: bool | None) -> "Batching | None":
    from ..local.batching import Batching, batching_enabled

    return Batching() if (batching_enabled() if enabled is None else enabled) else None


class _Generation:
    """Runs answers off the event loop: the engine's chunks one thread hop each, stopped
    when the client leaves or the server stops; whole or as server-sent events."""

    def __init__(self) -> None:
        import anyio

        self.limiter = anyio.CapacityLimiter(GENERATION_THREADS)  # /health stays free
        self.stopping = threading.Event()  # set on Ctrl-C: answers end at their next token

    async def in_thread(self, func: Callable[..., Any], *args: Any) -> Any:
        import anyio.to_thread

        return await anyio.to_thread.run_sync(func, *args, limiter=self.limiter)

    async def chunks(self, it: Iterator[Chunk], request: "Request",
                     ) -> AsyncGenerator[Chunk, None]:
        """The engine's chunks, one thread hop each; stops generating when the client leaves."""
        import anyio
        import anyio.to_thread

        done = object()
        idle = threading.Event()  # no thread is inside next(it)
        idle.set()

        def step() -> object:
            idle.clear()
            try:
                return next(it, done)
            finally:
                idle.set()

        try:
            while True:
                item = await anyio.to_thread.run_sync(step, limiter=self.limiter,
                                                      abandon_on_cancel=True)
                if item is done:
                    return
                assert isinstance(item, Chunk)
                yield item
                if self.stopping.is_set():
                    raise ApiError(503, "the server is shutting down; send the request again "
                                   "once it is back", type="server_error",
                                   code="server_shutting_down")
                if await request.is_disconnected():
                    return
        finally:
            # shielded, so a cancelled request (the client left, Ctrl-C) still does this
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_stop, it, idle)

    async def respond(self, request: "Request", stream: bool, shape: wire.ChatShape,
                      open_stream: Callable[[], Iterator[Chunk]], param: str) -> "Response":
        from fastapi.responses import JSONResponse, StreamingResponse

        try:
            it: Iterator[Chunk] = await self.in_thread(open_stream)  # validates; may load
        except OpenWeightError as exc:  # a prompt too long for the context window, ...
            raise api_error(exc, param=param) from exc
        if not stream:
            answer = wire.Answer()
            async with aclosing(self.chunks(it, request)) as gen:
                async for chunk in gen:
                    answer.add(chunk)
            return JSONResponse(shape.whole(answer))
        return StreamingResponse(self._events(it, request, shape),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, it: Iterator[Chunk], request: "Request",
                      shape: wire.ChatShape) -> AsyncIterator[str]:
        try:
            first = shape.first()
            if first is not None:
                yield wire.sse(first)
            usage = None
            async with aclosing(self.chunks(it, request)) as gen:
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
            yield wire.sse(api_error(exc).body())


# -- the app ------------------------------------------------------------------------------

def create_app(model: str | None = None, *, api_key: str | None = None,
               device: str | None = None, dtype: str | None = None,
               quantize: str | None = None, preload: bool = True,
               batching: bool | None = None) -> "FastAPI":
    """The FastAPI app serving ``model`` (default: the store's default model).

    ``preload`` loads the weights now and runs one token, so the first request is fast
    and a broken model fails here rather than on a client. ``batching`` (default: on unless
    OPENWEIGHT_BATCH=0) decodes concurrent requests of a local model together (see
    ``openweight.local.batching``); its batchers start at the first request and stop with
    the app (its lifespan) or ``app.state.batching.close()``.
    """
    from fastapi import FastAPI

    pool = ModelPool(model, device=device, dtype=dtype, quantize=quantize)
    if preload:
        pool.warm()
    gen = _Generation()

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
    _error_handlers(app)
    _routes(app, pool, gen, api_key)
    app.state.pool = pool
    app.state.stopping = gen.stopping
    app.state.batching = _batching(batching)
    return app


def _error_handlers(app: "FastAPI") -> None:
    """Every error answered in OpenAI's shape."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def answer(err: ApiError) -> "Response":
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

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


def _routes(app: "FastAPI", pool: ModelPool, gen: _Generation, api_key: str | None) -> None:
    """/health, and /v1's models, chat completions and completions."""
    from fastapi import APIRouter, Depends, Request

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' "
                           "with the key the server was started with", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    def source() -> "TokenSource | None":
        batch = app.state.batching  # read per request: None turns batching off
        return batch.source if batch is not None else None

    async def engine_for(body: Mapping[str, Any]) -> "LocalEngine":
        engine: LocalEngine = await gen.in_thread(pool.get, wire.model_from_json(body))
        return engine

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": pool.name}

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        names = await gen.in_thread(pool.names)
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "openweight"}
            for n in names]}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> "Response":
        body = await _read_body(request)
        messages = wire.messages_from_json(body)
        options = wire.options_from_json(body, None, chat=True)
        stream, include_usage = wire.stream_flags(body)
        engine = await engine_for(body)
        return await gen.respond(
            request, stream, wire.ChatShape(engine.name, include_usage),
            lambda: engine.stream(messages, options, source=source()), "messages")

    @v1.post("/completions")
    async def completions(request: Request) -> "Response":
        body = await _read_body(request)
        prompt = wire.prompt_from_json(body)
        options = wire.options_from_json(body, COMPLETIONS_DEFAULT_MAX_TOKENS).for_completion()
        stream, include_usage = wire.stream_flags(body)
        engine = await engine_for(body)
        return await gen.respond(
            request, stream, wire.CompletionShape(engine.name, include_usage),
            lambda: engine.complete(prompt, options, source=source()), "prompt")

    app.include_router(v1)


async def _read_body(request: "Request") -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body
