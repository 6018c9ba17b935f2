"""The llm model classes: one shared mixin, then a sync and an async class.

Every openweight model is registered as ``openweight/NAME``; ``openweight``
itself follows the store's default model. Building these objects is cheap (llm
builds them again on every ``get_model``): the weights load on first use, and
the ``openweight.Client`` objects that hold them are cached at module level.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any

import click
import llm
from llm.parts import (
    AttachmentPart,
    ReasoningPart,
    StreamEvent,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)

import openweight
from openweight.errors import redact_url
from openweight.settings import (
    keep_alive_seconds,
)

from .config import CONFIG_FILE, read_config, write_config
from .options import CLIENT_ONLY, LazyOptions, options_class

__all__ = [
    "CONFIG_FILE",
    "AsyncOpenWeight",
    "InvalidRequest",
    "OpenWeight",
    "OpenWeightModelError",
    "clear_clients",
    "client_for",
    "options_class",
    "read_config",
    "register_all",
    "sdk_errors",
    "write_config",
]

PREFIX = "openweight"
KEY_ALIAS = "openweight"
KEY_ENV_VAR = "OPENWEIGHT_API_KEY"


# -- errors ------------------------------------------------------------------------------


class OpenWeightModelError(llm.ModelError, click.ClickException):
    """An SDK error as llm shows it: one line, ``Error: ...``, exit code 1.

    It is an ``llm.ModelError`` for Python callers. It is also a
    ``click.ClickException`` because ``llm chat`` does not catch model errors:
    without this, a failed turn there would end in a traceback.
    """

    def __init__(self, message: str) -> None:
        click.ClickException.__init__(self, message)


class InvalidRequest(OpenWeightModelError, ValueError):
    """A bad request (``openweight.InvalidRequestError``): still a ValueError."""


@contextlib.contextmanager
def sdk_errors() -> Iterator[None]:
    """Translate SDK errors at the boundary, keeping the original as the cause."""
    try:
        yield
    except openweight.InvalidRequestError as exc:
        raise InvalidRequest(str(exc)) from exc
    except openweight.AuthenticationError as exc:
        raise OpenWeightModelError(f"{exc} (in llm: `llm keys set {KEY_ALIAS}` or --key)"
                                   ) from exc
    except openweight.OpenWeightError as exc:
        raise OpenWeightModelError(str(exc)) from exc


# -- clients, cached for the life of the process -------------------------------------------

# (model, device, dtype, quantize, remote URL, API key, keep-alive seconds)
ClientKey = tuple[str | None, str | None, str | None, str | None, str | None, str | None, float]
_clients: dict[ClientKey, openweight.Client] = {}
_async_clients: dict[ClientKey, openweight.AsyncClient] = {}
# an AsyncClient that talks HTTP is used from one event loop: cache those per loop
_loop_clients: weakref.WeakKeyDictionary[Any, dict[ClientKey, openweight.AsyncClient]] = (
    weakref.WeakKeyDictionary())
_lock = threading.Lock()


def clear_clients() -> None:
    """Forget the cached clients (the SDK keeps loaded weights in its own cache)."""
    with _lock:
        _clients.clear()
        _async_clients.clear()
        _loop_clients.clear()


def _cached(cache: dict[ClientKey, Any], key: ClientKey, make: Callable[..., Any]) -> Any:
    """One SDK client per key: it holds all policy (keep-alive, retries, validation)."""
    with _lock:
        client = cache.get(key)
        if client is None:
            model, device, dtype, quantize, base_url, api_key, keep_alive = key
            local = {} if base_url else {"keep_alive": keep_alive}  # 0: in this process
            with sdk_errors():
                client = make(model, base_url=base_url, api_key=api_key, device=device,
                              dtype=dtype, quantize=quantize, **local)
            cache[key] = client
        return client


def client_for(model: str | None, *, remote: str | None, key: str | None) -> openweight.Client:
    """The cached client for a model with the plugin's settings (the embedding models'
    way in): a remote server, else local kept loaded by a keep-alive server
    (OPENWEIGHT_KEEP_ALIVE, else 5m)."""
    keep_alive = 0.0 if remote else keep_alive_seconds(None)
    client: openweight.Client = _cached(
        _clients, (model, None, None, None, remote, key if remote else None, keep_alive),
        openweight.Client)
    return client


def _messages(prompt: llm.Prompt) -> list[dict[str, Any]]:
    """The whole conversation (llm hands it over as ``prompt.messages``) as SDK messages.

    Tool calls become an assistant message's OpenAI-style ``tool_calls``; each tool result
    (llm keeps a batch of them in one ``tool`` message) becomes its own ``tool`` message.
    """
    out: list[dict[str, Any]] = []
    for message in prompt.messages:
        if message.role == "tool":
            out.extend({"role": "tool", "tool_call_id": p.tool_call_id, "content": p.output}
                       for p in message.parts if isinstance(p, ToolResultPart))
            continue
        text = "".join(p.text for p in message.parts if isinstance(p, TextPart))
        images = [_image(p.attachment) for p in message.parts
                  if isinstance(p, AttachmentPart) and p.attachment is not None]
        thought = "".join(p.text for p in message.parts
                          if isinstance(p, ReasoningPart) and not p.redacted)
        calls = [{"id": p.tool_call_id, "type": "function",
                  "function": {"name": p.name, "arguments": p.arguments}}
                 for p in message.parts if isinstance(p, ToolCallPart) and not p.server_executed]
        item: dict[str, Any] = {"role": message.role, "content": text}
        if images:  # attachments of this turn or an earlier one: resent every time
            item["content"] = [*images, {"type": "text", "text": text}]
        if thought:
            item["reasoning"] = thought
        if calls:
            item["tool_calls"] = calls
        out.append(item)
    return out


def _image(attachment: llm.Attachment) -> openweight.ImagePart:
    """An attachment (a file, a URL, stdin's bytes) as the SDK's image part; a URL is
    fetched by the SDK, within its limits."""
    with sdk_errors():
        if attachment.url and not attachment.content and not attachment.path:
            return openweight.image(attachment.url)
        return openweight.image(attachment.content_bytes())  # type: ignore[no-untyped-call]


def _tool_specs(prompt: llm.Prompt) -> list[dict[str, Any]]:
    """llm's tools (``-T``, ``--functions``, ``tools=[...]``) as OpenAI function specs."""
    specs = []
    for tool in prompt.tools:
        if not isinstance(tool, llm.Tool):  # a provider's server-side tool: not ours
            continue
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = inspect.cleandoc(tool.description)  # a docstring
        function["parameters"] = tool.input_schema or {"type": "object", "properties": {}}
        specs.append({"type": "function", "function": function})
    return specs


class _Run:
    """One request's bookkeeping, shared by the sync and async ``execute``."""

    def __init__(self, model: _OpenWeightMixin, prompt: llm.Prompt, key: str | None) -> None:
        opts = {k: v for k, v in prompt.options.model_dump().items() if v is not None}
        # -o remote, then OPENWEIGHT_BASE_URL, then `llm openweight remote`, else local
        self.remote: str | None = (opts.get("remote") or os.environ.get("OPENWEIGHT_BASE_URL")
                                   or read_config().get("remote") or None)
        name = model.name
        if name is None and self.remote is None:
            with sdk_errors():
                name = openweight.default_model()  # `openweight` follows the store's default
        # a local model is served by a keep-alive server unless keep_alive is 0: the
        # Client finds or starts it (the plugin's default: OPENWEIGHT_KEEP_ALIVE, else 5m)
        keep_alive = 0.0
        if self.remote is None:
            with sdk_errors():  # a bad OPENWEIGHT_KEEP_ALIVE: a clean error too
                keep_alive = keep_alive_seconds(opts.get("keep_alive"))
        self.key: ClientKey = (name, opts.get("device"), opts.get("dtype"),
                               opts.get("quantize"), self.remote,
                               (key or None) if self.remote else None, keep_alive)
        self.messages = _messages(prompt)
        self.options = {k: v for k, v in opts.items() if k not in CLIENT_ONLY}
        if prompt.tools:
            self.options["tools"] = _tool_specs(prompt)
        if prompt.schema:  # llm has already turned its concise syntax into a JSON schema
            self.options["response_format"] = {
                "type": "json_schema", "json_schema": {"name": "output", "schema": prompt.schema}}
        self.started = time.monotonic()
        self.first: float | None = None
        self.finish_reason: str | None = None
        self.usage: openweight.Usage | None = None
        self.tool_calls: list[openweight.ToolCall] = []

    def sync_client(self) -> openweight.Client:
        client: openweight.Client = _cached(_clients, self.key, openweight.Client)
        return client

    def async_client(self) -> openweight.AsyncClient:
        cache = _async_clients
        if self.key[4] is not None or self.key[6]:  # a remote or keep-alive server
            cache = _loop_clients.setdefault(asyncio.get_running_loop(), {})
        client: openweight.AsyncClient = _cached(cache, self.key, openweight.AsyncClient)
        return client

    def open_stream(self) -> tuple[openweight.Client, openweight.Stream]:
        client = self.sync_client()
        return client, client.stream(self.messages, **self.options)

    def aopen_stream(self) -> tuple[openweight.AsyncClient, openweight.AsyncStream]:
        client = self.async_client()  # cheap: it pulls or starts a server in a thread
        return client, client.stream(self.messages, **self.options)

    def events(self, chunk: openweight.Chunk) -> list[StreamEvent]:
        """llm stream events for one SDK chunk; remembers the finish reason and usage."""
        out = []
        if chunk.reasoning:
            out.append(StreamEvent(type="reasoning", chunk=chunk.reasoning))
        if chunk.text:
            out.append(StreamEvent(type="text", chunk=chunk.text))
        if out and self.first is None:
            self.first = time.monotonic()
        for call in chunk.tool_calls:  # whole calls, parsed once the model has finished
            self.tool_calls.append(call)
            out.append(StreamEvent(type="tool_call_name", chunk=call.name, tool_call_id=call.id))
            out.append(StreamEvent(type="tool_call_args", chunk=json.dumps(dict(call.arguments)),
                                   tool_call_id=call.id))
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage
        return out

    def done(self, response: llm.Response | llm.AsyncResponse,
             client: openweight.Client | openweight.AsyncClient) -> None:
        """Record tool calls, usage, speed and the model that answered on the llm response."""
        for call in self.tool_calls:  # what tool_calls() returns and llm's chains run
            response.add_tool_call(llm.ToolCall(name=call.name, arguments=dict(call.arguments),
                                                tool_call_id=call.id))
        end = time.monotonic()
        usage = self.usage
        model_name = client.model
        info: dict[str, Any] = {
            "model": model_name,
            "finish_reason": self.finish_reason,
            "remote": redact_url(self.remote) if self.remote else None,  # logged: no password
            "keep_alive_server": client.keep_alive_url,
            "duration_s": round(end - self.started, 4),
        }
        if self.first is not None:
            info["time_to_first_token_s"] = round(self.first - self.started, 4)
        if usage is not None:
            response.set_usage(input=usage.prompt_tokens, output=usage.completion_tokens)
            info["usage"] = {"prompt_tokens": usage.prompt_tokens,
                             "completion_tokens": usage.completion_tokens,
                             "total_tokens": usage.total_tokens}
            # decode speed: the tokens after the first, over the time after the first arrived
            window = end - (self.first if self.first is not None else self.started)
            tokens = usage.completion_tokens - (1 if self.first is not None else 0)
            if tokens > 0 and window > 0:
                info["tokens_per_second"] = round(tokens / window, 2)
        response.response_json = info
        if model_name and f"{PREFIX}/{model_name}" != response.model.model_id:
            response.set_resolved_model(f"{PREFIX}/{model_name}")


# -- the model classes ------------------------------------------------------------------------


class _OpenWeightMixin:
    """What the sync and async classes share: identity, options, key and the request."""

    can_stream = True
    supports_conversation = True
    supports_tools = True
    supports_schema = True
    needs_key: str | None = KEY_ALIAS
    key_env_var: str | None = KEY_ENV_VAR
    Options = LazyOptions()
    model_id: str

    def __init__(self, name: str | None, *, installed: bool = False,
                 default: str | None = None, vision: bool = False) -> None:
        self.name = name  # None: the store's default model, resolved on each request
        if vision:  # llm refuses attachments, before anything loads, on other models
            self.attachment_types = set(openweight.images.ACCEPTED_TYPES)
        self.model_id = f"{PREFIX}/{name}" if name else PREFIX
        self._note = ("installed" if installed else "in the catalog: pulled on first use"
                      ) if name else f"the default model, now {default}"

    def get_key(self, explicit_key: str | None = None) -> str | None:
        """The API key of a remote server, if any: local models need none."""
        try:
            key: str | None = super().get_key(explicit_key)  # type: ignore[misc]
        except llm.NeedsKeyException:
            return None
        return key

    def __str__(self) -> str:
        return f"{super().__str__()} ({self._note})"


class OpenWeight(_OpenWeightMixin, llm.KeyModel):  # type: ignore[misc]
    def execute(self, prompt: llm.Prompt, stream: bool, response: llm.Response,
                conversation: llm.Conversation | None,
                key: str | None = None) -> Iterator[StreamEvent]:
        run = _Run(self, prompt, key)
        with sdk_errors():
            client, chunks = run.open_stream()
            with chunks:
                for chunk in chunks:
                    yield from run.events(chunk)
            run.done(response, client)


class AsyncOpenWeight(_OpenWeightMixin, llm.AsyncKeyModel):  # type: ignore[misc]
    async def execute(self, prompt: llm.Prompt, stream: bool, response: llm.AsyncResponse,
                      conversation: llm.AsyncConversation | None,
                      key: str | None = None) -> AsyncGenerator[StreamEvent, None]:
        run = _Run(self, prompt, key)
        with sdk_errors():
            client, chunks = run.aopen_stream()
            async with chunks:
                async for chunk in chunks:
                    for event in run.events(chunk):
                        yield event
            run.done(response, client)


# -- registration ----------------------------------------------------------------------------


def register_all(register: Callable[..., None]) -> None:
    """Register ``openweight`` and ``openweight/NAME`` for installed and catalog chat models
    (embedding models are ``openweight-embed/NAME``: ``embeddings.py``).

    Cheap by design: one read of the store's registry file, no torch, no network.
    """
    from openweight.store import CATALOG, DEFAULT_MODEL
    from openweight.store.kinds import kind_of
    from openweight.store.registry import read_registry

    try:
        registry = read_registry()
    except openweight.OpenWeightError:
        registry = {}  # a broken registry must not break every llm command; using it will
    installed = registry.get("models") or {}
    default = registry.get("default") or DEFAULT_MODEL
    sees = kind_of(default, installed.get(default)) == "vision"
    register(OpenWeight(None, default=default, vision=sees),
             AsyncOpenWeight(None, default=default, vision=sees))
    names = sorted(installed) + [n for n in CATALOG if n not in installed]
    for name in names:
        kind = kind_of(name, installed.get(name))
        if kind != "embedding":
            register(OpenWeight(name, installed=name in installed, vision=kind == "vision"),
                     AsyncOpenWeight(name, installed=name in installed,
                                     vision=kind == "vision"))
