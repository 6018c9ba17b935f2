"""The httpx backend against the answers real servers give, replayed with httpx.MockTransport."""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import openweight
from openweight import (
    AuthenticationError,
    Chunk,
    GenerationOptions,
    InvalidRequestError,
    Message,
    ModelNotFoundError,
    RemoteConnectionError,
    RemoteError,
    RemoteStatusError,
    RemoteTimeoutError,
    ToolCall,
    Usage,
)
from openweight import remote as remote_mod
from openweight.remote import RemoteBackend

from fake_openai import (
    SSE_HEADERS,
    URL,
    USAGE,
    Body,
    FakeServer,
    chunk,
    resp,
    sse,
    whole,
)

MSGS = [Message(role="user", content="What is the capital of France?")]
OPTS = GenerationOptions()


# What each server sends for the same answer: reasoning "Hmm.", text "Paris.", 12 + 8 tokens.
STREAMS: dict[str, tuple[int, dict[str, str], bytes]] = {
    "vllm": (200, SSE_HEADERS, sse(
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning": "Hmm"}), chunk({"reasoning": "."}),
        chunk({"content": "Paris"}), chunk({"content": "."}, "stop", stop_reason=None),
        {**chunk({}), "choices": [], "usage": USAGE})),
    "ollama": (200, SSE_HEADERS, sse(
        chunk({"role": "assistant", "content": "", "reasoning": "Hmm."},
              system_fingerprint="fp_ollama"),
        chunk({"role": "assistant", "content": "Paris."}),
        chunk({"role": "assistant", "content": ""}, "stop"),
        {**chunk({}), "choices": [], "usage": USAGE})),
    "llama.cpp": (200, SSE_HEADERS, sse(
        chunk({"role": "assistant", "content": None}),
        chunk({"reasoning_content": "Hmm."}), chunk({"content": "Paris."}),
        chunk({}, "stop", usage=USAGE, timings={"predicted_n": 8}))),
    "lm-studio": (200, {"content-type": "text/event-stream; charset=utf-8"}, sse(
        chunk({"role": "assistant", "reasoning_content": "Hm"}),
        chunk({"reasoning_content": "m."}), chunk({"content": "Par"}), chunk({"content": "is."}),
        chunk({}, "stop"), {**chunk({}), "choices": [], "usage": USAGE})),
    "transformers": (200, SSE_HEADERS, sse(  # transformers serve never sends [DONE]
        chunk({"role": "assistant", "reasoning_content": "Hmm."}),
        chunk({"content": "Paris."}), chunk({}, "stop", usage=USAGE), done=False)),
}


ANSWERS = {
    "vllm": whole({"role": "assistant", "content": "Paris.", "reasoning": "Hmm."}),
    "ollama": whole({"role": "assistant", "content": "Paris.", "reasoning": "Hmm."}),
    "llama.cpp": whole({"role": "assistant", "content": "Paris.", "reasoning_content": "Hmm."}),
    "lm-studio": whole({"role": "assistant", "content": "Paris.",
                        "reasoning_content": "Hmm."}),
    "transformers": whole({"role": "assistant", "content": "Paris.",
                           "reasoning_content": "Hmm."}),
}


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RemoteBackend, "retry_base_delay", 0.0)


# -- the answer variants ------------------------------------------------------------------

@pytest.mark.parametrize("server", sorted(STREAMS))
def test_stream_variants(server: str) -> None:
    status, headers, body = STREAMS[server]
    chunks = list(FakeServer(resp(status, headers=headers, content=body)).backend()
                  .stream(MSGS, OPTS))
    assert "".join(c.text for c in chunks) == "Paris."
    assert "".join(c.reasoning for c in chunks) == "Hmm."
    assert chunks[-1] == Chunk(finish_reason="stop", usage=Usage(12, 8))
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("server", sorted(STREAMS))
async def test_async_stream_variants(server: str) -> None:
    status, headers, body = STREAMS[server]
    backend = FakeServer(resp(status, headers=headers, content=body)).abackend()
    chunks = [c async for c in backend.stream(MSGS, OPTS)]
    assert "".join(c.text for c in chunks) == "Paris."
    assert "".join(c.reasoning for c in chunks) == "Hmm."
    assert chunks[-1] == Chunk(finish_reason="stop", usage=Usage(12, 8))


