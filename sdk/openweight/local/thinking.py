"""Tag-delimited output: <think>...</think> is reasoning (DeepSeek-R1, Qwen3) and
<tool_call>{...}</tool_call> is a tool call (Qwen, Hermes-style templates)."""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

from ..types import ToolCall
from .decode import IncrementalDecoder
from .parsers import Delta, make_tool_call

__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "THINK_CLOSE",
    "THINK_OPEN",
    "ThinkParser",
    "starts_inside_think",
    "think_token_ids",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CLOSE_OF = {THINK_OPEN: THINK_CLOSE, CALL_OPEN: CALL_CLOSE}
_KIND_OF = {THINK_OPEN: "reasoning", CALL_OPEN: "call"}


_TAG_IDS: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()


def tag_ids(tokenizer: Any) -> dict[str, int]:
    """The ids of the tags the tokenizer has as single tokens, by tag. Looked up once per
    tokenizer: ``get_vocab`` builds a dict of the whole vocabulary (~20 ms for 49k tokens),
    and every request asks."""
    try:
        return _TAG_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = tokenizer.get_vocab()
    ids = {tag: int(vocab[tag]) for tag in (THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE)
           if tag in vocab}
    with contextlib.suppress(TypeError):  # a tokenizer that cannot be weakly referenced
        _TAG_IDS[tokenizer] = ids
    return ids


def think_token_ids(tokenizer: Any) -> tuple[int, int] | None:
    """Ids of <think> and </think> when the tokenizer has them as single tokens."""
    ids = tag_ids(tokenizer)
    if THINK_OPEN in ids and THINK_CLOSE in ids:
        return ids[THINK_OPEN], ids[THINK_CLOSE]
    return None


def starts_inside_think(prompt: str) -> bool:
    """True when the chat template already opened <think> (the output begins inside it)."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


class ThinkParser:
    """Splits decoded output at tags, whether a tag arrives as one token or in pieces."""

    def __init__(self, tokenizer: Any, *, inside: bool, tool_calls: bool = False) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self._opens = [THINK_OPEN] + ([CALL_OPEN] if tool_calls else [])
        ids = tag_ids(tokenizer)
        self._tag_ids = {ids[t]: t for t in (*self._opens, *map(_CLOSE_OF.get, self._opens))
                         if t is not None and t in ids}
        self._open: str | None = THINK_OPEN if inside else None  # the tag we are inside
        self._pending = ""
        self._section_start = True  # strip the newlines that follow a tag
        self._call: list[str] = []
        self.tool_calls: list[ToolCall] = []

    @property
    def _kind(self) -> str:
        return _KIND_OF[self._open] if self._open else "text"

    def _enter(self, tag: str) -> list[Delta]:
        """Cross a tag: open a section, or close the one we are in."""
        out: list[Delta] = []
        if self._open == CALL_OPEN:
            raw = "".join(self._call).strip()
            call = make_tool_call(len(self.tool_calls), raw)
            if call is not None:
                self.tool_calls.append(call)
            else:  # not a valid call: the model's words are returned as text
                out.append(("text", raw))
            self._call = []
        self._open = None if tag in _CLOSE_OF.values() else tag
        self._section_start = True
        return out

    def _emit(self, piece: str) -> list[Delta]:
        if self._section_start:
            piece = piece.lstrip("\n")
            if not piece:
                return []
            self._section_start = False
        if self._open == CALL_OPEN:
            self._call.append(piece)
            return []
        return [(self._kind, piece)]

    def _wanted(self) -> list[str]:
        return [_CLOSE_OF[self._open]] if self._open else self._opens

    def _split(self, text: str, final: bool = False) -> list[Delta]:
        out: list[Delta] = []
        buf = self._pending + text
        while True:
            hits = [(buf.find(t), t) for t in self._wanted() if t in buf]
            if not hits:
                break
            at, tag = min(hits)
            out += self._emit(buf[:at]) if at else []
            buf = buf[at + len(tag):]
            out += self._enter(tag)
        hold = 0
        if not final:
            for tag in self._wanted():
                for k in range(min(len(tag) - 1, len(buf)), hold, -1):
                    if buf.endswith(tag[:k]):
                        hold = k
                        break
        self._pending = buf[len(buf) - hold:] if hold else ""
        ready = buf[: len(buf) - hold]
        return out + (self._emit(ready) if ready else [])

    def feed(self, token: int) -> list[Delta]:
        tag = self._tag_ids.get(token)
        if tag is not None and tag in self._wanted():
            out = self._split(self._decoder.flush(), final=True)
            return out + self._enter(tag)
        return self._split(self._decoder.add(token))

    def flush(self) -> list[Delta]:
        out = self._split(self._decoder.flush(), final=True)
        if self._open == CALL_OPEN and self._call:  # cut off inside a call: not a call
            out.append(("text", "".join(self._call)))
            self._call = []
        return out
