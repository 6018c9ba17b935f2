"""`openweight serve` for real: uvicorn on a loopback port, the tiny model, HTTP clients."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import openweight
from openweight import (
    AuthenticationError,
    InvalidRequestError,
    ModelNotFoundError,
    RemoteConnectionError,
    RemoteError,
    RemoteStatusError,
)
from openweight.cli import build_parser
from openweight.local import engine as engine_mod
from openweight.local import generation

from conftest import ServerThread

HI = [{"role": "user", "content": "hello"}]
TOO_LONG = "x" * 5000  # more tokens than the tiny model's context window (one per byte)
PROMPTS = ["hello", "what", "a", "x y z", "tell me", "b"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """An empty offline store, no remote settings: the server only knows the tiny model."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENWEIGHT_HOME", str(tmp_path_factory.mktemp("serve-store")))
        mp.setenv("OPENWEIGHT_OFFLINE", "1")
        mp.delenv("OPENWEIGHT_BASE_URL", raising=False)
        mp.delenv("OPENWEIGHT_API_KEY", raising=False)
        yield


@pytest.fixture(scope="module")
def local(tiny_model: Path, env: None) -> openweight.Client:
    return openweight.Client(str(tiny_model))


@pytest.fixture(scope="module")
def served(tiny_model: Path, env: None) -> Iterator[ServerThread]:
    from openweight.server import create_app

    with ServerThread(create_app(str(tiny_model))) as s:
        yield s


@pytest.fixture(scope="module")
def server(served: ServerThread) -> str:
    return served.url


@pytest.fixture(scope="module")
def auth_server(tiny_model: Path, env: None) -> Iterator[str]:
    from openweight.server import create_app

    with ServerThread(create_app(str(tiny_model), api_key="s3cret", preload=False)) as s:
        yield s.url


@pytest.fixture()
def remote(server: str) -> openweight.Client:
    return openweight.Client(base_url=server, timeout=30)


def _chat(url: str, body: Any, path: str = "/v1/chat/completions", **kw: Any) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(url + path, json=body, timeout=30, **kw)
    return httpx.post(url + path, content=body, timeout=30,  # a JSON body, as clients send
                      headers={"Content-Type": "application/json"}, **kw)


def _events(response: httpx.Response) -> list[Any]:
    out: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- the SDK against the server -----------------------------------------------------------

def test_health_and_models(server: str) -> None:
    assert httpx.get(server + "/health").json() == {"status": "ok", "model": "tiny-llama"}
    data = httpx.get(server + "/v1/models").json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["tiny-llama"]
    remote = openweight.Client(base_url=server)
    assert remote.model == "tiny-llama"  # the first model the server lists
    assert [m.name for m in remote.models()] == ["tiny-llama"]


def test_remote_matches_local(local: openweight.Client, remote: openweight.Client) -> None:
    for prompt in ("hello", "b"):
        msgs = [{"role": "user", "content": prompt}]
        want = local.chat(msgs, temperature=0, max_tokens=40)
        got = remote.chat(msgs, temperature=0, max_tokens=40)
        assert got == want  # text, finish reason, usage and model name
        chunks = list(remote.stream(msgs, temperature=0, max_tokens=40))
        assert "".join(c.text for c in chunks) == want.text
        assert chunks[-1].finish_reason == want.finish_reason
        assert chunks[-1].usage == want.usage
        assert all(c.finish_reason is None for c in chunks[:-1])


async def test_async_remote_matches_local(local: openweight.Client, server: str) -> None:
    want = local.chat(HI, temperature=0, max_tokens=40)
    client = openweight.AsyncClient(base_url=server)
    assert await client.chat(HI, temperature=0, max_tokens=40) == want
    chunks = [c async for c in client.stream(HI, temperature=0, max_tokens=40)]
    assert "".join(c.text for c in chunks) == want.text
    assert chunks[-1].usage == want.usage
    assert [m.name for m in await client.models()] == ["tiny-llama"]


