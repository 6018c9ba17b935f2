"""Finding, starting, listing and stopping keep-alive servers (what the Client and the
`openweight ps`/`stop` commands call). Nothing here imports the server."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import errors
from ..errors import OpenWeightError
from ..settings import (
    keep_alive_from_json,
    keep_alive_seconds,
    keep_alive_to_json,
)
from .process import (
    _alive,
    _children,
    _Daemon,
    _is_daemon,
    _log_tail,
    _probe,
    _ProbeError,
    _raise_failed,
    _rss_of,
    _terminate,
)
from .records import (
    POLL,
    START_TIMEOUT,
    SUPPORTED,
    TOKEN_FILE,
    _locked,
    _read_record,
    _record_path,
    _recorded_socket,
    _run_dir,
    _Settings,
    _settings,
    _socket_path,
    _token,
    _write_record,
)

# -- finding and starting -----------------------------------------------------------------------

def _spawn(run: Path, s: _Settings, key: str, token: str, keep_alive: float) -> dict[str, Any]:
    """Start ``python -m openweight.daemon`` detached; its record says "starting"."""
    from ..store.registry import home

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
    rec = {"version": 1, "key": key, "pid": proc.pid, "state": "starting",
           "socket": None, "model": s.model, "model_name": None, "device": s.device,
           "dtype": s.dtype, "quantize": s.quantize, "keep_alive": keep_alive_to_json(keep_alive),
           "started": time.time(), "log": str(log), "token_file": str(run / TOKEN_FILE)}
    _write_record(_record_path(run, key), rec)
    return rec


def _check(run: Path, key: str, token: str, keep_alive: float | None,
           ) -> tuple[str, dict[str, Any] | None]:
    """Under the lock: ("ready", rec) for a daemon that has just proved itself (see
    ``_probe``), ("pending", rec) for one still starting, or ("none", None) after removing
    a stale record. Silence or a wrong answer is stale, never "busy": the record is removed
    and the process stopped only if it is provably this user's daemon for ``key``."""
    path = _record_path(run, key)
    rec = _read_record(path)
    if rec is None:
        return "none", None
    pid = rec["pid"]
    if not _alive(pid) and (sock := _recorded_socket(rec, run, key)) is not None:
        sock.unlink(missing_ok=True)  # left by a daemon that was killed
    if not _alive(pid) or not _is_daemon(pid, key) or rec.get("state") == "failed":
        path.unlink(missing_ok=True)  # a process that is not our daemon is left alone
        return "none", None
    if rec.get("state") != "ready":
        return "pending", rec
    if _status(run, key, token, rec, keep_alive) is None:
        path.unlink(missing_ok=True)  # first: a daemon without its record exits by itself
        _terminate([(pid, key)], grace=3.0)
        return "none", None
    return "ready", rec


def _status(run: Path, key: str, token: str, rec: dict[str, Any],
            keep_alive: float | None, *, touch: bool = True,
            timeout: float | None = None) -> dict[str, Any] | None:
    """The status of the daemon a ready record names, once it has proved itself; None if
    it does not (no socket where it should be, another process, silence, a wrong answer)."""
    sock = _recorded_socket(rec, run, key)
    if sock is None:
        return None
    kwargs = {} if timeout is None else {"timeout": timeout}
    try:
        status = _probe(sock, rec["pid"], token, touch=touch, keep_alive=keep_alive, **kwargs)
    except _ProbeError:
        return None
    if status.get("pid") != rec["pid"] or status.get("key") != key:
        return None
    return status


def _endpoint(rec: dict[str, Any], token: str) -> tuple[str, str]:
    return f"unix:{rec['socket']}", token


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
                if _status(run, key, token, rec, None) is None:
                    raise OpenWeightError(f"the keep-alive server for {rec.get('model')} did "
                                          f"not prove that it holds your token (log: {log}); "
                                          "`openweight stop` stops it")
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
    _socket_path(run, s.key)  # an unsafe socket directory is refused here, before a start
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


def _info(run: Path, key: str, rec: dict[str, Any], token: str) -> DaemonInfo:
    status: dict[str, Any] = {}
    if rec.get("state") == "ready":
        status = _status(run, key, token, rec, None, touch=False, timeout=2.0) or {}
    idle = status.get("idle_s")
    keep_alive = status.get("keep_alive_s", rec.get("keep_alive"))
    sock = rec.get("socket")
    return DaemonInfo(
        key=key, model=str(rec.get("model_name") or rec.get("model")),
        pid=rec["pid"], state=str(rec.get("state")),
        url=f"unix:{sock}" if sock else None, device=str(rec.get("device")),
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
    return [_info(run, path.stem, rec, token) for path, rec in records]


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
