"""The backend contract: what a Client delegates to, written down (as httpx writes down
its transports) rather than discovered with ``getattr``.

- ``SyncBackend``: ``chat``, ``stream``, ``complete``, ``embed``, ``models``, ``close``. The local
  engine (``local.LocalEngine``) and the httpx backend (``remote.RemoteBackend``) are two.
- ``AsyncBackend``: the same, awaited. ``remote.AsyncRemoteBackend`` speaks HTTP itself;
  ``ThreadedAsyncBackend`` runs any SyncBackend (the local engine) in worker threads.
- ``ChunkStream`` / ``AsyncChunkStream``: the one stream type every backend returns:
  iterate it for Chunks, ``close()``/``aclose()`` (or leave its ``with`` block) to stop
  generating at once.

Nothing here imports torch, httpx or the store.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from types import TracebackType

from .embedding import EmbedRequest
from .errors import InvalidRequestError
from .options import GenerationOptions
from .types import ChatResult, Chunk, EmbeddingResult, Message, ModelInfo
from .wire import Answer

__all__ = [
    "AsyncBackend",
    "AsyncChunkStream",
    "ChunkStream",
    "SyncBackend",
    "ThreadedAsyncBackend",
    "collect",
    "not_an_embedder",
]


class ChunkStream(Iterator[Chunk]):
    """Chunks of a streamed answer. ``close()`` (or leaving a ``with`` block) stops
    generating; it is safe from any thread, even while another waits in ``next``."""

    def __init__(self, chunks: Iterator[Chunk],
                 on_close: Callable[[], None] | None = None) -> None:
        self._chunks = chunks
        self._on_close = on_close

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()  # first: a generation in another thread stops at its next token
        close = getattr(self._chunks, "close", None)
        if close is not None:
            # ValueError: a generator being run in another thread; on_close has stopped it
            with contextlib.suppress(ValueError):
                close()

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncChunkStream(AsyncIterator[Chunk]):
    """Async chunks of a streamed answer; ``aclose()`` (or ``async with``) stops generating."""

    def __init__(self, chunks: AsyncIterator[Chunk]) -> None:
        self._chunks = chunks

    async def __anext__(self) -> Chunk:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncChunkStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


def not_an_embedder(name: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{name} is a chat model: it cannot embed. Use an embedding model (the default: "
        "all-minilm-l6-v2; `openweight models` shows each model's kind)", param="model")


def collect(chunks: Iterator[Chunk], model: str) -> ChatResult:
    """Join a stream into one ChatResult (so stream and non-stream can never differ)."""
    answer = Answer()
    for chunk in chunks:
        answer.add(chunk)
    return answer.result(model)


class SyncBackend(ABC):
    """A model to talk to, in this process or over HTTP."""

    name: str  # the model's name (a remote backend resolves it on first use)

    @abstractmethod
    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> ChunkStream:
        """Validate now (a bad request raises here), then stream the answer."""

    @abstractmethod
    def complete(self, prompt: str, options: GenerationOptions) -> ChunkStream:
        """Continue raw text with no chat template."""

    @abstractmethod
    def models(self) -> list[ModelInfo]:
        """The models this backend can answer with."""

    def chat(self, messages: Sequence[Message], options: GenerationOptions) -> ChatResult:
        return collect(self.stream(messages, options), self.name)

    def embed(self, request: EmbedRequest) -> EmbeddingResult:
        """One vector per input (a chat model has none: it says so)."""
        raise not_an_embedder(self.name)

    def close(self) -> None:
        """Release connections (the local engine keeps its weights in the loader's cache)."""
        return None


class AsyncBackend(ABC):
    """The async twin of SyncBackend."""

    name: str  # the model's name (blocking where a server must be asked: resolve_name)

    @abstractmethod
    async def resolve_name(self) -> str:
        """The model's name (a remote backend may ask the server for it)."""

    @abstractmethod
    def stream(self, messages: Sequence[Message],
               options: GenerationOptions) -> AsyncGenerator[Chunk, None]:
        """Stream the answer: an async generator (validation errors come with the first
        chunk); ``aclose()`` stops generating."""

    @abstractmethod
    def complete(self, prompt: str, options: GenerationOptions) -> AsyncGenerator[Chunk, None]:
        """Continue raw text with no chat template."""

    @abstractmethod
    async def models(self) -> list[ModelInfo]: ...

    async def embed(self, request: EmbedRequest) -> EmbeddingResult:
        raise not_an_embedder(await self.resolve_name())

    async def chat(self, messages: Sequence[Message], options: GenerationOptions) -> ChatResult:
        answer = Answer()
        async with contextlib.aclosing(self.stream(messages, options)) as chunks:
            async for chunk in chunks:
                answer.add(chunk)
        return answer.result(await self.resolve_name())

    async def aclose(self) -> None:
        """Release connections."""
        return None


class ThreadedAsyncBackend(AsyncBackend):
    """A SyncBackend run in worker threads, so the event loop never blocks (the local
    engine: its generation already runs on its own model thread)."""

    def __init__(self, backend: SyncBackend) -> None:
        self.backend = backend

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.backend.name

    async def resolve_name(self) -> str:
        return await asyncio.to_thread(lambda: self.backend.name)

    async def chat(self, messages: Sequence[Message], options: GenerationOptions) -> ChatResult:
        return await asyncio.to_thread(self.backend.chat, messages, options)

    def stream(self, messages: Sequence[Message],
               options: GenerationOptions) -> AsyncGenerator[Chunk, None]:
        return in_threads(lambda: self.backend.stream(messages, options))

    def complete(self, prompt: str, options: GenerationOptions) -> AsyncGenerator[Chunk, None]:
        return in_threads(lambda: self.backend.complete(prompt, options))

    async def models(self) -> list[ModelInfo]:
        return await asyncio.to_thread(self.backend.models)

    async def embed(self, request: EmbedRequest) -> EmbeddingResult:
        return await asyncio.to_thread(self.backend.embed, request)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.backend.close)


async def in_threads(open_stream: Callable[[], ChunkStream]) -> AsyncGenerator[Chunk, None]:
    """A sync stream's chunks, opened and each fetched in a worker thread; closed when the
    consumer stops (``aclose``), so generation stops too."""
    stream = await asyncio.to_thread(open_stream)
    done = object()
    try:
        while True:
            chunk = await asyncio.to_thread(next, stream, done)
            if chunk is done:
                break
            assert isinstance(chunk, Chunk)
            yield chunk
    finally:
        stream.close()
