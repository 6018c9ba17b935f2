"""Keep-alive's trust, tested through real daemons (issue #19, part A).

A daemon proves itself before anything secret reaches it: whatever holds its socket and
does not prove itself (silence, any JSON, another process) gets neither the token nor the
prompt, and a real daemon is started instead. A record naming a live process that is not
this user's daemon is stale, never a crash. A daemon killed mid-answer is a clean error,
and the next call works. Loopback and keep-alive traffic never go through a proxy; remote
traffic does, as httpx users expect.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import openweight
from openweight import Client, OpenWeightError, RemoteConnectionError, daemon
from openweight.daemon import ensure_daemon, list_daemons, stop_daemons
from openweight.daemon import process as daemon_process
from openweight.remote import RemoteBackend

from daemon_helpers import cleanup_daemons, daemon_pids, eventually, read_record

pytestmark = pytest.mark.skipif(not daemon.SUPPORTED, reason="keep-alive needs POSIX")
SECRET_PROMPT = "the-prompt-nobody-else-may-read"
HI = [{"role": "user", "content": SECRET_PROMPT}]
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
              "all_proxy")

# A process that takes a daemon's socket: its command line names openweight.daemon and the
# key (so that it passes for the daemon by its pid), it records every byte it is sent, and
# it never answers ("silent") or answers every request with any JSON ("json").
FAKE = r"""
import json, os, socket, sys, threading
path, capture, mode = sys.argv[1], sys.argv[2], sys.argv[3]
if os.path.exists(path):
    os.unlink(path)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(8)
print("listening", flush=True)
body = json.dumps({"pid": os.getpid(), "key": sys.argv[5], "proof": "0" * 64,
                   "state": "ready"}).encode()
def serve(conn):
    while True:
        data = conn.recv(65536)
        if not data:
            return
        with open(capture, "ab") as f:
            f.write(data)
        if mode == "json":
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n" % len(body) + body)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


