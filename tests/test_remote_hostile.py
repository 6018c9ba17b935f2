"""A hostile or broken OpenAI-compatible server: every malformed answer (whole, streamed,
a /models listing, an error body) is a RemoteError with a short message and no credentials,
never another exception; what JSON cannot carry fails before anything is sent; through llm,
one ``Error:`` line, and nothing secret in llm's logs."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

import openweight
from openweight import (
    GenerationOptions,
    InvalidRequestError,
    Message,
    RemoteError,
    RemoteStatusError,
    ToolCall,
)
from openweight.remote import AsyncRemoteBackend, RemoteBackend

from fake_openai import SSE_HEADERS, FakeServer, chunk, resp, sse, whole
from plugin_helpers import assert_error, logged, run

MSGS = [Message(role="user", content="hi")]
OPTS = GenerationOptions()
SHORT = 700  # a message: where, what, at most 300 characters of the server's text, a hint

# answers no OpenAI-compatible server gives, as the bytes of a body (or of one event)
HOSTILE: dict[str, bytes] = {
    "choices-x": b'{"choices": ["x"]}',
    "choices-null": b'{"choices": null}',
    "choices-string": b'{"choices": "abc"}',
    "delta-tool-calls-5": b'{"choices": [{"delta": {"tool_calls": 5}}]}',
    "message-tool-calls-5": b'{"choices": [{"message": {"tool_calls": 5}}]}',
    "tool-call-not-object": b'{"choices": [{"delta": {"tool_calls": ["x"]}, '
                            b'"message": {"tool_calls": ["x"]}}]}',
    "delta-number": b'{"choices": [{"delta": 5, "message": 5}]}',
    "number": b"5",
    "list": b"[1, 2]",
    "string": b'"hello"',
    "empty": b"",
    "deep-open": b"[" * 100_000,
    "deep-closed": b"[" * 5000 + b"]" * 5000,
    "deep-but-parseable": b'{"choices": [{"message": {"content": "x", "x": '
                          + b"[" * 300 + b"]" * 300 + b"}}]}",
    "invalid-utf8": b'{"choices": "\xff\xfe\xfd"}',
    "huge-text": b"x" * 1_000_000,
}


Fake = FakeServer | httpx.MockTransport | None  # None: a real connection


def _backends(fake: Fake, url: str = "http://gpu-box:8000/v1",
              **kw: Any) -> tuple[RemoteBackend, AsyncRemoteBackend]:
    transport = httpx.MockTransport(fake) if isinstance(fake, FakeServer) else fake
    kw = {"model": "m", "max_retries": 0, **kw}
    return (RemoteBackend(url, transport=transport, **kw),
            AsyncRemoteBackend(url, transport=transport, **kw))


async def _every_call(fake: Fake, error: type[Exception],
                      url: str = "http://gpu-box:8000/v1", **kw: Any) -> list[str]:
    """chat and stream, sync and async: each raises ``error``; their messages."""
    sync, asynchronous = _backends(fake, url, **kw)
    messages = []
    for call in (lambda: sync.chat(MSGS, OPTS), lambda: list(sync.stream(MSGS, OPTS))):
        with pytest.raises(error) as info:
            call()
        messages.append(str(info.value))
    with pytest.raises(error) as ainfo:
        await asynchronous.chat(MSGS, OPTS)
    messages.append(str(ainfo.value))
    with pytest.raises(error) as ainfo:
        [c async for c in asynchronous.stream(MSGS, OPTS)]
    messages.append(str(ainfo.value))
    return messages


# -- whole answers, event streams, error bodies, model listings ------------------------------

@pytest.mark.parametrize("body", HOSTILE.values(), ids=HOSTILE.keys())
async def test_hostile_whole_answer(body: bytes) -> None:
    fake = FakeServer(resp(200, content=body, headers={"content-type": "application/json"}))
    for message in await _every_call(fake, RemoteError):
        assert len(message) < SHORT and "\n" not in message


@pytest.mark.parametrize("body", HOSTILE.values(), ids=HOSTILE.keys())
async def test_hostile_stream_event(body: bytes) -> None:
    events = b"data: " + body + b"\n\n"
    fake = FakeServer(resp(200, content=events, headers=SSE_HEADERS))
    sync, asynchronous = _backends(fake)
    with pytest.raises(RemoteError) as info:
        list(sync.stream(MSGS, OPTS))
    assert len(str(info.value)) < SHORT
    with pytest.raises(RemoteError) as ainfo:
        [c async for c in asynchronous.stream(MSGS, OPTS)]
    assert len(str(ainfo.value)) < SHORT


@pytest.mark.parametrize("event", [
    {"choices": [{"delta": {"tool_calls": 5}}]},
    {"choices": [{"delta": {"tool_calls": [{"function": 5}]}}]},
    {"choices": ["x"]},
    {"choices": [{"delta": "text"}]},
    7,
])
def test_malformed_event_after_good_ones_names_the_problem(event: object) -> None:
    body = sse(chunk({"content": "Par"}), event)
    fake = FakeServer(resp(200, content=body, headers=SSE_HEADERS))
    stream = fake.backend().stream(MSGS, OPTS)
    assert next(stream).text == "Par"
    with pytest.raises(RemoteError, match=r"tool_calls|choices|JSON object"):
        next(stream)


def test_lenient_where_real_servers_differ() -> None:
    """Null choices (a usage event), a call's arguments that are not JSON and ids that are
    not strings are what real servers and models send: still answers."""
    body = sse({"choices": None, "usage": {"prompt_tokens": True, "completion_tokens": -3}},
               chunk({"tool_calls": [{"index": 0, "id": 5, "function": {
                   "name": "f", "arguments": "{not json"}}]}, "tool_calls"))
    fake = FakeServer(resp(200, content=body, headers=SSE_HEADERS))
    *_, last = fake.backend().stream(MSGS, OPTS)
    assert last.tool_calls == (ToolCall(id="call_0", name="f", arguments={"_raw": "{not json"}),)
    assert last.usage is not None and last.usage.prompt_tokens == 0
    deep_args = json.dumps({"a": json.loads("[" * 100 + "]" * 100)})
    answer = whole({"content": "\ud800ok", "tool_calls": [
        {"id": ["x"], "function": {"name": "f", "arguments": deep_args}}]})
    result = FakeServer(resp(200, content=answer, headers={"content-type": "application/json"})
                        ).backend().chat(MSGS, OPTS)
    assert result.text == "\ufffdok"  # printable, loggable, sendable
    assert result.tool_calls[0].arguments == {"_raw": deep_args}  # deeper than a request takes


ERROR_BODIES: dict[str, bytes] = {
    "deep": b"[" * 100_000,
    "deep-object": b'{"error": ' + b"[" * 100_000,
    "huge-message": json.dumps({"error": {"message": "x" * 1_000_000}}).encode(),
    "huge-text": b"<html>" + b"y" * 1_000_000,
    "huge-detail": json.dumps({"detail": [{"loc": ["body"], "msg": "z" * 10_000}] * 500
                              }).encode(),
    "detail-odd": json.dumps({"detail": [{"loc": 5, "msg": 7}, 5, [[["x"]]], "s"]}).encode(),
    "terminal-escapes": json.dumps({"error": "\x1b[31mred\r\nsecond line\x07"}).encode(),
    "invalid-utf8": b'{"error": "\xff\xfe"}',
}


@pytest.mark.parametrize("body", ERROR_BODIES.values(), ids=ERROR_BODIES.keys())
async def test_hostile_error_body(body: bytes) -> None:
    fake = FakeServer(resp(500, content=body, headers={}))
    for message in await _every_call(fake, RemoteStatusError):
        assert len(message) < SHORT and "500" in message
        assert message.isprintable()


def test_huge_error_event_mid_stream() -> None:
    body = sse(chunk({"content": "a"}), {"error": {"message": "e" * 1_000_000, "code": 500}})
    fake = FakeServer(resp(200, content=body, headers=SSE_HEADERS))
    with pytest.raises(RemoteError) as info:
        list(fake.backend().stream(MSGS, OPTS))
    assert len(str(info.value)) < SHORT


MODEL_LISTINGS: dict[str, bytes] = {
    "number": b"5", "deep": b"[" * 100_000, "data-null": b'{"data": null}',
    "not-json": b"<html>", "invalid-utf8": b"\xff{", "data-string": b'{"data": "abc"}',
}


@pytest.mark.parametrize("body", MODEL_LISTINGS.values(), ids=MODEL_LISTINGS.keys())
async def test_hostile_model_listing(body: bytes) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    sync, asynchronous = _backends(transport, model=None)
    with pytest.raises(RemoteError) as info:
        sync.models()
    assert len(str(info.value)) < SHORT
    with pytest.raises(RemoteError):
        sync.chat(MSGS, OPTS)
    with pytest.raises(RemoteError):
        await asynchronous.models()


def test_model_listing_keeps_only_string_ids() -> None:
    listing = {"data": [{"id": json.loads("[" * 50 + "]" * 50)}, {"id": 5}, {"id": ""},
                        {"id": "good"}, "x", None]}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=listing))
    sync, _ = _backends(transport, model=None)
    assert [m.name for m in sync.models()] == ["good"]


# -- credentials never appear in a message ----------------------------------------------------

CREDENTIAL_URL = "http://alice:s3cret-pw@gpu-box:8000/v1"
KEY = "sk-topsecret-key"


@pytest.mark.parametrize("answer", [
    resp(401, {"error": {"message": f"bad key: Bearer {KEY}"}}),
    resp(404, {"detail": "Not Found"}),
    resp(500, content=f"proxy for {CREDENTIAL_URL} failed".encode(), headers={}),
    resp(200, content=b"<html>", headers={}),
    resp(200, content=b'{"choices": ["x"]}', headers={"content-type": "application/json"}),
    resp(200, content=sse(chunk({"content": "a"}), done=False), headers=SSE_HEADERS),
], ids=["401-echoing-key", "404", "500-echoing-url", "not-json", "malformed", "cut-short"])
async def test_no_credentials_in_messages(answer: httpx.Response) -> None:
    fake = FakeServer(answer)
    for message in await _every_call(fake, RemoteError, CREDENTIAL_URL, api_key=KEY):
        assert "s3cret" not in message and KEY not in message, message
        assert "alice" not in message, message


async def test_no_credentials_when_unreachable() -> None:
    url = "http://alice:s3cret-pw@127.0.0.1:1/v1"
    for message in await _every_call(None, RemoteError, url, api_key=KEY):
        assert "s3cret" not in message and "alice" not in message and KEY not in message


def test_credentials_in_the_url_still_authenticate() -> None:
    fake = FakeServer(resp(200, content=whole({"content": "ok"}),
                           headers={"content-type": "application/json"}))
    sync, _ = _backends(fake, CREDENTIAL_URL)
    assert sync.chat(MSGS, OPTS).text == "ok"
    assert fake.requests[-1].headers["authorization"] == httpx.BasicAuth(
        "alice", "s3cret-pw")._auth_header
    assert "s3cret" not in sync.base_url
    assert all("s3cret" not in m.source for m in sync.models())


# -- what JSON cannot carry fails before anything is sent --------------------------------------

SURROGATE_REQUESTS: dict[str, tuple[list[Message], dict[str, Any]]] = {
    "content": ([Message(role="user", content="a\ud800b")], {}),
    "system": ([Message(role="system", content="\udcff"), *MSGS], {}),
    "tool-result": ([*MSGS, Message(role="assistant", content="", tool_calls=(
        ToolCall(id="c", name="f", arguments={}),)),
        Message(role="tool", content="\ud800", tool_call_id="c")], {}),
    "tool-spec": (MSGS, {"tools": [{"type": "function", "function": {
        "name": "f", "description": "\ud800", "parameters": {"type": "object"}}}]}),
}


@pytest.mark.parametrize(("messages", "options"), SURROGATE_REQUESTS.values(),
                         ids=SURROGATE_REQUESTS.keys())
async def test_lone_surrogate_is_refused_before_sending(messages: list[Message],
                                                        options: dict[str, Any]) -> None:
    fake = FakeServer(resp(200, content=whole({"content": "ok"})))
    opts = GenerationOptions.from_kwargs(options)
    sync, asynchronous = _backends(fake)
    for call in (lambda: sync.chat(messages, opts), lambda: sync.stream(messages, opts)):
        with pytest.raises(InvalidRequestError, match="surrogate"):
            call()
    with pytest.raises(InvalidRequestError, match="surrogate"):
        await asynchronous.chat(messages, opts)
    with pytest.raises(InvalidRequestError, match="surrogate"):
        [c async for c in asynchronous.stream(messages, opts)]
    with pytest.raises(InvalidRequestError, match="surrogate"):
        sync.complete("x\ud800", OPTS)
    assert fake.requests == []


def test_lone_surrogate_through_the_client() -> None:
    client = openweight.Client(base_url="http://127.0.0.1:1/v1", model="m")
    with pytest.raises(InvalidRequestError, match="surrogate"):
        client.chat([{"role": "user", "content": "\ud800"}])
    with pytest.raises(InvalidRequestError, match="surrogate"):
        client.chat([{"role": "user", "content": "hi"}], stop=["\ud800"])


# -- through llm: a real HTTP server on loopback -------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._answer(self.server.listing)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self._answer(self.server.answer)

    def _answer(self, answer: tuple[int, str, bytes]) -> None:
        self.server.authorizations.append(self.headers.get("authorization"))
        status, content_type, body = answer
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    listing = (200, "application/json", b'{"data": [{"id": "m"}]}')
    answer = (200, "application/json", b"{}")

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.authorizations: list[str | None] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up on a huge body


@pytest.fixture()
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture()
def user(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An llm user dir, an empty offline store, no retry delays, no cached clients."""
    from llm_openweight import models as plugin_models

    path = tmp_path / "llm-user"
    monkeypatch.setenv("LLM_USER_PATH", str(path))
    monkeypatch.delenv("LLM_RAISE_ERRORS", raising=False)
    monkeypatch.setattr(RemoteBackend, "retry_base_delay", 0.0)
    plugin_models.clear_clients()
    yield path
    plugin_models.clear_clients()


