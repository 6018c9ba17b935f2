"""OpenAI's answer JSON <-> the SDK's chunks and results.

The server writes answers here (``ChatShape``, ``CompletionShape``: whole or as stream
events) and the remote backend reads them here (``result_from_json``, ``StreamParser``),
so both ends of the wire agree by construction.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import OpenWeightError, RemoteConnectionError, RemoteError
from ..types import ChatResult, Chunk, FinishReason, ToolCall, Usage
from .requests import arguments_from_json, tool_calls_from_json, tool_calls_to_json

__all__ = [
    "Answer",
    "ChatShape",
    "CompletionShape",
    "StreamParser",
    "error_body",
    "error_message",
    "finish_from_json",
    "result_chunks",
    "result_from_json",
    "sse",
    "usage_from_json",
    "usage_to_json",
]

_FINISH: dict[str, FinishReason] = {"length": "length", "tool_calls": "tool_calls",
                                    "function_call": "tool_calls"}


def finish_from_json(value: object) -> FinishReason:
    """Servers say stop, eos, end_turn, content_filter...: all but these two mean "stop"."""
    return _FINISH.get(value, "stop") if isinstance(value, str) else "stop"


def usage_from_json(value: object) -> Usage | None:
    if not isinstance(value, Mapping):
        return None
    prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens")
    return Usage(prompt_tokens=prompt if isinstance(prompt, int) else 0,
                 completion_tokens=completion if isinstance(completion, int) else 0)


def usage_to_json(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


# -- errors -------------------------------------------------------------------------------

def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_message(body: object, fallback: str = "") -> str:
    """The human message in an error body, whatever shape the server uses."""
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, str):
            return err
        if isinstance(err, Mapping) and isinstance(err.get("message"), str):
            return str(err["message"])
        detail = body.get("detail")  # FastAPI: a string, or a list of validation errors
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            return "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', ()))}: {d.get('msg')}"
                if isinstance(d, Mapping) else str(d) for d in detail)
    return fallback.strip()[:500]


# -- reading answers (the remote backend) ------------------------------------------------------

def result_from_json(data: Any, model: str) -> ChatResult:
    """A whole chat (or completions) answer."""
    choices = data.get("choices") if isinstance(data, Mapping) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, Mapping) else None
    if message is None and isinstance(choice, Mapping) and isinstance(choice.get("text"), str):
        message = {"content": choice["text"]}  # /completions
    if not isinstance(choice, Mapping) or not isinstance(message, Mapping):
        raise RemoteError(f"the server's answer has no choices[0].message: {str(data)[:200]}")
    calls = tool_calls_from_json(message.get("tool_calls"), "the answer", lenient=True)
    reasoning = _text(message.get("reasoning_content")) or _text(message.get("reasoning"))
    return ChatResult(
        text=_text(message.get("content")),
        reasoning=reasoning or None,
        tool_calls=calls,
        finish_reason="tool_calls" if calls else finish_from_json(choice.get("finish_reason")),
        usage=usage_from_json(data.get("usage")) or Usage(0, 0),
        model=_text(data.get("model")) or model,
    )


def result_chunks(result: ChatResult) -> Iterator[Chunk]:
    """A whole answer as a stream (for servers that answer a stream request with JSON)."""
    if result.text or result.reasoning:
        yield Chunk(text=result.text, reasoning=result.reasoning or "")
    yield Chunk(tool_calls=result.tool_calls, finish_reason=result.finish_reason,
                usage=result.usage)


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class StreamParser:
    """Turns the events of one chat completion stream into Chunks.

    Accepts what real servers send: ``reasoning_content`` or ``reasoning`` deltas, usage
    in a last chunk with no choices, tool calls in fragments, no ``[DONE]`` at the end,
    and ``{"error": ...}`` events. Text is passed on at once; the finish reason, usage
    and tool calls go out in one final Chunk from ``finish()``.
    """

    raise_error: Callable[[Mapping[str, Any]], OpenWeightError]
    done: bool = False
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    calls: dict[int, _PartialCall] = field(default_factory=dict)
    slots: dict[int, int] = field(default_factory=dict)  # a reused index -> its latest call

    def feed(self, event: str, data: str) -> Chunk | None:
        """One server-sent event (its ``event`` name and ``data``)."""
        data = data.strip()
        if not data or self.done:
            return None
        if data == "[DONE]":
            self.done = True
            return None
        try:
            payload = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise RemoteError(f"the server sent an event that is not JSON: {data[:200]!r}") \
                from exc
        if not isinstance(payload, Mapping):
            return None
        if event == "error" or payload.get("error") is not None:
            raise self.raise_error(payload)
        self.usage = usage_from_json(payload.get("usage")) or self.usage
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
            return None
        choice = choices[0]
        if choice.get("finish_reason") is not None:
            self.finish_reason = finish_from_json(choice["finish_reason"])
        delta = choice.get("delta") or choice.get("message") or {}
        if not isinstance(delta, Mapping):
            return None
        raw_calls = delta.get("tool_calls")
        for i, raw in enumerate(raw_calls if isinstance(raw_calls, list) else ()):
            self._add_call(i, raw)
        text = _text(delta.get("content")) or _text(choice.get("text"))  # or /completions
        reasoning = _text(delta.get("reasoning_content")) or _text(delta.get("reasoning"))
        return Chunk(text=text, reasoning=reasoning) if text or reasoning else None

    def _add_call(self, position: int, raw: object) -> None:
        if not isinstance(raw, Mapping):
            return
        wire, call_id = raw.get("index"), _text(raw.get("id"))
        wire = wire if isinstance(wire, int) else position  # older Ollama sends no index
        index = self.slots.get(wire, wire)
        taken = self.calls.get(index)
        if call_id and taken is not None and taken.id not in ("", call_id):
            # Ollama gives every call index 0: a new id is a new call, and so are the
            # fragments after it at that index
            same = [i for i, p in self.calls.items() if p.id == call_id]
            index = self.slots[wire] = same[0] if same else max(self.calls) + 1
        part = self.calls.setdefault(index, _PartialCall())
        part.id = part.id or call_id
        fn = raw.get("function")
        if isinstance(fn, Mapping):
            name = _text(fn.get("name"))
            if name != part.name:  # some servers repeat the whole name in every fragment
                part.name += name
            args = fn.get("arguments")
            part.arguments += json.dumps(args) if isinstance(args, Mapping) else _text(args)

    def finish(self, url: str) -> Chunk:
        """The final chunk; a stream that just stopped, with no sign of an end, is an error."""
        if not self.done and self.finish_reason is None:
            raise RemoteConnectionError(f"the stream from {url} ended before the answer was "
                                        "complete; the server may have crashed or restarted")
        calls = tuple(ToolCall(id=p.id or f"call_{i}", name=p.name,
                               arguments=arguments_from_json(p.arguments, lenient=True) or {})
                      for i, p in sorted(self.calls.items()))
        finish = self.finish_reason or "stop"
        return Chunk(tool_calls=calls, finish_reason="tool_calls" if calls else finish,
                     usage=self.usage or Usage(0, 0))


# -- writing answers (the server) ------------------------------------------------------------

@dataclass
class Answer:
    """What the chunks of one request add up to."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: FinishReason = "stop"
    usage: Usage = field(default_factory=lambda: Usage(0, 0))

    def add(self, chunk: Chunk) -> None:
        self.text.append(chunk.text)
        self.reasoning.append(chunk.reasoning)
        self.tool_calls.extend(chunk.tool_calls)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage

    def result(self, model: str) -> ChatResult:
        return ChatResult(text="".join(self.text), reasoning="".join(self.reasoning) or None,
                          tool_calls=tuple(self.tool_calls), finish_reason=self.finish_reason,
                          usage=self.usage, model=model)


