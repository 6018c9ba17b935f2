"""How generated tokens become answer text, reasoning and tool calls, per model family."""

from __future__ import annotations

from typing import Any, Protocol

from ..types import ToolCall
from .decode import IncrementalDecoder

__all__ = ["Delta", "OutputParser", "PlainParser"]

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
