"""Think-tag reasoning (DeepSeek-R1, Qwen3): text inside <think>...</think> is reasoning."""

from __future__ import annotations

from typing import Any

from ..types import ToolCall
from .decode import IncrementalDecoder
from .parsers import Delta

__all__ = ["THINK_CLOSE", "THINK_OPEN", "ThinkParser", "think_token_ids"]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def think_token_ids(tokenizer: Any) -> tuple[int, int] | None:
    """Ids of <think> and </think> when the tokenizer has them as single tokens."""
    vocab = tokenizer.get_vocab()
    if THINK_OPEN in vocab and THINK_CLOSE in vocab:
        return int(vocab[THINK_OPEN]), int(vocab[THINK_CLOSE])
    return None


def starts_inside_think(prompt: str) -> bool:
    """True when the chat template already opened <think> (the output begins inside it)."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


class ThinkParser:
    """Splits decoded output at think tags, whether they arrive as one token or as pieces."""

    def __init__(self, tokenizer: Any, *, inside: bool) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        ids = think_token_ids(tokenizer)
        self._open_id, self._close_id = ids if ids is not None else (-1, -1)
        self._kind = "reasoning" if inside else "text"
        self._pending = ""
        self._section_start = True  # strip the newlines that follow a tag
        self.tool_calls: list[ToolCall] = []

    def _switch(self, kind: str) -> None:
        self._kind = kind
        self._section_start = True

    def _emit(self, piece: str) -> list[Delta]:
        if self._section_start:
            piece = piece.lstrip("\n")
            if not piece:
                return []
            self._section_start = False
        return [(self._kind, piece)]

    def _split(self, text: str, final: bool = False) -> list[Delta]:
        out: list[Delta] = []
        buf = self._pending + text
        while True:
            tag = THINK_CLOSE if self._kind == "reasoning" else THINK_OPEN
            at = buf.find(tag)
            if at < 0:
                break
            out += self._emit(buf[:at]) if at else []
            buf = buf[at + len(tag):]
            self._switch("text" if self._kind == "reasoning" else "reasoning")
        hold = 0
        if not final:
            for k in range(min(len(tag) - 1, len(buf)), 0, -1):
                if buf.endswith(tag[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold:] if hold else ""
        ready = buf[: len(buf) - hold]
        return out + (self._emit(ready) if ready else [])

    def feed(self, token: int) -> list[Delta]:
        if token in (self._open_id, self._close_id):
            out = self._split(self._decoder.flush(), final=True)
            self._switch("reasoning" if token == self._open_id else "text")
            return out
        return self._split(self._decoder.add(token))

    def flush(self) -> list[Delta]:
        return self._split(self._decoder.flush(), final=True)
