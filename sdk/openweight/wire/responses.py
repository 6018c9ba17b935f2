"""OpenAI's Responses API (``POST /v1/responses``) <-> the SDK's messages, options and
chunks: the request's items into a conversation, and the answer into output items, whole
or as the typed streaming events OpenAI's clients parse.

Stateless: nothing is stored, and ``previous_response_id`` is refused with a clear 400.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequestError
from ..options import GenerationOptions
from ..types import Chunk, Message, ToolCall, Usage
from .requests import to_messages

__all__ = ["History", "ResponseBuilder", "ResponsesRequest", "responses_request_from_json"]

_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}


@dataclass
class ResponsesRequest:
    messages: list[Message]
    options: GenerationOptions
    stream: bool
    echo: dict[str, Any]  # request fields the response repeats (instructions, tools, ...)


def _error(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _content(value: object, where: str) -> object:
    """A message item's content as chat content: a string, or text and image_url parts."""
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise _error(f"{where}.content must be a string or a list of parts", "input")
    parts: list[dict[str, Any]] = []
    for n, part in enumerate(value):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise _error(f"{where}.content[{n}] is not an input_text, output_text or "
                         "input_image part (with image_url)", "input")
    return parts


def _call(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    name, call_id, args = item.get("name"), item.get("call_id"), item.get("arguments", "{}")
    if not isinstance(name, str) or not isinstance(call_id, str) or not isinstance(args, str):
        raise _error(f"{where} is a function_call without a name, call_id and arguments "
                     "string", "input")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def _items(raw: object) -> list[dict[str, Any]]:
    """The input items as chat messages: reasoning and function calls join the assistant
    turn they belong to; a function call's output becomes a tool message."""
    items = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise _error("input must be a string or a non-empty list of items", "input")
    out: list[dict[str, Any]] = []
    reasoning: list[str] = []
    for n, item in enumerate(items):
        where = f"input[{n}]"
        if not isinstance(item, Mapping):
            raise _error(f"{where} must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") in _ROLES:
            msg = {"role": _ROLES[item["role"]], "content": _content(item.get("content"), where)}
            if msg["role"] == "assistant" and reasoning:
                msg["reasoning"], reasoning = "".join(reasoning), []
            out.append(msg)
        elif kind == "reasoning":
            texts = [p.get("text") for p in (item.get("content") or item.get("summary") or [])
                     if isinstance(p, Mapping)]
            reasoning.append("".join(t for t in texts if isinstance(t, str)))
        elif kind == "function_call":
            if not (out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls")):
                out.append({"role": "assistant", "content": "", "tool_calls": []})
            if reasoning:
                out[-1]["reasoning"], reasoning = "".join(reasoning), []
            out[-1]["tool_calls"].append(_call(item, where))
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, str):
                raise _error(f"{where} is a function_call_output without a call_id and an "
                             "output string", "input")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        else:
            raise _error(f"{where} has type {kind!r} (role {item.get('role')!r}); openweight "
                         "takes message, reasoning, function_call and function_call_output "
                         "items", "input")
    return out


def _tools(body: Mapping[str, Any]) -> dict[str, Any]:
    """tools, tool_choice and text.format as chat-completions options."""
    raw: dict[str, Any] = {}
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list) or not all(
                isinstance(t, Mapping) and t.get("type") == "function" for t in tools):
            raise _error("tools: openweight runs function tools only ({\"type\": "
                         "\"function\", \"name\": ..., \"parameters\": ...})", "tools")
        raw["tools"] = [{"type": "function", "function": {
            k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}}
            for t in tools]
    choice = body.get("tool_choice")
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    if choice is not None:
        raw["tool_choice"] = choice
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), Mapping) else None
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        raw["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "output"), "schema": fmt.get("schema"),
            "strict": fmt.get("strict")}}
    elif isinstance(fmt, Mapping) and fmt.get("type") == "json_object":
        raw["response_format"] = {"type": "json_object"}
    return raw


