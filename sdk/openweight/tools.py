"""Tool definitions: OpenAI-style function specs, or plain Python functions."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .errors import InvalidRequestError

__all__ = ["tool_spec", "tool_specs"]


def tool_spec(tool: Callable[..., Any] | dict[str, Any]) -> dict[str, Any]:
    """A function spec for ``tool``. A Python function needs type hints and a docstring with
    an ``Args:`` section; transformers turns it into the JSON schema."""
    if not callable(tool):
        return tool
    from transformers.utils import get_json_schema

    try:
        spec: dict[str, Any] = get_json_schema(tool)
    except Exception as exc:
        name = getattr(tool, "__name__", repr(tool))
        raise InvalidRequestError(
            f"cannot describe the function {name} as a tool: {exc}. Give it type hints and a "
            "docstring with an 'Args:' section describing each argument"
        ) from exc
    return spec


def tool_specs(tools: Iterable[Callable[..., Any] | dict[str, Any]]) -> list[dict[str, Any]]:
    return [tool_spec(t) for t in tools]
