"""`openweight serve` refuses what it should (issue #19): over real HTTP, with scripted
engines where the answer's text does not matter.

Host header (DNS rebinding), JSON content type, /health without the key, body cap, bounds
on a request, the bounded queue, the deadline, model names that never reach the file
system or a pull, hostile input answered 4xx with ``param``, and /metrics.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openweight import ModelNotFoundError
from openweight.cli import build_parser
from openweight.server import ServerLimits, create_app
from openweight.server.guards import host_allowed
from openweight.types import Chunk, Usage

from conftest import ServerThread

HI = [{"role": "user", "content": "hello"}]
KEY = "s3cret"


class Scripted:
    """An engine that answers "a b c" (one chunk a word), ``delay`` seconds a chunk."""

    def __init__(self, name: str = "scripted", delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.started = threading.Event()

    def _chunks(self) -> Iterator[Chunk]:
        self.started.set()
        for word in ("a ", "b ", "c"):
            time.sleep(self.delay)
            yield Chunk(text=word)
        yield Chunk(finish_reason="stop", usage=Usage(3, 3))

    def stream(self, messages: Any, options: Any, **_: Any) -> Iterator[Chunk]:
        return self._chunks()

    def complete(self, prompt: str, options: Any, **_: Any) -> Iterator[Chunk]:
        return self._chunks()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty offline store."""
    home = tmp_path_factory.mktemp("hardening-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENWEIGHT_HOME", str(home))
        mp.setenv("OPENWEIGHT_OFFLINE", "1")
        mp.delenv("OPENWEIGHT_BASE_URL", raising=False)
        mp.delenv("OPENWEIGHT_API_KEY", raising=False)
        yield home


def _serve(tiny_model: Path, *, engine: Scripted | None = None, **kw: Any) -> ServerThread:
    app = create_app(str(tiny_model), preload=False, **kw)
    scripted = engine or Scripted()
    app.state.pool.engines[scripted.name] = scripted
    return ServerThread(app)


@pytest.fixture(scope="module")
def server(tiny_model: Path, env: Path) -> Iterator[str]:
    with _serve(tiny_model, limits=ServerLimits(max_body_mb=0.25)) as s:
        yield s.url


@pytest.fixture(scope="module")
def keyed(tiny_model: Path, env: Path) -> Iterator[str]:
    with _serve(tiny_model, api_key=KEY) as s:
        yield s.url


def _post(url: str, body: Any, path: str = "/v1/chat/completions",
          **kw: Any) -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(url + path, json=body, timeout=30, **kw)
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return httpx.post(url + path, content=body, timeout=30, headers=headers, **kw)


def _error(r: httpx.Response, status: int, param: str | None = None,
           code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def _ok(url: str) -> None:
    r = _post(url, {"model": "scripted", "messages": HI})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "a b c"


# -- a web page cannot use a server without a key -----------------------------------------

def test_post_needs_a_json_content_type(server: str) -> None:
    body = json.dumps({"model": "scripted", "messages": HI}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                 None):
        headers = {"Content-Type": kind} if kind else {}
        r = httpx.post(server + "/v1/chat/completions", content=body, headers=headers)
        _error(r, 415, code="unsupported_media_type")
    r = httpx.post(server + "/v1/completions", content=body,
                   headers={"Content-Type": "text/plain;charset=UTF-8"})
    _error(r, 415, code="unsupported_media_type")
    r = _post(server, body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_host_header_is_checked_without_a_key(server: str, keyed: str) -> None:
    port = server.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}",
                 f"LOCALHOST.:{port}"):
        assert httpx.get(server + "/health", headers={"Host": host}).status_code == 200
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1", "localhost:1",
                 f"rebind.attacker.test:{port}", "", "[::1", f"::1:{port}"):
        r = httpx.get(server + "/health", headers={"Host": host})
        _error(r, 421, code="host_not_allowed")
        r = _post(server, {"messages": HI}, headers={"Host": host})
        _error(r, 421, code="host_not_allowed")
    # with a key the key is the guard: any Host is answered (a proxy may rename it)
    r = httpx.get(keyed + "/health", headers={"Host": "gpu-box.lan"})
    assert r.status_code == 200


