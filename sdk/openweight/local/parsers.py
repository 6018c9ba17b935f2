"""How generated tokens become answer text, reasoning and tool calls, per model family."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

from ..types import ToolCall
from .decode import IncrementalDecoder

__all__ = [
    "Delta",
    "JsonCallParser",
    "OutputParser",
    "PlainParser",
    "make_tool_call",
    "tool_call_id",
]

Delta = tuple[str, str]  # ("text" | "reasoning", piece)


class OutputParser(Protocol):
    tool_calls: list[ToolCall]

    def feed(self, token: int) -> list[Delta]: ...

    def flush(self) -> list[Delta]: ...


class PlainParser:
    """Every generated token is answer text."""

    def __init__(self, tokenizer: Any) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self.tool_calls: list[ToolCall] = []

    def feed(self, token: int) -> list[Delta]:
        piece = self._decoder.add(token)
        return [("text", piece)] if piece else []

    def flush(self) -> list[Delta]:
        piece = self._decoder.flush()
        return [("text", piece)] if piece else []


class JsonCallParser:
    """Llama 3.x style tool calls: the whole answer is a JSON call (``{"name": ...,
    "parameters": {...}}``, maybe after ``<|python_tag|>``; several are joined by ``;``).

    Text that starts like JSON is held back until the end; if it is not a valid call it
    comes back as text."""

    def __init__(self, tokenizer: Any) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self._mode = "undecided"  # then "call" (holding back) or "text" (streaming)
        self._held: list[str] = []
        self.tool_calls: list[ToolCall] = []

    def feed(self, token: int) -> list[Delta]:
        piece = self._decoder.add(token)
        if self._mode == "text":
            return [("text", piece)] if piece else []
        self._held.append(piece)
        start = "".join(self._held).lstrip()
        if self._mode == "call" or not start:
            return []
        if start[0] == "{":
            self._mode = "call"
            return []
        self._mode, self._held = "text", []
        return [("text", start)]

    def flush(self) -> list[Delta]:
        rest = "".join(self._held) + self._decoder.flush()
        self._held = []
        if self._mode == "text":
            return [("text", rest)] if rest else []
        calls: list[ToolCall] = []
        for part in rest.strip().split(";"):
            call = make_tool_call(len(calls), part.strip())
            if call is None:  # not a call after all: the model's words, as text
                return [("text", rest.strip())] if rest.strip() else []
            calls.append(call)
        self.tool_calls.extend(calls)
        return []


def tool_call_id(index: int, name: str, arguments: str) -> str:
    """A stable id: the same call in the same place always gets the same id."""
    digest = hashlib.sha256(f"{index}:{name}:{arguments}".encode()).hexdigest()[:16]
    return f"call_{digest}"


def make_tool_call(index: int, raw: str, name: str | None = None) -> ToolCall | None:
    """A ToolCall from a JSON call (``{"name": ..., "arguments"|"parameters": {...}}``, or just
    the arguments when ``name`` is known); None when it is not a valid call."""
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if name is None:
        name = data.get("name")
        data = data.get("arguments", data.get("parameters", {}))
        if isinstance(data, str):  # some models double-encode the arguments
            try:
                data = json.loads(data)
            except ValueError:
                return None
    if not isinstance(name, str) or not name or not isinstance(data, dict):
        return None
    return ToolCall(id=tool_call_id(index, name, raw), name=name, arguments=data)