History = Callable[[str], list[Message] | None]  # a stored response's whole conversation


def _history(body: Mapping[str, Any], history: History | None) -> list[Message]:
    previous = body.get("previous_response_id")
    if previous is None:
        return []
    if history is None:
        raise _error("previous_response_id: this server stores no responses (store: false; "
                     "start it with --responses-store N to keep the last N); send the whole "
                     "conversation in input", "previous_response_id")
    found = history(previous) if isinstance(previous, str) else None
    if found is None:
        raise _error(f"previous_response_id {str(previous)[:60]!r} is not stored here: it "
                     "was never made here, was made with store: false, or was evicted (the "
                     "store keeps the most recent responses only)", "previous_response_id")
    return found


def responses_request_from_json(body: Mapping[str, Any],
                                history: History | None = None) -> ResponsesRequest:
    """A checked ``/v1/responses`` request; ``history`` looks up a stored response's
    conversation for ``previous_response_id`` (None: nothing is stored)."""
    earlier = _history(body, history)
    if "input" not in body:
        raise _error("'input' is required: a string or a list of items", "input")
    chat = _items(body["input"])
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _error("instructions must be a string", "instructions")
    if instructions:
        chat.insert(0, {"role": "system", "content": instructions})
    raw = _tools(body)
    for name, key in (("temperature", "temperature"), ("top_p", "top_p"),
                      ("max_output_tokens", "max_tokens")):
        if body.get(name) is not None:
            raw[key] = body[name]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, Mapping) and reasoning.get("effort") is not None:
        raw["reasoning_effort"] = reasoning["effort"]
    try:
        options = GenerationOptions.from_kwargs(raw)
    except InvalidRequestError as exc:
        param = {"max_tokens": "max_output_tokens", "reasoning_effort": "reasoning"}.get(
            exc.param or "", exc.param)
        raise _error(str(exc), param or "input") from exc
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _error("stream must be true or false", "stream")
    echo = {k: body.get(k) for k in ("instructions", "tools", "tool_choice", "temperature",
                                     "top_p", "max_output_tokens", "metadata", "reasoning",
                                     "previous_response_id")}
    echo["text"] = body.get("text") or {"format": {"type": "text"}}
    return ResponsesRequest(earlier + to_messages(chat), options, stream, echo)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class _Item:
    kind: str  # "reasoning", "message" or "function_call"
    id: str
    index: int
    text: list[str] = field(default_factory=list)
    call: ToolCall | None = None


