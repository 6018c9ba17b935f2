"""The store's home and its on-disk registry (one JSON file, replaced atomically)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import OpenWeightError

__all__ = ["home", "locked", "read_registry", "update_registry", "write_json_atomic"]

REGISTRY_FILE = "registry.json"


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


@contextmanager
def locked(name: str, timeout: float = -1) -> Iterator[None]:
    """An inter-process lock in the store (``registry`` guards the registry file)."""
    from filelock import FileLock

    lock_dir = home() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f"{name}.lock"), timeout=timeout):
        yield


@contextmanager
def update_registry() -> Iterator[dict[str, Any]]:
    """Read, let the caller change, and atomically write back the registry, under its lock."""
    with locked("registry"):
        data = read_registry()
        yield data
        write_json_atomic(home() / REGISTRY_FILE, data)
