"""Client and AsyncClient: the policy around a backend.

Which backend answers (a remote server, this user's keep-alive server, or the local
engine in this process), keep-alive (find or start a keep-alive server), one retry rule,
and request validation. The backends (``backends.py``) do the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .backends import (
    AsyncBackend,
    AsyncChunkStream,
    ChunkStream,
    SyncBackend,
    ThreadedAsyncBackend,
    collect,
)
from .embedding import EmbedInput, EmbedRequest
from .errors import InvalidRequestError, OpenWeightError, RemoteConnectionError
from .options import GenerationOptions
from .settings import (
    KEEP_ALIVE_ENV,
    check_device,
    check_dtype,
    check_quantize,
    is_path,
    keep_alive_seconds,
)
from .types import ChatResult, Chunk, EmbeddingResult, Message, MessageInput, ModelInfo
from .wire import to_messages

__all__ = ["AsyncClient", "AsyncStream", "Client", "Stream"]

Stream = ChunkStream  # what Client.stream returns
AsyncStream = AsyncChunkStream  # what AsyncClient.stream returns
T = TypeVar("T")
C = TypeVar("C", bound="_Base")


class _Base:
    """What both clients decide before any I/O: settings, and where requests go."""

    def __init__(self, model: str | None = None, *, base_url: str | None = None,
                 api_key: str | None = None, device: str | None = None,
                 dtype: str | None = None, quantize: str | None = None,
                 keep_alive: str | float | None = None,
                 timeout: float = 600.0, max_retries: int = 2, api: str = "chat") -> None:
        self._settings: dict[str, Any] = {k: v for k, v in locals().items()
                                          if k not in ("self", "model")}  # for twins
        if api not in ("chat", "responses"):
            raise InvalidRequestError(f"api={api!r}: use 'chat' (chat completions, the "
                                      "default) or 'responses' (the Responses API)", param="api")
        self._api = api
        self._model = model
        self._base_url = base_url or os.environ.get("OPENWEIGHT_BASE_URL") or None
        self._api_key = api_key or os.environ.get("OPENWEIGHT_API_KEY") or None
        self._timeout = timeout
        self._max_retries = max_retries
        # keep-alive: seconds to start (or refresh) a background server with; None: use one
        # that already runs for these settings, never start one; 0: always in this process
        self._keep_alive: float | None = None
        if keep_alive is not None:
            self._keep_alive = keep_alive_seconds(keep_alive)  # a bad value fails here
        self._daemon_url: str | None = None  # the keep-alive server in use, if any
        self._embedders: dict[str, Any] = {}  # clients of other models, for embed(model=...)
        self._device, self._dtype, self._quantize = device, dtype, quantize
        if self._base_url is None:
            # fail early on a bad setting; nothing heavy is imported or loaded here
            self._device = check_device(device)
            self._dtype = check_dtype(dtype)
            self._quantize = check_quantize(quantize)
            if keep_alive is None and os.environ.get(KEEP_ALIVE_ENV, "").strip():
                self._keep_alive = keep_alive_seconds(None)

    @property
    def is_remote(self) -> bool:
        """Does this client talk to a server given by ``base_url`` or OPENWEIGHT_BASE_URL?"""
        return self._base_url is not None

    @property
    def keep_alive_url(self) -> str | None:
        """The address of the keep-alive server answering this client (None: none is):
        ``unix:`` and the path of its socket, a base URL ``Client(base_url=...)`` accepts."""
        return self._daemon_url

    def _remote_args(self) -> tuple[str, str | None, str | None] | None:
        """``(url, api key, model)`` of the server to talk to, or None: the local engine.
        A keep-alive server is found (or started) here."""
        if self._base_url is not None:
            return self._base_url, self._api_key, self._model
        server = self._keep_alive_server()
        if server is not None:
            self._daemon_url = server[0]
        return server

    def _keep_alive_server(self) -> tuple[str, str, str] | None:
        """``(url, token, model name)`` of the keep-alive server to use, or None (local).

        With ``keep_alive`` (or OPENWEIGHT_KEEP_ALIVE) nonzero, one is started if none runs,
        after pulling the model here (its progress shows in this process). Without it, only
        a server already running for the same model, device, dtype and quantize is used.
        """
        from . import daemon

        if not daemon.SUPPORTED or self._keep_alive == 0:
            return None
        model, device, dtype, quantize = self._model, self._device, self._dtype, self._quantize
        if self._keep_alive is None:  # reuse only: a lookup costs a few milliseconds
            try:
                found = daemon.find_daemon(model, device=device, dtype=dtype,
                                           quantize=quantize)
            except OpenWeightError:
                return None  # nothing usable runs: load the model here (errors show there)
            if found is None:
                return None
            url, token = found
        else:
            if not is_path(model):
                from .store import ensure_model

                model, _ = ensure_model(model)  # pull in the foreground, with progress
            url, token = daemon.ensure_daemon(model, device=device, dtype=dtype,
                                              quantize=quantize, keep_alive=self._keep_alive)
        if model is None:
            from .store import default_model

            model = default_model()
        return url, token, Path(model).name if is_path(model) else model

    def _for_embedding(self: C, model: str | None) -> C:
        """This client, or its twin for another model (local and naming none: the default)."""
        if model is None and self._model is None and self._base_url is None:
            from .store import default_embedding_model

            model = default_embedding_model()
        if model is None or model == self._model:
            return self
        if model not in self._embedders:
            self._embedders[model] = type(self)(model, **self._settings)
        twin: C = self._embedders[model]
        return twin

    def _remote_options(self) -> dict[str, Any]:
        """Timeout, retries, the API; a keep-alive server's errors are raised as ours."""
        own = self._daemon_url is not None
        return {"timeout": self._timeout, "max_retries": self._max_retries, "own_server": own,
                "api": "chat" if own else self._api}

    def _local(self) -> SyncBackend:
        from .store import open_engine

        return open_engine(self._model, device=self._device, dtype=self._dtype,
                           quantize=self._quantize)

    def _forget_daemon(self) -> bool:
        """After a connection error: True if it was a keep-alive server, forgotten so that
        the next call finds (or starts) one again, or runs here."""
        if self._daemon_url is None:
            return False
        self._daemon_url = None
        self._drop_backend()
        return True

    def _drop_backend(self) -> None:
        raise NotImplementedError

    @staticmethod
    def _prepare(messages: Iterable[MessageInput],
                 options: dict[str, Any]) -> tuple[list[Message], GenerationOptions]:
        tools = options.get("tools")
        if isinstance(tools, list | tuple):  # Python functions become function specs
            from .tools import tool_specs

            options = {**options, "tools": tool_specs(tools)}
        return to_messages(messages), GenerationOptions.from_kwargs(options)

    @staticmethod
    def _prepare_prompt(prompt: object, options: dict[str, Any]) -> GenerationOptions:
        if not isinstance(prompt, str):
            raise InvalidRequestError(f"prompt must be a string, not {type(prompt).__name__}",
                                      param="prompt")
        return GenerationOptions.from_kwargs(options).for_completion()


