"""The httpx backends: talk to any OpenAI-compatible server (openweight serve, vLLM, Ollama, ...).

Pure logic (building requests, parsing answers and stream events, mapping failures
to the SDK's errors) lives in ``_RemoteLogic`` and ``wire``; ``RemoteBackend`` and
``AsyncRemoteBackend`` add the few lines of sync and async I/O around it, as httpx does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from typing import Any

import httpx
from httpx_sse import EventSource

from . import wire
from .backends import AsyncBackend, ChunkStream, SyncBackend
from .embedding import EmbedRequest
from .errors import (
    InvalidRequestError,
    ModelNotFoundError,
    OpenWeightError,
    RemoteError,
    RemoteStatusError,
    redact_url,
)
from .options import GenerationOptions
from .remote_http import (
    async_unix_transport,
    import_httpcore,
    is_loopback_http,
    is_sse,
    retry_delay,
    split_base_url,
    status_error,
    transport_error,
    unix_transport,
)
from .types import ChatResult, Chunk, EmbeddingResult, Message, ModelInfo
from .wire.embeddings import embed_body, embedding_result_from_json
from .wire.responses_client import (
    ResponsesStreamParser,
    responses_body,
    result_from_responses_json,
)

__all__ = ["AsyncRemoteBackend", "RemoteBackend"]

APIS = ("chat", "responses")  # how a chat is sent: /chat/completions or /responses
NO_COMPLETIONS = ("completions", "continue raw text with a local model, or use chat()")
NO_EMBEDDINGS = ("embeddings", "name an embedding model on a server that serves them "
                 "(llama.cpp: --embeddings)")


class _RemoteLogic:
    """Everything about the protocol that does no I/O."""

    retry_base_delay = 0.5

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, max_retries: int = 2,
                 transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
                 api: str = "chat", own_server: bool = False) -> None:
        # the URL shown, the URL httpx asks, and the Unix socket of a keep-alive server
        self.base_url, self._http_base, self._uds = split_base_url(base_url)
        self._given_url = base_url
        self._model = model
        self._api_key = api_key
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 30.0))
        self._max_retries = max(0, max_retries)
        self._transport = transport
        self._ssl: ssl.SSLContext | None = None
        self._lock = threading.Lock()
        if api not in APIS:
            raise InvalidRequestError(f"api={api!r}: use 'chat' (chat completions, the "
                                      "default) or 'responses'", param="api")
        self._api = api
        self._own_server = own_server  # a keep-alive server: its errors as in-process ones

    # -- requests ------------------------------------------------------------------------

    def _client_kwargs(self) -> dict[str, Any]:
        headers = {"User-Agent": "openweight", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        local = self._uds is not None or is_loopback_http(self.base_url)
        with self._lock:  # building an SSL context costs ~10 ms: once per backend
            if self._ssl is None and self._transport is None and not local:
                self._ssl = httpx.create_ssl_context()
        import_httpcore()
        # plain HTTP on this machine (a keep-alive or local server): no TLS, no redirects
        # off the machine unverified, and never a proxy (trust_env=False ignores the proxy
        # variables and .netrc); a remote server: the proxy variables and NO_PROXY apply
        kwargs: dict[str, Any] = {"base_url": self._http_base + "/", "headers": headers,
                                  "timeout": self._timeout, "follow_redirects": not local,
                                  "trust_env": not local}
        if self._transport is not None:
            kwargs["transport"] = self._transport
        elif self._uds is not None:
            kwargs["transport"] = self._uds_transport(self._uds)
        else:
            kwargs["verify"] = False if local else self._ssl
        return kwargs

    def _uds_transport(self, path: str) -> httpx.BaseTransport | httpx.AsyncBaseTransport:
        raise NotImplementedError

    @staticmethod
    def _build(client: httpx.Client | httpx.AsyncClient, method: str, path: str,
               body: dict[str, Any] | None, stream: bool) -> httpx.Request:
        accept = {"Accept": "text/event-stream"} if stream else None
        return client.build_request(method, path, json=body, headers=accept)

    # -- answers -------------------------------------------------------------------------

    def _json(self, response: httpx.Response) -> Any:
        """The answer's JSON; anything else (too deep, not UTF-8...) is a RemoteError."""
        return wire.answer_json(response.content, redact_url(response.request.url))

    def _parse_models(self, data: Any) -> list[ModelInfo]:
        names = wire.model_names_from_json(data, self.base_url)
        default = self._model or (names[0] if names else None)
        return [ModelInfo(name=n, installed=True, source=f"remote:{self.base_url}",
                          default=n == default) for n in names]

    def _first_model(self, models: list[ModelInfo]) -> str:
        if not models:
            raise ModelNotFoundError(f"the server at {self.base_url} lists no models; pass "
                                     "model=... to the client")
        self._model = models[0].name
        return self._model

    @contextlib.contextmanager
    def _missing_api(self, api: str, hint: str) -> Iterator[None]:
        """A server without this API (404, 405, 501): say so, and what to do."""
        try:
            yield
        except RemoteStatusError as exc:
            if exc.status_code not in (404, 405, 501):
                raise
            raise InvalidRequestError(f"{self.base_url} has no {api} API ({exc}); {hint}"
                                      ) from exc

    def _chat_request(self, model: str, messages: Sequence[Message], options: GenerationOptions,
                      stream: bool) -> tuple[str, dict[str, Any]]:
        """The path and body of a chat, in the API this backend speaks."""
        if self._api == "responses":
            return "responses", responses_body(model, list(messages), options, stream)
        return "chat/completions", wire.chat_body(model, list(messages), options, stream=stream)

    @staticmethod
    def _result(path: str, data: Any, model: str) -> ChatResult:
        if path == "responses":
            return result_from_responses_json(data, model)
        return wire.result_from_json(data, model)

    def _stream_parser(self, path: str) -> wire.StreamParser | ResponsesStreamParser:
        if path == "responses":
            return ResponsesStreamParser(raise_error=self._event_error)
        return wire.StreamParser(raise_error=self._event_error)

    # -- failures ------------------------------------------------------------------------

    def _status_error(self, status: int, body_text: str, url: object) -> OpenWeightError:
        return status_error(status, body_text, url, self.base_url, self._api_key,
                            self._own_server)

    def _event_error(self, payload: Mapping[str, Any]) -> OpenWeightError:
        """An ``{"error": ...}`` event in the middle of a stream, mapped like a status."""
        err = payload.get("error")
        status = 500
        if isinstance(err, Mapping):
            code = err.get("code")
            if isinstance(code, int) and 400 <= code < 600:
                status = code
            elif err.get("type") in ("invalid_request_error", "BadRequestError"):
                status = 400
        return self._status_error(status, json.dumps(payload), f"{self.base_url} (mid-stream)")

    def _transport_error(self, exc: Exception) -> RemoteError:
        return transport_error(exc, self.base_url, self._timeout.read)

    def _retry_delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying this answer, or None if it is final."""
        return retry_delay(response, attempt, self._max_retries, self.retry_base_delay)


class RemoteBackend(_RemoteLogic, SyncBackend):
    """A model on an OpenAI-compatible server (a ``SyncBackend``).

    ``transport`` is the test seam (``httpx.MockTransport``); each request gets a
    short-lived httpx client, so nothing is left open between calls.
    """

    @property
    def name(self) -> str:  # type: ignore[override]
        """The model's name: the one given, else the first the server lists."""
        return self._model or self._first_model(self.models())

    def _uds_transport(self, path: str) -> httpx.BaseTransport:
        return unix_transport(path)

    def _send(self, client: httpx.Client, method: str, path: str,
              body: dict[str, Any] | None = None, stream: bool = False) -> httpx.Response:
        for attempt in range(self._max_retries + 1):
            try:
                response = client.send(self._build(client, method, path, body, stream),
                                       stream=stream)
                if response.is_success:
                    return response
                try:
                    response.read()
                finally:
                    response.close()
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from exc
            delay = self._retry_delay(response, attempt)
            if delay is None:
                break
            time.sleep(delay)
        raise self._status_error(response.status_code, response.text, response.request.url)

    def _get_json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with httpx.Client(**self._client_kwargs()) as client:
            response = self._send(client, method, path, body)
            return self._json(response)

    def models(self) -> list[ModelInfo]:
        return self._parse_models(self._get_json("GET", "models"))

    def embed(self, request: EmbedRequest) -> EmbeddingResult:
        with self._missing_api(*NO_EMBEDDINGS):
            data = self._get_json("POST", "embeddings", embed_body(self.name, request))
        return embedding_result_from_json(data, self.name, len(request))

    def chat(self, messages: Sequence[Message], options: GenerationOptions) -> ChatResult:
        model = self.name
        path, body = self._chat_request(model, messages, options, stream=False)
        return self._result(path, self._get_json("POST", path, body), model)

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> ChunkStream:
        """Send the request now (so errors raise here); iterate the returned chunks."""
        model = self.name
        path, body = self._chat_request(model, messages, options, stream=True)
        return self._open_stream(path, body, model)

    def complete(self, prompt: str, options: GenerationOptions) -> ChunkStream:
        """Continue raw text through the server's legacy completions API."""
        model = self.name
        with self._missing_api(*NO_COMPLETIONS):
            return self._open_stream("completions", wire.completion_body(model, prompt, options),
                                     model)

    def _open_stream(self, path: str, body: dict[str, Any], model: str) -> ChunkStream:
        client = httpx.Client(**self._client_kwargs())
        try:
            response = self._send(client, "POST", path, body, stream=True)
        except BaseException:
            client.close()
            raise

        def close() -> None:
            response.close()
            client.close()

        return ChunkStream(self._iter_chunks(response, model, close, path), on_close=close)

    def _iter_chunks(self, response: httpx.Response, model: str,
                     close: Callable[[], None], path: str) -> Iterator[Chunk]:
        try:
            if not is_sse(response):
                response.read()
                yield from wire.result_chunks(self._result(path, self._json(response), model))
                return
            parser = self._stream_parser(path)
            for event in EventSource(response).iter_sse():
                chunk = parser.feed(event.event, event.data)
                if chunk is not None:
                    yield chunk
                if parser.done:
                    break
            yield parser.finish(self.base_url)
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise self._transport_error(exc) from exc
        finally:
            close()


