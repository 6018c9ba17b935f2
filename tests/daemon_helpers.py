"""Keep-alive daemons seen from outside, for tests: this store's daemon processes (from
/proc), waiting for a condition, and cleaning up every daemon a test may have started."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openweight.daemon import process as daemon_process
from openweight.daemon import stop_daemons

from conftest import wait_until


def daemon_pids(key: str | None = None) -> list[int]:
    """Running daemon processes of this test's store (for ``key``), found in /proc."""
    home = os.environ.get("OPENWEIGHT_HOME")
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"openweight.daemon" in argv and state != "Z" and (
                key is None or key.encode() in argv) and home_of(int(entry.name)) == home:
            pids.append(int(entry.name))
    return pids


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    return wait_until(check, timeout, poll=0.05, between=daemon_process._reap)


def home_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"OPENWEIGHT_HOME="):
            return item.split(b"=", 1)[1].decode()
    return None


def cleanup_daemons(home: Path) -> None:
    """Stop this store's daemons, then make sure none of its processes is left."""
    stop_daemons()
    for pid in daemon_pids():
        os.kill(pid, signal.SIGKILL)
    assert eventually(lambda: daemon_pids() == [], timeout=10)


def read_record(home: Path) -> dict[str, Any]:
    """The one daemon record in ``home``'s run directory."""
    [path] = (home / "run").glob("*.json")
    data: dict[str, Any] = json.loads(path.read_text())
    return data
