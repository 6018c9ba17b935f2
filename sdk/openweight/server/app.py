"""`openweight serve`: the local engine behind an OpenAI-compatible HTTP API.

FastAPI and uvicorn are imported only when the server is built, so ``import openweight``
and the rest of the CLI stay cheap.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run
# time, and they name classes imported inside create_app
import argparse
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing, asynccontextmanager, suppress
from types import FrameType
from typing import TYPE_CHECKING, Any

from . import wire
from .errors import (
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    OpenWeightError,
)
from .options import GenerationOptions
from .types import Chunk, Message

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .client import Client
    from .local import LocalEngine
    from .local.batching import Batching

__all__ = ["ApiError", "add_serve_parser", "cmd_serve", "create_app"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
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


# -- models: the served default, or any installed/catalog model by name -------------------

class ModelPool:
    """One openweight.Client per model name, made on first use and kept."""

    def __init__(self, model: str | None, *, device: str | None = None,
                 dtype: str | None = None, quantize: str | None = None) -> None:
        self._device, self._dtype, self._quantize = device, dtype, quantize  # for every model
        self._lock = threading.Lock()
        self.default = self._client(model)
        self.name = self.default.model  # resolves the name (pulling the model if needed)
        self._clients: dict[str, Client] = {self.name: self.default}
        if model:
            self._clients[model] = self.default

    def _client(self, model: str | None) -> "Client":
        from .client import Client

        client = Client(model=model, device=self._device, dtype=self._dtype,
                        quantize=self._quantize)
        if client.is_remote:
            raise InvalidRequestError("OPENWEIGHT_BASE_URL is set in the server's environment; "
                                      "openweight serve runs local models: unset it")
        return client

    def warm(self) -> None:
        """Load the default model and run one token, so that the first request is fast and
        a broken model fails here; then forget that token's prompt (the local model's
        prefix cache), so the first request is computed as in a fresh process. A prompt
        whose start was cached computes its rest apart, which can move a knife-edge greedy
        answer: the warm-up's chat preamble once turned SmolLM2's "Paris" into "L'Etoile"
        on every server's first request."""
        from .local import LocalEngine

        self.default.chat([{"role": "user", "content": "Hi"}], max_tokens=1)
        backend = self.default._get_backend()
        if isinstance(backend, LocalEngine):
            backend.loaded.prefix_cache.clear()

    def loaded(self) -> dict[str, str] | None:
        """What the default model runs with, resolved (``LoadedModel.summary``), when it
        runs in this process (loading it if it is not loaded yet)."""
        from .local import LocalEngine

        backend = self.default._get_backend()
        return backend.loaded.summary() if isinstance(backend, LocalEngine) else None

    def get(self, name: str | None) -> "Client":
        """The client for a request's ``model`` field (blocking: may pull or load)."""
        if not name:
            return self.default
        client = self._clients.get(name)
        if client is not None:
            return client
        with self._lock:
            client = self._clients.get(name)
            if client is not None:
                return client
            if not NAME_RE.match(name):  # never let a request name a path on this machine
                raise ApiError(404, f"unknown model {name!r}; GET /v1/models lists the models "
                               "served here", param="model", code="model_not_found")
            client = self._client(name)
            client.model  # noqa: B018 - resolve now: unknown names raise ModelNotFoundError
            self._clients[name] = client
            return client

    def names(self) -> list[str]:
        from .store import list_models

        names = [self.name]
        names += [m.name for m in list_models() if m.installed and m.name != self.name]
        return names


def _stop(it: Iterator[Chunk], idle: threading.Event) -> None:
    """Stop a generation and wait for its thread, even while a token is being awaited."""
    close = getattr(it, "close", lambda: None)
    close()  # sets the engine's cancel flag at once, even mid-next in another thread
    if idle.wait(timeout=60):  # the pending next() returns at the engine's next step
        close()  # now it can run the generator's cleanup, which joins the thread


# -- continuous batching: concurrent requests of a local model share decode steps ---------

