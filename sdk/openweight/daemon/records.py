"""Keep-alive's files: the run directory, the per-user token, one record per daemon,
and the locks around them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import OpenWeightError
from ..settings import (
    is_path,
)

SUPPORTED = os.name == "posix"  # detached sessions, signals and /proc-style process checks
HOST = "127.0.0.1"
STATUS_PATH = "/_openweight/keepalive"
TOKEN_FILE = "token"
START_TIMEOUT = 900.0  # a daemon may pull its model first
LOCK_TIMEOUT = 60.0
PROBE_TIMEOUT = 5.0
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
    from ..store.registry import home

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

    from ..store.registry import locked

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
    from ..store.registry import write_json_atomic

    write_json_atomic(path, data)  # a private temp file (0600) renamed over the record