def test_env_switches_to_remote(local: openweight.Client, server: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENWEIGHT_BASE_URL", server + "/v1")
    client = openweight.Client()
    assert client.is_remote
    assert client.generate("hello", temperature=0, max_tokens=20) == local.generate(
        "hello", temperature=0, max_tokens=20)


def test_options_reach_the_engine(local: openweight.Client, remote: openweight.Client) -> None:
    opts: dict[str, Any] = dict(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05,
                                repetition_penalty=1.1, seed=7, max_tokens=30)
    assert remote.chat(HI, **opts) == local.chat(HI, **opts)
    stopped = remote.chat(HI, temperature=0, max_tokens=30, stop=["r"])
    assert stopped == local.chat(HI, temperature=0, max_tokens=30, stop=["r"])
    assert remote.chat(HI, temperature=0, max_tokens=3).usage.completion_tokens == 3


def test_model_field(server: str, tiny_model: Path) -> None:
    base = {"messages": HI, "temperature": 0, "max_tokens": 5}
    texts = {json.dumps(_chat(server, {**base, **extra}).json()["choices"][0]["message"])
             for extra in ({}, {"model": "tiny-llama"}, {"model": str(tiny_model)})}
    assert len(texts) == 1  # default, its name and the path it was started with agree
    with pytest.raises(ModelNotFoundError, match="nope"):
        openweight.Client(base_url=server, model="nope").chat(HI)


def test_completions(server: str) -> None:
    body = {"prompt": "Once upon", "temperature": 0, "max_tokens": 12}
    whole = _chat(server, body, "/v1/completions").json()
    assert whole["object"] == "text_completion"
    choice = whole["choices"][0]
    assert whole["usage"]["completion_tokens"] <= 12
    assert choice["finish_reason"] in ("stop", "length")
    with httpx.stream("POST", server + "/v1/completions",
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}
                      ) as r:
        events = _events(r)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == \
        choice["text"]
    assert events[-2]["usage"] == whole["usage"]
    default = _chat(server, {"prompt": "Once upon", "temperature": 0}, "/v1/completions")
    assert default.json()["usage"]["completion_tokens"] <= 16  # OpenAI's default max_tokens


def test_stream_wire_format(server: str) -> None:
    body = {"messages": HI, "temperature": 0, "max_tokens": 10, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in e for e in events[:-1])  # no usage unless asked for
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body) as r:
        events = _events(r)
    assert events[-2]["choices"] == []
    assert events[-2]["usage"] == {"prompt_tokens": 24, "completion_tokens": 10,
                                   "total_tokens": 34}
    assert all(e["usage"] is None for e in events[:-2])


def test_reasoning_goes_out_as_reasoning_content(served: ServerThread,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that thinks: reasoning travels as reasoning_content, both ways."""
    from openweight.types import Chunk, Usage

    class Thinker:
        name = "thinker"

        def stream(self, messages: Any, options: Any, **_: Any) -> Iterator[Chunk]:
            yield Chunk(reasoning="let me think")
            yield Chunk(text="42")
            yield Chunk(finish_reason="stop", usage=Usage(3, 2))

    server, pool = served.url, served.app.state.pool
    monkeypatch.setitem(pool.engines, "thinker", Thinker())
    raw = _chat(server, {"model": "thinker", "messages": HI}).json()
    assert raw["choices"][0]["message"] == {"role": "assistant", "content": "42",
                                            "reasoning_content": "let me think"}
    remote = openweight.Client(base_url=server, model="thinker")
    result = remote.chat(HI)
    assert (result.text, result.reasoning, result.usage) == ("42", "let me think", Usage(3, 2))
    chunks = list(remote.stream(HI))
    assert [c.reasoning for c in chunks] == ["let me think", "", ""]


def test_message_forms(server: str, local: openweight.Client) -> None:
    """Text parts, the developer role and tool-call turns are all accepted."""
    body = {"temperature": 0, "max_tokens": 8, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hel"},
                                     {"type": "text", "text": "lo"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]}
    r = _chat(server, body)
    assert r.status_code == 200, r.text
    called = openweight.Message(role="assistant", content="", tool_calls=(
        openweight.ToolCall(id="c1", name="f", arguments={"x": 1}),))
    want = local.chat([{"role": "system", "content": "Be brief."}, HI[0], called,
                       {"role": "tool", "tool_call_id": "c1", "content": "42"}],
                      temperature=0, max_tokens=8)
    assert r.json()["choices"][0]["message"]["content"] == want.text


def test_tool_calls_round_trip(served: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tool calls an engine makes reach the SDK intact, streamed or not."""
    from openweight.types import Chunk, ToolCall, Usage

    call = ToolCall(id="call_1", name="get_weather", arguments={"city": "Paris", "days": 2})

    class Caller:
        name = "caller"

        def stream(self, messages: Any, options: Any, **_: Any) -> Iterator[Chunk]:
            yield Chunk(tool_calls=(call,), finish_reason="tool_calls", usage=Usage(5, 9))

    monkeypatch.setitem(served.app.state.pool.engines, "caller", Caller())
    remote = openweight.Client(base_url=served.url, model="caller")
    result = remote.chat(HI)
    assert (result.tool_calls, result.finish_reason, result.usage) == (
        (call,), "tool_calls", Usage(5, 9))
    assert list(remote.stream(HI)) == [Chunk(tool_calls=(call,), finish_reason="tool_calls",
                                             usage=Usage(5, 9))]


# -- errors -------------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[Any, int, str | None]] = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "tiny-llama"}, 400, "messages"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ({"messages": HI, "temperature": "hot"}, 400, "temperature"),
    ({"messages": HI, "temperature": 3}, 400, "temperature"),
    ({"messages": HI, "top_p": 0}, 400, "top_p"),
    ({"messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": HI, "max_tokens": True}, 400, "max_tokens"),
    ({"messages": HI, "seed": -1}, 400, "seed"),
    ({"messages": HI, "stop": [1]}, 400, "stop"),
    ({"messages": HI, "n": 2}, 400, "n"),
    ({"messages": HI, "reasoning_effort": "extreme"}, 400, "reasoning_effort"),
    ({"messages": HI, "stream": "yes"}, 400, "stream"),
    ({"messages": HI, "model": 7}, 400, "model"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]},
        *HI]}, 400, "messages"),
    ({"messages": HI, "model": "no-such-model"}, 404, "model"),
    ({"messages": HI, "model": "/etc"}, 404, "model"),
    ({"messages": [{"role": "user", "content": TOO_LONG}]}, 400, "messages"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_REQUESTS)
