"""The store's home and its on-disk registry (one JSON file, replaced atomically)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import OpenWeightError

__all__ = [
    "LOCK_TIMEOUT_ENV",
    "StoreLockTimeout",
    "home",
    "lock_timeout",
    "locked",
    "private_dir",
    "read_registry",
    "update_registry",
    "write_json_atomic",
]

REGISTRY_FILE = "registry.json"
LOCK_TIMEOUT_ENV = "OPENWEIGHT_LOCK_TIMEOUT"
REGISTRY_WAIT = 60.0  # registry writes take milliseconds
MODEL_WAIT = 1800.0  # another process may be downloading the same model
_LOCK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreLockTimeout(OpenWeightError, TimeoutError):
    """Another process held a store lock for longer than this one would wait."""


def home() -> Path:
    """``OPENWEIGHT_HOME``, else the platform's user cache dir (e.g. ~/.cache/openweight)."""
    env = os.environ.get("OPENWEIGHT_HOME")
    if env:
        return Path(env).expanduser().absolute()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("openweight", appauthor=False))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temp file beside ``path``, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _empty() -> dict[str, Any]:
    return {"version": 1, "default": None, "models": {}}


def read_registry() -> dict[str, Any]:
    """The registry as a dict; an absent file is an empty registry."""
    path = home() / REGISTRY_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _empty()
    except (OSError, ValueError) as exc:
        raise OpenWeightError(f"the model registry {path} is unreadable ({exc}); move it away "
                              "and pull your models again") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise OpenWeightError(f"the model registry {path} is not in the expected format; move "
                              "it away and pull your models again")
    return data


def private_dir(path: Path, purpose: str) -> Path:
    """``path`` as a directory only its user can enter: created 0700, narrowed to 0700 if
    it is ours and wider, and refused if it is not a directory owned by this user (another
    user could hold our locks there and make us wait)."""
    with contextlib.suppress(FileExistsError):  # a file there: refused below
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    foreign = hasattr(os, "getuid") and st.st_uid != os.getuid()
    if not stat.S_ISDIR(st.st_mode) or foreign:
        raise OpenWeightError(f"{path} is not a directory owned by you; the store keeps its "
                              f"{purpose} there: remove it, or set OPENWEIGHT_HOME to a store "
                              "of your own")
    if os.name != "nt" and stat.S_IMODE(st.st_mode) != 0o700:
        path.chmod(0o700)
    return path


def lock_timeout(default: float) -> float:
    """Seconds to wait for a store lock: ``OPENWEIGHT_LOCK_TIMEOUT`` if set, else ``default``."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise OpenWeightError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds; "
                              "set it to, say, 60, or unset it")
    return seconds


@contextlib.contextmanager
def locked(name: str, timeout: float | None = None) -> Iterator[None]:
    """An inter-process lock in the store's private ``locks/`` (``registry`` guards the
    registry file, ``model-NAME`` one model). Waits ``timeout`` seconds at most (None: a
    minute for the registry, half an hour for a model, or ``OPENWEIGHT_LOCK_TIMEOUT``),
    then raises ``StoreLockTimeout`` naming the process that holds it."""
    from filelock import FileLock, Timeout

    if not _LOCK_NAME.match(name):
        raise OpenWeightError(f"{name!r} cannot name a store lock")
    if timeout is None:
        timeout = lock_timeout(REGISTRY_WAIT if name == "registry" else MODEL_WAIT)
    lock_dir = private_dir(home() / "locks", "its locks")
    holder = lock_dir / f"{name}.holder"
    try:
        lock = FileLock(str(lock_dir / f"{name}.lock"), timeout=timeout)
        lock.acquire()
    except Timeout as exc:
        raise StoreLockTimeout(_busy(name, holder, timeout)) from exc
    try:
        _write_holder(holder)
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def _write_holder(holder: Path) -> None:
    """Who holds a lock, for the error a process that waits too long gets."""
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
    with contextlib.suppress(OSError):  # only the error message would be poorer
        holder.write_text(json.dumps({"pid": os.getpid(), "command": command[:200],
                                      "since": time.time()}), encoding="utf-8")


def _busy(name: str, holder: Path, waited: float) -> str:
    try:
        info = json.loads(holder.read_text(encoding="utf-8"))
        who = (f"process {int(info['pid'])} ({str(info.get('command', ''))[:200]!r}, "
               f"holding it for {time.time() - float(info['since']):.0f} s)")
    except (OSError, ValueError, KeyError, TypeError):
        who = "another process"
    what = "the model registry" if name == "registry" else f"the store lock {name!r}"
    return (f"{what} is held by {who}; waited {waited:.0f} s. Wait for that process to "
            f"finish (a pull of a large model takes a while) or stop it, then try again; "
            f"{LOCK_TIMEOUT_ENV} sets how long to wait")


@contextlib.contextmanager
def update_registry() -> Iterator[dict[str, Any]]:
    """Read, let the caller change, and atomically write back the registry, under its lock."""
    with locked("registry"):
        data = read_registry()
        yield data
        write_json_atomic(home() / REGISTRY_FILE, data)
