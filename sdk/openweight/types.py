"""Frozen value types shared by the local engine, the remote client and the server."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .images import ImagePart

__all__ = [
    "ChatResult",
    "Chunk",
    "EmbeddingResult",
    "FinishReason",
    "Message",
    "MessageInput",
    "ModelInfo",
    "ToolCall",
    "Usage",
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
    # text and images in their order, for a message with images (``content`` is its text)
    parts: tuple[str | ImagePart, ...] = ()

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(p for p in self.parts if isinstance(p, ImagePart))

    def content_parts(self) -> list[dict[str, Any]]:
        """The content as a chat template's list of parts (``{"type": "image"}`` where an
        image goes, the processor inserts its tokens there)."""
        parts = self.parts or (self.content,)
        return [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"}
                for p in parts if not isinstance(p, str) or p]

    def to_dict(self) -> dict[str, Any]:
        """The message as the dict a chat template (or an OpenAI server) expects."""
        out: dict[str, Any] = {"role": self.role,
                               "content": self.content_parts() if self.images else self.content}
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
class EmbeddingResult:
    """The vectors of one embedding request, one per input, in input order.
    ``usage.prompt_tokens`` counts the tokens embedded."""

    vectors: list[list[float]]
    model: str
    dimensions: int
    usage: Usage


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
    kind: str = "chat"  # "chat", or "embedding": a model that makes vectors


MessageInput = Message | Mapping[str, Any]