def test_allowed_host(tiny_model: Path, env: Path) -> None:
    with _serve(tiny_model, allowed_hosts=("gpu-box", "proxy.lan:443")) as s:
        port = s.url.rsplit(":", 1)[1]
        for host, status in ((f"gpu-box:{port}", 200), ("gpu-box", 200),
                             ("proxy.lan:443", 200), ("proxy.lan", 421),
                             (f"other:{port}", 421)):
            assert httpx.get(s.url + "/health", headers={"Host": host}).status_code == status


def test_host_allowed_rules() -> None:
    assert host_allowed("10.0.0.5:8000", ("10.0.0.5", 8000))
    assert not host_allowed("localhost:8000", ("10.0.0.5", 8000))  # not a loopback bind
    assert host_allowed("[::1]:80", ("::1", 80)) and host_allowed("localhost", ("::1", 80))
    assert not host_allowed("localhost:8001", ("127.0.0.1", 8000))
    assert host_allowed("0.0.0.0:8000", ("127.0.0.1", 8000))  # the URL --host 0.0.0.0 prints
    assert not host_allowed("0.0.0.0:8000", ("10.0.0.5", 8000))
    assert host_allowed("anything:1", ("127.0.0.1", 8000), ["*"])
    assert not host_allowed("a b", ("127.0.0.1", 8000)) and not host_allowed("x:99999", None)


def test_health_reveals_nothing_without_the_key(keyed: str, server: str) -> None:
    assert httpx.get(keyed + "/health").json() == {"status": "ok"}
    assert httpx.get(keyed + "/health", headers={"Authorization": "Bearer wrong"}).json() == {
        "status": "ok"}
    r = httpx.get(keyed + "/health", headers={"Authorization": f"Bearer {KEY}"})
    assert r.json() == {"status": "ok", "model": "tiny-llama"}
    assert httpx.get(server + "/health").json() == {"status": "ok", "model": "tiny-llama"}


# -- resource limits ------------------------------------------------------------------------

def test_body_cap(server: str) -> None:
    big = {"model": "scripted", "messages": [{"role": "user", "content": "x" * 300_000}]}
    _error(_post(server, big), 413, code="request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the cap applies while reading
        yield json.dumps(big).encode()

    _error(_post(server, chunked()), 413, code="request_too_large")
    _ok(server)


def test_body_cap_answers_before_the_body_is_sent(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n{"
                     .encode())
        head = sock.recv(4096).decode("latin-1")  # 50 MB announced, 1 byte sent
    assert head.startswith("HTTP/1.1 413"), head


LIMITS: list[tuple[dict[str, Any], str]] = [
    ({"messages": HI * 4097}, "messages"),
    ({"messages": HI, "stop": [str(i) for i in range(17)]}, "stop"),
    ({"messages": HI, "stop": "x" * 1025}, "stop"),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": f"f{i}"}}
                                for i in range(129)]}, "tools"),
    ({"messages": HI, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "description": "d" * 70_000}}}]},
     "tools"),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "object", "description": "d" * 70_000}}}},
     "response_format"),
]


@pytest.mark.parametrize(("extra", "param"), LIMITS)
def test_bounds_on_a_request(server: str, extra: dict[str, Any], param: str) -> None:
    _error(_post(server, {"model": "scripted", **extra}), 400, param)


def test_queue_is_bounded(tiny_model: Path, env: Path) -> None:
    slow = Scripted(delay=0.3)
    with _serve(tiny_model, engine=slow, limits=ServerLimits(max_queue=1)) as s:
        body = {"model": "scripted", "messages": HI, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body) as first:
            assert slow.started.wait(10)
            r = _post(s.url, {"model": "scripted", "messages": HI})
            _error(r, 429, code="queue_full")
            assert r.headers["Retry-After"] == "1"
            assert httpx.get(s.url + "/health").status_code == 200  # not queued
            assert first.read().decode().endswith("data: [DONE]\n\n")
        _ok(s.url)  # the slot came back


