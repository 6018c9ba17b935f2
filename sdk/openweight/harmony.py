"""gpt-oss's harmony format: a token-level state machine that splits channels.

The prompt ends with ``<|start|>assistant``; the model then writes messages like
``<|channel|>analysis<|message|>...<|end|>``, then
``<|start|>assistant<|channel|>final<|message|>...<|return|>``, or a tool call
``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>``.
Special tokens are looked up in the tokenizer, never hard-coded, and never reach the text.
"""

from __future__ import annotations

import re
from typing import Any

from .local.decode import IncrementalDecoder
from .local.parsers import make_tool_call
from .types import ToolCall

__all__ = ["HARMONY_TOKENS", "Delta", "HarmonyParser", "harmony_token_ids"]

HARMONY_TOKENS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>",
                  "<|call|>", "<|constrain|>")
Delta = tuple[str, str]  # ("text" | "reasoning", piece)
_RECIPIENT = re.compile(r"to=([^\s<]+)")
_CHANNEL = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")


def harmony_token_ids(tokenizer: Any) -> dict[str, int] | None:
    """The ids of the harmony special tokens, or None if the tokenizer lacks any of them."""
    ids: dict[str, int] = {}
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in HARMONY_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == unk:
            return None
        ids[token] = int(tid)
    return ids


class HarmonyParser:
    """Feeds on generated token ids; returns text and reasoning deltas, collects tool calls."""

    def __init__(self, tokenizer: Any, ids: dict[str, int]) -> None:
        self._tok = tokenizer
        self._ids = ids
        self._special = frozenset(ids.values()) | frozenset(
            int(i) for i in getattr(tokenizer, "all_special_ids", [])
        )
        self._state = "header"  # header | content | idle
        self._header: list[int] = []
        self._kind = "text"
        self._recipient: str | None = None
        self._decoder: IncrementalDecoder | None = None
        self._args: list[str] = []
        self._opened_any = False
        self.tool_calls: list[ToolCall] = []
        self.malformed_calls: list[str] = []

    def _open(self) -> None:
        header = str(self._tok.decode(self._header, skip_special_tokens=False))
        channel_match = _CHANNEL.search(header)
        channel = channel_match.group(1) if channel_match else "final"
        recipient = _RECIPIENT.search(header)
        self._recipient = recipient.group(1) if recipient else None
        if self._recipient is not None:
            self._kind = "call"
        elif channel == "analysis":
            self._kind = "reasoning"
        else:  # final, and commentary preambles, are for the user
            self._kind = "text"
        self._decoder = IncrementalDecoder(self._tok)
        self._args = []
        self._state = "content"
        self._opened_any = True

    def _close(self) -> list[Delta]:
        out: list[Delta] = []
        if self._state == "content" and self._decoder is not None:
            rest = self._decoder.flush()
            if self._kind == "call":
                self._args.append(rest)
                out += self._finish_call()
            elif rest:
                out.append((self._kind, rest))
        self._state = "idle"
        self._decoder = None
        return out

    def _finish_call(self) -> list[Delta]:
        """A finished call; a malformed one is returned as text, never dropped or raised."""
        raw = "".join(self._args).strip()
        name = (self._recipient or "").removeprefix("functions.")
        call = make_tool_call(len(self.tool_calls), raw, name=name)
        if call is None:
            self.malformed_calls.append(f"{self._recipient}: {raw}")
            return [("text", raw)] if raw else []
        self.tool_calls.append(call)
        return []

    def feed(self, token: int) -> list[Delta]:
        ids = self._ids
        if token == ids["<|start|>"]:
            out = self._close()
            self._state, self._header = "header", []
            return out
        if token in (ids["<|end|>"], ids["<|return|>"], ids["<|call|>"]):
            return self._close()
        if token == ids["<|message|>"] and self._state == "header":
            self._open()
            return []
        if self._state == "header":
            self._header.append(token)
            return []
        if self._state != "content" or token in self._special or self._decoder is None:
            return []  # between messages, or a stray special token: never text
        piece = self._decoder.add(token)
        if self._kind == "call":
            self._args.append(piece)
            return []
        return [(self._kind, piece)] if piece else []

    def flush(self) -> list[Delta]:
        """End of generation (length limit or cancel): whatever the open message holds."""
        if self._state == "header" and self._header and not self._opened_any and not (
            self._special & set(self._header)
        ):
            # the model wrote plain text without any harmony framing: that is its answer
            text = str(self._tok.decode(self._header, skip_special_tokens=True))
            self._header = []
            return [("text", text)] if text else []
        if self._kind == "call" and self._state == "content":
            self._state = "idle"  # an unfinished call is not a call
            return []
        return self._close()