@pytest.mark.parametrize("server", sorted(ANSWERS))
async def test_chat_variants(server: str) -> None:
    backend = FakeServer(resp(200, content=ANSWERS[server],
                              headers={"content-type": "application/json"})).backend()
    want = openweight.ChatResult(text="Paris.", reasoning="Hmm.", finish_reason="stop",
                                 usage=Usage(12, 8), model="m")
    assert backend.chat(MSGS, OPTS) == want
    assert await FakeServer(resp(200, content=ANSWERS[server], headers={
        "content-type": "application/json"})).abackend().chat(MSGS, OPTS) == want


def test_stream_answered_with_json() -> None:
    """A server that ignores stream=true and answers whole: still chunks."""
    fake = FakeServer(resp(200, content=ANSWERS["vllm"],
                           headers={"content-type": "application/json"}))
    chunks = list(fake.backend().stream(MSGS, OPTS))
    assert chunks == [Chunk(text="Paris.", reasoning="Hmm."),
                      Chunk(finish_reason="stop", usage=Usage(12, 8))]


def test_no_usage_and_other_finish_reasons() -> None:
    body = sse(chunk({"content": "Pa"}), chunk({"content": "ris"}, "length"))
    chunks = list(FakeServer(resp(200, headers=SSE_HEADERS, content=body)).backend()
                  .stream(MSGS, OPTS))
    assert chunks[-1] == Chunk(finish_reason="length", usage=Usage(0, 0))
    body = sse(chunk({"content": "x"}, "content_filter"))
    chunks = list(FakeServer(resp(200, headers=SSE_HEADERS, content=body)).backend()
                  .stream(MSGS, OPTS))
    assert chunks[-1].finish_reason == "stop"


def test_tool_calls_in_fragments() -> None:
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": ""}}
    body = sse(
        chunk({"role": "assistant", "tool_calls": [call]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({}, "tool_calls"))
    chunks = list(FakeServer(resp(200, headers=SSE_HEADERS, content=body)).backend()
                  .stream(MSGS, OPTS))
    assert chunks == [Chunk(finish_reason="tool_calls", usage=Usage(0, 0), tool_calls=(
        ToolCall(id="call_1", name="get_weather", arguments={"city": "Paris"}),))]
    answer = whole({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function",
         "function": {"name": "f", "arguments": '{"a": 1}'}}]}, "tool_calls")
    result = FakeServer(resp(200, content=answer, headers={"content-type": "application/json"})
                        ).backend().chat(MSGS, OPTS)
    assert result.tool_calls == (ToolCall(id="c", name="f", arguments={"a": 1}),)
    assert (result.text, result.finish_reason) == ("", "tool_calls")


# -- what is sent -------------------------------------------------------------------------

def test_request_body_and_headers() -> None:
    fake = FakeServer(resp(200, content=ANSWERS["vllm"],
                           headers={"content-type": "application/json"}))
    opts = GenerationOptions.from_kwargs(dict(
        max_tokens=5, temperature=0.5, top_p=0.9, top_k=40, min_p=0.1, repetition_penalty=1.2,
        seed=3, stop=["\n"]))
    history = [Message(role="system", content="Be brief."), *MSGS,
               Message(role="assistant", content="", tool_calls=(
                   ToolCall(id="c1", name="f", arguments={"x": 1}),)),
               Message(role="tool", content="42", tool_call_id="c1")]
    fake.backend(api_key="k3y").chat(history, opts)
    list(fake.backend().stream(MSGS, GenerationOptions()))
    chat, stream = fake.bodies
    assert chat == {
        "model": "m", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 40,
        "min_p": 0.1, "repetition_penalty": 1.2, "seed": 3, "stop": ["\n"],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "f", "arguments": '{"x": 1}'}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"}]}
    assert stream["stream"] is True and stream["stream_options"] == {"include_usage": True}
    first, second = fake.requests
    assert str(first.url) == URL + "/chat/completions"
    assert (first.headers["accept"], second.headers["accept"]) == (
        "application/json", "text/event-stream")
    assert first.headers["authorization"] == "Bearer k3y"
    assert "authorization" not in second.headers


