"""Client and AsyncClient: pick a backend, validate the request, delegate."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

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
from .types import ChatResult, Chunk, Message, MessageInput, ModelInfo
from .wire import CHAT_ONLY_OPTIONS, to_messages

__all__ = ["AsyncClient", "AsyncStream", "Backend", "Client", "Stream"]

T = TypeVar("T")


class Backend(Protocol):
    """What a client delegates to: the local engine or a remote server."""

    name: str

    def chat(self, messages: list[Message], options: GenerationOptions) -> ChatResult: ...

    def stream(self, messages: list[Message], options: GenerationOptions) -> Iterator[Chunk]: ...


def _complete(backend: Backend, prompt: str, options: GenerationOptions) -> Iterator[Chunk]:
    """Chunks continuing raw text, from a backend that can (the local engine, a server)."""
    complete = getattr(backend, "complete", None)
    if complete is None:  # pragma: no cover - both built-in backends have it
        raise InvalidRequestError(f"{backend.name} cannot continue raw text; use chat()")
    chunks: Iterator[Chunk] = complete(prompt, options)
    return chunks


def _collect(chunks: Iterator[Chunk], model: str) -> ChatResult:
    from .local.engine import collect  # light: no torch, and one join for every backend

    return collect(chunks, model)


def _close(it: object) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


class Stream(Iterator[Chunk]):
    """Chunks of a streamed answer. Close it (or leave a ``with`` block) to stop generating."""

    def __init__(self, chunks: Iterator[Chunk]) -> None:
        self._chunks = chunks

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def close(self) -> None:
        _close(self._chunks)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncStream(AsyncIterator[Chunk]):
    """Async chunks of a streamed answer; ``aclose()`` (or ``async with``) stops generating."""

    def __init__(self, chunks: AsyncIterator[Chunk]) -> None:
        self._chunks = chunks

    async def __anext__(self) -> Chunk:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


def _local_backend(model: str | None, device: str | None, dtype: str | None,
                   quantize: str | None) -> Backend:
    from .local import LocalEngine

    if model is not None and is_path(model):  # a directory of the caller's: used as it is
        path = Path(model).expanduser()
        return LocalEngine(path, name=path.name, device=device, dtype=dtype, quantize=quantize)
    from .store import ensure_model, packed_cache

    name, path = ensure_model(model)  # a store model: its packed form is kept in the store
    return LocalEngine(path, name=name, device=device, dtype=dtype, quantize=quantize,
                       packed_cache=packed_cache())


class _Base:
    def __init__(self, model: str | None = None, *, base_url: str | None = None,
                 api_key: str | None = None, device: str | None = None,
                 dtype: str | None = None, quantize: str | None = None,
                 keep_alive: str | float | None = None,
                 timeout: float = 600.0, max_retries: int = 2) -> None:
        self._model = model
        self._base_url = base_url or os.environ.get("OPENWEIGHT_BASE_URL") or None
        self._api_key = api_key or os.environ.get("OPENWEIGHT_API_KEY") or None
        self._device = device
        self._dtype = dtype
        self._quantize = quantize
        self._timeout = timeout
        self._max_retries = max_retries
        self._backend: Backend | None = None
        # keep-alive: seconds to start (or refresh) a background server with; None: use one
        # that already runs for these settings, never start one; 0: always in this process
        self._keep_alive: float | None = None
        self._via_daemon = False  # the backend is a keep-alive server (found again if gone)
        if keep_alive is not None:
            self._keep_alive = keep_alive_seconds(keep_alive)  # a bad value fails here
        if self._base_url is None:
            # fail early on a bad device/dtype; nothing heavy is imported or loaded here
            self._device = check_device(device)
            self._dtype = check_dtype(dtype)
            self._quantize = check_quantize(quantize)
            if keep_alive is None and os.environ.get(KEEP_ALIVE_ENV, "").strip():
                self._keep_alive = keep_alive_seconds(None)

    @property
    def is_remote(self) -> bool:
        """Does this client talk to a server given by ``base_url`` or OPENWEIGHT_BASE_URL?"""
        return self._base_url is not None

    def _remote(self, base_url: str, api_key: str | None, model: str | None) -> Backend:
        from .remote import RemoteBackend

        return RemoteBackend(base_url, model=model, api_key=api_key, timeout=self._timeout,
                             max_retries=self._max_retries)

    def _get_backend(self) -> Backend:
        if self._backend is None:
            if self._base_url is not None:
                self._backend = self._remote(self._base_url, self._api_key, self._model)
            elif (server := self._keep_alive_server()) is not None:
                url, token, name = server
                self._backend = self._remote(url, token, name)
                self._via_daemon = True
            else:
                self._backend = _local_backend(self._model, self._device, self._dtype,
                                               self._quantize)
        return self._backend

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
            url, token = daemon.ensure_daemon(model, device=device, dtype=dtype, quantize=quantize,
                                              keep_alive=self._keep_alive)
        if model is None:
            from .store import default_model

            model = default_model()
        return url, token, Path(model).name if is_path(model) else model

    def _forget_daemon(self) -> bool:
        """After a connection error: True if it was a keep-alive server, forgotten so that
        the next call finds (or starts) one again, or runs here."""
        if not self._via_daemon:
            return False
        self._backend = None
        self._via_daemon = False
        return True

    def _retry(self, call: Callable[[Backend], T]) -> T:
        """``call(backend)``, once more if a keep-alive server went away (idle timeout,
        ``openweight stop``) before answering."""
        try:
            return call(self._get_backend())
        except RemoteConnectionError:
            if not self._forget_daemon():
                raise
        return call(self._get_backend())

    @property
    def model(self) -> str:
        """The name of the model this client talks to (resolving the default if needed)."""
        return self._get_backend().name

    @staticmethod
    def _prepare(messages: Iterable[MessageInput],
                 options: dict[str, Any]) -> tuple[list[Message], GenerationOptions]:
        tools = options.get("tools")
        if isinstance(tools, (list, tuple)):  # Python functions become function specs
            from .tools import tool_specs

            options = {**options, "tools": tool_specs(tools)}
        return to_messages(messages), GenerationOptions.from_kwargs(options)

    @staticmethod
    def _prepare_prompt(prompt: object, options: dict[str, Any]) -> GenerationOptions:
        if not isinstance(prompt, str):
            raise InvalidRequestError(f"prompt must be a string, not {type(prompt).__name__}",
                                      param="prompt")
        chat_only = [name for name in CHAT_ONLY_OPTIONS if options.get(name) is not None]
        if chat_only:
            raise InvalidRequestError(f"option {chat_only[0]} applies to chat only; raw text "
                                      "completion takes sampling options (use chat() instead)",
                                      param=chat_only[0])
        return GenerationOptions.from_kwargs(options)


class Client(_Base):
    """Chat with a local model in this process, or with a remote OpenAI-compatible server.

    ``Client()`` uses the default local model; ``Client(base_url=...)`` (or the
    ``OPENWEIGHT_BASE_URL`` environment variable) talks to a server instead.

    A local model runs in this process, unless a keep-alive server (see
    ``openweight.daemon``) already runs for the same model, device, dtype and quantize:
    then that one answers. ``keep_alive="5m"`` (or OPENWEIGHT_KEEP_ALIVE) starts one if
    none runs, kept loaded for that long after the last request; ``keep_alive=0`` always
    runs the model in this process.
    """

    def chat(self, messages: Iterable[MessageInput], **options: Any) -> ChatResult:
        """Answer a conversation; options are those of GenerationOptions."""
        msgs, opts = self._prepare(messages, options)
        return self._retry(lambda backend: backend.chat(msgs, opts))

    def stream(self, messages: Iterable[MessageInput], **options: Any) -> Stream:
        """Stream the answer chunk by chunk; the last chunk carries finish_reason and usage."""
        msgs, opts = self._prepare(messages, options)
        return Stream(self._retry(lambda backend: backend.stream(msgs, opts)))

    def generate(self, prompt: str, **options: Any) -> ChatResult:
        """Answer one user turn."""
        return self.chat([{"role": "user", "content": prompt}], **options)

    def complete(self, prompt: str, **options: Any) -> ChatResult:
        """Continue raw text with no chat template (sampling options and response_format)."""
        opts = self._prepare_prompt(prompt, options)
        return self._retry(lambda backend: _collect(_complete(backend, prompt, opts),
                                                    backend.name))

    def stream_complete(self, prompt: str, **options: Any) -> Stream:
        """Stream the continuation of raw text, chunk by chunk."""
        opts = self._prepare_prompt(prompt, options)
        return Stream(self._retry(lambda backend: _complete(backend, prompt, opts)))

    def models(self) -> list[ModelInfo]:
        """The models this client can use: installed and catalog models, or the server's."""
        backend = self._get_backend() if self.is_remote else None
        if backend is not None:
            return list(backend.models())  # type: ignore[attr-defined]
        from .store import list_models

        return list_models()


