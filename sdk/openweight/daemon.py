"""Keep-alive: one background server per user and model settings, holding the model loaded.

Every ``llm -m openweight`` call is a new process, and importing torch and loading the
weights costs seconds each time. With keep-alive the first call starts a server in the
background (``python -m openweight.daemon``: ``openweight serve``'s app on a private
loopback port), later calls find it and talk to it through the remote backend, and it
exits after ``keep_alive`` seconds without a request (default 5 minutes).

Files, in ``run/`` under the store home (a directory only the user can open):

- ``token``: the per-user API key (mode 0600); every request to a daemon must carry it.
- ``KEY.json``: one record per daemon (pid, port, state, model settings, keep-alive);
  the daemon exits when its record is removed or taken over.
- ``KEY.log``: the daemon's output.

``KEY`` is the model's name and a hash of its settings (model, device, dtype, quantize).
Finding and starting a daemon happen under a file lock per ``KEY``, so callers racing to
start one start exactly one. A record whose process is gone, is not a daemon, or does not
answer is replaced. Nothing here imports torch, transformers, httpx or FastAPI: only the
daemon process loads the server.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from . import errors
from .errors import OpenWeightError
from .settings import (
    DEFAULT_KEEP_ALIVE,
    KEEP_ALIVE_ENV,
    is_path,
    keep_alive_from_json,
    keep_alive_seconds,
    keep_alive_to_json,
)

__all__ = [
    "DEFAULT_KEEP_ALIVE",
    "KEEP_ALIVE_ENV",
    "SUPPORTED",
    "DaemonInfo",
    "KeepAliveApp",
    "ensure_daemon",
    "find_daemon",
    "keep_alive_seconds",
    "list_daemons",
    "start_daemon",
    "stop_daemons",
]

SUPPORTED = os.name == "posix"  # detached sessions, signals and /proc-style process checks
HOST = "127.0.0.1"
STATUS_PATH = "/_openweight/keepalive"
TOKEN_FILE = "token"
START_TIMEOUT = 900.0  # a daemon may pull its model first
LOCK_TIMEOUT = 60.0
PROBE_TIMEOUT = 5.0
STOP_GRACE = 10.0
POLL = 0.05

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# -- settings, files and locks ----------------------------------------------------------------

@dataclass(frozen=True)
class _Settings:
    """What makes two daemons different: one daemon per user and settings."""

    model: str  # a store name, or the absolute path of a model directory
    device: str
    dtype: str
    quantize: str
    store: str  # the store's run dir: stores never share daemons

    @property
    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(
            [self.model, self.device, self.dtype, self.quantize, self.store]
        ).encode()).hexdigest()[:12]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(self.model).name).strip("-.")[:40]
        return f"{slug or 'model'}-{digest}"


def _settings(run: Path, model: str | None, device: str | None, dtype: str | None,
              quantize: str | None) -> _Settings:
    """Settings in one spelling: a path made absolute, the default model resolved."""
    if model and is_path(model):
        model = str(Path(model).expanduser().resolve())
    elif not model:
        from .store import default_model

        model = default_model()
    return _Settings(model, (device or "auto").lower(), (dtype or "auto").lower(),
                     (quantize or "auto").lower(), str(run))


def _run_dir() -> Path:
    """``run/`` in the store home: created 0700, and refused if another user owns it."""
    from .store.registry import home

    path = home() / "run"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise OpenWeightError(f"{path} is not a directory owned by you; keep-alive keeps its "
                              "keys there: remove it, or set OPENWEIGHT_HOME to a store of your "
                              "own (or turn keep-alive off with OPENWEIGHT_KEEP_ALIVE=0)")
    if stat.S_IMODE(st.st_mode) != 0o700:
        path.chmod(0o700)
    return path


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    from filelock import Timeout

    from .store.registry import locked

    try:
        with locked(name, timeout=LOCK_TIMEOUT):
            yield
    except Timeout as exc:
        raise OpenWeightError(f"another process holds the keep-alive lock {name!r} for over "
                              f"{LOCK_TIMEOUT:.0f} s; try again, or stop it with "
                              "`openweight stop`") from exc


def _token(run: Path) -> str:
    """The per-user API key: made once, readable by the user only; unsafe ones are replaced."""
    path = run / TOKEN_FILE
    with _locked("daemon-token"):
        try:
            st = path.lstat()
        except FileNotFoundError:
            pass
        else:
            safe = (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()
                    and not st.st_mode & 0o077)
            token = path.read_text(encoding="ascii").strip() if safe else ""
            if len(token) >= 32:
                return token
            path.unlink()  # daemons started with it no longer answer to it and are replaced
        token = secrets.token_urlsafe(32)
        tmp = run / f".{TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(token + "\n")
        os.replace(tmp, path)
        return token


def _record_path(run: Path, key: str) -> Path:
    return run / f"{key}.json"


def _read_record(path: Path) -> dict[str, Any] | None:
    """A record, or None when absent; an unreadable one is deleted (it is stale)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        path.unlink(missing_ok=True)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
        path.unlink(missing_ok=True)
        return None
    return data