def test_bad_requests(server: str, body: Any, status: int, param: str | None) -> None:
    r = _chat(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"]
    if status == 404:
        assert err["code"] == "model_not_found"


def test_other_error_shapes_and_still_serving(server: str, remote: openweight.Client) -> None:
    r = httpx.get(server + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    assert _chat(server, {"prompt": 5}, "/v1/completions").json()["error"]["param"] == "prompt"
    r = _chat(server, {"prompt": TOO_LONG}, "/v1/completions")
    assert r.status_code == 400 and "context window" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt"
    assert _chat(server, {"prompt": ""}, "/v1/completions").json()["error"]["param"] == "prompt"
    assert remote.chat(HI, max_tokens=3).usage.completion_tokens == 3  # still serving


def test_sdk_maps_server_errors(server: str) -> None:
    remote = openweight.Client(base_url=server)
    with pytest.raises(InvalidRequestError, match="context window"):
        remote.chat([{"role": "user", "content": TOO_LONG}])
    with pytest.raises(InvalidRequestError, match="context window"):
        remote.stream([{"role": "user", "content": TOO_LONG}])
    with pytest.raises(InvalidRequestError):  # validated before anything is sent
        remote.chat(HI, temperature=9)
    with pytest.raises(ModelNotFoundError):
        list(openweight.Client(base_url=server, model="gpt-4o").stream(HI))


def test_error_after_the_stream_started(server: str, served: ServerThread,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(served.app.state, "batching", None)  # the single-stream path
    real_source = engine_mod.default_source
    calls = []

    def failing_source(*args: Any) -> Any:
        for token in real_source(*args):
            calls.append(1)
            if len(calls) > 4:
                raise RuntimeError("the GPU caught fire")
            yield token

    monkeypatch.setattr(engine_mod, "default_source", failing_source)
    body = {"messages": HI, "temperature": 0, "max_tokens": 50, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = _events(r)
    assert "GPU caught fire" in events[-1]["error"]["message"]  # the last event, no [DONE]
    assert events[-1]["error"]["type"] == "server_error"
    calls.clear()
    with pytest.raises(RemoteStatusError, match="GPU caught fire") as info:
        list(openweight.Client(base_url=server).stream(HI, max_tokens=50))
    assert info.value.status_code == 500
    monkeypatch.undo()
    assert openweight.Client(base_url=server).chat(HI, max_tokens=2).usage.completion_tokens == 2


# -- auth ---------------------------------------------------------------------------------

def test_api_key(auth_server: str, local: openweight.Client) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = httpx.post(auth_server + "/v1/chat/completions", json={"messages": HI},
                       headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(auth_server + "/v1/models").status_code == 401
    assert httpx.get(auth_server + "/health").status_code == 200  # no key for health checks
    with pytest.raises(AuthenticationError, match="API key"):
        openweight.Client(base_url=auth_server, model="tiny-llama").chat(HI)
    with pytest.raises(AuthenticationError):
        openweight.Client(base_url=auth_server, api_key="wrong").chat(HI)
    good = openweight.Client(base_url=auth_server, api_key="s3cret")
    assert good.chat(HI, temperature=0, max_tokens=9) == local.chat(HI, temperature=0,
                                                                     max_tokens=9)


def test_api_key_from_env(auth_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENWEIGHT_BASE_URL", auth_server)
    monkeypatch.setenv("OPENWEIGHT_API_KEY", "s3cret")
    assert openweight.Client().generate("hi", max_tokens=2).usage.completion_tokens == 2


# -- concurrency and disconnects ----------------------------------------------------------

def test_concurrent_clients_get_sequential_answers(server: str) -> None:
    remote = openweight.Client(base_url=server)

    def ask(i: int) -> tuple[str, str | None, int]:
        msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        if i % 2:
            chunks = list(remote.stream(msgs, temperature=0, max_tokens=60))
            return ("".join(c.text for c in chunks), chunks[-1].finish_reason,
                    chunks[-1].usage.completion_tokens if chunks[-1].usage else -1)
        r = remote.chat(msgs, temperature=0, max_tokens=60)
        return r.text, r.finish_reason, r.usage.completion_tokens

    jobs = list(range(8))
    sequential = [ask(i) for i in jobs]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, jobs))
    assert concurrent == sequential


async def test_concurrent_async_clients(local: openweight.Client, server: str) -> None:
    client = openweight.AsyncClient(base_url=server, model="tiny-llama")
    prompts = PROMPTS * 2
    results = await asyncio.gather(*[
        client.chat([{"role": "user", "content": p}], temperature=0, max_tokens=40)
        for p in prompts])
    for p, r in zip(prompts, results, strict=True):
        assert r == local.chat([{"role": "user", "content": p}], temperature=0, max_tokens=40)


@pytest.fixture()
def slow_tokens(served: ServerThread, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make the engine take 20 ms a token, and record when each token was made (on the
    single-stream generate path: the batch's own disconnect tests are in test_batching)."""
    monkeypatch.setattr(served.app.state, "batching", None)
    monkeypatch.setattr(engine_mod, "default_source", engine_mod.generate_source)
    real_put = generation._QueueStreamer.put
    made: list[float] = []

    def slow_put(self: Any, value: Any) -> None:
        time.sleep(0.02)
        made.append(time.monotonic())
        real_put(self, value)

    monkeypatch.setattr(generation._QueueStreamer, "put", slow_put)
    return made


@pytest.mark.slow
def test_disconnect_stops_generation(server: str, slow_tokens: list[float]) -> None:
    remote = openweight.Client(base_url=server)
    stream = remote.stream(HI, temperature=0, max_tokens=200)  # "hello" runs to the limit
    for _ in range(5):
        next(stream)
    stream.close()
    # 200 tokens take at least 4 s: wait until no token came for 0.3 s, at most 3 s
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and time.monotonic() - slow_tokens[-1] < 0.3:
        time.sleep(0.05)
    assert len(slow_tokens) < 100, "generation ran on after the client left"
    assert time.monotonic() - slow_tokens[-1] >= 0.3
    # and the model is free again for the next client
    assert remote.chat(HI, max_tokens=2).usage.completion_tokens == 2


@pytest.mark.slow
def test_disconnect_while_queued(server: str, slow_tokens: list[float]) -> None:
    """A client that leaves while another holds the model never gets generated for."""
    remote = openweight.Client(base_url=server)
    first = remote.stream(HI, temperature=0, max_tokens=60)  # holds the model for 1.2 s+
    next(first)
    body = {"messages": HI, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=5):
        time.sleep(0.1)  # queued behind the first stream; then we hang up
    rest = list(first)
    assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == 60
    time.sleep(0.3)
    assert len(slow_tokens) == 61  # the prompt and 60 tokens: nothing for the one who left


# -- the official OpenAI client -----------------------------------------------------------

def test_openai_client(server: str, local: openweight.Client) -> None:
    import openai

    want = local.chat(HI, temperature=0, max_tokens=30)
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0) as oc:
        r = oc.chat.completions.create(model="tiny-llama", messages=HI,  # type: ignore[arg-type]
                                       temperature=0, max_tokens=30)
        assert r.choices[0].message.content == want.text
        assert r.choices[0].finish_reason == want.finish_reason
        assert r.usage is not None and r.usage.completion_tokens == want.usage.completion_tokens
        parts, usage = [], None
        for chunk in oc.chat.completions.create(
                model="tiny-llama", messages=HI, temperature=0,  # type: ignore[arg-type]
                max_tokens=30, stream=True, stream_options={"include_usage": True}):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            usage = chunk.usage or usage
        assert "".join(parts) == want.text
        assert usage is not None and usage.prompt_tokens == want.usage.prompt_tokens
        with pytest.raises(openai.NotFoundError):
            oc.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError):
            oc.chat.completions.create(model="tiny-llama", messages=HI,  # type: ignore[arg-type]
                                       temperature=7)
        assert [m.id for m in oc.models.list()] == ["tiny-llama"]


# -- the command --------------------------------------------------------------------------

def test_serve_arguments() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.model, args.host, args.port, args.api_key, args.device, args.dtype,
            args.quantize) == (None, "127.0.0.1", 8000, None, None, None, None)
    args = build_parser().parse_args(["serve", "--model", "m", "--host", "0.0.0.0", "--port",
                                      "9", "--api-key", "k", "--device", "cpu", "--dtype",
                                      "float32", "--quantize", "int8"])
    assert (args.model, args.host, args.port, args.api_key, args.device, args.dtype,
            args.quantize) == ("m", "0.0.0.0", 9, "k", "cpu", "float32", "int8")
    assert args.func.__name__ == "cmd_serve"


def test_importing_openweight_stays_light() -> None:
    code = ("import sys, openweight, openweight.cli, openweight.server; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'torch', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


SLOW_SERVER = """
import os, sys, time
os.environ.update(OPENWEIGHT_FAST="0", OPENWEIGHT_BATCH="0")  # tokens through generate()
from openweight.local import generation
put = generation._QueueStreamer.put
def slow(self, value):
    time.sleep(0.02)
    put(self, value)
generation._QueueStreamer.put = slow
from openweight.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start_server(tiny_model: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENWEIGHT_")}
    env.update(OPENWEIGHT_OFFLINE="1", OPENWEIGHT_HOME=str(tiny_model.parent / "store"),
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVER, "serve", "--model", str(tiny_model), "--port", "0",
         *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "openweight: serving NAME at URL (...)"
    if " at http://" not in line:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"server did not start: {line!r} {err[-2000:]}")
    return proc, line.split(" at ", 1)[1].split()[0]


@pytest.fixture(scope="module")
def two_servers(tiny_model: Path) -> Iterator[list[tuple[subprocess.Popen[str], str]]]:
    """Two `openweight serve` processes started side by side (each takes a few seconds)."""
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda _: _start_server(tiny_model), range(2)))
    yield servers
    for proc, _ in servers:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.slow
def test_server_killed_mid_stream_raises(two_servers: list[Any]) -> None:
    proc, url = two_servers[0]
    remote = openweight.Client(base_url=url, timeout=20)
    stream = remote.stream(HI, temperature=0, max_tokens=200)
    next(stream)
    proc.kill()
    start = time.monotonic()
    with pytest.raises(RemoteError, match=r"connection|ended"):
        list(stream)
    assert time.monotonic() - start < 10  # no hang
    stream.close()
    proc.wait(timeout=10)
    with pytest.raises(RemoteConnectionError, match="cannot connect"):
        remote.chat(HI)


@pytest.mark.slow
def test_ctrl_c_stops_the_server(two_servers: list[Any]) -> None:
    proc, url = two_servers[1]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    assert openweight.Client(base_url=url).chat(HI, max_tokens=2).usage.completion_tokens == 2
    # in flight: 200 tokens at 20 ms take 4 s; Ctrl-C ends the answer at the next token
    stream = openweight.Client(base_url=url).stream(HI, temperature=0, max_tokens=200)
    next(stream)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    with pytest.raises(RemoteError, match="shutting down"):
        list(stream)
    stream.close()
    _, err = proc.communicate(timeout=20)
    assert time.monotonic() - start < 10  # no hang
    assert proc.returncode == 0, err
    assert "server stopped" in err and "Traceback" not in err and "ERROR" not in err


def test_the_warm_up_leaves_no_cached_prompt(tiny_model: Path, env: None) -> None:
    """``create_app`` runs one token to load the model, then forgets that prompt: a first
    request is computed as in a fresh process, not after the warm-up's cached chat preamble
    (which once turned the real SmolLM2's "Paris" into "L'Etoile" on every first request of
    a keep-alive server)."""
    from openweight.local import LocalEngine
    from openweight.server import create_app

    app = create_app(str(tiny_model), batching=False)
    backend = app.state.pool.default
    assert isinstance(backend, LocalEngine)
    cache = backend.loaded.prefix_cache
    assert len(cache) == 0
    with ServerThread(app) as s:
        body = {"messages": [{"role": "user", "content": "hello"}],
                "temperature": 0, "max_tokens": 5}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
    assert len(cache) == 1  # the request's own prompt and answer, kept for its next turn
