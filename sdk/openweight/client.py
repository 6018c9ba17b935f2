"""Client and AsyncClient: pick a backend, validate the request, delegate."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from .errors import InvalidRequestError
from .options import GenerationOptions
from .types import ChatResult, Chunk, Message, MessageInput, ModelInfo, to_messages

__all__ = ["AsyncClient", "AsyncStream", "Backend", "Client", "Stream"]

CHAT_ONLY_OPTIONS = ("tools", "tool_choice", "thinking", "reasoning_effort")


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

    looks_like_path = model is not None and (
        model.startswith(("/", ".", "~")) or Path(model).expanduser().exists()
    )
    if model is not None and looks_like_path:
        path = Path(model).expanduser()
        return LocalEngine(path, name=path.name, device=device, dtype=dtype, quantize=quantize)
    from .store import ensure_model

    name, path = ensure_model(model)
    return LocalEngine(path, name=name, device=device, dtype=dtype, quantize=quantize)


class _Base:
    def __init__(self, model: str | None = None, *, base_url: str | None = None,
                 api_key: str | None = None, device: str | None = None,
                 dtype: str | None = None, quantize: str | None = None,
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
        if self._base_url is None:
            # fail early on a bad device/dtype; nothing heavy is imported or loaded here
            from .local.loader import DEVICES, DTYPES
            from .local.quantize import QUANTIZE

            if device is not None and device.split(":")[0].lower() not in DEVICES:
                raise InvalidRequestError(f"device {device!r} is not supported; use one of "
                                          f"{', '.join(DEVICES)}")
            if dtype is not None and dtype.lower() not in DTYPES:
                raise InvalidRequestError(f"dtype {dtype!r} is not supported; use one of "
                                          f"{', '.join(DTYPES)}")
            if quantize is not None and quantize.lower() not in QUANTIZE:
                raise InvalidRequestError(f"quantize {quantize!r} is not supported; use one "
                                          f"of {', '.join(QUANTIZE)}")

    @property
    def is_remote(self) -> bool:
        return self._base_url is not None

    def _get_backend(self) -> Backend:
        if self._backend is None:
            if self._base_url is not None:
                from .remote import RemoteBackend

                self._backend = RemoteBackend(self._base_url, model=self._model,
                                              api_key=self._api_key, timeout=self._timeout,
                                              max_retries=self._max_retries)
            else:
                self._backend = _local_backend(self._model, self._device, self._dtype,
                                               self._quantize)
        return self._backend

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
    """

    def chat(self, messages: Iterable[MessageInput], **options: Any) -> ChatResult:
        """Answer a conversation; options are those of GenerationOptions."""
        msgs, opts = self._prepare(messages, options)
        return self._get_backend().chat(msgs, opts)

    def stream(self, messages: Iterable[MessageInput], **options: Any) -> Stream:
        """Stream the answer chunk by chunk; the last chunk carries finish_reason and usage."""
        msgs, opts = self._prepare(messages, options)
        return Stream(self._get_backend().stream(msgs, opts))

    def generate(self, prompt: str, **options: Any) -> ChatResult:
        """Answer one user turn."""
        return self.chat([{"role": "user", "content": prompt}], **options)

    def complete(self, prompt: str, **options: Any) -> ChatResult:
        """Continue raw text with no chat template (sampling options and response_format)."""
        opts = self._prepare_prompt(prompt, options)
        backend = self._get_backend()
        return _collect(_complete(backend, prompt, opts), backend.name)

    def stream_complete(self, prompt: str, **options: Any) -> Stream:
        """Stream the continuation of raw text, chunk by chunk."""
        opts = self._prepare_prompt(prompt, options)
        return Stream(_complete(self._get_backend(), prompt, opts))

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

    async def chat(self, messages: Iterable[MessageInput], **options: Any) -> ChatResult:
        msgs, opts = self._prepare(messages, options)
        backend = await self._backend_async()
        achat = getattr(backend, "achat", None)
        if achat is not None:
            result: ChatResult = await achat(msgs, opts)
            return result
        return await asyncio.to_thread(backend.chat, msgs, opts)

    def stream(self, messages: Iterable[MessageInput], **options: Any) -> AsyncStream:
        msgs, opts = self._prepare(messages, options)
        return AsyncStream(self._astream(msgs, opts))

    async def _astream(self, msgs: list[Message], opts: GenerationOptions) -> AsyncIterator[Chunk]:
        backend = await self._backend_async()
        astream = getattr(backend, "astream", None)
        source: AsyncGenerator[Chunk, None] = (
            astream(msgs, opts) if astream is not None
            else _in_thread(lambda: backend.stream(msgs, opts)))
        # aclosing: our aclose() closes the source (the HTTP response, the engine) at once
        async with contextlib.aclosing(source) as chunks:
            async for chunk in chunks:
                yield chunk

    async def generate(self, prompt: str, **options: Any) -> ChatResult:
        return await self.chat([{"role": "user", "content": prompt}], **options)

    async def complete(self, prompt: str, **options: Any) -> ChatResult:
        opts = self._prepare_prompt(prompt, options)
        backend = await self._backend_async()
        return await asyncio.to_thread(
            lambda: _collect(_complete(backend, prompt, opts), backend.name))

    def stream_complete(self, prompt: str, **options: Any) -> AsyncStream:
        opts = self._prepare_prompt(prompt, options)
        return AsyncStream(self._astream_complete(prompt, opts))

    async def _astream_complete(self, prompt: str,
                                opts: GenerationOptions) -> AsyncIterator[Chunk]:
        backend = await self._backend_async()
        source = _in_thread(lambda: _complete(backend, prompt, opts))
        async with contextlib.aclosing(source) as chunks:
            async for chunk in chunks:
                yield chunk

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
