"""Keep-alive's processes: is a pid alive and this user's daemon, stopping one, its memory,
and the status probe over the daemon's Unix socket (the daemon proves itself first)."""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from .. import errors
from ..errors import OpenWeightError
from ..settings import (
    keep_alive_to_json,
)
from .records import (
    POLL,
    PROBE_TIMEOUT,
    STATUS_PATH,
    STOP_GRACE,
    _proof,
)

# -- processes --------------------------------------------------------------------------------

class _Daemon(subprocess.Popen[bytes]):
    """A daemon this process started. It may outlive this process (that is what it is for):
    dropped while it still runs, at exit, it is left running, with no ResourceWarning and
    no wait; dropped after it has exited, its exit status is collected."""

    def __del__(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(Exception):
                self.poll()  # collect it if it has exited; never wait


_children: list[_Daemon] = []


def _reap() -> None:
    """Collect the exit status of daemons this process started that have exited (no
    zombies left behind); those still running are kept, to be collected later."""
    _children[:] = [p for p in _children if p.poll() is None]


def _alive(pid: int) -> bool:
    _reap()
    if any(child.pid == pid for child in _children):
        return True  # our own, and poll() has just said it runs (an exited one is collected)
    from ..store.sources import pid_alive

    if not pid_alive(pid):
        return False
    try:  # a zombie answers signal 0 but is gone
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return not fields or fields[0] not in ("Z", "X")


def _is_daemon(pid: int, key: str) -> bool:
    """Is ``pid`` this user's daemon for ``key`` (not a process that got its pid since, nor
    another user's process)?"""
    proc = Path(f"/proc/{pid}")
    try:
        owner = proc.stat().st_uid
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists() and _alive(pid)  # no /proc: trust the pid
    except OSError:
        return False
    return owner == os.getuid() and b"openweight.daemon" in cmdline and key.encode() in cmdline


def _terminate(pids: list[tuple[int, str]], grace: float = STOP_GRACE) -> None:
    """SIGTERM this user's daemons among ``pids``, then SIGKILL those still running after
    ``grace`` seconds. Any other process (its pid reused, another user's) is left alone."""
    ours = [(pid, key) for pid, key in pids if _alive(pid) and _is_daemon(pid, key)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, key in ours:
            if _alive(pid) and _is_daemon(pid, key):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while any(_alive(pid) for pid, _ in ours) and time.monotonic() < deadline:
            time.sleep(POLL)
        grace = 5.0
    _reap()  # those that were ours and have exited: their exit status, collected


def _rss_of(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _own_rss() -> int | None:
    rss = _rss_of(os.getpid())
    if rss is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak, not current
        rss = peak if sys.platform == "darwin" else peak * 1024
    return rss


def _gpu_bytes() -> int | None:
    torch = sys.modules.get("torch")  # never imported for this
    try:
        if torch is not None and torch.cuda.is_initialized():
            return int(torch.cuda.memory_allocated())
    except Exception:
        return None
    return None


# -- talking to a daemon ----------------------------------------------------------------------

class _ProbeError(Exception):
    def __init__(self, message: str, status: int | None = None,
                 timed_out: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.timed_out = timed_out


def _peer_is(sock: socket.socket, pid: int) -> bool:
    """Is the process at the other end of a Unix socket this user's process ``pid``? Asked
    of the kernel (SO_PEERCRED on Linux, LOCAL_PEERCRED's uid on macOS and the BSDs);
    where the system offers neither, True: the private directory and the proof decide."""
    if hasattr(socket, "SO_PEERCRED"):
        size = struct.calcsize("3i")
        peer_pid, uid, _ = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, size))
        return bool(uid == os.getuid() and peer_pid == pid)
    option = getattr(socket, "LOCAL_PEERCRED", None)
    if option is None:
        return True
    try:  # struct xucred: cr_version, cr_uid, ...
        raw = sock.getsockopt(0, option, 76)  # SOL_LOCAL is 0
    except OSError:
        return True
    return len(raw) >= 8 and int(struct.unpack("=II", raw[:8])[1]) == os.getuid()


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a daemon's Unix socket; the peer is checked before a byte is sent."""

    def __init__(self, path: Path, pid: int, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path, self.pid = path, pid

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
            if not _peer_is(sock, self.pid):
                raise _ProbeError("its socket is held by another process")
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _ask(conn: _UnixConnection, path: str, headers: dict[str, str]) -> dict[str, Any]:
    """One GET on the probe's connection: a JSON object, or _ProbeError."""
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read(1 << 20)
    except TimeoutError as exc:
        raise _ProbeError("timed out", timed_out=True) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _ProbeError(f"unreachable ({exc})") from exc
    if response.status != 200:
        raise _ProbeError(f"answered HTTP {response.status}", response.status)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _ProbeError("answered something that is not JSON") from exc
    if not isinstance(data, dict):
        raise _ProbeError("answered something that is not a status")
    if response.will_close:
        conn.close()
    return data


def _probe(sock: Path, pid: int, token: str, *, touch: bool,
           keep_alive: float | None = None, timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    """The status of the daemon ``pid`` listening on ``sock`` (``touch`` counts as a request
    for the idle timer). Nothing secret is sent until it has proved itself: the kernel says
    the socket is this user's process ``pid``, and it answers a fresh challenge with
    HMAC(token, challenge); only then, on that same connection, is the token sent."""
    query: dict[str, str] = {"touch": "1"} if touch else {}
    if keep_alive is not None:
        query["keep_alive"] = str(keep_alive_to_json(keep_alive))
    path = STATUS_PATH + (f"?{urlencode(query)}" if query else "")
    challenge = secrets.token_hex(16)
    conn = _UnixConnection(sock, pid, timeout)
    try:
        answer = _ask(conn, f"{STATUS_PATH}?{urlencode({'challenge': challenge})}", {})
        proof = answer.get("proof")
        if not isinstance(proof, str) or not hmac.compare_digest(
                proof.encode(), _proof(token, challenge).encode()):
            raise _ProbeError("did not prove that it holds this user's token")
        if conn.sock is None:
            raise _ProbeError("closed the connection it proved itself on")
        conn.auto_open = 0  # the token goes over the connection that proved itself, only
        return _ask(conn, path, {"Authorization": f"Bearer {token}"})
    finally:
        conn.close()


def _raise_failed(rec: dict[str, Any], log: Path) -> None:
    """Re-raise the error the daemon met while starting, as the class it was."""
    error = rec.get("error") if isinstance(rec.get("error"), dict) else {}
    assert isinstance(error, dict)
    cls = getattr(errors, str(error.get("type")), None)
    message = str(error.get("message") or f"the keep-alive server failed to start; see {log}")
    if isinstance(cls, type) and issubclass(cls, OpenWeightError) and cls is not (
            errors.RemoteStatusError):
        raise cls(message)
    raise OpenWeightError(message)


def _log_tail(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""