PLUGIN_CASES: dict[str, tuple[str, tuple[int, str, bytes]]] = {
    "choices-x": ("answer", (200, "application/json", HOSTILE["choices-x"])),
    "delta-tool-calls-5": ("answer", (200, "text/event-stream",
                                      b"data: " + HOSTILE["delta-tool-calls-5"] + b"\n\n")),
    "deep": ("answer", (200, "application/json", HOSTILE["deep-open"])),
    "invalid-utf8": ("answer", (200, "application/json", HOSTILE["invalid-utf8"])),
    "huge-error": ("answer", (500, "text/plain", b"e" * 1_000_000)),
    "deep-error": ("answer", (502, "application/json", b"[" * 100_000)),
    "listing-number": ("listing", (200, "application/json", b"5")),
    "listing-deep": ("listing", (200, "application/json", b"[" * 100_000)),
}


@pytest.mark.parametrize(("where", "answer"), PLUGIN_CASES.values(), ids=PLUGIN_CASES.keys())
@pytest.mark.parametrize("mode", [[], ["--async"], ["--no-stream"]])
def test_plugin_shows_one_error_line(server: _Server, user: Path, where: str,
                                    answer: tuple[int, str, bytes], mode: list[str]) -> None:
    setattr(server, where, answer)
    result = run("-m", "openweight", "hi", "-o", "remote", server.url, *mode)
    assert_error(result)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert len(result.stderr) < SHORT + 100
    # the SDK's RemoteError, saying who answered what (llm would print any exception)
    assert "server" in result.stderr or "127.0.0.1" in result.stderr, result.stderr
    assert "recursion" not in result.stderr and "attribute" not in result.stderr