class ChatShape:
    """How the chunks of one request are written out (chat completions)."""

    object = "chat.completion"
    prefix = "chatcmpl"

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.calls_sent = 0  # tool call indexes run on across the chunks of a stream

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "choices": choices}
        if self.include_usage:
            out["usage"] = None
        return out

    def first(self) -> dict[str, Any] | None:
        return self._event({"role": "assistant", "content": ""}, None)

    def _event(self, delta: dict[str, Any], finish: FinishReason | None) -> dict[str, Any]:
        return self._envelope(self.object + ".chunk", [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

    def events(self, chunk: Chunk) -> list[dict[str, Any]]:
        """The events of one chunk: its delta, then (as OpenAI does) the finish on its own."""
        delta: dict[str, Any] = {}
        if chunk.reasoning:
            delta["reasoning_content"] = chunk.reasoning
        if chunk.text:
            delta["content"] = chunk.text
        if chunk.tool_calls:  # whole calls, arguments as a JSON string, as OpenAI streams them
            delta["tool_calls"] = tool_calls_to_json(chunk.tool_calls, start=self.calls_sent)
            self.calls_sent += len(chunk.tool_calls)
        out = [self._event(delta, None)] if delta else []
        if chunk.finish_reason is not None:
            out.append(self._event({}, chunk.finish_reason))
        return out

    def usage_event(self, usage: Usage) -> dict[str, Any]:
        out = self._envelope(self.object + ".chunk", [])
        out["usage"] = usage_to_json(usage)
        return out

    def _whole(self, choice: dict[str, Any], answer: Answer) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "choices": [{"index": 0, **choice, "logprobs": None,
                                                  "finish_reason": answer.finish_reason}],
                "usage": usage_to_json(answer.usage)}

    def whole(self, answer: Answer) -> dict[str, Any]:
        text = "".join(answer.text)  # null beside tool calls, as OpenAI answers
        message: dict[str, Any] = {"role": "assistant",
                                   "content": None if answer.tool_calls and not text else text}
        reasoning = "".join(answer.reasoning)
        if reasoning:
            message["reasoning_content"] = reasoning
        if answer.tool_calls:
            message["tool_calls"] = tool_calls_to_json(answer.tool_calls)
        return self._whole({"message": message}, answer)


class CompletionShape(ChatShape):
    """The legacy completions API: ``choices[0].text``."""

    object = "text_completion"
    prefix = "cmpl"

    def first(self) -> dict[str, Any] | None:
        return None

    def events(self, chunk: Chunk) -> list[dict[str, Any]]:
        if not chunk.text and chunk.finish_reason is None:
            return []
        return [self._envelope(self.object, [{"index": 0, "text": chunk.text, "logprobs": None,
                                              "finish_reason": chunk.finish_reason}])]

    def usage_event(self, usage: Usage) -> dict[str, Any]:
        out = self._envelope(self.object, [])
        out["usage"] = usage_to_json(usage)
        return out

    def whole(self, answer: Answer) -> dict[str, Any]:
        return self._whole({"text": "".join(answer.text)}, answer)


def sse(data: object) -> str:
    """One server-sent event carrying ``data`` as compact JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