class AsyncRemoteBackend(_RemoteLogic, AsyncBackend):
    """The async twin of RemoteBackend (an ``AsyncBackend``); the same logic, awaited I/O."""

    def _uds_transport(self, path: str) -> httpx.AsyncBaseTransport:
        return async_unix_transport(path)

    async def _send(self, client: httpx.AsyncClient, method: str, path: str,
                    body: dict[str, Any] | None = None, stream: bool = False) -> httpx.Response:
        for attempt in range(self._max_retries + 1):
            try:
                response = await client.send(self._build(client, method, path, body, stream),
                                             stream=stream)
                if response.is_success:
                    return response
                try:
                    await response.aread()
                finally:
                    await response.aclose()
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from exc
            delay = self._retry_delay(response, attempt)
            if delay is None:
                break
            await asyncio.sleep(delay)
        raise self._status_error(response.status_code, response.text, response.request.url)

    async def _get_json(self, method: str, path: str,
                        body: dict[str, Any] | None = None) -> Any:
        async with httpx.AsyncClient(**self._client_kwargs()) as client:
            response = await self._send(client, method, path, body)
            return self._json(response)

    @property
    def name(self) -> str:  # type: ignore[override]
        """The model's name; blocking when the server must be asked (use resolve_name)."""
        if self._model:
            return self._model
        sync = RemoteBackend(self._given_url, api_key=self._api_key, timeout=self._timeout.read
                             or 600.0, max_retries=self._max_retries, transport=self._transport)
        return self._first_model(sync.models())

    async def resolve_name(self) -> str:
        return self._model or self._first_model(await self.models())

    async def models(self) -> list[ModelInfo]:
        return self._parse_models(await self._get_json("GET", "models"))

    async def embed(self, request: EmbedRequest) -> EmbeddingResult:
        model = await self.resolve_name()
        with self._missing_api(*NO_EMBEDDINGS):
            data = await self._get_json("POST", "embeddings", embed_body(model, request))
        return embedding_result_from_json(data, model, len(request))

    async def chat(self, messages: Sequence[Message], options: GenerationOptions) -> ChatResult:
        model = await self.resolve_name()
        path, body = self._chat_request(model, messages, options, stream=False)
        return self._result(path, await self._get_json("POST", path, body), model)

    async def stream(self, messages: Sequence[Message],
                     options: GenerationOptions) -> AsyncGenerator[Chunk, None]:
        """An async generator of chunks; ``aclose()`` closes the HTTP response."""
        model = await self.resolve_name()
        path, body = self._chat_request(model, messages, options, stream=True)
        async with contextlib.aclosing(self._stream(path, body, model)) as chunks:
            async for chunk in chunks:  # aclosing: our aclose() reaches the response at once
                yield chunk

    async def complete(self, prompt: str,
                       options: GenerationOptions) -> AsyncGenerator[Chunk, None]:
        model = await self.resolve_name()
        body = wire.completion_body(model, prompt, options)
        with self._missing_api(*NO_COMPLETIONS):
            async with contextlib.aclosing(self._stream("completions", body, model)) as chunks:
                async for chunk in chunks:
                    yield chunk

    async def _stream(self, path: str, body: dict[str, Any],
                      model: str) -> AsyncGenerator[Chunk, None]:
        async with httpx.AsyncClient(**self._client_kwargs()) as client:
            response = await self._send(client, "POST", path, body, stream=True)
            try:
                if not is_sse(response):
                    await response.aread()
                    result = self._result(path, self._json(response), model)
                    for whole in wire.result_chunks(result):
                        yield whole
                    return
                parser = self._stream_parser(path)
                async for event in EventSource(response).aiter_sse():
                    chunk = parser.feed(event.event, event.data)
                    if chunk is not None:
                        yield chunk
                    if parser.done:
                        break
                yield parser.finish(self.base_url)
            except (httpx.HTTPError, httpx.StreamError) as exc:
                raise self._transport_error(exc) from exc
            finally:
                await response.aclose()