class Client(_Base):
    """Chat with a local model in this process, or with a remote OpenAI-compatible server
    (``base_url=...`` or OPENWEIGHT_BASE_URL; ``api="responses"`` for a server that speaks
    only the Responses API).

    A local model runs here unless a keep-alive server (``openweight.daemon``) runs for the
    same model, device, dtype and quantize; ``keep_alive="5m"`` (or OPENWEIGHT_KEEP_ALIVE)
    starts one, ``keep_alive=0`` never uses one. One retry rule: a keep-alive server that
    went away before the first chunk of an answer is found or started again, once.
    """

    _backend: SyncBackend | None = None

    @property
    def backend(self) -> SyncBackend:
        """The backend answering this client (a ``LocalEngine`` or a ``RemoteBackend``),
        made on first use: the documented seam for tests and tools that need the engine."""
        if self._backend is None:
            remote = self._remote_args()
            if remote is None:
                self._backend = self._local()
            else:
                from .remote import RemoteBackend

                url, key, model = remote
                self._backend = RemoteBackend(url, model=model, api_key=key,
                                              **self._remote_options())
        return self._backend

    def _drop_backend(self) -> None:
        self._backend = None

    @property
    def model(self) -> str:
        """The name of the model this client talks to (resolving the default if needed)."""
        return self.backend.name

    def _retry(self, call: Callable[[SyncBackend], T]) -> T:
        try:
            return call(self.backend)
        except RemoteConnectionError:
            if not self._forget_daemon():
                raise
        return call(self.backend)

    def _open(self, open_stream: Callable[[SyncBackend], ChunkStream]) -> ChunkStream:
        """The stream, opened now (a bad request raises here), under the retry rule."""
        current = [self._retry(open_stream)]

        def chunks() -> Iterator[Chunk]:
            started = again = False
            try:
                while True:
                    try:
                        chunk = next(current[0])
                    except StopIteration:
                        return
                    except RemoteConnectionError:
                        if started or again or not self._forget_daemon():
                            raise
                        again = True
                        current[0].close()
                        current[0] = open_stream(self.backend)
                        continue
                    started = True
                    yield chunk
            finally:
                current[0].close()

        return ChunkStream(chunks(), on_close=lambda: current[0].close())

    def chat(self, messages: Iterable[MessageInput], **options: Any) -> ChatResult:
        """Answer a conversation; options are those of GenerationOptions."""
        msgs, opts = self._prepare(messages, options)
        return self._retry(lambda backend: backend.chat(msgs, opts))

    def stream(self, messages: Iterable[MessageInput], **options: Any) -> Stream:
        """Stream the answer chunk by chunk; the last chunk carries finish_reason and usage."""
        msgs, opts = self._prepare(messages, options)
        return self._open(lambda backend: backend.stream(msgs, opts))

    def generate(self, prompt: str, **options: Any) -> ChatResult:
        """Answer one user turn."""
        return self.chat([{"role": "user", "content": prompt}], **options)

    def complete(self, prompt: str, **options: Any) -> ChatResult:
        """Continue raw text with no chat template (sampling options and response_format)."""
        opts = self._prepare_prompt(prompt, options)
        return self._retry(lambda backend: collect(backend.complete(prompt, opts),
                                                   backend.name))

    def stream_complete(self, prompt: str, **options: Any) -> Stream:
        """Stream the continuation of raw text, chunk by chunk."""
        opts = self._prepare_prompt(prompt, options)
        return self._open(lambda backend: backend.complete(prompt, opts))

    def models(self) -> list[ModelInfo]:
        """The models this client can use: installed and catalog models, or the server's."""
        if self.is_remote:
            return self.backend.models()
        from .store import list_models

        return list_models()

    def embed(self, input: EmbedInput, *, model: str | None = None, truncate: bool = False,
              dimensions: int | None = None) -> EmbeddingResult:
        """One vector per input (a text, a list of texts, or token ids), from an embedding
        model: ``model``, else this client's, else (local) the default embedding model.
        An input longer than the model's window is an error unless ``truncate``;
        ``dimensions`` keeps the first N numbers of each vector (re-normalised)."""
        request = EmbedRequest.build(input, truncate=truncate, dimensions=dimensions)
        client = self._for_embedding(model)
        return client._retry(lambda backend: backend.embed(request))


