"""`python -m openweight.daemon`: a keep-alive server (started by ensure_daemon, not by
hand): the server's app on a Unix socket in a private directory, its record kept up to
date, an idle timeout."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import OpenWeightError
from ..settings import (
    DEFAULT_KEEP_ALIVE,
    keep_alive_from_json,
)
from .keeper import (
    KeepAliveApp,
)
from .records import (
    _locked,
    _read_record,
    _record_path,
    _run_dir,
    _socket_path,
    _write_record,
)

DAEMON_MAX_BODY_MB = 256.0  # 8 images of 20 MB, base64-encoded, and the rest of a request


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
    where: tuple[Path, int] | None = None
    failed = False  # a failed record stays for the caller to read (and remove)
    try:
        sock, where = _listen(_socket_path(run, key))  # connections queue from here
        if not _set(run, key, state="loading", socket=str(where[0])):
            return 0
        try:
            from ..server import create_app
            from ..server.limits import ServerLimits

            # one user's calls come one at a time: the single-stream path is faster for
            # one stream and reuses a whole conversation's KV cache (`llm chat`);
            # OPENWEIGHT_BATCH=1 batches concurrent calls instead
            batch = os.environ.get("OPENWEIGHT_BATCH", "0").strip().lower() in (
                "1", "true", "yes", "on")
            # the user's own requests: images by URL, and bodies as large as the SDK's
            # own limits allow (8 images of 20 MB as data URLs), as in this process
            app = create_app(args.model, api_key=token, device=_arg(args.device),
                             dtype=_arg(args.dtype), quantize=_arg(args.quantize),
                             batching=batch, allow_image_urls=True,
                             limits=ServerLimits(max_body_mb=DAEMON_MAX_BODY_MB))
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
        if where is not None:
            _unlink_own(*where)


def _listen(path: Path) -> tuple[socket.socket, tuple[Path, int]]:
    """A Unix socket listening at ``path`` (in the private socket directory), mode 0600;
    with the inode it got, so that only this daemon's socket is removed at exit."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a daemon of these settings that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        path.chmod(0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock, (path, path.lstat().st_ino)


def _unlink_own(path: Path, inode: int) -> None:
    with contextlib.suppress(OSError):
        if path.lstat().st_ino == inode:  # not a later daemon's socket at the same path
            path.unlink()


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
    ttl = "until stopped" if math.isinf(keeper.keep_alive) else f"{keeper.keep_alive:g} s idle"
    print(f"openweight: keep-alive server for {name} at unix:{sock.getsockname()} "
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