def test_reasoning_switches_are_sent() -> None:
    fake = FakeServer(resp(200, content=ANSWERS["vllm"],
                           headers={"content-type": "application/json"}))
    fake.backend().chat(MSGS, GenerationOptions.from_kwargs({"reasoning_effort": "high"}))
    assert fake.bodies[-1]["reasoning_effort"] == "high"
    fake.backend().chat(MSGS, GenerationOptions.from_kwargs({"thinking": False}))
    assert fake.bodies[-1]["chat_template_kwargs"] == {"enable_thinking": False}


@pytest.mark.parametrize(("given", "used"), [
    ("http://h:1", "http://h:1/v1"), ("http://h:1/", "http://h:1/v1"),
    ("https://h/v1/", "https://h/v1"), ("http://h/api/v1", "http://h/api/v1")])
def test_base_url(given: str, used: str) -> None:
    assert RemoteBackend(given).base_url == used


def test_bad_base_url() -> None:
    with pytest.raises(InvalidRequestError, match="http"):
        RemoteBackend("localhost:8000")


def test_default_model_is_the_first_listed() -> None:
    fake = FakeServer(resp(200, content=ANSWERS["vllm"],
                           headers={"content-type": "application/json"}),
                      models=["big", "small"])
    backend = fake.backend(model=None)
    assert backend.name == "big"
    assert [(m.name, m.default) for m in backend.models()] == [("big", True), ("small", False)]
    backend.chat(MSGS, OPTS)
    assert fake.bodies[-1]["model"] == "big"
    with pytest.raises(ModelNotFoundError, match="no models"):
        _ = FakeServer(resp(200, {}), models=[]).backend(model=None).name


async def test_async_default_model() -> None:
    fake = FakeServer(resp(200, content=ANSWERS["vllm"],
                           headers={"content-type": "application/json"}),
                      models=["big", "small"])
    backend = fake.abackend(model=None)
    assert [m.name for m in await backend.models()] == ["big", "small"]
    await backend.chat(MSGS, OPTS)
    assert fake.bodies[-1]["model"] == "big"


# -- failures -----------------------------------------------------------------------------

@pytest.mark.parametrize(("response", "error", "match"), [
    (resp(401, {"error": {"message": "Incorrect API key provided", "type":
                          "invalid_request_error", "code": "invalid_api_key"}}),
     AuthenticationError, "Incorrect API key"),
    (resp(401, {"error": {"code": 401, "message": "Invalid API Key",
                          "type": "authentication_error"}}), AuthenticationError, "Invalid API"),
    (resp(403, {"detail": "Forbidden"}), AuthenticationError, "Forbidden"),
    (resp(404, {"error": {"message": "unknown model 'x'", "type": "invalid_request_error",
                          "param": "model", "code": "model_not_found"}}),
     ModelNotFoundError, "unknown model"),
    (resp(404, {"object": "error", "message": "The model `x` does not exist.",
                "type": "NotFoundError", "param": None, "code": 404}),
     ModelNotFoundError, "does not exist"),
    (resp(404, {"error": {"message": 'model "x" not found, try pulling it first',
                          "type": "api_error", "param": None, "code": None}}),
     ModelNotFoundError, "try pulling"),
    (resp(404, {"detail": "Not Found"}), RemoteStatusError, "/v1"),
    (resp(400, {"error": {"message": "temperature too high", "type": "invalid_request_error",
                          "param": "temperature", "code": None}}),
     InvalidRequestError, "temperature too high"),
    (resp(422, {"detail": [{"loc": ["body", "messages"], "msg": "Field required",
                            "type": "missing"}]}),
     InvalidRequestError, "body.messages: Field required"),
    (resp(418, content=b"I'm a teapot", headers={}), RemoteStatusError, "teapot"),
])
async def test_status_errors(response: httpx.Response, error: type[Exception],
                             match: str) -> None:
    fake = FakeServer(response)
    with pytest.raises(error, match=match):
        fake.backend().chat(MSGS, OPTS)
    with pytest.raises(error, match=match):
        fake.backend().stream(MSGS, OPTS)
    with pytest.raises(error, match=match):
        await fake.abackend().chat(MSGS, OPTS)
    with pytest.raises(error, match=match):
        [c async for c in fake.abackend().stream(MSGS, OPTS)]
    assert len(fake.requests) == 4  # nothing retried


