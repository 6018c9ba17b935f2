"""`llm openweight ...`: thin wrappers over the `openweight` console command.

Each subcommand hands its arguments, unparsed, to ``openweight.cli.main`` so
output, errors and exit codes are the same as ``openweight SUBCOMMAND ...``.
Only ``remote`` is the plugin's own: it sets the server llm's openweight models
use by default.
"""

from __future__ import annotations

import os
from typing import Any

import click

__all__ = ["PASSTHROUGH", "register"]

PASSTHROUGH = {
    "models": "List installed and catalog models",
    "pull": "Install a model: catalog name, hub ORG/NAME, model directory or .gguf file",
    "rm": "Remove installed models",
    "default": ("Show or set the default model (what `llm -m openweight` uses; for an "
                "embedding model, what `llm embed -m openweight-embed` uses)"),
    "info": "Show what is known about a model",
    "ps": "List the models kept loaded in the background (keep-alive)",
    "stop": "Stop keep-alive servers: all, or those serving a model",
}


def _passthrough(name: str, help_text: str) -> click.Command:
    @click.command(
        name=name,
        help=f"{help_text}. Same as `openweight {name}`: see `llm openweight {name} -h`.",
        short_help=help_text,
        add_help_option=False,  # -h/--help go to the openweight parser
        context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.pass_context
    def command(ctx: click.Context, args: tuple[str, ...]) -> None:
        from openweight.cli import main

        try:
            code: Any = main([name, *args])
        except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
            code = exc.code
        if isinstance(code, str):  # SystemExit("message") prints it and exits 1
            click.echo(code, err=True)
            code = 1
        ctx.exit(code or 0)

    return command


def register(cli: click.Group) -> None:
    """Add the ``openweight`` command group to llm's CLI."""

    @cli.group(name="openweight")
    def openweight_group() -> None:
        "Open-weight models on this machine (or a server): the openweight SDK"

    for name, help_text in PASSTHROUGH.items():
        openweight_group.add_command(_passthrough(name, help_text))

    @openweight_group.command(name="remote")
    @click.argument("url", required=False)
    @click.option("--off", is_flag=True, help="Forget the remote: run models on this machine")
    def remote(url: str | None, off: bool) -> None:
        """Show or set the OpenAI-compatible server openweight models run on.

        \b
        llm openweight remote http://HOST:8000/v1   use that server by default
        llm openweight remote --off                 run on this machine again
        llm openweight remote                       show the current setting

        The server's API key, if it needs one: `llm keys set openweight` or
        OPENWEIGHT_API_KEY. `-o remote URL` overrides this for one prompt.
        """
        from .config import CONFIG_FILE, read_config, write_config
        from .options import check_url

        if url and off:
            raise click.UsageError("give a URL or --off, not both")
        config = read_config()
        if off:
            config.pop("remote", None)
            write_config(config)
            click.echo("openweight models now run on this machine")
        elif url:
            try:
                config["remote"] = check_url(url)
            except ValueError as exc:
                raise click.ClickException(str(exc)) from exc
            write_config(config)
            click.echo(f"openweight models now run on {config['remote']}")
        else:
            where = config.get("remote")
            click.echo(where or "local: openweight models run on this machine")
        env = os.environ.get("OPENWEIGHT_BASE_URL")
        if env:
            click.echo(f"(OPENWEIGHT_BASE_URL is set: {env} is used instead)", err=True)
        if url or off:
            click.echo(f"(saved in {CONFIG_FILE} in llm's user directory)", err=True)
