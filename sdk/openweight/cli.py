"""The `openweight` console command (the llm plugin's `llm openweight ...` wraps it)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import OpenWeightError

__all__ = ["build_parser", "main"]


def _size(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1000  # type: ignore[assignment]
    return str(n)


def cmd_models(args: argparse.Namespace) -> int:
    from .store import list_models

    models = list_models()
    if args.json:
        print(json.dumps([m.__dict__ for m in models], indent=2))
        return 0
    rows = [("NAME", "KIND", "INSTALLED", "SIZE", "FAMILY", "SOURCE")]
    for m in models:
        rows.append((m.name + (" (default)" if m.default else ""), m.kind,
                     "yes" if m.installed else "no", _size(m.size_bytes), m.family or "-",
                     m.source or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .store import pull

    info = pull(args.source, name=args.name, progress=not args.quiet)
    print(f"{info.name} installed at {info.path} ({_size(info.size_bytes)})")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .store import remove_model

    for name in args.names:
        remove_model(name)
        print(f"removed {name}")
    return 0


def cmd_default(args: argparse.Namespace) -> int:
    from .store import default_embedding_model, default_model, set_default

    if args.name:
        set_default(args.name)  # an embedding model becomes the embedding default
        print(args.name)
    else:
        print(default_embedding_model() if args.embedding else default_model())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .store import default_model, model_info

    print(json.dumps(model_info(args.name or default_model()), indent=2, sort_keys=True))
    return 0


def _ago(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def cmd_ps(args: argparse.Namespace) -> int:
    import math

    from .daemon import list_daemons

    daemons = list_daemons()
    if args.json:
        print(json.dumps([d.as_dict() for d in daemons], indent=2))
        return 0
    rows = [("MODEL", "PID", "ADDRESS", "DEVICE", "MEMORY", "IDLE", "STOPS IN")]
    for d in daemons:
        if d.state != "ready":
            idle, until = d.state, "-"
        elif d.in_flight:
            idle, until = "busy", "-"
        else:
            idle = _ago(d.idle_seconds) if d.idle_seconds is not None else "-"
            until = ("never" if math.isinf(d.keep_alive)
                     else _ago(d.expires_in) if d.expires_in is not None else "-")
        where = d.url.removeprefix("http://").removesuffix("/v1") if d.url else "-"
        settings = d.loaded or {"device": d.device, "dtype": d.dtype, "quantize": d.quantize}
        device = "/".join(v for v in (settings.get(k, "auto") for k in
                                      ("device", "dtype", "quantize")) if v not in ("auto", "none"))
        rows.append((d.model, str(d.pid), where, device or "auto", _size(d.rss_bytes), idle,
                     until))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from .daemon import list_daemons, stop_daemons

    names = sorted({d.model for d in list_daemons()})
    count = stop_daemons(args.name)
    if count:
        shown = args.name or ", ".join(names)
        print(f"stopped {count} keep-alive server{'s' if count > 1 else ''} ({shown})")
    else:
        print("no keep-alive server is running" + (f" for {args.name}" if args.name else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openweight", description="Open-weight language models on your own hardware.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list installed and catalog models")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("pull", help="install a model: catalog name, hub ORG/NAME, dir or .gguf")
    p.add_argument("source", help="catalog name, hub repo id, or a model directory or .gguf "
                   "file written as a path (./DIR, /DIR, ~/DIR)")
    p.add_argument("--name", help="the name to install it under")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("rm", help="remove installed models")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("default", help="show or set the default model (an embedding model "
                       "named here becomes the default for embeddings)")
    p.add_argument("name", nargs="?", help="the model to make the default")
    p.add_argument("--embedding", action="store_true",
                   help="show the default embedding model instead")
    p.set_defaults(func=cmd_default)

    p = sub.add_parser("info", help="show what is known about a model")
    p.add_argument("name", nargs="?", help="model name, or a model directory written as a "
                   "path (./DIR); default: the default model")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("ps", help="list the models kept loaded in the background (keep-alive)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("stop", help="stop keep-alive servers: all, or those serving NAME")
    p.add_argument("name", nargs="?", help="model name or directory (default: all)")
    p.set_defaults(func=cmd_stop)

    try:
        from .server import add_serve_parser
    except ImportError:  # pragma: no cover - the server module is optional at import time
        pass
    else:
        add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; user mistakes print one line on stderr and exit 1."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except OpenWeightError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