def test_retries_then_success() -> None:
    fake = FakeServer(resp(429, {"error": {"message": "slow down"}}, {"retry-after": "0"}),
                      resp(503, content=b"<html>Bad gateway</html>", headers={}),
                      resp(200, content=ANSWERS["vllm"],
                           headers={"content-type": "application/json"}))
    assert fake.backend().chat(MSGS, OPTS).text == "Paris."
    assert len(fake.requests) == 3


async def test_retries_exhausted() -> None:
    fake = FakeServer(resp(500, {"detail": "CUDA out of memory"}))
    with pytest.raises(RemoteStatusError, match="CUDA out of memory") as info:
        fake.backend(max_retries=2).chat(MSGS, OPTS)
    assert info.value.status_code == 500 and "CUDA" in info.value.body
    assert len(fake.requests) == 3
    with pytest.raises(RemoteStatusError):
        [c async for c in fake.abackend(max_retries=1).stream(MSGS, OPTS)]
    assert len(fake.requests) == 5
    with pytest.raises(RemoteStatusError):
        fake.backend(max_retries=0).stream(MSGS, OPTS)
    assert len(fake.requests) == 6


def test_backoff_grows_and_honours_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RemoteBackend, "retry_base_delay", 0.5)
    backend = RemoteBackend(URL, max_retries=3)
    busy = httpx.Response(503)
    delays = [backend._retry_delay(busy, i) for i in range(4)]
    assert delays[3] is None
    low_high = [(0.37, 0.63), (0.74, 1.26), (1.49, 2.51)]
    assert all(lo < d < hi  # type: ignore[operator]
               for d, (lo, hi) in zip(delays, low_high, strict=False))
    assert backend._retry_delay(httpx.Response(429, headers={"retry-after": "2"}), 0) == 2
    assert backend._retry_delay(httpx.Response(400), 0) is None


@pytest.mark.parametrize("event", [
    {"error": {"message": "out of memory", "type": "server_error", "param": None,
               "code": None}},
    {"error": {"code": 500, "message": "out of memory", "type": "server_error"}},
    {"object": "error", "message": "out of memory", "type": "InternalServerError",
     "code": 500, "error": "out of memory"},
])
async def test_error_event_mid_stream(event: dict[str, Any]) -> None:
    body = sse(chunk({"content": "Par"}), event, done=False)
    fake = FakeServer(resp(200, headers=SSE_HEADERS, content=body))
    stream = fake.backend().stream(MSGS, OPTS)
    assert next(stream).text == "Par"
    with pytest.raises(RemoteStatusError, match="out of memory") as info:
        next(stream)
    assert info.value.status_code == 500
    with pytest.raises(RemoteError, match="out of memory"):
        [c async for c in fake.abackend().stream(MSGS, OPTS)]


def test_stream_cut_short_raises() -> None:
    body = sse(chunk({"content": "Par"}), done=False)  # no finish_reason, no [DONE]
    fake = FakeServer(resp(200, headers=SSE_HEADERS, content=body))
    with pytest.raises(RemoteConnectionError, match="ended before"):
        list(fake.backend().stream(MSGS, OPTS))


EVENTS = [sse(chunk({"content": w}), done=False) for w in ("a", "b", "c", "d")]


