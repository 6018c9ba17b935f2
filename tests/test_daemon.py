"""Keep-alive daemons: start, reuse, races, stale records, tokens, idle exit, ps and stop.

Every daemon here serves the tiny random model from a temp store, and every fixture stops
the daemons it may have started, so no process outlives the tests.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from openweight import Client, InvalidRequestError, ModelNotFoundError, cli, daemon
from openweight.daemon import (
    ensure_daemon,
    find_daemon,
    list_daemons,
    start_daemon,
    stop_daemons,
)
from openweight.daemon import process as daemon_process
from openweight.settings import keep_alive_from_json, keep_alive_seconds

from daemon_helpers import cleanup_daemons, daemon_pids, eventually, read_record

pytestmark = pytest.mark.skipif(not daemon.SUPPORTED, reason="keep-alive needs POSIX")
ENV = ("OPENWEIGHT_BASE_URL", "OPENWEIGHT_API_KEY", "OPENWEIGHT_KEEP_ALIVE")


def _use_store(mp: pytest.MonkeyPatch, home: Path, tiny_model: Path) -> None:
    import openweight

    mp.setenv("OPENWEIGHT_HOME", str(home))
    mp.setenv("OPENWEIGHT_OFFLINE", "1")
    for var in ENV:
        mp.delenv(var, raising=False)
    openweight.pull(str(tiny_model), name="tiny", progress=False)


@pytest.fixture()
def ow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            tiny_model: Path) -> Iterator[Path]:
    home = tmp_path / "store"
    _use_store(monkeypatch, home, tiny_model)
    try:
        yield home
    finally:
        cleanup_daemons(home)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           tiny_model: Path) -> Iterator[tuple[Path, str, str]]:
    """One daemon for the tiny model, shared by the read-only tests: (home, url, token)."""
    home = tmp_path_factory.mktemp("daemon") / "store"
    with pytest.MonkeyPatch.context() as mp:
        _use_store(mp, home, tiny_model)
        try:
            url, token = ensure_daemon("tiny", keep_alive=120)
            yield home, url, token
        finally:
            cleanup_daemons(home)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.path)


def _get(url: str, path: str, token: str | None) -> tuple[int, dict[str, Any]]:
    conn = _UnixConnection(url.removeprefix("unix:"))  # a daemon listens on a Unix socket
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


# -- keep-alive values ----------------------------------------------------------------------

@pytest.mark.parametrize(("value", "seconds"), [
    (None, 300.0), ("300", 300.0), (300, 300.0), (2.5, 2.5), ("5m", 300.0), ("90s", 90.0),
    ("1h30m", 5400.0), ("5m0s", 300.0), ("500ms", 0.5), ("0", 0.0), (0, 0.0),
    ("-1", math.inf), (-1, math.inf), ("-5m", math.inf), (" 2m ", 120.0),
])
def test_keep_alive_seconds(value: str | float | None, seconds: float,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENWEIGHT_KEEP_ALIVE", raising=False)
    assert keep_alive_seconds(value) == seconds


def test_keep_alive_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENWEIGHT_KEEP_ALIVE", "10m")
    assert keep_alive_seconds() == 600.0
    assert keep_alive_seconds("1m") == 60.0  # an explicit value wins
    monkeypatch.setenv("OPENWEIGHT_KEEP_ALIVE", "soon")
    with pytest.raises(InvalidRequestError, match="OPENWEIGHT_KEEP_ALIVE 'soon'"):
        keep_alive_seconds()


@pytest.mark.parametrize("value", ["5 minutes", "m", "1x", "", "1m-2s", True, float("nan")])
def test_keep_alive_rejects(value: object) -> None:
    with pytest.raises(InvalidRequestError, match="is not a duration"):
        keep_alive_seconds(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "seconds"), [
    (120, 120.0), (2.5, 2.5), (-1, math.inf), (0, 0.0), (float("nan"), 300.0),
    ("600", 300.0), (True, 300.0), (None, 300.0), ([60], 300.0)])
def test_keep_alive_read_back(raw: object, seconds: float) -> None:
    """A keep-alive read from a record or a query: a number, else the default; NaN (which
    would compare false with every idle time and keep a daemon forever) is the default."""
    assert keep_alive_from_json(raw) == seconds


@pytest.mark.parametrize(("query", "seconds"), [
    (b"keep_alive=nan", 300.0), (b"keep_alive=NaN", 300.0), (b"keep_alive=60", 60.0),
    (b"keep_alive=-1", math.inf), (b"keep_alive=soon", 300.0)])
def test_keep_alive_query_never_means_forever_by_accident(query: bytes, seconds: float) -> None:
    import asyncio

    from openweight.daemon import STATUS_PATH, KeepAliveApp

    async def inner(scope: Any, receive: Any, send: Any) -> None:  # never reached here
        raise AssertionError("the status path is the keeper's own")

    keeper = KeepAliveApp(inner, token="t" * 43, key="k", model="m", keep_alive=300.0)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "path": STATUS_PATH, "query_string": query,
             "headers": [(b"authorization", b"Bearer " + b"t" * 43)]}
    asyncio.run(keeper(scope, receive, send))
    assert sent[0]["status"] == 200
    assert keeper.keep_alive == seconds
    keeper.last -= 301  # idle past the default: only a forever keep-alive would stay
    assert keeper.expired() == (seconds != math.inf)


def test_import_is_light() -> None:
    code = ("import sys, openweight.daemon; "
            "print(sorted(m for m in ('torch', 'transformers', 'httpx', 'fastapi', 'uvicorn') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# -- one daemon, shared ---------------------------------------------------------------------

@pytest.mark.slow
def test_start_then_reuse(served: tuple[Path, str, str]) -> None:
    home, url, token = served
    rec = read_record(home)
    assert rec["state"] == "ready" and rec["model_name"] == "tiny"
    assert url == f"unix:{rec['socket']}"
    started = time.monotonic()
    assert ensure_daemon("tiny", keep_alive=120) == (url, token)  # same pid and socket
    assert time.monotonic() - started < 1.0
    assert read_record(home)["pid"] == rec["pid"]
    assert find_daemon("tiny") == (url, token)
    result = Client(base_url=url, api_key=token).chat([{"role": "user", "content": "Hi"}],
                                                      max_tokens=3)
    assert result.model == "tiny" and result.usage.completion_tokens == 3


@pytest.mark.slow
def test_files_are_private(served: tuple[Path, str, str]) -> None:
    home, _, token = served
    run = home / "run"
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    for path in run.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert (run / "token").read_text().strip() == token
    assert len(token) >= 32
    assert token not in next(run.glob("*.json")).read_text()  # the record names the file
    argv = Path(f"/proc/{read_record(home)['pid']}/cmdline").read_bytes().decode()
    assert token not in argv  # the key is never on the command line


@pytest.mark.slow
def test_listens_on_a_private_socket_only(served: tuple[Path, str, str]) -> None:
    home, url, _ = served
    sock = Path(url.removeprefix("unix:"))
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert sock.parent.stat().st_uid == os.getuid()
    pid = read_record(home)["pid"]
    inodes = {os.readlink(fd).removeprefix("socket:[").rstrip("]")
              for fd in Path(f"/proc/{pid}/fd").iterdir()
              if os.readlink(fd).startswith("socket:")}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # no TCP port at all, not even loopback
        with open(table) as f:
            assert not [ln for ln in list(f)[1:] if ln.split()[9] in inodes], table


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/health", "/v1/models", daemon.STATUS_PATH])
def test_token_required_everywhere(served: tuple[Path, str, str], path: str) -> None:
    _, url, token = served
    status, body = _get(url, path, None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert _get(url, path, "x" * len(token))[0] == 401
    assert _get(url, path, token)[0] == 200


@pytest.mark.slow
def test_ps(served: tuple[Path, str, str], capsys: pytest.CaptureFixture[str],
            tiny_model: Path) -> None:
    from openweight.local.resolve import auto_quantize

    home, url, _ = served
    [info] = list_daemons()
    assert info.model == "tiny" and info.state == "ready" and info.url == url
    assert info.pid == read_record(home)["pid"]
    assert info.rss_bytes and info.rss_bytes > 10_000_000
    assert info.idle_seconds is not None and 0 <= info.idle_seconds < 120
    assert info.keep_alive == 120.0
    assert cli.main(["ps"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["MODEL", "PID", "ADDRESS", "DEVICE", "MEMORY", "IDLE", "STOPS",
                              "IN"]
    assert row.split()[:3] == ["tiny", str(info.pid), url]
    assert "MB" in row
    assert cli.main(["ps", "--json"]) == 0
    [data] = json.loads(capsys.readouterr().out)
    assert data["model"] == "tiny" and data["keep_alive"] == 120.0
    # what it runs with, resolved: quantize=auto's choice on this CPU and why, the decode path
    quantize, why = auto_quantize("cpu", tiny_model)
    loaded = data["loaded"]
    assert loaded["device"] == "cpu" and loaded["quantize"] == quantize
    assert loaded["quantize_reason"] == why and loaded["decode"].startswith("the fast path")
    assert ("kernels" in loaded) == (quantize != "none")
    assert row.split()[3] == "/".join(v for v in ("cpu", loaded["dtype"], quantize)
                                      if v != "none")
    time.sleep(1.1)
    assert list_daemons()[0].idle_seconds >= 1.0  # ps does not touch
    ensure_daemon("tiny", keep_alive="5m")  # a later call sets the keep-alive, as Ollama's do
    assert list_daemons()[0].keep_alive == 300.0
    assert list_daemons()[0].idle_seconds < 1.0


# -- starting, racing, replacing ------------------------------------------------------------

@pytest.mark.slow
def test_stop(ow_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ensure_daemon("tiny", keep_alive=-1)  # until stopped
    pid = int(read_record(ow_home)["pid"])
    assert cli.main(["ps"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "never"
    assert list_daemons()[0].keep_alive == math.inf
    assert cli.main(["stop", "other"]) == 0
    assert capsys.readouterr().out == "no keep-alive server is running for other\n"
    assert cli.main(["stop", "tiny"]) == 0
    assert capsys.readouterr().out == "stopped 1 keep-alive server (tiny)\n"
    daemon_process._reap()
    assert pid not in daemon_pids()
    assert list(ow_home.joinpath("run").glob("*.json")) == []
    assert cli.main(["ps"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1  # the header only
    assert stop_daemons() == 0
    assert find_daemon("tiny") is None


RACER = """
import sys
from openweight.daemon import ensure_daemon
print(ensure_daemon("tiny", keep_alive=60)[0])
"""


@pytest.mark.slow
def test_racing_callers_start_one(ow_home: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", RACER], stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    urls: list[str] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            urls.append(ensure_daemon("tiny", keep_alive=60)[0])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        urls.append(out.strip())
    assert not errors
    assert len(urls) == 7 and len(set(urls)) == 1
    key = str(read_record(ow_home)["key"])
    assert daemon_pids(key) == [read_record(ow_home)["pid"]]


@pytest.mark.slow
def test_stale_records_are_replaced(ow_home: Path) -> None:
    _, token = ensure_daemon("tiny", keep_alive=60)
    first = read_record(ow_home)
    os.kill(int(first["pid"]), signal.SIGKILL)  # a crash
    url2, token2 = ensure_daemon("tiny", keep_alive=60)
    second = read_record(ow_home)
    assert second["pid"] != first["pid"] and token2 == token
    assert int(first["pid"]) not in daemon_pids()
    assert _get(url2, "/health", token)[0] == 200

    # a record naming a live process that is not a daemon: replaced, the process left alone
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        path = next((ow_home / "run").glob("*.json"))
        os.kill(int(second["pid"]), signal.SIGKILL)
        path.write_text(json.dumps({**second, "pid": sleeper.pid}))
        ensure_daemon("tiny", keep_alive=60)
        third = read_record(ow_home)
        assert third["pid"] not in (sleeper.pid, second["pid"])
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()

    # a daemon that does not take the user's token (made anew: the old one was unsafe)
    (ow_home / "run" / "token").chmod(0o644)
    _, token3 = ensure_daemon("tiny", keep_alive=60)
    fourth = read_record(ow_home)
    assert token3 != token and fourth["pid"] != third["pid"]
    assert stat.S_IMODE((ow_home / "run" / "token").stat().st_mode) == 0o600
    assert eventually(lambda: daemon_pids() == [fourth["pid"]])

    # an unreadable record is no daemon
    path.write_text("{not json")
    assert list_daemons() == [] and not path.exists()
    assert eventually(lambda: daemon_pids() == [])  # its daemon saw its record go: exited


@pytest.mark.slow
def test_idle_timeout(ow_home: Path) -> None:
    url, token = ensure_daemon("tiny", keep_alive="2s")
    pid = int(read_record(ow_home)["pid"])
    time.sleep(1.2)
    assert _get(url, "/health", token)[0] == 200  # a request resets the idle clock
    time.sleep(1.2)
    assert pid in daemon_pids()
    assert eventually(lambda: pid not in daemon_pids())
    assert list((ow_home / "run").glob("*.json")) == []
    assert "keep-alive server stopped" in next((ow_home / "run").glob("*.log")).read_text()


@pytest.mark.slow
def test_start_error_is_raised_as_is(ow_home: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'"):
        ensure_daemon("no-such-model", keep_alive=60)
    assert list((ow_home / "run").glob("*.json")) == []
    with pytest.raises(InvalidRequestError, match="keep_alive is 0"):
        ensure_daemon("tiny", keep_alive=0)
    assert find_daemon("tiny", keep_alive=0) is None


@pytest.mark.slow
def test_start_in_background(ow_home: Path) -> None:
    """start_daemon() returns at once; find_daemon() waits for a daemon still loading."""
    started = time.monotonic()
    start_daemon("tiny", keep_alive=60)
    start_daemon("tiny", keep_alive=60)  # one is enough
    assert time.monotonic() - started < 2.0
    assert read_record(ow_home)["state"] in ("starting", "loading")
    found = find_daemon("tiny")
    assert found is not None and read_record(ow_home)["state"] == "ready"
    assert _get(found[0], "/health", found[1])[0] == 200
    assert len(daemon_pids(str(read_record(ow_home)["key"]))) == 1
