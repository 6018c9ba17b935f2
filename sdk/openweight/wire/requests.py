"""OpenAI's request JSON <-> the SDK's messages and options.

The one place that reads and writes a chat request: the Client reads its callers' dicts
here (``to_messages``), the server reads a request body here, and the remote backend
writes one here. Every mistake is an ``InvalidRequestError`` naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import InvalidRequestError
from ..images import MAX_IMAGES, ImagePart, image_from_url
from ..options import MAX_JSON_DEPTH, MAX_MESSAGES, OPTION_SPECS, GenerationOptions
from ..types import ROLES, Message, ToolCall

__all__ = [
    "CHAT_FIELDS",
    "arguments_from_json",
    "chat_body",
    "check_json",
    "completion_body",
    "message_to_json",
    "messages_from_json",
    "model_from_json",
    "nested_deeper",
    "options_from_json",
    "prompt_from_json",
    "stream_flags",
    "to_messages",
    "tool_calls_from_json",
    "tool_calls_to_json",
]

CHAT_FIELDS = ("tools", "tool_choice", "response_format")  # chat completions only


# -- any request body -----------------------------------------------------------------------

def _is_text(value: str) -> bool:
    """Is ``value`` text that UTF-8 can carry (no lone surrogate such as '\\ud800')?"""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_json(body: Mapping[str, Any]) -> None:
    """A parsed request body: nested at most MAX_JSON_DEPTH deep, and every string (keys
    included) text UTF-8 can carry. Raises InvalidRequestError naming the top-level field."""
    for key, value in body.items():
        param = key if isinstance(key, str) and _is_text(key) else None
        if param is None:
            raise InvalidRequestError("a field name of the request body is not valid "
                                      "Unicode text (a lone surrogate?)")
        stack: list[tuple[object, int]] = [(value, 1)]
        while stack:
            item, depth = stack.pop()
            if isinstance(item, str):
                if not _is_text(item):
                    raise InvalidRequestError(f"'{param}' holds a string that is not valid "
                                              "Unicode text (a lone surrogate such as "
                                              "\\ud800?)", param=param)
                continue
            if not isinstance(item, Mapping | list | tuple):
                continue
            if depth > MAX_JSON_DEPTH:
                raise InvalidRequestError(f"'{param}' is nested more than {MAX_JSON_DEPTH} "
                                          "levels deep", param=param)
            children = [*item.keys(), *item.values()] if isinstance(item, Mapping) else item
            stack.extend((child, depth + 1) for child in children)


def nested_deeper(value: object, limit: int) -> bool:
    """Are parsed JSON's arrays and objects nested more than ``limit`` deep? (Without
    recursion: a hostile answer must not raise RecursionError where it is used.)"""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping | list | tuple):
            if depth >= limit:
                return True
            children = item.values() if isinstance(item, Mapping) else item
            stack.extend((child, depth + 1) for child in children)
    return False


# -- tool calls -----------------------------------------------------------------------------

def arguments_from_json(raw: object, *, lenient: bool = False) -> dict[str, Any] | None:
    """Tool call arguments: a JSON string (OpenAI) or an object (Ollama). None when they
    are not a JSON object; ``lenient`` (a model's answer) keeps them as ``{"_raw": ...}``
    rather than lose what the model wrote."""
    if isinstance(raw, Mapping):
        return dict(raw) if not nested_deeper(raw, MAX_JSON_DEPTH) else None
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    value: object = None
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            value = None
    if isinstance(value, dict) and not nested_deeper(value, MAX_JSON_DEPTH):
        return value
    return {"_raw": raw} if lenient and isinstance(raw, str) else None


def tool_calls_from_json(raw: object, where: str, *,
                         lenient: bool = False) -> tuple[ToolCall, ...]:
    """OpenAI's ``tool_calls`` list. In a request a malformed call raises; in an answer
    (``lenient``) it is skipped, and arguments that are not JSON are kept raw."""
    if not raw:
        return ()
    calls: list[ToolCall] = []
    for call in raw if isinstance(raw, list | tuple) else [raw]:
        fn = call.get("function", call) if isinstance(call, Mapping) else None
        name = fn.get("name") if isinstance(fn, Mapping) else None
        args = arguments_from_json(fn.get("arguments"), lenient=lenient) if isinstance(
            fn, Mapping) else None
        if not isinstance(name, str) or args is None:
            if lenient:
                continue
            raise InvalidRequestError(
                f"{where}.tool_calls must be a list of {{id, type, function: {{name, "
                "arguments}}} with arguments a JSON object", param="messages")
        call_id = call.get("id") if isinstance(call, Mapping) else None
        call_id = call_id if isinstance(call_id, str | int) else None
        calls.append(ToolCall(id=str(call_id or f"call_{len(calls)}"), name=name,
                              arguments=args))
    return tuple(calls)


def tool_calls_to_json(calls: Iterable[ToolCall], start: int | None = None,
                       ) -> list[dict[str, Any]]:
    """OpenAI's ``tool_calls`` (arguments as a JSON string); a stream's deltas number them
    from ``start``."""
    return [{**({"index": start + i} if start is not None else {}), "id": c.id,
             "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(dict(c.arguments))}}
            for i, c in enumerate(calls)]


# -- messages -------------------------------------------------------------------------------

def _image_part(part: Mapping[str, Any], where: str) -> ImagePart:
    """An ``image_url`` part: ``{"type": "image_url", "image_url": {"url": ...}}``."""
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, Mapping) else spec
    if not isinstance(url, str):
        raise InvalidRequestError(f"{where} is an image_url part without a url string",
                                  param="messages")
    return image_from_url(url, where)


def _content(value: object, where: str) -> tuple[str, tuple[str | ImagePart, ...]]:
    """Message content: a string, or OpenAI's list of text and image_url parts (an
    ``ImagePart`` too, from Python); its text, and its parts when it has images."""
    parts: list[str | ImagePart] = []
    if value is None or isinstance(value, str):
        parts = [value or ""]
    elif isinstance(value, list):
        for n, p in enumerate(value):
            here = f"{where}.content[{n}]"
            if isinstance(p, ImagePart):
                parts.append(p)
            elif isinstance(p, Mapping) and p.get("type") == "text" and \
                    isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p, Mapping) and p.get("type") == "image_url":
                parts.append(_image_part(p, here))
            else:
                raise InvalidRequestError(f"{here} is not a text or image_url part",
                                          param="messages")
    else:
        raise InvalidRequestError(f"{where}.content must be a string or a list of text and "
                                  f"image parts, got {type(value).__name__}", param="messages")
    text = "".join(p for p in parts if isinstance(p, str))
    if not _is_text(text):
        raise InvalidRequestError(f"{where}.content is not valid Unicode text (a lone "
                                  "surrogate such as \\ud800?)", param="messages")
    has_images = any(isinstance(p, ImagePart) for p in parts)
    return text, tuple(parts) if has_images else ()


def _message(m: Mapping[str, Any], where: str) -> Message:
    role = "system" if m.get("role") == "developer" else m.get("role")
    if role not in ROLES:
        raise InvalidRequestError(f"{where} has role {role!r}; use one of {', '.join(ROLES)}",
                                  param="messages")
    reasoning = m.get("reasoning_content", m.get("reasoning"))
    call_id = m.get("tool_call_id")
    text, parts = _content(m.get("content"), where)
    return Message(role=str(role), content=text, parts=parts,
                   reasoning=reasoning if isinstance(reasoning, str) else None,
                   tool_calls=tool_calls_from_json(m.get("tool_calls"), where),
                   tool_call_id=call_id if isinstance(call_id, str) else None)


def to_messages(messages: object) -> list[Message]:
    """Validate and normalise a list of OpenAI-style dicts or Message objects."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Iterable):
        raise InvalidRequestError(
            "messages must be a list of {'role': ..., 'content': ...} dicts or Message objects, "
            f"not {type(messages).__name__}; use generate(prompt) for a plain string",
            param="messages")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if i >= MAX_MESSAGES:
            raise InvalidRequestError(f"messages has more than {MAX_MESSAGES} messages; send "
                                      "fewer (or a summary of the older ones)", param="messages")
        if isinstance(m, Message):
            if m.role not in ROLES:
                raise InvalidRequestError(f"messages[{i}] has role {m.role!r}; use one of "
                                          f"{', '.join(ROLES)}", param="messages")
            out.append(m)
        elif isinstance(m, Mapping):
            out.append(_message(m, f"messages[{i}]"))
        else:
            raise InvalidRequestError(f"messages[{i}] must be a dict or a Message (an object), "
                                      f"not {type(m).__name__}", param="messages")
    if not out:
        raise InvalidRequestError("messages is empty; give at least one user message",
                                  param="messages")
    images = sum(len(m.images) for m in out)
    if images > MAX_IMAGES:
        raise InvalidRequestError(f"the messages hold {images} images; one request takes at "
                                  f"most {MAX_IMAGES}", param="messages")
    return out