@pytest.mark.parametrize(("fail", "error"), [
    (httpx.RemoteProtocolError("peer closed connection without sending complete message"),
     RemoteConnectionError),
    (httpx.ReadError("connection reset by peer"), RemoteConnectionError),
    (httpx.ReadTimeout("timed out"), RemoteTimeoutError),
])
async def test_transport_failures_mid_stream(fail: Exception, error: type[Exception]) -> None:
    body = Body(EVENTS[:2], fail)
    fake = FakeServer(lambda r: httpx.Response(200, headers=SSE_HEADERS, stream=body))
    stream = fake.backend().stream(MSGS, OPTS)
    assert [next(stream).text, next(stream).text] == ["a", "b"]
    with pytest.raises(error) as info:
        next(stream)
    assert info.value.__cause__ is fail
    assert body.closed
    body.closed = False
    with pytest.raises(error):
        [c async for c in fake.abackend().stream(MSGS, OPTS)]
    assert body.closed


async def test_close_closes_the_response() -> None:
    body = Body([*EVENTS, sse(chunk({}, "stop"))])
    fake = FakeServer(lambda r: httpx.Response(200, headers=SSE_HEADERS, stream=body))
    stream = fake.backend().stream(MSGS, OPTS)
    assert next(stream).text == "a"
    stream.close()  # type: ignore[attr-defined]
    assert body.closed
    body.closed = False
    fake.backend().stream(MSGS, OPTS).close()  # type: ignore[attr-defined]
    assert body.closed  # closed even if never iterated
    body.closed = False
    astream = fake.abackend().stream(MSGS, OPTS)
    assert (await astream.__anext__()).text == "a"
    await astream.aclose()  # type: ignore[attr-defined]
    assert body.closed


def test_answer_without_a_message() -> None:
    for body in ({"choices": []}, {"choices": [{"message": None}]}, [1]):
        with pytest.raises(RemoteError, match=r"no choices\[0\]\.message"):
            FakeServer(resp(200, body)).backend().chat(MSGS, OPTS)


def test_non_json_answer() -> None:
    fake = FakeServer(resp(200, content=b"<html>hello</html>", headers={}))
    with pytest.raises(RemoteError, match="not JSON") as info:
        fake.backend().chat(MSGS, OPTS)
    assert isinstance(info.value.__cause__, ValueError)


# -- real sockets: refused connections and silent servers ---------------------------------

def test_cannot_connect() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    client = openweight.Client(base_url=f"http://127.0.0.1:{port}/v1", model="m")
    with pytest.raises(RemoteConnectionError, match="cannot connect") as info:
        client.chat([{"role": "user", "content": "hi"}])
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    with pytest.raises(RemoteConnectionError):
        client.stream([{"role": "user", "content": "hi"}])


