"""Keep-alive, wired in: the llm plugin and Client() through keep-alive servers.

The plugin sends a local model's requests to a keep-alive server by default; Client()
uses one that runs, and starts one only when asked. Every daemon here serves the tiny
random model from a temp store and is stopped at teardown. The tiny model's text is
random: answers are compared between paths (greedy), never read.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llm
import pytest

import openweight
from llm_openweight import models as plugin_models
from openweight import AsyncClient, Client, InvalidRequestError, daemon, settings
from openweight.daemon import list_daemons, stop_daemons
from openweight.remote import AsyncRemoteBackend, RemoteBackend

from daemon_helpers import cleanup_daemons, daemon_pids
from plugin_helpers import GREEDY, TINY, assert_error, logged, run

pytestmark = pytest.mark.skipif(not daemon.SUPPORTED, reason="keep-alive needs POSIX")
HI = [{"role": "user", "content": "hello"}]


@pytest.fixture()
def home(store: Path, tiny_model: Path, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A store holding the tiny model, an llm user dir, keep-alive at its default (on for
    the plugin); no daemon outlives the test."""
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm-user"))
    for var in ("OPENWEIGHT_BASE_URL", "OPENWEIGHT_API_KEY", "LLM_RAISE_ERRORS",
                "OPENWEIGHT_KEEP_ALIVE"):
        monkeypatch.delenv(var, raising=False)
    openweight.pull(str(tiny_model), name="tiny", progress=False)
    plugin_models.clear_clients()
    try:
        yield store
    finally:
        plugin_models.clear_clients()
        cleanup_daemons(store)


