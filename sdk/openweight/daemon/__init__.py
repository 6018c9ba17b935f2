"""Keep-alive: one background server per user and model settings, holding the model loaded.

Every ``llm -m openweight`` call is a new process, and importing torch and loading the
weights costs seconds each time. With keep-alive the first call starts a server in the
background (``python -m openweight.daemon``: ``openweight serve``'s app on a Unix socket
in a private directory), later calls find it and talk to it through the remote backend,
and it exits after ``keep_alive`` seconds without a request (default 5 minutes).

Files, in ``run/`` under the store home (a directory only the user can open):

- ``token``: the per-user API key (mode 0600); every request to a daemon must carry it.
- ``KEY.json``: one record per daemon (pid, socket, state, model settings, keep-alive);
  the daemon exits when its record is removed or taken over.
- ``KEY.log``: the daemon's output.

The sockets live apart, in a short private directory (``$XDG_RUNTIME_DIR/openweight``,
else ``openweight-UID`` in the temp directory; 0700, refused unless it is the user's), as
Unix socket paths are short. A daemon proves itself before anything secret is sent to
it: the kernel says its socket is the recorded process of this user, and it answers a
fresh challenge with an HMAC of the token (see ``process._probe``).

``KEY`` is the model's name and a hash of its settings (model, device, dtype, quantize).
Finding and starting a daemon happen under a file lock per ``KEY``, so callers racing to
start one start exactly one. A record whose process is gone, is not this user's daemon,
or does not prove itself in time is replaced (and a process that is not provably this
user's daemon is left alone). Nothing here imports torch, transformers, httpx or FastAPI: only the
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
from .records import STATUS_PATH, SUPPORTED

__all__ = [
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