def messages_from_json(body: Mapping[str, Any]) -> list[Message]:
    """A request body's ``messages``."""
    raw = body.get("messages")
    if not isinstance(raw, list):
        raise InvalidRequestError("'messages' is required: a list of {role, content} objects",
                                  param="messages")
    return to_messages(raw)


def message_to_json(message: Message) -> dict[str, Any]:
    """A message as OpenAI's API takes it (tool call arguments as a JSON string)."""
    out = message.to_dict()
    if message.images:
        out["content"] = [{"type": "text", "text": p} if isinstance(p, str) else
                          {"type": "image_url", "image_url": {"url": p.data_url()}}
                          for p in message.parts]
    if message.tool_calls:
        out["tool_calls"] = tool_calls_to_json(message.tool_calls)
    return out


# -- options and prompts ----------------------------------------------------------------------

def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...],
           what: str) -> Any:
    """``body[name]`` if it is of ``kind`` (a bool is not a number here), else a 400."""
    value = body.get(name)
    if value is not None and ((isinstance(value, bool) and kind is not bool)
                              or not isinstance(value, kind)):
        raise InvalidRequestError(f"'{name}' must be {what}, got {type(value).__name__}",
                                  param=name)
    return value


def options_from_json(body: Mapping[str, Any], default_max_tokens: int | None,
                      chat: bool = False) -> GenerationOptions:
    """The options of a request, validated where the SDK validates them. ``chat`` adds
    tools, tool_choice and response_format (which raw completion refuses)."""
    if not chat:
        for name in CHAT_FIELDS:
            if body.get(name) is not None:
                raise InvalidRequestError(f"'{name}' applies to chat completions only; send "
                                          "it to /v1/chat/completions", param=name)
    raw: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens")
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    for name in (*OPTION_SPECS, *(CHAT_FIELDS if chat else ()), "stop"):
        value = max_tokens if name == "max_tokens" else body.get(name)
        if value is not None:
            raw[name] = value
    if chat:  # accepted for OpenAI clients that always send it; several calls may still come
        _field(body, "parallel_tool_calls", bool, "true or false")
    template_kwargs = body.get("chat_template_kwargs")  # vLLM's way to switch thinking
    if ("thinking" not in raw and isinstance(template_kwargs, Mapping)
            and template_kwargs.get("enable_thinking") is not None):
        raw["thinking"] = template_kwargs["enable_thinking"]
    if "max_tokens" not in raw and default_max_tokens is not None:
        raw["max_tokens"] = default_max_tokens
    for name, value in raw.items():  # one at a time, to name the parameter that is wrong
        try:
            GenerationOptions.from_kwargs({name: value})
        except InvalidRequestError as exc:
            raise InvalidRequestError(str(exc), param=name) from exc
    n = _field(body, "n", int, "an integer")
    if n is not None and n != 1:
        raise InvalidRequestError("only n=1 is supported; send several requests instead",
                                  param="n")
    return GenerationOptions.from_kwargs(raw)