@pytest.fixture()
def silent_server() -> Iterator[str]:
    """Sends the headers and one event of a stream, then nothing at all."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        conns = []
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            conn.settimeout(None)
            conns.append(conn)
            conn.recv(65536)
            event = sse(chunk({"content": "Par"}), done=False)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n" +
                         f"{len(event):x}\r\n".encode() + event + b"\r\n")
        for c in conns:
            c.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    stop.set()
    thread.join(timeout=5)
    listener.close()


async def test_read_timeout_between_chunks(silent_server: str) -> None:
    client = openweight.Client(base_url=silent_server, model="m", timeout=0.5)
    stream = client.stream([{"role": "user", "content": "hi"}])
    assert next(stream).text == "Par"
    start = time.monotonic()
    with pytest.raises(RemoteTimeoutError, match="sent nothing"):
        next(stream)
    assert time.monotonic() - start < 3
    stream.close()
    aclient = openweight.AsyncClient(base_url=silent_server, model="m", timeout=0.5)
    with pytest.raises(RemoteTimeoutError):
        [c async for c in aclient.stream([{"role": "user", "content": "hi"}])]


# -- the public clients switch with one setting -------------------------------------------

@pytest.fixture()
def mocked(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    """Every RemoteBackend the clients make talks to this fake vLLM."""
    status, headers, body = STREAMS["vllm"]

    def answer(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content).get("stream"):
            return resp(status, headers=headers, content=body)
        return resp(200, content=ANSWERS["vllm"], headers={"content-type": "application/json"})

    fake = FakeServer(answer, models=["qwen3-8b"])
    for name in ("RemoteBackend", "AsyncRemoteBackend"):
        monkeypatch.setattr(remote_mod, name, functools.partial(
            getattr(remote_mod, name), transport=httpx.MockTransport(fake)))
    return fake


async def test_env_switch(mocked: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENWEIGHT_BASE_URL", "http://gpu-box:8000")
    monkeypatch.setenv("OPENWEIGHT_API_KEY", "from-env")
    client = openweight.Client()  # the unchanged program
    assert client.is_remote and client.model == "qwen3-8b"
    result = client.generate("What is the capital of France?", max_tokens=9)
    assert (result.text, result.reasoning, result.usage) == ("Paris.", "Hmm.", Usage(12, 8))
    with client.stream([{"role": "user", "content": "hi"}]) as stream:
        assert "".join(c.text for c in stream) == "Paris."
    aclient = openweight.AsyncClient()
    assert (await aclient.chat([{"role": "user", "content": "hi"}])).text == "Paris."
    assert "".join([c.text async for c in aclient.stream([{"role": "user", "content": "hi"}])]
                   ) == "Paris."
    assert [m.name for m in await aclient.models()] == ["qwen3-8b"]
    assert all(r.headers["authorization"] == "Bearer from-env" for r in mocked.requests)
    assert str(mocked.requests[0].url) == "http://gpu-box:8000/v1/models"
    assert mocked.bodies[0]["max_tokens"] == 9


def test_options_validated_before_sending(mocked: FakeServer) -> None:
    client = openweight.Client(base_url="http://gpu-box:8000/v1", model="m")
    with pytest.raises(InvalidRequestError, match="temperature"):
        client.chat([{"role": "user", "content": "hi"}], temperature=-1)
    with pytest.raises(InvalidRequestError, match="unknown option"):
        client.chat([{"role": "user", "content": "hi"}], beam_width=4)
    assert mocked.requests == []


# -- what a first request costs to set up --------------------------------------------------------

_FRESH_CLIENT = """
import importlib.util, json, ssl, sys
import httpx
from openweight.remote import RemoteBackend
local = RemoteBackend("http://127.0.0.1:9/v1", model="m")._client_kwargs()
remote = RemoteBackend("https://example.invalid/v1", model="m")._client_kwargs()
with httpx.Client(**local):
    pass
out = {"httpcore": "httpcore" in sys.modules, "trio_imported": "trio" in sys.modules,
       "local_verify": local["verify"], "local_redirects": local["follow_redirects"],
       "remote_tls": isinstance(remote["verify"], ssl.SSLContext),
       "remote_redirects": remote["follow_redirects"],
       "trio_installed": importlib.util.find_spec("trio") is not None}
if out["trio_installed"]:
    import httpcore._synchronization as sync
    out["stand_in_is_trio_lock"] = sync.trio.Lock is importlib.import_module("trio").Lock
print(json.dumps(out))
"""


def test_first_client_leaves_trio_unimported_and_skips_tls_on_loopback() -> None:
    """httpcore is imported without trio (a tenth of a warm `llm` call when trio is
    installed), yet a trio user still gets trio through httpcore; plain HTTP on loopback
    loads no certificates and follows no redirects; other URLs keep TLS verification."""
    import subprocess
    import sys

    out = json.loads(subprocess.run([sys.executable, "-c", _FRESH_CLIENT], check=True,
                                    capture_output=True, text=True).stdout)
    assert out["httpcore"] and not out["trio_imported"]
    assert out["local_verify"] is False and out["local_redirects"] is False
    assert out["remote_tls"] and out["remote_redirects"] is True
    if out["trio_installed"]:
        assert out["stand_in_is_trio_lock"]