class AsyncClient(_Base):
    """The async twin of Client: same arguments, same results, never blocks the event loop."""

    async def _backend_async(self) -> Backend:
        if self._backend is None:
            return await asyncio.to_thread(self._get_backend)
        return self._backend

    async def _aretry(self, call: Callable[[Backend], Awaitable[T]]) -> T:
        """``await call(backend)``, once more if a keep-alive server went away."""
        try:
            return await call(await self._backend_async())
        except RemoteConnectionError:
            if not self._forget_daemon():
                raise
        return await call(await self._backend_async())

    async def _retry_stream(self, open_source: Callable[[Backend], AsyncGenerator[Chunk, None]],
                            ) -> AsyncIterator[Chunk]:
        """The source's chunks; opened once more if a keep-alive server went away before
        the first chunk (never after: the caller has seen part of the answer)."""
        for again in (False, True):
            # aclosing: our aclose() closes the source (the HTTP response, the engine) at once
            async with contextlib.aclosing(open_source(await self._backend_async())) as chunks:
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

        async def call(backend: Backend) -> ChatResult:
            achat = getattr(backend, "achat", None)
            if achat is not None:
                result: ChatResult = await achat(msgs, opts)
                return result
            return await asyncio.to_thread(backend.chat, msgs, opts)

        return await self._aretry(call)

    def stream(self, messages: Iterable[MessageInput], **options: Any) -> AsyncStream:
        msgs, opts = self._prepare(messages, options)
        return AsyncStream(self._astream(msgs, opts))

    def _astream(self, msgs: list[Message], opts: GenerationOptions) -> AsyncIterator[Chunk]:
        def open_source(backend: Backend) -> AsyncGenerator[Chunk, None]:
            astream = getattr(backend, "astream", None)
            if astream is not None:
                source: AsyncGenerator[Chunk, None] = astream(msgs, opts)
                return source
            return _in_thread(lambda: backend.stream(msgs, opts))

        return self._retry_stream(open_source)

    async def generate(self, prompt: str, **options: Any) -> ChatResult:
        return await self.chat([{"role": "user", "content": prompt}], **options)

    async def complete(self, prompt: str, **options: Any) -> ChatResult:
        opts = self._prepare_prompt(prompt, options)
        return await self._aretry(lambda backend: asyncio.to_thread(
            lambda: _collect(_complete(backend, prompt, opts), backend.name)))

    def stream_complete(self, prompt: str, **options: Any) -> AsyncStream:
        opts = self._prepare_prompt(prompt, options)
        return AsyncStream(self._retry_stream(
            lambda backend: _in_thread(lambda: _complete(backend, prompt, opts))))

    async def models(self) -> list[ModelInfo]:
        backend = await self._backend_async() if self.is_remote else None
        if backend is not None:
            amodels = getattr(backend, "amodels", None)
            if amodels is not None:
                return list(await amodels())
        from .store import list_models

        return await asyncio.to_thread(list_models)


async def _in_thread(open_stream: Callable[[], Iterator[Chunk]]) -> AsyncGenerator[Chunk, None]:
    """A sync stream's chunks, each fetched in a worker thread; closed when we stop."""
    it = await asyncio.to_thread(open_stream)
    done = object()
    try:
        while True:
            chunk = await asyncio.to_thread(next, it, done)
            if chunk is done:
                break
            assert isinstance(chunk, Chunk)
            yield chunk
    finally:
        _close(it)
