"""The client's side of OpenAI's Responses API, for a remote server that speaks only it
(``Client(base_url=..., api="responses")``): messages and options into a request body,
and the answer (whole, or its typed stream events) into the SDK's results and chunks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequestError, OpenWeightError, RemoteConnectionError, RemoteError
from ..options import GenerationOptions
from ..types import ChatResult, Chunk, FinishReason, Message, ToolCall, Usage
from .answers import _text, answer_json
from .requests import arguments_from_json

__all__ = ["ResponsesStreamParser", "responses_body", "result_from_responses_json"]

# options with no field in the Responses API: refused, never dropped in silence
NOT_IN_RESPONSES = ("top_k", "min_p", "repetition_penalty", "seed", "stop", "thinking")


def _message_items(m: Message) -> list[dict[str, Any]]:
    if m.role == "tool":
        return [{"type": "function_call_output", "call_id": m.tool_call_id or "",
                 "output": m.content}]
    items: list[dict[str, Any]] = []
    if m.reasoning:
        items.append({"type": "reasoning", "summary": [],
                      "content": [{"type": "reasoning_text", "text": m.reasoning}]})
    if m.images:
        content: Any = [{"type": "input_text", "text": p} if isinstance(p, str) else
                        {"type": "input_image", "image_url": p.data_url()} for p in m.parts]
    else:
        content = m.content
    if m.content or m.images or not m.tool_calls:
        items.append({"type": "message", "role": m.role, "content": content})
    items += [{"type": "function_call", "call_id": c.id, "name": c.name,
               "arguments": json.dumps(dict(c.arguments))} for c in m.tool_calls]
    return items


def responses_body(model: str, messages: list[Message], options: GenerationOptions,
                   stream: bool) -> dict[str, Any]:
    """The ``/responses`` request for a conversation."""
    unsupported = [n for n in NOT_IN_RESPONSES if getattr(options, n) not in (None, ())]
    if unsupported:
        raise InvalidRequestError(f"option {unsupported[0]} has no field in the Responses "
                                  "API; leave it out, or talk to this server's chat API",
                                  param=unsupported[0])
    body: dict[str, Any] = {"model": model, "stream": stream, "store": False,
                            "input": [i for m in messages for i in _message_items(m)]}
    for name, key in (("max_tokens", "max_output_tokens"), ("temperature", "temperature"),
                      ("top_p", "top_p")):
        if getattr(options, name) is not None:
            body[key] = getattr(options, name)
    if options.tools:
        body["tools"] = [{"type": "function", **t["function"]} for t in options.tools]
    choice = options.tool_choice
    if choice is not None:
        body["tool_choice"] = choice if choice in ("auto", "none", "required") else {
            "type": "function", "name": choice}
    if options.reasoning_effort is not None:
        body["reasoning"] = {"effort": options.reasoning_effort}
    schema = options.json_schema
    if schema is not None:
        body["text"] = {"format": {"type": "json_schema", "name": "output", "schema": schema}}
    return body


def _call(item: Mapping[str, Any]) -> ToolCall:
    return ToolCall(id=_text(item.get("call_id")) or _text(item.get("id")),
                    name=_text(item.get("name")),
                    arguments=arguments_from_json(item.get("arguments"), lenient=True) or {})


def _texts(parts: object) -> str:
    return "".join(_text(p.get("text")) for p in parts or () if isinstance(p, Mapping)) \
        if isinstance(parts, list) else ""


def _usage(value: object) -> Usage:
    if not isinstance(value, Mapping):
        return Usage(0, 0)
    counts = [value.get(k) for k in ("input_tokens", "output_tokens")]
    return Usage(*(c if isinstance(c, int) and c >= 0 else 0 for c in counts))


def _finish(data: Mapping[str, Any], calls: tuple[ToolCall, ...]) -> FinishReason:
    if calls:
        return "tool_calls"
    details = data.get("incomplete_details")
    return "length" if isinstance(details, Mapping) and details.get(
        "reason") == "max_output_tokens" else "stop"


def result_from_responses_json(data: object, model: str) -> ChatResult:
    """A whole response; one without an output list is a RemoteError."""
    output = data.get("output") if isinstance(data, Mapping) else None
    if not isinstance(data, Mapping) or not isinstance(output, list):
        raise RemoteError("the server's answer is not a response with an output list")
    items = [i for i in output if isinstance(i, Mapping)]
    calls = tuple(_call(i) for i in items if i.get("type") == "function_call")
    reasoning = "".join(_texts(i.get("content")) or _texts(i.get("summary"))
                        for i in items if i.get("type") == "reasoning")
    text = "".join(_texts(i.get("content")) for i in items if i.get("type") == "message")
    return ChatResult(text=text, reasoning=reasoning or None, tool_calls=calls,
                      finish_reason=_finish(data, calls), usage=_usage(data.get("usage")),
                      model=_text(data.get("model")) or model)


@dataclass
class ResponsesStreamParser:
    """Turns a Responses stream's typed events into Chunks (the interface of
    ``wire.StreamParser``): text and reasoning at once, function calls as each is done,
    usage and the finish reason from ``response.completed``."""

    raise_error: Callable[[Mapping[str, Any]], OpenWeightError]
    done: bool = False
    calls: list[ToolCall] = field(default_factory=list)
    final: Chunk | None = None

    def feed(self, event: str, data: str) -> Chunk | None:
        data = data.strip()
        if not data or self.done or data == "[DONE]":
            return None
        payload = answer_json(data, "the server's stream")
        if not isinstance(payload, Mapping):
            raise RemoteError("the server sent an event that is not a JSON object")
        kind = payload.get("type") or event
        if kind in ("error", "response.failed"):
            error = payload.get("error") if kind == "response.failed" else payload
            raise self.raise_error({"error": error if isinstance(error, Mapping) else {}})
        delta = _text(payload.get("delta"))
        if kind == "response.output_text.delta":
            return Chunk(text=delta) if delta else None
        if kind in ("response.reasoning_text.delta", "response.reasoning_summary_text.delta"):
            return Chunk(reasoning=delta) if delta else None
        item = payload.get("item")
        if kind == "response.output_item.done" and isinstance(item, Mapping) and \
                item.get("type") == "function_call":
            self.calls.append(_call(item))
        if kind in ("response.completed", "response.incomplete"):
            response = payload.get("response")
            response = response if isinstance(response, Mapping) else {}
            self.done = True
            calls = tuple(self.calls)
            self.final = Chunk(tool_calls=calls, finish_reason=_finish(response, calls),
                               usage=_usage(response.get("usage")))
        return None

    def finish(self, url: str) -> Chunk:
        if self.final is None:
            raise RemoteConnectionError(f"the stream from {url} ended before the response "
                                        "was complete; the server may have crashed or "
                                        "restarted")
        return self.final
