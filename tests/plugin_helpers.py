"""The llm CLI with the plugin registered, for tests: run a command, check llm's clean
error, read the logs database, and spy on how the plugin builds its Client."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from llm.plugins import load_plugins, pm

import llm_openweight
import openweight

# llm loads entry points unless sys._called_from_test is set; make sure the plugin is in
# either way, and that its commands were added to the CLI.
load_plugins()
if not pm.is_registered(llm_openweight):
    pm.register(llm_openweight, name="openweight")
from llm.cli import cli  # noqa: E402  (after the plugin is registered)

if "openweight" not in cli.commands:
    llm_openweight.register_commands(cli=cli)

TINY = "openweight/tiny"
GREEDY = ["-o", "temperature", "0", "-o", "max_tokens", "6"]


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=True)


def assert_error(result: Result, *needles: str) -> None:
    """llm's clean error: exit code 1, ``Error: ...``, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Error:" in result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output


def logged(user: Path) -> list[dict[str, Any]]:
    """Every logged response in ``user``'s logs database, oldest first."""
    if not (user / "logs.db").exists():
        return []
    result = run("logs", "-n", "0", "--json")
    assert result.exit_code == 0, result.output
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return sorted(rows, key=lambda r: r["id"])


class Spy:
    """Wraps openweight.Client to record how the plugin builds it and what it sends."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inits: list[dict[str, Any]] = []
        self.calls: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []
        spy = self

        class SpyClient(openweight.Client):
            def __init__(self, model: str | None = None, **kwargs: Any) -> None:
                spy.inits.append({"model": model, **kwargs})
                super().__init__(model, **kwargs)

            def stream(self, messages: Any, **options: Any) -> openweight.Stream:
                spy.calls.append((list(messages), options))
                return super().stream(messages, **options)

        monkeypatch.setattr(openweight, "Client", SpyClient)
