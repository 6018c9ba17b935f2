"""httpx plumbing the remote backends share: which URLs are this machine, which answers
are event streams, what a failed exchange means, transports to a Unix socket, and
importing httpcore without trio."""

from __future__ import annotations

import importlib
import importlib.util
import ipaddress
import random
import socket
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from . import wire
from .errors import (
    AuthenticationError,
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    OpenWeightError,
    RemoteConnectionError,
    RemoteError,
    RemoteStatusError,
    RemoteTimeoutError,
    excerpt,
    redact_url,
)

__all__ = ["async_unix_transport", "import_httpcore", "is_loopback_host", "is_loopback_http",
           "is_sse", "retry_delay", "split_base_url", "status_error", "transport_error",
           "unix_transport"]


def split_base_url(base_url: str) -> tuple[str, str, str | None]:
    """``(shown, asked, socket)``: the base URL as errors show it, the one httpx asks (the
    API under /v1 if the path is empty, the usual mistake), and the Unix socket to connect
    to for ``unix:/path/to/socket`` (a keep-alive server), else None. The URL shown has no
    ``user:password@`` (httpx sends those as HTTP basic authentication)."""
    url = urlsplit(base_url.strip())
    if url.scheme == "unix" and url.path.startswith("/") and not url.netloc:
        return f"unix:{url.path}", "http://localhost/v1", url.path
    if url.scheme not in ("http", "https") or not url.netloc:
        raise InvalidRequestError(f"base_url {redact_url(base_url)!r} is not an http(s) URL; give "
                                  "something like http://localhost:8000/v1")
    if url.path in ("", "/"):
        base_url = base_url.strip().rstrip("/") + "/v1"
    asked = base_url.strip().rstrip("/")
    return redact_url(asked), asked, None


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1): this machine, never a proxy."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_http(base_url: str) -> bool:
    parts = urlsplit(base_url)
    return parts.scheme == "http" and is_loopback_host(parts.hostname or "")


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


def unix_transport(path: str) -> httpx.HTTPTransport:
    """A transport to a server on the Unix socket ``path``: plain HTTP, no proxy, no TLS.

    httpcore 1.0's sync backend leaves the socket of a failed connection (the server has
    just exited) to the garbage collector, a ResourceWarning; the pool here closes it.
    """
    import_httpcore()
    import httpcore

    transport = httpx.HTTPTransport(uds=path, verify=False, trust_env=False)
    backend = _closing_unix_backend()
    if backend is not None and isinstance(getattr(transport, "_pool", None),
                                          httpcore.ConnectionPool):
        transport._pool = httpcore.ConnectionPool(uds=path, network_backend=backend)
    return transport


def async_unix_transport(path: str) -> httpx.AsyncHTTPTransport:
    """The async twin of :func:`unix_transport` (anyio closes a failed socket itself)."""
    import_httpcore()
    return httpx.AsyncHTTPTransport(uds=path, verify=False, trust_env=False)


def _closing_unix_backend() -> Any:
    """httpcore's sync network backend, closing a Unix socket that fails to connect; None
    if httpcore has changed (then its own backend is used)."""
    try:
        import httpcore
        from httpcore._backends.sync import SyncStream
    except ImportError:
        return None

    class Backend(httpcore.SyncBackend):
        def connect_unix_socket(self, path: str, timeout: float | None = None,
                                socket_options: Any = None) -> httpcore.NetworkStream:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                for option in socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(timeout)
                sock.connect(path)
            except TimeoutError as exc:
                sock.close()
                raise httpcore.ConnectTimeout(str(exc)) from exc
            except OSError as exc:
                sock.close()
                raise httpcore.ConnectError(str(exc)) from exc
            return SyncStream(sock)

    return Backend()


def transport_error(exc: Exception, url: str, read_timeout: float | None) -> RemoteError:
    """What a failed exchange with ``url`` means, as the SDK's error."""
    if isinstance(exc, httpx.ConnectTimeout):
        return RemoteConnectionError(f"timed out connecting to {url}; check the address "
                                     "and that the server is running")
    if isinstance(exc, httpx.TimeoutException):
        return RemoteTimeoutError(f"{url} sent nothing for {read_timeout} s; the "
                                  "server may be overloaded; raise timeout= or retry")
    if isinstance(exc, httpx.ConnectError):
        return RemoteConnectionError(f"cannot connect to {url} ({excerpt(str(exc))}); is "
                                     "the server running? Start one with `openweight serve`")
    if isinstance(exc, (httpx.TransportError, httpx.StreamError)):
        return RemoteConnectionError(f"the connection to {url} broke "
                                     f"({excerpt(str(exc)) or type(exc).__name__});"
                                     " the server may have crashed or restarted")
    return RemoteError(f"talking to {url} failed: {excerpt(str(exc))}")


RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 30.0


def retry_delay(response: httpx.Response, attempt: int, max_retries: int,
                base_delay: float) -> float | None:
    """Seconds to wait before retrying this answer (its Retry-After, else a jittered
    exponential backoff), or None if it is final."""
    if response.status_code not in RETRY_STATUSES or attempt >= max_retries:
        return None
    after = response.headers.get("retry-after", "")
    try:
        return min(max(float(after), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        delay: float = base_delay * 2**attempt
        return min(delay * (0.75 + random.random() / 2), MAX_RETRY_AFTER)


INVALID_STATUSES = frozenset({400, 413, 422})


def _own_server_error(status: int, body: object) -> OpenWeightError | None:
    """An error of this user's keep-alive server as the error it stands for in-process:
    the same type, the same message, no internal address (None: not one it makes)."""
    err = body.get("error") if isinstance(body, Mapping) else None
    message = err.get("message") if isinstance(err, Mapping) else None
    if not isinstance(err, Mapping) or not isinstance(message, str):
        return None
    code, param = err.get("code"), err.get("param")
    if status in INVALID_STATUSES:
        return InvalidRequestError(message, param=param if isinstance(param, str) else None)
    if status == 404 and code == "model_not_found":
        return ModelNotFoundError(message)
    if code == "model_load_error":
        return ModelLoadError(message)
    if status == 500 and code is None and err.get("type") == "server_error":
        return GenerationError(message)
    return None


def status_error(status: int, body_text: str, url: object, base_url: str,
                 api_key: str | None, own_server: bool = False) -> OpenWeightError:
    """What an HTTP error answer means, as the SDK's error (the server's own message
    quoted, the API key never). ``own_server``: a keep-alive server, whose errors are
    raised as in this process (see ``_own_server_error``)."""
    try:
        body: object = wire.answer_json(body_text, "")
    except RemoteError:
        body = None
    if own_server:
        found = _own_server_error(status, body)
        if found is not None:
            return found
    message = wire.error_message(body, body_text) or f"HTTP {status}"
    if api_key:  # a server that echoes the key back
        message = message.replace(api_key, "***")
    err = body.get("error") if isinstance(body, Mapping) else None
    code = err.get("code") if isinstance(err, Mapping) else None
    where = f"{redact_url(url)} answered {status}: {message}"
    if status in (401, 403):
        return AuthenticationError(f"{where}; check the API key (api_key= or "
                                   "OPENWEIGHT_API_KEY)")
    if status == 404 and (code == "model_not_found" or "model" in message.lower()):
        return ModelNotFoundError(f"{where}; GET {base_url}/models lists the "
                                  "models it serves")
    if status in INVALID_STATUSES:
        return InvalidRequestError(where)
    hint = "; check base_url (it usually ends with /v1)" if status == 404 else ""
    return RemoteStatusError(where + hint, status_code=status, body=body_text)
