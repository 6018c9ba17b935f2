"""Keep-alive's files: the run directory, the per-user token, one record per daemon,
and the locks around them."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import OpenWeightError
from ..settings import (
    is_path,
)

SUPPORTED = os.name == "posix"  # detached sessions, signals, Unix sockets
STATUS_PATH = "/_openweight/keepalive"
TOKEN_FILE = "token"
START_TIMEOUT = 900.0  # a daemon may pull its model first
LOCK_TIMEOUT = 60.0
PROBE_TIMEOUT = 5.0  # a daemon that does not prove itself within this is stale
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 104 (macOS) or 108 (Linux) bytes
STOP_GRACE = 10.0
POLL = 0.05

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
        from ..store import default_model

        model = default_model()
    return _Settings(model, (device or "auto").lower(), (dtype or "auto").lower(),
                     (quantize or "auto").lower(), str(run))


def _run_dir() -> Path:
    """``run/`` in the store home: created 0700, and refused if another user owns it."""
    from ..store.registry import home, private_dir

    return private_dir(home() / "run", "keep-alive's keys and records")


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """A keep-alive lock in the store's ``locks/``: waits ``LOCK_TIMEOUT`` seconds at most,
    then raises ``StoreLockTimeout`` naming the process that holds it."""
    from ..store.registry import locked

    with locked(name, timeout=LOCK_TIMEOUT):
        yield


def _safe_token(path: Path) -> str | None:
    """The token in ``path`` if it is a regular file of this user's that only they can read
    (written whole by ``os.replace``, so it is never seen half-written); else None."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()
            and not st.st_mode & 0o077):
        return None
    token = path.read_text(encoding="ascii").strip()
    return token if len(token) >= 32 else None


def _token(run: Path) -> str:
    """The per-user API key: made once, readable by the user only; unsafe ones are replaced.
    Reading a good one takes no lock (every warm call reads it); making one does."""
    path = run / TOKEN_FILE
    token = _safe_token(path)
    if token is not None:
        return token
    with _locked("daemon-token"):
        token = _safe_token(path)
        if token is not None:  # made by a racing caller
            return token
        path.unlink(missing_ok=True)  # daemons started with it no longer answer to it
        token = secrets.token_urlsafe(32)
        tmp = run / f".{TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(token + "\n")
        os.replace(tmp, path)
        return token


def _proof(token: str, challenge: str) -> str:
    """What a daemon answers a challenge with: it holds ``token`` (the token stays secret)."""
    return hmac.new(token.encode(), b"openweight-keepalive-proof\0" + challenge.encode(),
                    hashlib.sha256).hexdigest()


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
    from ..store.registry import write_json_atomic

    write_json_atomic(path, data)  # a private temp file (0600) renamed over the record


# -- the socket --------------------------------------------------------------------------------

def _private_dir(path: Path) -> bool:
    """Is ``path`` a real directory (no symlink) owned by this user with mode 0700, in a
    parent nobody else can rename it out of?"""
    try:
        st = path.lstat()
        parent = path.parent.lstat()
    except OSError:
        return False
    parent_safe = parent.st_uid in (0, os.getuid()) and (
        not parent.st_mode & 0o022 or bool(parent.st_mode & stat.S_ISVTX))
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
            and stat.S_IMODE(st.st_mode) == 0o700 and parent_safe)


def _socket_dirs() -> list[Path]:
    """Where daemons' sockets may live: short paths (the AF_UNIX limit), private to the
    user: $XDG_RUNTIME_DIR/openweight, else openweight-UID in the temp directory."""
    dirs = []
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        dirs.append(Path(runtime) / "openweight")
    name = f"openweight-{os.getuid()}"
    dirs += [Path(tempfile.gettempdir()) / name, Path("/tmp") / name]
    return dirs


def _socket_name(run: Path, key: str) -> str:
    return hashlib.sha256(f"{run}\0{key}".encode()).hexdigest()[:24] + ".sock"


def _socket_path(run: Path, key: str) -> Path:
    """The socket the daemon for ``key`` listens on, in a private 0700 directory (created
    here); a directory that is not ours with mode 0700 is refused, never used."""
    name = _socket_name(run, key)
    for folder in _socket_dirs():
        if len(os.fsencode(folder / name)) > MAX_SOCKET_PATH:
            continue
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
            folder.chmod(0o700)  # ours, just made: whatever the umask
        if not _private_dir(folder):
            raise OpenWeightError(f"{folder} is not a directory only you can open (yours, "
                                  "mode 0700); keep-alive servers listen there: remove it "
                                  "(or `chmod 700` it if it is yours), or turn keep-alive "
                                  "off with OPENWEIGHT_KEEP_ALIVE=0")
        return folder / name
    raise OpenWeightError("no directory with a path short enough for a Unix socket; set "
                          "XDG_RUNTIME_DIR to a short private directory, or turn keep-alive "
                          "off with OPENWEIGHT_KEEP_ALIVE=0")


def _recorded_socket(rec: dict[str, Any], run: Path, key: str) -> Path | None:
    """The socket a record names, if it is where the daemon for ``key`` would listen (its
    name) in a private directory; None otherwise (an old or tampered record: stale)."""
    value = rec.get("socket")
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    if (not path.is_absolute() or path.name != _socket_name(run, key)
            or not _private_dir(path.parent)):
        return None
    return path