def test_plugin_lone_surrogate(server: _Server, user: Path) -> None:
    result = run("-m", "openweight", "a\ud800", "-o", "remote", server.url)
    assert_error(result, "surrogate")
    assert server.authorizations[1:] == []  # at most the model listing was asked for


def test_plugin_refuses_credentials_in_the_option(server: _Server, user: Path) -> None:
    url = server.url.replace("http://", "http://alice:secret@")
    result = run("-m", "openweight", "hi", "-o", "remote", url)
    assert_error(result, "OPENWEIGHT_BASE_URL", "llm keys set openweight")
    assert "secret" not in result.output
    assert server.authorizations == []
    assert "secret" not in json.dumps(logged(user))


def test_plugin_logs_no_credentials(server: _Server, user: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A password in OPENWEIGHT_BASE_URL authenticates, and llm's logs never hold it."""
    server.answer = (200, "application/json", whole({"content": "Paris."}))
    monkeypatch.setenv("OPENWEIGHT_BASE_URL", server.url.replace("http://", "http://alice:secret@"))
    result = run("-m", "openweight", "hi")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Paris.\n"
    assert server.authorizations[-1] == httpx.BasicAuth("alice", "secret")._auth_header
    rows = logged(user)
    assert len(rows) == 1 and rows[0]["response_json"]["remote"] == server.url
    assert "secret" not in run("logs", "-n", "0", "--json").stdout
    assert "secret" not in (user / "logs.db").read_bytes().decode("latin-1")