def test_request_timeout(tiny_model: Path, env: Path) -> None:
    slow = Scripted(delay=0.4)
    with _serve(tiny_model, engine=slow, limits=ServerLimits(request_timeout=0.6)) as s:
        _error(_post(s.url, {"model": "scripted", "messages": HI}), 504,
               code="request_timeout")
        with httpx.stream("POST", s.url + "/v1/chat/completions",
                          json={"model": "scripted", "messages": HI, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert json.loads(lines[-1][6:])["error"]["code"] == "request_timeout"
        assert "data: [DONE]" not in lines
        slow.delay = 0
        _ok(s.url)


# -- a request's model names a served model, never a path or a pull ------------------------

def test_model_names_only_served_models(server: str, tiny_model: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    from openweight import store

    def no_pull(*a: Any, **kw: Any) -> Any:
        raise AssertionError("a request started a pull")

    monkeypatch.setattr(store, "pull", no_pull)
    (tmp_path / "here-model").symlink_to(tiny_model)
    monkeypatch.chdir(tmp_path)  # a directory by that name in the server's directory...
    catalog_name = next(iter(store.CATALOG))
    bodies = {}
    for name in ("here-model", "no-such-model", catalog_name, str(tiny_model.parent),
                 "./here-model", "../x", "~/x", "/etc/passwd", "a" * 5000):
        err = _error(_post(server, {"messages": HI, "model": name}), 404, "model",
                     "model_not_found")
        bodies[name] = err["message"].replace(repr(name[:100]), "NAME")
    assert len(set(bodies.values())) == 1, bodies  # ...is answered as any unknown name


def test_installed_models_are_served(tiny_model: Path, env: Path) -> None:
    from openweight import store

    store.pull(str(tiny_model), name="tiny-installed", progress=False, notify=lambda m: None)
    with _serve(tiny_model) as s:
        r = _post(s.url, {"messages": HI, "model": "tiny-installed", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "tiny-installed"
    store.remove_model("tiny-installed")


def test_allow_pull(tiny_model: Path, env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from openweight import store

    asked: list[str] = []

    def ensure(name: str, **_: Any) -> Any:
        asked.append(name)
        raise ModelNotFoundError(f"{name} cannot be pulled in a test")

    monkeypatch.setattr(store, "ensure_model", ensure)
    name = next(iter(store.CATALOG))
    with _serve(tiny_model) as s:
        _error(_post(s.url, {"messages": HI, "model": name}), 404, "model")
    assert asked == []
    with _serve(tiny_model, allow_pull=True) as s:
        _error(_post(s.url, {"messages": HI, "model": name}), 404, "model")
        _error(_post(s.url, {"messages": HI, "model": "not-in-catalog"}), 404, "model")
    assert asked == [name]


# -- hostile input: a 4xx naming the field, never a 500 or a traceback ----------------------

DEEP = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HOSTILE: list[tuple[Any, str, int, str | None]] = [
    (b"[" * 100_000 + b"]" * 100_000, "/v1/chat/completions", 400, None),
    (DEEP, "/v1/chat/completions", 400, None),
    (b'{"messages": ' + b"[" * 200 + b"]" * 200 + b"}", "/v1/chat/completions", 400,
     "messages"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "/v1/chat/completions", 400,
     "messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}',
     "/v1/chat/completions", 400, "stop"),
    (b'{"prompt": "\\ud800x"}', "/v1/completions", 400, "prompt"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}',
     "/v1/chat/completions", 400, None),
    (b'\xff\xfe{"messages": 1}', "/v1/chat/completions", 400, None),
    ({"messages": {"role": "user"}}, "/v1/chat/completions", 400, "messages"),
    ({"messages": [5]}, "/v1/chat/completions", 400, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "/v1/chat/completions", 400, "messages"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "/v1/chat/completions", 400,
     "messages"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": 5}, *HI]},
     "/v1/chat/completions", 400, "messages"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": 5}]},
                   *HI]}, "/v1/chat/completions", 400, "messages"),
    ({"messages": HI, "max_tokens": 10**400}, "/v1/chat/completions", 400, "max_tokens"),
    ({"messages": HI, "seed": 10**400}, "/v1/chat/completions", 400, "seed"),
    ({"messages": HI, "temperature": [1]}, "/v1/chat/completions", 400, "temperature"),
    ({"messages": HI, "tools": 5}, "/v1/chat/completions", 400, "tools"),
    ({"messages": HI, "tools": [{"function": {"name": "f", "parameters": 5}}]},
     "/v1/chat/completions", 400, "tools"),
    ({"messages": HI, "tool_choice": {"x": 1}}, "/v1/chat/completions", 400, "tool_choice"),
    ({"messages": HI, "response_format": "json"}, "/v1/chat/completions", 400,
     "response_format"),
    ({"messages": HI, "stream_options": 5}, "/v1/chat/completions", 400, "stream_options"),
    ({"messages": HI, "chat_template_kwargs": {"enable_thinking": "yes"}},
     "/v1/chat/completions", 400, "thinking"),
    ({"prompt": ["a", "b"]}, "/v1/completions", 400, "prompt"),
    ({"prompt": "x", "response_format": {"type": "json_object"}}, "/v1/completions", 400,
     "response_format"),
    ({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]},
     "/v1/completions", 400, "tools"),
    ({"prompt": "x", "tool_choice": "none"}, "/v1/completions", 400, "tool_choice"),
]


@pytest.mark.parametrize(("body", "path", "status", "param"), HOSTILE)
def test_hostile_input(server: str, body: Any, path: str, status: int, param: str | None,
                       caplog: pytest.LogCaptureFixture) -> None:
    if isinstance(body, dict):
        body = {"model": "scripted", **body}
    with caplog.at_level(logging.ERROR):
        _error(_post(server, body, path), status, param)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    _ok(server)


# -- metrics ---------------------------------------------------------------------------------

def test_metrics(keyed: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    _error(httpx.get(keyed + "/metrics"), 401, code="invalid_api_key")
    assert _post(keyed, {"model": "scripted", "messages": HI}, headers=auth).status_code == 200
    _post(keyed, {"model": "scripted", "messages": HI, "temperature": 9}, headers=auth)
    r = httpx.get(keyed + "/metrics", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in ('openweight_requests_total{route="/v1/chat/completions",status="200"}',
                 'openweight_requests_total{route="/metrics",status="401"}',
                 'openweight_generated_tokens_total{model="scripted"} 3.0',
                 'openweight_errors_total{type="invalid_api_key"}',
                 'openweight_errors_total{type="invalid_request_error"}',
                 "openweight_queue_depth 0.0",
                 "openweight_time_to_first_token_seconds_count 1.0"):
        assert line in text, line


def test_serve_flags() -> None:
    args = build_parser().parse_args(
        ["serve", "--allowed-host", "a", "--allowed-host", "b:1", "--allow-pull",
         "--max-body-mb", "2.5", "--max-queue", "3", "--request-timeout", "30"])
    assert (args.allowed_host, args.allow_pull, args.max_body_mb, args.max_queue,
            args.request_timeout) == (["a", "b:1"], True, 2.5, 3, 30.0)
    args = build_parser().parse_args(["serve"])
    assert (args.allowed_host, args.allow_pull, args.max_queue, args.request_timeout) == (
        None, False, 64, None)
    for bad in ({"max_body_mb": 0}, {"max_queue": 0}, {"request_timeout": -1.0}):
        with pytest.raises(ValueError):
            ServerLimits(**bad)  # type: ignore[arg-type]