class ResponseBuilder:
    """One response: its items as the chunks arrive, the events a stream sends, and the
    whole response object."""

    def __init__(self, model: str, echo: dict[str, Any]) -> None:
        self.id = _new_id("resp")
        self.created = int(time.time())
        self.model, self.echo = model, echo
        self.items: list[_Item] = []
        self.seq = 0
        self.usage = Usage(0, 0)
        self.reasoning_tokens = 0
        self.finish: str | None = None
        self.stored = False  # kept by the server, for a later previous_response_id

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def opening(self) -> list[dict[str, Any]]:
        return [self.event("response.created", response=self.whole("in_progress")),
                self.event("response.in_progress", response=self.whole("in_progress"))]

    def _open(self, kind: str) -> tuple[_Item, list[dict[str, Any]]]:
        """The current item of this kind, or a new one (closing the one before)."""
        if self.items and self.items[-1].kind == kind and kind != "function_call":
            return self.items[-1], []
        events = self._close_last()
        item = _Item(kind, _new_id({"reasoning": "rs", "message": "msg"}.get(kind, "fc")),
                     len(self.items))
        self.items.append(item)
        events.append(self.event("response.output_item.added", output_index=item.index,
                                  item=self._item(item, "in_progress")))
        if kind != "function_call":
            events.append(self.event("response.content_part.added", item_id=item.id,
                                      output_index=item.index, content_index=0,
                                      part=self._part(item, "")))
        return item, events

    def feed(self, chunk: Chunk) -> list[dict[str, Any]]:
        """The events of one chunk of the answer."""
        events: list[dict[str, Any]] = []
        for kind, delta in (("reasoning", chunk.reasoning), ("message", chunk.text)):
            if delta:
                item, opened = self._open(kind)
                item.text.append(delta)
                name = "reasoning_text" if kind == "reasoning" else "output_text"
                extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
                events += [*opened, self.event(f"response.{name}.delta", item_id=item.id,
                                                output_index=item.index, content_index=0,
                                                delta=delta, **extra)]
        for call in chunk.tool_calls:
            item, opened = self._open("function_call")
            item.call = call
            args = json.dumps(dict(call.arguments))
            events += [*opened, self.event("response.function_call_arguments.delta",
                                            item_id=item.id, output_index=item.index,
                                            delta=args)]
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.finish_reason is not None:
            self.finish = chunk.finish_reason
        return events

    def closing(self) -> list[dict[str, Any]]:
        status = self.status()
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return [*self._close_last(), self.event(kind, response=self.whole(status))]

    def _close_last(self) -> list[dict[str, Any]]:
        if not self.items:
            return []
        item = self.items[-1]
        where = {"item_id": item.id, "output_index": item.index}
        if item.kind == "function_call":
            assert item.call is not None
            events = [self.event("response.function_call_arguments.done", **where,
                                  name=item.call.name,
                                  arguments=json.dumps(dict(item.call.arguments)))]
        else:
            name = "reasoning_text" if item.kind == "reasoning" else "output_text"
            text = "".join(item.text)
            events = [self.event(f"response.{name}.done", **where, content_index=0, text=text,
                                  **({"logprobs": []} if item.kind == "message" else {})),
                      self.event("response.content_part.done", **where, content_index=0,
                                  part=self._part(item, text))]
        return [*events, self.event("response.output_item.done", output_index=item.index,
                                     item=self._item(item, "completed"))]

    @staticmethod
    def _part(item: _Item, text: str) -> dict[str, Any]:
        if item.kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _item(self, item: _Item, status: str) -> dict[str, Any]:
        text = "".join(item.text)
        if item.kind == "reasoning":
            return {"type": "reasoning", "id": item.id, "summary": [],
                    "content": [self._part(item, text)]}
        if item.kind == "message":
            return {"type": "message", "id": item.id, "status": status, "role": "assistant",
                    "content": [self._part(item, text)] if status == "completed" else []}
        call = item.call
        return {"type": "function_call", "id": item.id, "status": status,
                "call_id": call.id if call else "", "name": call.name if call else "",
                "arguments": json.dumps(dict(call.arguments)) if call else ""}

    def as_message(self) -> Message:
        """The answer as the assistant turn of a conversation (for a stored response)."""
        text = "".join("".join(i.text) for i in self.items if i.kind == "message")
        reasoning = "".join("".join(i.text) for i in self.items if i.kind == "reasoning")
        calls = tuple(i.call for i in self.items if i.call is not None)
        return Message(role="assistant", content=text, reasoning=reasoning or None,
                       tool_calls=calls)

    def status(self) -> str:
        return "incomplete" if self.finish == "length" else "completed"

    def whole(self, status: str | None = None) -> dict[str, Any]:
        """The response object (``status``: as the answer ended, unless given)."""
        status = status or self.status()
        done = status != "in_progress"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": self.model,
            "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
            else None,
            "output": [self._item(i, "completed") for i in self.items] if done else [],
            "parallel_tool_calls": True, "store": self.stored,
            "previous_response_id": self.echo.get("previous_response_id"),
            **{k: v for k, v in self.echo.items() if k not in ("tools", "previous_response_id")},
            "tools": self.echo.get("tools") or [],
            "tool_choice": self.echo.get("tool_choice") or "auto",
            "usage": {"input_tokens": self.usage.prompt_tokens,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": self.usage.completion_tokens,
                      "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                      "total_tokens": self.usage.total_tokens} if done else None,
        }