@pytest.fixture()
def home(store: Path, tiny_model: Path, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A store holding the tiny model, keep-alive at its default; no daemon outlives the
    test (nor a fake one: their command lines name openweight.daemon)."""
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm-user"))
    monkeypatch.delenv("OPENWEIGHT_KEEP_ALIVE", raising=False)
    openweight.pull(str(tiny_model), name="tiny", progress=False)
    try:
        yield store
    finally:
        cleanup_daemons(store)


def _stopped_daemon(home: Path) -> dict[str, Any]:
    """The record of a real daemon for the tiny model, which has then been stopped."""
    ensure_daemon("tiny", keep_alive=60)
    rec = read_record(home)
    stop_daemons()
    assert eventually(lambda: daemon_pids() == [])
    return rec


def _fake(rec: dict[str, Any], capture: Path, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", FAKE, rec["socket"], str(capture), mode,
                             "openweight.daemon", rec["key"]], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "listening\n"
    return proc


def _llm(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``llm`` in a subprocess, as a user runs it (the plugin, keep-alive on by default)."""
    return subprocess.run([sys.executable, "-m", "llm", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def _writeread_record(home: Path, rec: dict[str, Any], pid: int) -> None:
    (home / "run" / f"{rec['key']}.json").write_text(json.dumps({**rec, "pid": pid}))


def _token(home: Path) -> str:
    return (home / "run" / "token").read_text().strip()


# -- whatever holds the socket proves itself, or gets nothing ---------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["silent", "json"])
def test_a_listener_that_does_not_prove_itself_gets_no_secret(
        home: Path, tmp_path: Path, mode: str) -> None:
    rec = _stopped_daemon(home)
    capture = tmp_path / "capture"
    fake = _fake(rec, capture, mode)
    try:
        _writeread_record(home, rec, fake.pid)
        # the plugin, in a process of its own: keep-alive finds the record, asks the fake
        # to prove itself, gets silence (5 s) or a wrong proof, and starts a real daemon
        result = _llm("-m", "openweight/tiny", SECRET_PROMPT, "-o", "max_tokens", "3")
        assert result.returncode == 0, result.stderr
        new = read_record(home)
        assert new["pid"] != fake.pid and daemon_pids() == [new["pid"]]
        seen = capture.read_bytes() if capture.exists() else b""
        assert b"challenge=" in seen  # it was asked, with no credential
        assert _token(home).encode() not in seen and b"Authorization" not in seen
        assert SECRET_PROMPT.encode() not in seen
    finally:
        fake.kill()
        fake.communicate()


@pytest.mark.slow
def test_a_socket_held_by_another_process_is_sent_nothing(home: Path, tmp_path: Path) -> None:
    """The kernel says who holds the socket: not the recorded pid, so not even the
    challenge is sent."""
    rec = _stopped_daemon(home)
    capture = tmp_path / "capture"
    fake = _fake(rec, capture, "json")  # holds the socket
    # the recorded pid: a process that passes for the daemon, but does not hold the socket
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                              "openweight.daemon", rec["key"]])
    try:
        _writeread_record(home, rec, other.pid)
        client = Client("tiny", keep_alive="1m")
        assert client.chat(HI, max_tokens=3).usage.completion_tokens == 3
        assert client.keep_alive_url == f"unix:{rec['socket']}"  # the real daemon's now
        assert read_record(home)["pid"] not in (fake.pid, other.pid)
        assert not capture.exists()  # not a byte
    finally:
        other.kill()
        other.wait()
        fake.kill()
        fake.communicate()


# -- a live process that is not this user's daemon: a stale record, never a crash -------------

@pytest.mark.slow
def test_a_record_naming_a_live_foreign_pid_is_stale(home: Path) -> None:
    rec = _stopped_daemon(home)
    sleeper = subprocess.Popen(["sleep", "120"])  # alive, not a daemon
    try:
        for pid in (1, sleeper.pid):
            _writeread_record(home, rec, pid)
            assert list_daemons() == []  # stale: the record is removed, nothing raised
            assert not list((home / "run").glob("*.json"))
            _writeread_record(home, rec, pid)
            assert stop_daemons() == 0
            _writeread_record(home, rec, pid)
            ensure_daemon("tiny", keep_alive=60)  # replaced by a real daemon
            assert read_record(home)["pid"] not in (1, sleeper.pid)
            assert sleeper.poll() is None  # left alone
            stop_daemons()
        # a foreign process that cannot be signalled (another user's): no PermissionError
        daemon_process._terminate([(1, str(rec["key"]))], grace=0.1)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_terminate_never_raises_for_a_process_it_may_not_signal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's process that looks like our daemon (no /proc to tell, say): the
    signal is refused, and that is no crash."""
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        def refused(pid: int, sig: int) -> None:
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(daemon_process, "_is_daemon", lambda pid, key: True)
        monkeypatch.setattr(daemon_process.os, "kill", refused)
        daemon_process._terminate([(sleeper.pid, "tiny-0")], grace=0.1)
    finally:
        monkeypatch.undo()
        sleeper.kill()
        sleeper.wait()


# -- a daemon killed mid-answer -----------------------------------------------------------------

@pytest.mark.slow
def test_a_daemon_killed_mid_stream_is_a_clean_error_and_the_next_call_works(
        home: Path) -> None:
    client = Client("tiny", keep_alive="1m")
    expected = client.chat(HI, max_tokens=5, temperature=0)
    [info] = list_daemons()
    stream = client.stream(HI, max_tokens=900, temperature=0)
    first = next(stream)
    os.kill(info.pid, signal.SIGKILL)
    with pytest.raises(RemoteConnectionError, match=r"broke|cannot connect"):
        for _ in stream:  # what was already sent may arrive; then the clean error
            pass
    stream.close()
    assert first.text is not None
    assert eventually(lambda: info.pid not in daemon_pids())
    again = client.chat(HI, max_tokens=5, temperature=0)  # a new daemon, the same answer
    assert again.text == expected.text
    [new] = list_daemons()
    assert new.pid != info.pid


# -- proxies --------------------------------------------------------------------------------------

class _RecordingProxy:
    """An HTTP proxy on loopback that records each request's head and answers a model list
    (so a request sent through it succeeds)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "m"}]}).encode()
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        break
                    data += more
                self.requests.append(data)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
                             + body)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[_RecordingProxy]:
    """Every proxy variable set to a recording proxy, NO_PROXY unset."""
    fake = _RecordingProxy()
    for var in PROXY_VARS:
        monkeypatch.setenv(var, fake.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        yield fake
    finally:
        fake.close()


@pytest.mark.slow
def test_keep_alive_traffic_never_uses_a_proxy(home: Path, proxy: _RecordingProxy) -> None:
    first = _llm("-m", "openweight/tiny", SECRET_PROMPT, "-o", "max_tokens", "3")
    assert first.returncode == 0, first.stderr
    warm = _llm("-m", "openweight/tiny", SECRET_PROMPT, "-o", "max_tokens", "3")  # reused
    assert warm.returncode == 0, warm.stderr
    assert len(list_daemons()) == 1
    assert Client("tiny").chat(HI, max_tokens=3).usage.completion_tokens == 3
    # the daemon given by its address (benchmarks/bench_keepalive.py's "warm (env)")
    url, token = ensure_daemon("tiny", keep_alive=60)
    given = _llm("-m", "openweight/tiny", SECRET_PROMPT, "-o", "max_tokens", "3",
                 OPENWEIGHT_BASE_URL=url, OPENWEIGHT_API_KEY=token)
    assert given.returncode == 0, given.stderr
    assert len(list_daemons()) == 1 and proxy.requests == []


def test_loopback_servers_never_use_a_proxy(proxy: _RecordingProxy) -> None:
    """A server on this machine (``openweight serve``, a keep-alive server) is asked
    directly, proxy variables or not."""
    server = _RecordingProxy()  # any HTTP server on loopback will do: it lists "m"
    try:
        assert [m.name for m in RemoteBackend(server.url + "/v1").models()] == ["m"]
        assert server.requests[0].startswith(b"GET /v1/models ")
        assert proxy.requests == []
    finally:
        server.close()
    for url in ("http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "unix:/tmp/x.sock"):
        assert RemoteBackend(url)._client_kwargs()["trust_env"] is False


def test_remote_servers_use_the_proxy_and_honour_no_proxy(
        proxy: _RecordingProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    remote = RemoteBackend("http://gpu-box.invalid:8000/v1", max_retries=0, timeout=5)
    assert [m.name for m in remote.models()] == ["m"]  # answered by the proxy
    assert proxy.requests[0].startswith(b"GET http://gpu-box.invalid:8000/v1/models ")
    monkeypatch.setenv("NO_PROXY", "gpu-box.invalid")
    with pytest.raises(RemoteConnectionError):  # asked directly: no such host
        remote.models()
    assert len(proxy.requests) == 1


def test_a_socket_directory_that_is_not_private_is_refused(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="ow"))  # short: a socket path must fit
    try:
        (runtime / "openweight").mkdir()
        (runtime / "openweight").chmod(0o755)  # others may look in
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
        with pytest.raises(OpenWeightError, match="mode 0700"):
            ensure_daemon("tiny", keep_alive=60)
        assert daemon_pids() == [] and not list((home / "run").glob("*.json"))
        local = Client("tiny")  # reuse only: finds none, runs here
        assert local.chat(HI, max_tokens=2).usage.completion_tokens == 2
        assert local.keep_alive_url is None
        (runtime / "openweight").chmod(0o700)
        url, _ = ensure_daemon("tiny", keep_alive=60)
        assert url.startswith(f"unix:{runtime}/openweight/")
    finally:
        cleanup_daemons(home)
        shutil.rmtree(runtime)