def prompt_from_json(body: Mapping[str, Any]) -> str:
    """A completions request's ``prompt``: a string, or a list of one string."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequestError("'prompt' is required: a string (or a list of one string)",
                                  param="prompt")
    return prompt


def stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """``(stream, include_usage)`` of a request."""
    stream = _field(body, "stream", bool, "true or false")
    stream_options = _field(body, "stream_options", dict, "an object") or {}
    include_usage = _field(stream_options, "include_usage", bool, "true or false")
    return bool(stream), bool(stream and include_usage)


def model_from_json(body: Mapping[str, Any]) -> str | None:
    name: str | None = _field(body, "model", str, "a string")
    return name


# -- request bodies the remote backend sends ------------------------------------------------

def chat_body(model: str, messages: list[Message], options: GenerationOptions,
              stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model,
                            "messages": [message_to_json(m) for m in messages]}
    body.update(options.to_dict())
    if isinstance(body.get("thinking"), bool):  # how vLLM, SGLang and llama.cpp take it
        body["chat_template_kwargs"] = {"enable_thinking": body["thinking"]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    check_json(body)  # what JSON cannot carry (a lone surrogate) fails here, not in httpx
    return body


def completion_body(model: str, prompt: str, options: GenerationOptions) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, **options.to_dict(), "stream": True,
            "stream_options": {"include_usage": True}}
    check_json(body)
    return body
