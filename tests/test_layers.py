"""The shape of the code: imports point one way, files stay small.

Layers, lowest first: core (errors, types, options, settings, wire, harmony, tools) <-
backends (backends.py, local/, remote.py, store/) <- the Client <- entry points (server/,
daemon/, cli.py, the llm plugin). Imports inside functions count: a lazy import is still
a dependency at run time.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SDK = ROOT / "sdk"
ENTRY = ("openweight.client", "openweight.server", "openweight.daemon", "openweight.cli")
MAX_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SDK / "openweight").rglob("*.py"):
        parts = list(path.relative_to(SDK).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """The SDK modules ``name`` imports, anywhere in it (function-level imports too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if (
                node.level) else []
            target = ".".join(base + ([node.module] if node.module else []))
            found = [f"{target}.{a.name}" for a in node.names
                     if f"{target}.{a.name}" in modules]
            yield from found or [target]
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(name, path, modules) if m in modules and m != name}
            for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, if there is any (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (found := visit(dep)) is not None:
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_checks_see_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert "openweight.wire" in _graph()["openweight.server.app"]  # lazy imports are seen


def test_no_import_circle_among_the_sdk_modules() -> None:
    assert _cycle(_graph()) is None


def test_lower_layers_never_import_the_client_or_an_entry_point() -> None:
    wrong = {name: sorted(d for d in deps if d.startswith(ENTRY))
             for name, deps in _graph().items()
             if name != "openweight" and not name.startswith(ENTRY)}
    assert {k: v for k, v in wrong.items() if v} == {}


@pytest.mark.parametrize("entry", ["openweight.server", "openweight.daemon"])
def test_the_server_and_the_daemon_never_use_a_client(entry: str) -> None:
    """They serve engines: a Client there could forward to a keep-alive or remote server."""
    graph = _graph()
    users = {name for name, deps in graph.items()
             if name.startswith(entry) and {"openweight", "openweight.client"} & deps}
    assert users == set()


def _code_files() -> list[Path]:
    return [*(SDK / "openweight").rglob("*.py"), *(ROOT / "llm_openweight").rglob("*.py"),
            *(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "examples").rglob("*.py")]


def test_files_stay_small() -> None:
    files = [*(SDK / "openweight").rglob("*.py"), *(ROOT / "llm_openweight").rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_functions_stay_short() -> None:
    """No function over ~60 lines outside tests (the SDK, the plugin, benchmarks, examples)."""
    long = {}
    for path in _code_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert long == {}
