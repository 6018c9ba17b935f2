"""Frozen value types shared by the local engine, the remote client and the server."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidRequestError

__all__ = [
    "ChatResult",
    "Chunk",
    "FinishReason",
    "Message",
    "MessageInput",
    "ModelInfo",
    "ToolCall",
    "Usage",
    "to_messages",
]

FinishReason = Literal["stop", "length", "tool_calls"]
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCall:
    """A function call the model asked for."""

    id: str
    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    content: str
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The message as the dict a chat template (or an OpenAI server) expects."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": dict(c.arguments)},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class Usage:
    """Exact token counts of one request."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ChatResult:
    """The whole answer to one chat request."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    model: str
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """A piece of a streamed answer. The last chunk has finish_reason and usage set."""

    text: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class ModelInfo:
    """A model known to the store or to a remote server."""

    name: str
    installed: bool
    source: str | None = None
    path: str | None = None
    size_bytes: int | None = None
    family: str | None = None
    description: str | None = None
    default: bool = False


MessageInput = Message | Mapping[str, Any]


def _tool_calls(value: object, i: int) -> tuple[ToolCall, ...]:
    """OpenAI-style tool calls of an assistant message (arguments as a JSON string or dict)."""
    if not value:
        return ()
    calls: list[ToolCall] = []
    for call in value if isinstance(value, (list, tuple)) else [value]:
        fn = call.get("function", call) if isinstance(call, Mapping) else None
        args = fn.get("arguments", {}) if isinstance(fn, Mapping) else None
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                args = None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not isinstance(
            args, Mapping
        ):
            raise InvalidRequestError(f"messages[{i}]['tool_calls'] must be a list of "
                                      "{'id', 'function': {'name', 'arguments'}} objects")
        call_id = call.get("id") if isinstance(call, Mapping) else None
        calls.append(ToolCall(id=str(call_id or f"call_{i}_{len(calls)}"),
                              name=fn["name"], arguments=dict(args)))
    return tuple(calls)


def to_messages(messages: object) -> list[Message]:
    """Validate and normalise a list of dicts or Message objects."""
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise InvalidRequestError(
            "messages must be a list of {'role': ..., 'content': ...} dicts or Message objects, "
            f"not {type(messages).__name__}; use generate(prompt) for a plain string"
        )
    out: list[Message] = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            msg = m
        elif isinstance(m, Mapping):
            role, content = m.get("role"), m.get("content")
            if content is None and m.get("tool_calls"):
                content = ""
            if not isinstance(content, str):
                raise InvalidRequestError(
                    f"messages[{i}]['content'] must be a string, got {type(content).__name__}"
                )
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            msg = Message(
                role=str(role),
                content=content,
                reasoning=reasoning if isinstance(reasoning, str) else None,
                tool_calls=_tool_calls(m.get("tool_calls"), i),
                tool_call_id=m.get("tool_call_id"),
            )
        else:
            raise InvalidRequestError(
                f"messages[{i}] must be a dict or a Message, not {type(m).__name__}"
            )
        if msg.role not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}] has role {msg.role!r}; use one of {', '.join(ROLES)}"
            )
        out.append(msg)
    if not out:
        raise InvalidRequestError("messages is empty; give at least one user message")
    return out