class AsyncClient(_Base):
    """The async twin of Client: same arguments, same results, never blocks the event loop."""

    _abackend: AsyncBackend | None = None

    @property
    def backend(self) -> AsyncBackend:
        """The backend answering this client (``AsyncRemoteBackend``, or the local engine
        run in threads: ``ThreadedAsyncBackend``), made on first use. Blocking: it may pull
        a model or start a keep-alive server (the client's methods make it in a thread)."""
        if self._abackend is None:
            remote = self._remote_args()
            if remote is None:
                self._abackend = ThreadedAsyncBackend(self._local())
            else:
                from .remote import AsyncRemoteBackend

                url, key, model = remote
                self._abackend = AsyncRemoteBackend(url, model=model, api_key=key,
                                                    **self._remote_options())
        return self._abackend

    def _drop_backend(self) -> None:
        self._abackend = None

    @property
    def model(self) -> str:
        """The name of the model this client talks to (blocking: it may ask the server)."""
        return self.backend.name

    async def _backend(self) -> AsyncBackend:
        if self._abackend is None:
            return await asyncio.to_thread(lambda: self.backend)
        return self._abackend

    async def _retry(self, call: Callable[[AsyncBackend], Awaitable[T]]) -> T:
        """``await call(backend)``, once more if a keep-alive server went away."""
        try:
            return await call(await self._backend())
        except RemoteConnectionError:
            if not self._forget_daemon():
                raise
        return await call(await self._backend())

    async def _open(self, open_stream: Callable[[AsyncBackend], AsyncGenerator[Chunk, None]],
                    ) -> AsyncGenerator[Chunk, None]:
        """The source's chunks; opened once more if a keep-alive server went away before
        the first chunk (never after: the caller has seen part of the answer)."""
        for again in (False, True):
            source = open_stream(await self._backend())
            # aclosing: our aclose() closes the source (the HTTP response, the engine) at once
            async with contextlib.aclosing(source) as chunks:
                started = False
                try:
                    async for chunk in chunks:
                        started = True
                        yield chunk
                    return
                except RemoteConnectionError:
                    if started or again or not self._forget_daemon():
                        raise

    async def chat(self, messages: Iterable[MessageInput], **options: Any) -> ChatResult:
        msgs, opts = self._prepare(messages, options)
        return await self._retry(lambda backend: backend.chat(msgs, opts))

    def stream(self, messages: Iterable[MessageInput], **options: Any) -> AsyncStream:
        msgs, opts = self._prepare(messages, options)
        return AsyncStream(self._open(lambda backend: backend.stream(msgs, opts)))

    async def generate(self, prompt: str, **options: Any) -> ChatResult:
        return await self.chat([{"role": "user", "content": prompt}], **options)

    async def complete(self, prompt: str, **options: Any) -> ChatResult:
        opts = self._prepare_prompt(prompt, options)
        answer = [c async for c in self._open(lambda b: b.complete(prompt, opts))]
        return collect(iter(answer), await (await self._backend()).resolve_name())

    def stream_complete(self, prompt: str, **options: Any) -> AsyncStream:
        opts = self._prepare_prompt(prompt, options)
        return AsyncStream(self._open(lambda backend: backend.complete(prompt, opts)))

    async def models(self) -> list[ModelInfo]:
        if self.is_remote:
            return await (await self._backend()).models()
        from .store import list_models

        return await asyncio.to_thread(list_models)

    async def embed(self, input: EmbedInput, *, model: str | None = None,
                    truncate: bool = False, dimensions: int | None = None) -> EmbeddingResult:
        request = EmbedRequest.build(input, truncate=truncate, dimensions=dimensions)
        client = await asyncio.to_thread(self._for_embedding, model)
        return await client._retry(lambda backend: backend.embed(request))
