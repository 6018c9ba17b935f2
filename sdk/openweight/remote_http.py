"""httpx plumbing the remote backends share: which URLs are this machine, which answers
are event streams, and importing httpcore without trio."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any
from urllib.parse import urlsplit

import httpx

__all__ = ["LOOPBACK_HOSTS", "import_httpcore", "is_loopback_http", "is_sse"]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback_http(base_url: str) -> bool:
    parts = urlsplit(base_url)
    return parts.scheme == "http" and (parts.hostname or "") in LOOPBACK_HOSTS


class _LazyTrio:
    """Stands for the ``trio`` module in httpcore until something uses it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("trio"), name)


def import_httpcore() -> None:
    """Import httpcore (httpx imports it at its first client) without importing trio.

    httpcore imports trio whenever it is installed, only to tell a trio event loop from
    asyncio's in its async locks: ~95 ms, a tenth of a warm ``llm -m openweight`` call.
    A process that has not imported trio yet is not in a trio loop, so httpcore is
    imported with trio hidden and then given a stand-in that imports trio on first use:
    an httpx client run later under trio still finds it. (Only ``httpcore.TrioBackend``,
    which nothing uses unless named, stays the stub httpcore keeps for a missing trio.)
    """
    if "httpcore" in sys.modules or "trio" in sys.modules:
        return
    sys.modules["trio"] = None  # type: ignore[assignment]  # then `import trio` fails
    sync: Any
    try:
        sync = importlib.import_module("httpcore._synchronization")
    except ImportError:  # httpcore moved: import it as it wants
        sync = None
    finally:
        if "trio" in sys.modules and sys.modules["trio"] is None:
            del sys.modules["trio"]
    if (sync is not None and getattr(sync, "trio", "") is None
            and importlib.util.find_spec("trio") is not None):
        setattr(sync, "trio", _LazyTrio())  # noqa: B010  (a module httpcore does not export)


def is_sse(response: httpx.Response) -> bool:
    return "text/event-stream" in response.headers.get("content-type", "")
