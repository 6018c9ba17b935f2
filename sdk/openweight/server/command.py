"""`openweight serve`'s command: bind, build the app, run uvicorn until Ctrl-C."""

import argparse
import os
import socket
import sys
from contextlib import suppress
from types import FrameType
from typing import Any

__all__ = ["add_serve_parser", "cmd_serve"]


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket: connections queue from here on, so the printed URL works at once."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = info[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock



def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..remote_http import is_loopback_host
    from .app import create_app
    from .limits import ServerLimits

    if os.environ.get("OPENWEIGHT_BASE_URL"):  # the server runs models itself: say so
        print("openweight: ignoring OPENWEIGHT_BASE_URL (the server runs models locally)",
              file=sys.stderr)
    api_key = args.api_key or os.environ.get("OPENWEIGHT_API_KEY") or None
    try:
        limits = ServerLimits(max_body_mb=args.max_body_mb, max_queue=args.max_queue,
                              request_timeout=args.request_timeout)
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    if args.responses_store < 0:
        print(f"Error: --responses-store {args.responses_store} must be 0 (stateless) or a "
              "number of responses to keep", file=sys.stderr)
        return 2
    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        print(f"Error: cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
              "choose another --port or --host", file=sys.stderr)
        return 1
    try:
        print(f"openweight: loading {args.model or 'the default model'}...", file=sys.stderr,
              flush=True)
        app = create_app(args.model, api_key=api_key, device=args.device, dtype=args.dtype,
                         quantize=args.quantize, limits=limits,
                         allowed_hosts=args.allowed_host or (), allow_pull=args.allow_pull,
                         allow_image_urls=args.allow_image_urls,
                         responses_store=args.responses_store)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"openweight: serving {app.state.pool.name} at http://{shown}:{port}/v1 "
              f"({'API key required' if api_key else 'no API key'}; Ctrl-C to stop)", flush=True)
        if not api_key and not is_loopback_host(args.host):
            print(f"openweight: warning: listening on {args.host} without --api-key; anyone who "
                  "can reach this machine can use it", file=sys.stderr, flush=True)

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                app.state.stopping.set()  # end streams now rather than wait for them
                super().handle_exit(sig, frame)

        config = uvicorn.Config(app, log_level="warning", ws="none", lifespan="on",
                                timeout_graceful_shutdown=5)
        with suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
            Server(config).run(sockets=[sock])
    finally:
        sock.close()
    print("openweight: server stopped", file=sys.stderr)
    return 0


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``openweight`` command's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve local models over the OpenAI API (/v1/chat/completions, "
                    "/v1/completions, /v1/models, /health). Requests may name any installed "
                    "model; --model is the one loaded at start and used when none is named.")
    p.add_argument("--model", "-m", metavar="NAME_OR_PATH",
                   help="model name or directory (default: the default model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks one)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 (default: "
                        "$OPENWEIGHT_API_KEY, else none)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", help="auto, bfloat16, float16 or float32 (default: auto)")
    p.add_argument("--quantize", help="auto, none, int8 or int4 weight-only quantisation of "
                   "the Linear layers (default: auto, see docs/performance.md)")
    _add_limit_flags(p)
    p.set_defaults(func=cmd_serve)
    return p


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    """What the server accepts: hosts, model names, body size, queue, deadline."""
    from .limits import DEFAULT_MAX_BODY_MB, DEFAULT_MAX_QUEUE

    p.add_argument("--allowed-host", action="append", metavar="NAME[:PORT]",
                   help="without --api-key, answer requests whose Host header is NAME too "
                        "(repeatable; '*' for any; default: only the address listened on, "
                        "and localhost names on loopback)")
    p.add_argument("--allow-pull", action="store_true",
                   help="let a request name a catalog model that is not installed (it is "
                        "pulled); default: only --model and installed models are served")
    p.add_argument("--allow-image-urls", action="store_true",
                   help="let image_url parts be http(s) URLs, which the server fetches (at "
                        "most 20 MB, 15 s each); default: data URLs only")
    p.add_argument("--responses-store", type=int, default=0, metavar="N",
                   help="keep the last N responses of /v1/responses in memory, so that "
                        "previous_response_id can continue them (least recently used out; "
                        "default: 0, stateless)")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, metavar="MB",
                   help=f"largest request body; larger gets 413 (default: "
                        f"{DEFAULT_MAX_BODY_MB:g})")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                   help=f"generation requests running or waiting at once; more get 429 with "
                        f"Retry-After (default: {DEFAULT_MAX_QUEUE})")
    p.add_argument("--request-timeout", type=float, metavar="SECONDS",
                   help="stop a generation after this long; the client gets 504 "
                        "(request_timeout) or a stream's error event (default: no deadline)")