def _batching(enabled: bool | None) -> "Batching | None":
    from .local.batching import Batching, batching_enabled

    return Batching() if (batching_enabled() if enabled is None else enabled) else None


def _local_engine(client: "Client", batch: "Batching | None") -> "LocalEngine | None":
    """The client's engine when it runs the model in this process and batching is on."""
    if batch is None:
        return None
    from .local import LocalEngine

    backend = client._get_backend()
    return backend if isinstance(backend, LocalEngine) else None


def _open_chat(client: "Client", messages: list[Message], options: GenerationOptions,
               batch: "Batching | None") -> Iterator[Chunk]:
    engine = _local_engine(client, batch)
    if engine is None or batch is None:
        return client.stream(messages, **options.to_dict())
    return engine.stream(messages, options, source=batch.source)


def _open_completion(client: "Client", prompt: str, options: GenerationOptions,
                     batch: "Batching | None") -> Iterator[Chunk]:
    engine = _local_engine(client, batch)
    chat_only = any(options.to_dict().get(name) is not None for name in wire.CHAT_ONLY_OPTIONS)
    if engine is None or batch is None or chat_only:  # the client explains what is wrong
        return client.stream_complete(prompt, **options.to_dict())
    return engine.complete(prompt, options, source=batch.source)


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
    import anyio
    import anyio.to_thread
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import Response

    pool = ModelPool(model, device=device, dtype=dtype, quantize=quantize)
    if preload:
        pool.warm()
    limiter = anyio.CapacityLimiter(GENERATION_THREADS)  # /health stays free when busy
    stopping = threading.Event()  # set on Ctrl-C: answers in flight end at their next token

    @asynccontextmanager
    async def lifespan(app: "FastAPI") -> AsyncIterator[None]:
        try:
            yield
        finally:
            if app.state.batching is not None:
                await anyio.to_thread.run_sync(app.state.batching.close)

    async def in_thread(func: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(func, *args, limiter=limiter)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' "
                           "with the key the server was started with", code="invalid_api_key")

    app = FastAPI(title="openweight", summary="OpenAI-compatible API over local models",
                  docs_url=None, redoc_url=None, lifespan=lifespan)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found" if exc.status_code == 404 else None
        err = ApiError(exc.status_code, str(exc.detail), code=kind)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse(ApiError(400, str(exc)).body(), status_code=400)

    @app.exception_handler(OpenWeightError)
    async def on_openweight_error(request: Request, exc: OpenWeightError) -> Response:
        err = api_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)  # a bug: answered in OpenAI's shape, and logged
    async def on_error(request: Request, exc: Exception) -> Response:
        err = api_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    async def read_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def get_client(body: Mapping[str, Any]) -> "Client":
        name = wire.model_from_json(body)
        try:
            client: Client = await in_thread(pool.get, name)
        except OpenWeightError as exc:
            raise api_error(exc) from exc
        return client

    async def chunks(it: Iterator[Chunk], request: Request) -> AsyncGenerator[Chunk, None]:
        """The engine's chunks, one thread hop each; stops generating when the client leaves."""
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
                item = await anyio.to_thread.run_sync(step, limiter=limiter,
                                                      abandon_on_cancel=True)
                if item is done:
                    return
                assert isinstance(item, Chunk)
                yield item
                if stopping.is_set():
                    raise ApiError(503, "the server is shutting down; send the request again "
                                   "once it is back", type="server_error",
                                   code="server_shutting_down")
                if await request.is_disconnected():
                    return
        finally:
            # shielded, so a cancelled request (the client left, Ctrl-C) still does this
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_stop, it, idle)

    async def respond(request: Request, stream: bool, shape: wire.ChatShape,
                      open_stream: Callable[[], Iterator[Chunk]], param: str) -> Response:
        try:
            it: Iterator[Chunk] = await in_thread(open_stream)  # validates; may load the model
        except ApiError:
            raise
        except OpenWeightError as exc:  # a prompt too long for the context window, ...
            raise api_error(exc, param=param) from exc
        if not stream:
            answer = wire.Answer()
            async with aclosing(chunks(it, request)) as gen:
                async for chunk in gen:
                    answer.add(chunk)
            return JSONResponse(shape.whole(answer))

        async def events() -> AsyncIterator[str]:
            try:
                first = shape.first()
                if first is not None:
                    yield wire.sse(first)
                usage = None
                async with aclosing(chunks(it, request)) as gen:
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

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": pool.name}

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        names = await in_thread(pool.names)
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "openweight"}
            for n in names]}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request)
        messages = wire.messages_from_json(body)
        options = wire.options_from_json(body, None, chat=True)
        stream, include_usage = wire.stream_flags(body)
        client = await get_client(body)
        shape = wire.ChatShape(client.model, include_usage)
        return await respond(request, stream, shape,
                             lambda: _open_chat(client, messages, options, app.state.batching),
                             "messages")

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request)
        prompt = wire.prompt_from_json(body)
        options = wire.options_from_json(body, COMPLETIONS_DEFAULT_MAX_TOKENS)
        stream, include_usage = wire.stream_flags(body)
        client = await get_client(body)
        shape = wire.CompletionShape(client.model, include_usage)
        return await respond(request, stream, shape,
                             lambda: _open_completion(client, prompt, options,
                                                      app.state.batching),
                             "prompt")

    app.include_router(v1)
    app.state.pool = pool
    app.state.stopping = stopping
    app.state.batching = _batching(batching)  # read per request: None turns it off
    return app


