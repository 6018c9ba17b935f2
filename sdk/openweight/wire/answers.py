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

from ..errors import OpenWeightError, RemoteConnectionError, RemoteError, excerpt
from ..options import MAX_JSON_DEPTH
from ..types import ChatResult, Chunk, FinishReason, ToolCall, Usage
from .requests import arguments_from_json, nested_deeper, tool_calls_from_json, tool_calls_to_json

__all__ = [
    "MAX_ANSWER_DEPTH",
    "Answer",
    "ChatShape",
    "CompletionShape",
    "StreamParser",
    "answer_json",
    "error_body",
    "error_message",
    "finish_from_json",
    "model_names_from_json",
    "result_chunks",
    "result_from_json",
    "sse",
    "usage_from_json",
    "usage_to_json",
]

MAX_ANSWER_DEPTH = 2 * MAX_JSON_DEPTH  # an answer's envelope around a request's nesting

_FINISH: dict[str, FinishReason] = {"length": "length", "tool_calls": "tool_calls",
                                    "function_call": "tool_calls"}


def finish_from_json(value: object) -> FinishReason:
    """Servers say stop, eos, end_turn, content_filter...: all but these two mean "stop"."""
    return _FINISH.get(value, "stop") if isinstance(value, str) else "stop"


def usage_from_json(value: object) -> Usage | None:
    if not isinstance(value, Mapping):
        return None
    return Usage(prompt_tokens=_count(value.get("prompt_tokens")),
                 completion_tokens=_count(value.get("completion_tokens")))


def _count(value: object) -> int:
    return max(value, 0) if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_to_json(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def _text(value: object) -> str:
    """A string field of an answer ("" if it is none); a lone surrogate (JSON can escape
    one: "\\ud800") becomes U+FFFD, so the text can be printed, logged and sent on."""
    if not isinstance(value, str):
        return ""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


# -- errors -------------------------------------------------------------------------------

def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_message(body: object, fallback: str = "") -> str:
    """The human message in an error body, whatever shape the server uses: one line of at
    most MAX_QUOTED characters (a server's text is quoted, never trusted)."""
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, str):
            return excerpt(err)
        if isinstance(err, Mapping) and isinstance(err.get("message"), str):
            return excerpt(err["message"])
        detail = body.get("detail")  # FastAPI: a string, or a list of validation errors
        if isinstance(detail, str):
            return excerpt(detail)
        if isinstance(detail, list):
            return excerpt("; ".join(_validation_error(d) for d in detail[:20]))
    return excerpt(fallback.strip())


def _validation_error(item: object) -> str:
    """One of FastAPI's validation errors: ``body.messages: Field required``."""
    if not isinstance(item, Mapping):
        return excerpt(item if isinstance(item, str) else json.dumps(item)[:600])
    loc = item.get("loc")
    where = ".".join(str(p) for p in loc if isinstance(p, str | int)) \
        if isinstance(loc, list) else ""
    msg = item.get("msg")
    return f"{where}: {msg if isinstance(msg, str) else 'invalid'}"


def answer_json(raw: bytes | str, where: str) -> Any:
    """A server's JSON answer (or error body), parsed. Anything else (not JSON, not UTF-8,
    nested deeper than MAX_ANSWER_DEPTH) is a RemoteError quoting the start of it."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RemoteError(f"{where} answered with something that is not JSON: "
                          f"{excerpt(raw)!r}") from exc
    if nested_deeper(data, MAX_ANSWER_DEPTH):
        raise RemoteError(f"{where} answered with JSON nested more than {MAX_ANSWER_DEPTH} "
                          "levels deep; is it an OpenAI-compatible server?")
    return data


def model_names_from_json(data: Any, where: str) -> list[str]:
    """The model names in a ``/models`` answer (OpenAI's ``{"data": [{"id": ...}]}``)."""
    items = data.get("data") if isinstance(data, Mapping) else data
    if not isinstance(items, list):
        raise RemoteError(f"{where}/models did not answer with a list of models: "
                          f"{_shape(data)}")
    return [m["id"] for m in items if isinstance(m, Mapping) and isinstance(m.get("id"), str)
            and m["id"].strip()]


def _shape(data: object) -> str:
    """A short quote of parsed JSON (at most MAX_ANSWER_DEPTH deep) for a message."""
    return excerpt(json.dumps(data, ensure_ascii=False)[:2000]) if isinstance(
        data, Mapping | list) else excerpt(repr(data))


# -- reading answers (the remote backend) ------------------------------------------------------

def result_from_json(data: Any, model: str) -> ChatResult:
    """A whole chat (or completions) answer; a malformed one is a RemoteError."""
    choices = data.get("choices") if isinstance(data, Mapping) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, Mapping) else None
    if message is None and isinstance(choice, Mapping) and isinstance(choice.get("text"), str):
        message = {"content": choice["text"]}  # /completions
    if not isinstance(choice, Mapping) or not isinstance(message, Mapping):
        raise RemoteError(f"the server's answer has no choices[0].message: {_shape(data)}")
    _check_calls(message.get("tool_calls"), "the server's answer")
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


def _check_calls(raw: object, where: str) -> None:
    """``tool_calls`` in an answer: absent, or a list of objects (each call's own mistakes,
    such as arguments that are not JSON, are the model's and are kept)."""
    if raw is not None and not (isinstance(raw, list) and all(
            isinstance(c, Mapping) and isinstance(c.get("function") or {}, Mapping)
            for c in raw)):
        raise RemoteError(f"{where} has tool_calls that are not a list of "
                          f"{{id, function: {{name, arguments}}}} objects: {_shape(raw)}")


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
        payload = answer_json(data, "the server's stream")
        if not isinstance(payload, Mapping):
            raise RemoteError(f"the server sent an event that is not a JSON object: "
                              f"{excerpt(data)!r}")
        if event == "error" or payload.get("error") is not None:
            raise self.raise_error(payload)
        self.usage = usage_from_json(payload.get("usage")) or self.usage
        choices = payload.get("choices")
        if not choices:  # none, null or []: a usage or keep-alive event
            return None
        choice = choices[0] if isinstance(choices, list) else None
        delta = (choice.get("delta") or choice.get("message") or {}) if isinstance(
            choice, Mapping) else None
        if not isinstance(choice, Mapping) or not isinstance(delta, Mapping):
            raise RemoteError("the server sent an event without choices[0].delta: "
                              f"{excerpt(data)!r}")
        if choice.get("finish_reason") is not None:
            self.finish_reason = finish_from_json(choice["finish_reason"])
        raw_calls = delta.get("tool_calls")
        _check_calls(raw_calls, "an event of the server's stream")
        for i, raw in enumerate(raw_calls or ()):
            self._add_call(i, raw)
        text = _text(delta.get("content")) or _text(choice.get("text"))  # or /completions
        reasoning = _text(delta.get("reasoning_content")) or _text(delta.get("reasoning"))
        return Chunk(text=text, reasoning=reasoning) if text or reasoning else None

    def _add_call(self, position: int, raw: Mapping[str, Any]) -> None:
        wire, call_id = raw.get("index"), _text(raw.get("id"))
        # older Ollama sends no index; a hostile one is no index either
        wire = wire if isinstance(wire, int) and 0 <= wire < 1024 else position
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