def _dead_url() -> str:
    """A loopback URL nothing listens on (a daemon that has just exited)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _logged() -> list[dict[str, Any]]:
    return logged(Path(os.environ["LLM_USER_PATH"]))


def _url_of(client: Client | AsyncClient) -> str | None:
    """The server a client talks to (a keep-alive or remote one), None: in this process."""
    backend = client.backend
    return backend.base_url if isinstance(backend, RemoteBackend | AsyncRemoteBackend) else None


# -- the plugin -------------------------------------------------------------------------------

@pytest.mark.slow
async def test_plugin_starts_one_daemon_and_reuses_it(home: Path) -> None:
    local = run("-m", TINY, "hello", *GREEDY, "-o", "keep_alive", "0")
    assert local.exit_code == 0, local.output
    assert list_daemons() == []  # keep_alive 0: in this process, nothing started

    first = run("-m", TINY, "hello", *GREEDY)  # on by default: starts the daemon
    assert first.exit_code == 0, first.output
    [info] = list_daemons()
    assert info.model == "tiny" and info.keep_alive == settings.DEFAULT_KEEP_ALIVE
    plugin_models.clear_clients()  # as a new `llm` process would
    second = run("-m", TINY, "hello", *GREEDY, "-o", "keep_alive", "2m")
    assert second.exit_code == 0, second.output
    assert first.stdout == second.stdout == local.stdout  # greedy: the same answer
    [again] = list_daemons()
    assert again.pid == info.pid and again.keep_alive == 120.0  # reused; the timeout set
    assert daemon_pids() == [info.pid]
    servers = [row["response_json"]["keep_alive_server"] for row in _logged()]
    assert servers == [None, info.url, info.url]

    # the async model, through the same daemon
    response = llm.get_async_model(TINY).prompt("hello", temperature=0, max_tokens=6)
    assert await response.text() == first.stdout.rstrip("\n")
    assert response.response_json is not None
    assert response.response_json["keep_alive_server"] == info.url
    assert [d.pid for d in list_daemons()] == [info.pid]

    # `llm openweight ps` and `llm openweight stop` are `openweight ps` and `openweight stop`
    ps = run("openweight", "ps")
    assert ps.exit_code == 0, ps.output
    assert ps.stdout.splitlines()[1].split()[:2] == ["tiny", str(info.pid)]
    stop = run("openweight", "stop")
    assert stop.exit_code == 0 and stop.stdout == "stopped 1 keep-alive server (tiny)\n"
    assert list_daemons() == []
    assert run("openweight", "ps").stdout.splitlines()[1:] == []


@pytest.mark.parametrize("how", ["option", "env"])
def test_plugin_keep_alive_zero_never_starts_one(home: Path, how: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["-o", "keep_alive", "0"] if how == "option" else []
    if how == "env":
        monkeypatch.setenv("OPENWEIGHT_KEEP_ALIVE", "0")
    result = run("-m", TINY, "hello", *GREEDY, *args)
    assert result.exit_code == 0, result.output
    assert list_daemons() == [] and daemon_pids() == []
    assert not list((home / "run").glob("*.json")) if (home / "run").exists() else True
    assert _logged()[-1]["response_json"]["keep_alive_server"] is None


def test_plugin_bad_keep_alive_is_a_clean_error(home: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert_error(run("-m", TINY, "hi", "-o", "keep_alive", "soon"), "keep_alive",
                 "is not a duration")
    assert_error(run("-m", TINY, "hi", "-o", "keep_alive", "5 minutes"), "is not a duration")
    with pytest.raises(ValueError, match="is not a duration"):
        llm.get_model(TINY).prompt("hi", keep_alive="soon").text()
    monkeypatch.setenv("OPENWEIGHT_KEEP_ALIVE", "soon")
    assert_error(run("-m", TINY, "hi"), "OPENWEIGHT_KEEP_ALIVE 'soon' is not a duration")
    assert list_daemons() == []


def test_plugin_remote_wins_over_keep_alive(home: Path) -> None:
    dead = _dead_url()
    result = run("-m", TINY, "hi", "-o", "remote", dead, "-o", "keep_alive", "5m")
    assert_error(result, "cannot connect")  # the remote was used, not a keep-alive server
    assert list_daemons() == []


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--async"]])
def test_plugin_retries_once_when_the_daemon_has_just_exited(
        home: Path, monkeypatch: pytest.MonkeyPatch, mode: list[str]) -> None:
    expected = run("-m", TINY, "hello", *GREEDY)  # starts the daemon
    assert expected.exit_code == 0, expected.output
    real = daemon.ensure_daemon
    calls: list[Any] = []

    def exits_just_then(*args: Any, **kwargs: Any) -> tuple[str, str]:
        calls.append(args)
        url, token = real(*args, **kwargs)
        return (_dead_url(), token) if len(calls) == 1 else (url, token)

    monkeypatch.setattr(daemon, "ensure_daemon", exits_just_then)
    plugin_models.clear_clients()
    result = run("-m", TINY, "hello", *GREEDY, *mode)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected.stdout and len(calls) == 2

    # a daemon that cannot be reached twice in a row: one clean error, no traceback
    monkeypatch.setattr(daemon, "ensure_daemon",
                        lambda *a, **k: (_dead_url(), real(*a, **k)[1]))
    plugin_models.clear_clients()  # as a new `llm` process would
    assert_error(run("-m", TINY, "hello", *GREEDY, *mode), "cannot connect")


# -- Client() and AsyncClient() -----------------------------------------------------------------

@pytest.mark.slow
async def test_client_starts_with_keep_alive_and_reuses_otherwise(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = Client("tiny", keep_alive=0).chat(HI, max_tokens=6, temperature=0)
    assert list_daemons() == []
    plain = Client("tiny")  # reuse only: nothing runs, so it runs here
    assert _url_of(plain) is None and list_daemons() == []

    starter = Client("tiny", keep_alive="1m")  # starts one
    assert starter.chat(HI, max_tokens=6, temperature=0) == expected
    [info] = list_daemons()
    assert info.keep_alive == 60.0 and _url_of(starter) == info.url

    reuser = Client("tiny")  # finds it
    assert reuser.chat(HI, max_tokens=6, temperature=0) == expected
    assert _url_of(reuser) == info.url and reuser.model == "tiny" and not reuser.is_remote
    areuser = AsyncClient("tiny")
    assert await areuser.chat(HI, max_tokens=6, temperature=0) == expected
    async with areuser.stream(HI, max_tokens=6, temperature=0) as chunks:
        assert "".join([c.text async for c in chunks]) == expected.text
    assert _url_of(areuser) == info.url
    assert _url_of(Client("tiny", device="cpu")) is None  # other settings: not that one
    assert _url_of(Client("tiny", keep_alive=0)) is None
    monkeypatch.setenv("OPENWEIGHT_KEEP_ALIVE", "0")
    assert _url_of(Client("tiny")) is None  # keep-alive off in the environment
    monkeypatch.delenv("OPENWEIGHT_KEEP_ALIVE")
    assert [d.pid for d in list_daemons()] == [info.pid]

    # the daemon exits (idle timeout, `openweight stop`): the starter starts one again,
    # the others find that one
    stop_daemons()
    assert starter.chat(HI, max_tokens=6, temperature=0) == expected
    [new] = list_daemons()
    assert new.pid != info.pid and _url_of(starter) == new.url
    with reuser.stream(HI, max_tokens=6, temperature=0) as stream:
        assert "".join(c.text for c in stream) == expected.text
    assert _url_of(reuser) == new.url
    # none runs any more: a client that only reuses runs the model here
    stop_daemons()
    assert await areuser.chat(HI, max_tokens=6, temperature=0) == expected
    assert _url_of(areuser) is None and list_daemons() == []


def test_client_bad_keep_alive(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidRequestError, match="keep_alive 'soon' is not a duration"):
        Client("tiny", keep_alive="soon")
    monkeypatch.setenv("OPENWEIGHT_KEEP_ALIVE", "soon")
    with pytest.raises(InvalidRequestError, match="OPENWEIGHT_KEEP_ALIVE 'soon'"):
        AsyncClient("tiny")
    Client(base_url="http://127.0.0.1:1/v1")  # a remote client does not read it


def test_client_remote_wins(home: Path) -> None:
    client = Client("tiny", base_url="http://127.0.0.1:1/v1", keep_alive="5m")
    assert client.is_remote and _url_of(client) == "http://127.0.0.1:1/v1"
    assert list_daemons() == []


def test_serve_never_uses_keep_alive(monkeypatch: pytest.MonkeyPatch, tiny_model: Path) -> None:
    """`openweight serve` runs its models itself whatever the environment says: its pool
    holds local engines (never a Client), so it cannot forward to a keep-alive server or to
    OPENWEIGHT_BASE_URL, and nothing sets an environment variable to keep it so."""
    from openweight.local import LocalEngine
    from openweight.server import ModelPool

    monkeypatch.setenv("OPENWEIGHT_KEEP_ALIVE", "5m")
    monkeypatch.setenv("OPENWEIGHT_BASE_URL", "http://127.0.0.1:1/v1")
    pool = ModelPool(str(tiny_model))
    assert isinstance(pool.default, LocalEngine) and pool.get(None) is pool.default
    pool.warm()  # answers in this process: the base URL above would refuse a connection
    assert list_daemons() == []
    assert os.environ["OPENWEIGHT_KEEP_ALIVE"] == "5m"