# -- the command --------------------------------------------------------------------------

def _bind(host: str, port: int) -> socket.socket:
    """A listening socket: connections queue from here on, so the printed URL works at once."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = info[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    os.environ["OPENWEIGHT_KEEP_ALIVE"] = "0"  # it runs models itself, never via keep-alive
    # this process runs the models itself: a base URL meant for clients must not loop back
    if os.environ.pop("OPENWEIGHT_BASE_URL", None):
        print("openweight: ignoring OPENWEIGHT_BASE_URL (the server runs models locally)",
              file=sys.stderr)
    api_key = args.api_key or os.environ.get("OPENWEIGHT_API_KEY") or None
    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        print(f"Error: cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
              "choose another --port or --host", file=sys.stderr)
        return 1
    try:
        print(f"openweight: loading {args.model or 'the default model'}...", file=sys.stderr,
              flush=True)
        app = create_app(args.model, api_key=api_key, device=args.device, dtype=args.dtype,
                         quantize=args.quantize)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"openweight: serving {app.state.pool.name} at http://{shown}:{port}/v1 "
              f"({'API key required' if api_key else 'no API key'}; Ctrl-C to stop)", flush=True)
        if not api_key and not _is_loopback(args.host):
            print(f"openweight: warning: listening on {args.host} without --api-key; anyone who "
                  "can reach this machine can use it", file=sys.stderr, flush=True)

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                app.state.stopping.set()  # end streams now rather than wait for them
                super().handle_exit(sig, frame)

        config = uvicorn.Config(app, log_level="warning", ws="none", lifespan="on",
                                timeout_graceful_shutdown=5)
        with suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
            Server(config).run(sockets=[sock])
    finally:
        sock.close()
    print("openweight: server stopped", file=sys.stderr)
    return 0


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``openweight`` command's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve local models over the OpenAI API (/v1/chat/completions, "
                    "/v1/completions, /v1/models, /health). Requests may name any installed "
                    "model; --model is the one loaded at start and used when none is named.")
    p.add_argument("--model", "-m", metavar="NAME_OR_PATH",
                   help="model name or directory (default: the default model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks one)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 (default: "
                        "$OPENWEIGHT_API_KEY, else none)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", help="auto, bfloat16, float16 or float32 (default: auto)")
    p.add_argument("--quantize", help="auto, none, int8 or int4 weight-only quantisation of "
                   "the Linear layers (default: auto, see README Performance)")
    p.set_defaults(func=cmd_serve)
    return p