def _write_record(path: Path, data: dict[str, Any]) -> None:
    from .store.registry import write_json_atomic

    write_json_atomic(path, data)  # a private temp file (0600) renamed over the record


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
    from .store.sources import pid_alive

    if not pid_alive(pid):
        return False
    try:  # a zombie answers signal 0 but is gone
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return not fields or fields[0] not in ("Z", "X")


def _is_daemon(pid: int, key: str) -> bool:
    """Is ``pid`` the daemon for ``key`` (not a process that got its pid since)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists() and _alive(pid)  # no /proc: trust the pid
    except OSError:
        return False
    return b"openweight.daemon" in cmdline and key.encode() in cmdline


def _terminate(pids: list[tuple[int, str]], grace: float = STOP_GRACE) -> None:
    """SIGTERM daemons, then SIGKILL those still running after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, key in pids:
            if _alive(pid) and _is_daemon(pid, key):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while any(_alive(pid) for pid, _ in pids) and time.monotonic() < deadline:
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


def _probe(port: int, token: str, *, touch: bool, keep_alive: float | None = None,
           timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    """The daemon's status (``touch`` counts as a request for the idle timer)."""
    query: dict[str, str] = {"touch": "1"} if touch else {}
    if keep_alive is not None:
        query["keep_alive"] = str(keep_alive_to_json(keep_alive))
    import http.client

    path = STATUS_PATH + (f"?{urlencode(query)}" if query else "")
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        body = response.read()
    except TimeoutError as exc:
        raise _ProbeError("timed out", timed_out=True) from exc
    except OSError as exc:
        raise _ProbeError(f"unreachable ({exc})") from exc
    finally:
        conn.close()
    if response.status != 200:
        raise _ProbeError(f"answered HTTP {response.status}", response.status)
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise _ProbeError("answered something that is not JSON") from exc
    if not isinstance(data, dict):
        raise _ProbeError("answered something that is not a status")
    return data


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


# -- finding and starting -----------------------------------------------------------------------

def _spawn(run: Path, s: _Settings, key: str, token: str, keep_alive: float) -> dict[str, Any]:
    """Start ``python -m openweight.daemon`` detached; its record says "starting"."""
    from .store.registry import home

    log = run / f"{key}.log"
    cmd = [sys.executable, "-m", "openweight.daemon", "--key", key, "--model", s.model,
           "--device", s.device, "--dtype", s.dtype, "--quantize", s.quantize,
           "--keep-alive", str(keep_alive_to_json(keep_alive))]
    env = dict(os.environ)
    env["OPENWEIGHT_API_KEY"] = token  # not on the command line, which other users can read
    env["OPENWEIGHT_HOME"] = str(home())
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        proc = _Daemon(cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env, cwd=run,
                       start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    _children.append(proc)
    rec = {"version": 1, "key": key, "pid": proc.pid, "state": "starting", "host": HOST,
           "port": None, "model": s.model, "model_name": None, "device": s.device,
           "dtype": s.dtype, "quantize": s.quantize, "keep_alive": keep_alive_to_json(keep_alive),
           "started": time.time(), "log": str(log), "token_file": str(run / TOKEN_FILE)}
    _write_record(_record_path(run, key), rec)
    return rec


def _check(run: Path, key: str, token: str, keep_alive: float | None,
           ) -> tuple[str, dict[str, Any] | None]:
    """Under the lock: ("ready", rec), ("pending", rec) for one still starting, or
    ("none", None) after removing a stale record (and stopping a daemon that is ours but
    broken)."""
    path = _record_path(run, key)
    rec = _read_record(path)
    if rec is None:
        return "none", None
    pid = rec["pid"]
    if not _alive(pid) or not _is_daemon(pid, key) or rec.get("state") == "failed":
        path.unlink(missing_ok=True)
        return "none", None
    if rec.get("state") != "ready":
        return "pending", rec
    try:
        status = _probe(int(rec["port"]), token, touch=True, keep_alive=keep_alive)
    except _ProbeError as exc:
        if exc.timed_out:
            return "ready", rec  # alive, ours, and busy: the request will be answered later
        status = {}
    if status.get("pid") != pid or status.get("key") != key:  # wrong token, hung, not ours
        path.unlink(missing_ok=True)  # first: a daemon without its record exits by itself
        _terminate([(pid, key)], grace=3.0)
        return "none", None
    return "ready", rec


def _endpoint(rec: dict[str, Any], token: str) -> tuple[str, str]:
    return f"http://{HOST}:{int(rec['port'])}/v1", token


def _wait(run: Path, key: str, token: str, rec: dict[str, Any],
          timeout: float) -> tuple[str, str]:
    """Wait for a starting daemon to be ready; its start-up error is raised here."""
    path = _record_path(run, key)
    log = Path(str(rec.get("log") or run / f"{key}.log"))
    pid = rec["pid"]
    deadline = time.monotonic() + timeout
    gone = False
    while True:
        current = _read_record(path)
        if current is not None and current["pid"] != pid:  # another caller replaced it
            return _wait(run, key, token, current, max(deadline - time.monotonic(), 1.0))
        if current is not None:
            rec = current
            if rec.get("state") == "ready":
                return _endpoint(rec, token)
            if rec.get("state") == "failed":
                _forget(path, pid)
                _raise_failed(rec, log)
        if current is None or gone:
            _forget(path, pid)
            tail = _log_tail(log)
            raise OpenWeightError(f"the keep-alive server for {rec.get('model')} exited while "
                                  f"starting{': ' + tail if tail else ''} (log: {log})")
        if not _alive(pid):
            gone = True  # read the record once more: it may have written its error
            continue
        if time.monotonic() > deadline:
            raise OpenWeightError(f"the keep-alive server for {rec.get('model')} is not ready "
                                  f"after {timeout:.0f} s (log: {log}); `openweight stop` "
                                  "stops it")
        time.sleep(POLL)


def _forget(path: Path, pid: int) -> None:
    """Remove a record if it still belongs to ``pid``."""
    with _locked(f"daemon-{path.stem}"):
        rec = _read_record(path)
        if rec is not None and rec["pid"] == pid:
            path.unlink(missing_ok=True)


def _prepare(model: str | None, device: str | None, dtype: str | None,
             quantize: str | None) -> tuple[Path, _Settings, str]:
    if not SUPPORTED:
        raise OpenWeightError("keep-alive needs a POSIX system; set OPENWEIGHT_KEEP_ALIVE=0")
    run = _run_dir()
    s = _settings(run, model, device, dtype, quantize)
    return run, s, s.key


def ensure_daemon(model: str | None = None, *, device: str | None = None,
                  dtype: str | None = None, quantize: str | None = None,
                  keep_alive: str | float | None = None,
                  timeout: float = START_TIMEOUT) -> tuple[str, str]:
    """``(base_url, api_key)`` of the daemon for these settings, started if none runs.

    Waits until the model is loaded (a model that cannot load raises the error it met,
    e.g. ``ModelNotFoundError``). ``keep_alive`` (seconds or a duration, see
    :func:`keep_alive_seconds`) also resets a running daemon's idle timeout.
    """
    seconds = keep_alive_seconds(keep_alive)
    if seconds == 0:
        raise errors.InvalidRequestError("keep_alive is 0 (off): run the model in this process")
    run, s, key = _prepare(model, device, dtype, quantize)
    token = _token(run)
    with _locked(f"daemon-{key}"):
        state, rec = _check(run, key, token, seconds)
        if state == "ready" and rec is not None:
            return _endpoint(rec, token)
        if rec is None:
            rec = _spawn(run, s, key, token, seconds)
    return _wait(run, key, token, rec, timeout)


def find_daemon(model: str | None = None, *, device: str | None = None,
                dtype: str | None = None, quantize: str | None = None,
                keep_alive: str | float | None = None,
                timeout: float = START_TIMEOUT) -> tuple[str, str] | None:
    """``(base_url, api_key)`` of a running daemon for these settings, else None.

    Never starts one; one that is still loading its model is waited for. ``keep_alive``,
    if given, resets its idle timeout (``0``: None, run in this process).
    """
    seconds = keep_alive_seconds(keep_alive) if keep_alive is not None else None
    if seconds == 0:
        return None
    run, _, key = _prepare(model, device, dtype, quantize)
    if not _record_path(run, key).exists():
        return None
    token = _token(run)
    with _locked(f"daemon-{key}"):
        state, rec = _check(run, key, token, seconds)
    if rec is None:
        return None
    if state == "ready":
        return _endpoint(rec, token)
    return _wait(run, key, token, rec, timeout)


def start_daemon(model: str | None = None, *, device: str | None = None,
                 dtype: str | None = None, quantize: str | None = None,
                 keep_alive: str | float | None = None) -> None:
    """Start the daemon for these settings in the background, unless one runs; don't wait
    (to load a model ahead of its first use)."""
    seconds = keep_alive_seconds(keep_alive)
    if seconds == 0:
        return
    run, s, key = _prepare(model, device, dtype, quantize)
    token = _token(run)
    with _locked(f"daemon-{key}"):
        _, rec = _check(run, key, token, seconds)
        if rec is None:
            _spawn(run, s, key, token, seconds)


# -- listing and stopping ---------------------------------------------------------------------

@dataclass(frozen=True)
class DaemonInfo:
    """One keep-alive server, as ``openweight ps`` shows it."""

    key: str
    model: str  # the name it serves (or the model asked for, while it is starting)
    pid: int
    state: str  # starting, loading, ready
    url: str | None
    device: str
    dtype: str
    quantize: str
    keep_alive: float  # seconds; math.inf: until stopped
    started: float  # epoch seconds
    idle_seconds: float | None  # None while it is starting (0 while it answers)
    in_flight: int | None
    rss_bytes: int | None
    gpu_bytes: int | None
    log: str
    # what the model runs with, resolved (quantize=auto's choice and why, the kernels,
    # the decode path: LoadedModel.summary); None until it is loaded
    loaded: dict[str, str] | None = None

    @property
    def expires_in(self) -> float | None:
        """Seconds until it exits if no request comes (None: not counting down)."""
        if self.idle_seconds is None or math.isinf(self.keep_alive):
            return None
        return max(0.0, self.keep_alive - self.idle_seconds)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["keep_alive"] = keep_alive_to_json(self.keep_alive)
        data["expires_in"] = self.expires_in
        return data


def _records(run: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(run.glob("*.json")):
        rec = _read_record(path)
        if rec is not None:
            yield path, rec


def _info(rec: dict[str, Any], token: str) -> DaemonInfo:
    status: dict[str, Any] = {}
    if rec.get("state") == "ready" and rec.get("port"):
        with contextlib.suppress(_ProbeError):
            status = _probe(int(rec["port"]), token, touch=False, timeout=2.0)
    idle = status.get("idle_s")
    keep_alive = status.get("keep_alive_s", rec.get("keep_alive"))
    port = rec.get("port")
    return DaemonInfo(
        key=str(rec.get("key")), model=str(rec.get("model_name") or rec.get("model")),
        pid=rec["pid"], state=str(rec.get("state")),
        url=f"http://{HOST}:{port}/v1" if port else None, device=str(rec.get("device")),
        dtype=str(rec.get("dtype")), quantize=str(rec.get("quantize")),
        keep_alive=keep_alive_from_json(keep_alive), started=float(rec.get("started") or 0),
        idle_seconds=float(idle) if isinstance(idle, int | float) else None,
        in_flight=status.get("in_flight") if isinstance(status.get("in_flight"), int) else None,
        rss_bytes=status.get("rss_bytes") or _rss_of(rec["pid"]),
        gpu_bytes=status.get("gpu_bytes"), log=str(rec.get("log")),
        loaded=rec.get("loaded") if isinstance(rec.get("loaded"), dict) else None)


def _live_records(run: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Records of running daemons; stale ones are removed on the way."""
    for path, rec in _records(run):
        key = path.stem
        if _alive(rec["pid"]) and _is_daemon(rec["pid"], key):
            yield path, rec
            continue
        _forget(path, rec["pid"])


def list_daemons() -> list[DaemonInfo]:
    """The running keep-alive servers of this user and store (stale records are cleaned)."""
    if not SUPPORTED:
        return []
    run = _run_dir()
    records = list(_live_records(run))
    token = _token(run) if records else ""
    return [_info(rec, token) for _, rec in records]


def _matches(rec: dict[str, Any], model: str) -> bool:
    names = {rec.get("key"), rec.get("model"), rec.get("model_name"),
             Path(str(rec.get("model"))).name}
    if model.startswith(("/", ".", "~")):
        names.add(str(Path(str(rec.get("model"))).resolve()))
        model = str(Path(model).expanduser().resolve())
    return model in names


def stop_daemons(model: str | None = None) -> int:
    """Stop the keep-alive servers (all, or those serving ``model``); returns how many."""
    if not SUPPORTED:
        return 0
    run = _run_dir()
    stopping: list[tuple[int, str]] = []
    for path, rec in _live_records(run):
        if model is not None and not _matches(rec, model):
            continue
        key = path.stem
        with _locked(f"daemon-{key}"):
            again = _read_record(path)
            if again is None or again["pid"] != rec["pid"]:
                continue
            path.unlink(missing_ok=True)  # nobody finds it from here on
        stopping.append((rec["pid"], key))
    _terminate(stopping)
    return len(stopping)


# -- the daemon process -------------------------------------------------------------------------

class KeepAliveApp:
    """ASGI wrapper: the token on every request, the idle clock, and the status endpoint.

    ``GET /_openweight/keepalive`` answers the daemon's status (``?touch=1`` counts as a
    request; ``?keep_alive=S`` sets the idle timeout). Every path, ``/health`` included,
    needs ``Authorization: Bearer TOKEN``.
    """

    def __init__(self, app: ASGIApp, *, token: str, key: str, model: str,
                 keep_alive: float) -> None:
        self.app = app
        self.token = token.encode()
        self.key = key
        self.model = model
        self.keep_alive = keep_alive
        self.in_flight = 0
        self.last = time.monotonic()
        self.started = time.time()

    def idle_seconds(self) -> float:
        return 0.0 if self.in_flight else time.monotonic() - self.last

    def expired(self) -> bool:
        return not math.isinf(self.keep_alive) and self.idle_seconds() >= self.keep_alive

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "key": self.key, "model": self.model, "state": "ready",
                "idle_s": round(self.idle_seconds(), 3), "in_flight": self.in_flight,
                "keep_alive_s": keep_alive_to_json(self.keep_alive), "started": self.started,
                "rss_bytes": _own_rss(), "gpu_bytes": _gpu_bytes()}

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                scheme, _, given = bytes(value).partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    given.strip(), self.token)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            await _send_json(send, 401, {"error": {
                "message": "missing or wrong API key: this keep-alive server answers only its "
                           "user's token (the file run/token in the openweight store)",
                "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}},
                {"www-authenticate": "Bearer"})
            return
        if scope["path"] == STATUS_PATH:
            query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
            if "keep_alive" in query:
                with contextlib.suppress(ValueError):
                    self.keep_alive = keep_alive_from_json(float(query["keep_alive"][0]))
            if query.get("touch") == ["1"]:
                self.last = time.monotonic()
            await _send_json(send, 200, self.status())
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.last = time.monotonic()


async def _send_json(send: Send, status: int, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


def _set(run: Path, key: str, **fields: Any) -> bool:
    """Update this daemon's record; False when it is no longer ours (stopped or replaced)."""
    path = _record_path(run, key)
    with _locked(f"daemon-{key}"):
        rec = _read_record(path)
        if rec is None or rec["pid"] != os.getpid():
            return False
        rec.update(fields)
        _write_record(path, rec)
        return True


def _still_ours(run: Path, key: str) -> bool:
    """Is our record still there and ours? (A file that cannot be read right now is.)"""
    try:
        rec = _read_record(_record_path(run, key))
    except OSError:
        return True
    return rec is not None and rec["pid"] == os.getpid()


def _watch(run: Path, key: str, keeper: KeepAliveApp, should_exit: Callable[[], None],
           done: threading.Event) -> None:
    """Exit when idle past keep-alive, or when the record is no longer ours."""
    while not done.wait(0.25):
        if not _still_ours(run, key):
            should_exit()
            return
        if keeper.expired():
            with _locked(f"daemon-{key}"):
                if keeper.expired():  # a caller may have touched it while we waited
                    if _still_ours(run, key):
                        _record_path(run, key).unlink(missing_ok=True)
                    should_exit()
                    return


def _serve(argv: list[str] | None = None) -> int:
    """``python -m openweight.daemon``: started by :func:`ensure_daemon`, not by hand."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m openweight.daemon")
    p.add_argument("--key", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantize", default="auto")
    p.add_argument("--keep-alive", type=float, default=DEFAULT_KEEP_ALIVE)
    args = p.parse_args(argv)
    token = os.environ.pop("OPENWEIGHT_API_KEY", "")
    if not token:
        print("Error: no API key in the environment; start it with ensure_daemon()",
              file=sys.stderr)
        return 2
    run = _run_dir()
    key = args.key
    keep_alive = keep_alive_from_json(args.keep_alive)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # until uvicorn takes over
    sock: socket.socket | None = None
    failed = False  # a failed record stays for the caller to read (and remove)
    try:
        sock = socket.create_server((HOST, 0))  # loopback only; connections queue from here
        port = sock.getsockname()[1]
        if not _set(run, key, state="loading", port=port):
            return 0
        try:
            from .server import create_app

            # one user's calls come one at a time: the single-stream path is faster for
            # one stream and reuses a whole conversation's KV cache (`llm chat`);
            # OPENWEIGHT_BATCH=1 batches concurrent calls instead
            batch = os.environ.get("OPENWEIGHT_BATCH", "0").strip().lower() in (
                "1", "true", "yes", "on")
            app = create_app(args.model, api_key=token, device=_arg(args.device),
                             dtype=_arg(args.dtype), quantize=_arg(args.quantize),
                             batching=batch)
        except OpenWeightError as exc:  # the caller waiting for us raises it, as it is
            failed = _set(run, key, state="failed", error={"type": type(exc).__name__,
                                                           "message": str(exc)})
            print(f"Error: {exc}", file=sys.stderr)
            return 1
        name = str(app.state.pool.name)
        keeper = KeepAliveApp(app, token=token, key=key, model=name, keep_alive=keep_alive)
        return _run_uvicorn(app, keeper, sock, run, key, name)
    finally:
        if not failed and _still_ours(run, key):
            with _locked(f"daemon-{key}"):
                if _still_ours(run, key):
                    _record_path(run, key).unlink(missing_ok=True)
        if sock is not None:
            sock.close()


def _arg(value: str, default: str = "auto") -> str | None:
    return None if value == default else value


def _run_uvicorn(app: Any, keeper: KeepAliveApp, sock: socket.socket, run: Path, key: str,
                 name: str) -> int:
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.stopping.set()  # end streams now rather than wait for them
            super().handle_exit(sig, frame)

    config = uvicorn.Config(keeper, log_level="warning", ws="none", lifespan="off",
                            timeout_graceful_shutdown=5)
    server = Server(config)
    done = threading.Event()

    def should_exit() -> None:
        app.state.stopping.set()
        server.should_exit = True

    watchdog = threading.Thread(target=_watch, args=(run, key, keeper, should_exit, done),
                                name="openweight-keepalive", daemon=True)
    if not _set(run, key, state="ready", model_name=name, loaded=app.state.pool.loaded()):
        return 0
    port = sock.getsockname()[1]
    ttl = "until stopped" if math.isinf(keeper.keep_alive) else f"{keeper.keep_alive:g} s idle"
    print(f"openweight: keep-alive server for {name} at http://{HOST}:{port}/v1 "
          f"(pid {os.getpid()}; exits after {ttl})", flush=True)
    watchdog.start()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[sock])
    finally:
        done.set()
        print("openweight: keep-alive server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
