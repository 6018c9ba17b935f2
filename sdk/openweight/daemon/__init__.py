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

from .control import (
    DaemonInfo,
    ensure_daemon,
    find_daemon,
    list_daemons,
    start_daemon,
    stop_daemons,
)
from .keeper import KeepAliveApp
from .records import HOST, STATUS_PATH, SUPPORTED

__all__ = [
    "HOST",
    "STATUS_PATH",
    "SUPPORTED",
    "DaemonInfo",
    "KeepAliveApp",
    "ensure_daemon",
    "find_daemon",
    "list_daemons",
    "start_daemon",
    "stop_daemons",
]
