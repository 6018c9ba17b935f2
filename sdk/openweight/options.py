"""Generation options and their bounds: the one place every limit is written down.

The llm plugin and the server build their option schemas from ``OPTION_SPECS``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import InvalidRequestError

__all__ = [
    "CHAT_ONLY_OPTIONS", "DEFAULT_MAX_TOKENS", "MAX_JSON_DEPTH", "MAX_MESSAGES",
    "MAX_SCHEMA_CHARS", "MAX_STOP_CHARS", "MAX_STOP_STRINGS", "MAX_TOOLS", "OPTION_SPECS",
    "GenerationOptions", "OptionSpec"]

DEFAULT_MAX_TOKENS = 1024
CHAT_ONLY_OPTIONS = ("tools", "tool_choice", "thinking", "reasoning_effort")

# -- bounds on one request, shared by the SDK and the server (which answers 400 past them)
MAX_MESSAGES = 4096        # messages in one chat request
MAX_STOP_STRINGS = 16      # strings in ``stop``
MAX_STOP_CHARS = 1024      # characters in one stop string
MAX_TOOLS = 128            # function specs in ``tools`` (OpenAI's own limit)
MAX_SCHEMA_CHARS = 65_536  # one tool's parameters or one response_format schema, as JSON text
MAX_JSON_DEPTH = 64        # nesting of arrays and objects in a request body


@dataclass(frozen=True)
class OptionSpec:
    """Type, bounds and help text of one generation option."""

    name: str
    kind: type
    description: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] = ()

    def bounds_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        low = f">= {self.ge}" if self.ge is not None else ""
        low = low or (f"> {self.gt}" if self.gt is not None else "")
        high = f"<= {self.le}" if self.le is not None else ""
        return " and ".join(p for p in (low, high) if p) or "any value"


OPTION_SPECS: dict[str, OptionSpec] = {
    s.name: s
    for s in (
        OptionSpec("max_tokens", int, "Maximum number of tokens to generate", ge=1, le=1_000_000),
        OptionSpec("temperature", float, "Sampling temperature; 0 means greedy", ge=0.0, le=2.0),
        OptionSpec("top_p", float, "Nucleus sampling: keep the smallest set of tokens with this "
                   "total probability", gt=0.0, le=1.0),
        OptionSpec("top_k", int, "Sample from the k most likely tokens; 0 disables", ge=0,
                   le=100_000),
        OptionSpec("min_p", float, "Drop tokens less likely than min_p times the top token",
                   ge=0.0, le=1.0),
        OptionSpec("repetition_penalty", float, "Penalty above 1.0 discourages repeating tokens",
                   gt=0.0, le=10.0),
        OptionSpec("seed", int, "Random seed for reproducible sampling", ge=0, le=2**63 - 1),
        OptionSpec("thinking", bool, "Think before answering, on or off (Qwen3 and other "
                   "models with a thinking switch)"),
        OptionSpec("reasoning_effort", str, "How much the model reasons before answering "
                   "(gpt-oss)", choices=("low", "medium", "high")),
    )
}


def _check_number(spec: OptionSpec, value: object) -> float | int:
    wrong_type = (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (spec.kind is int and not isinstance(value, int))
    )
    if wrong_type or not isinstance(value, (int, float)):
        kind = "an integer" if spec.kind is int else "a number"
        raise InvalidRequestError(
            f"option {spec.name}={value!r} is invalid: it must be {kind} "
            f"({spec.bounds_text()})"
        )
    try:
        v = float(value)
    except OverflowError:  # an integer past float's range is past every bound
        v = float("inf")
    if (
        (spec.ge is not None and v < spec.ge)
        or (spec.gt is not None and v <= spec.gt)
        or (spec.le is not None and v > spec.le)
        or v != v
    ):
        raise InvalidRequestError(
            f"option {spec.name}={value!r} is out of range: it must be {spec.bounds_text()}"
        )
    return int(value) if spec.kind is int else v


def _check_choice(spec: OptionSpec, value: object) -> str:
    if not isinstance(value, str) or value.lower() not in spec.choices:
        raise InvalidRequestError(
            f"option {spec.name}={value!r} is invalid: it must be {spec.bounds_text()}"
        )
    return value.lower()


def _check_bool(spec: OptionSpec, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(
            f"option {spec.name}={value!r} is invalid: it must be true or false"
        )
    return value


_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check_tools(value: object) -> tuple[dict[str, Any], ...]:
    """OpenAI-style function specs: {"type": "function", "function": {"name", ...}}."""
    if not isinstance(value, (list, tuple)):
        raise InvalidRequestError("option tools must be a list of function specs "
                                  "({'type': 'function', 'function': {'name': ...}})")
    if len(value) > MAX_TOOLS:
        raise InvalidRequestError(f"option tools has {len(value)} functions; at most "
                                  f"{MAX_TOOLS} are allowed")
    out: list[dict[str, Any]] = []
    names: list[str] = []
    for i, spec in enumerate(value):
        fn = spec.get("function") if isinstance(spec, Mapping) else None
        if not isinstance(spec, Mapping) or spec.get("type", "function") != "function" or (
            not isinstance(fn, Mapping)
        ):
            raise InvalidRequestError(f"tools[{i}] is not a function spec: give "
                                      "{'type': 'function', 'function': {'name': ..., "
                                      "'parameters': {...}}} or a Python function")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise InvalidRequestError(f"tools[{i}] has an invalid name {name!r}: use 1 to 64 "
                                      "letters, digits, '_', '-' or '.'")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise InvalidRequestError(f"tools[{i}] ({name}): parameters must be a JSON schema "
                                      "object")
        _check_schema_size(params, f"tools[{i}] ({name}): parameters")
        out.append({"type": "function", "function": {**fn, "parameters": dict(params)}})
        names.append(name)
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"option tools names a function twice: {names}")
    return tuple(out)


def _check_schema_size(schema: Mapping[str, Any], what: str) -> None:
    """A JSON schema no longer than MAX_SCHEMA_CHARS as JSON text (and JSON at all)."""
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"{what} is not a JSON schema ({exc})") from exc
    if size > MAX_SCHEMA_CHARS:
        raise InvalidRequestError(f"{what} is {size} characters of JSON; at most "
                                  f"{MAX_SCHEMA_CHARS} are allowed")


def _check_response_format(value: object) -> dict[str, Any]:
    """OpenAI's response_format: text, json_object, or json_schema with a schema."""
    kind = value.get("type") if isinstance(value, Mapping) else None
    if not isinstance(value, Mapping) or kind not in ("text", "json_object", "json_schema"):
        raise InvalidRequestError(
            f"option response_format={value!r} is invalid: use {{'type': 'json_object'}} or "
            "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}"
        )
    if kind == "json_schema":
        wrapper = value.get("json_schema", value)
        schema = wrapper.get("schema") if isinstance(wrapper, Mapping) else None
        if not isinstance(schema, Mapping):
            raise InvalidRequestError("response_format json_schema needs a 'schema' object: "
                                      "{'type': 'json_schema', 'json_schema': {'schema': {...}}}")
        _check_schema_size(schema, "response_format's schema")
    return dict(value)


def _check_stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise InvalidRequestError(
            f"option stop={value!r} is invalid: give a string or a list of strings"
        )
    if any(s == "" for s in items):
        raise InvalidRequestError("option stop contains an empty string; remove it")
    if len(items) > MAX_STOP_STRINGS:
        raise InvalidRequestError(
            f"option stop has {len(items)} strings; at most {MAX_STOP_STRINGS} are allowed"
        )
    if any(len(s) > MAX_STOP_CHARS for s in items):
        raise InvalidRequestError(f"option stop has a string over {MAX_STOP_CHARS} characters; "
                                  "shorten it")
    return tuple(items)


def _check(name: str, value: object) -> Any:
    """The validated value of one option (InvalidRequestError if it is wrong)."""
    spec = OPTION_SPECS.get(name)
    if name == "stop":
        return _check_stop(value)
    if name == "tools":
        return _check_tools(value)
    if name == "tool_choice":
        if value not in ("auto", "none"):
            raise InvalidRequestError(f"option tool_choice={value!r} is not supported: "
                                      "use 'auto' or 'none'")
        return value
    if name == "response_format":
        return _check_response_format(value)
    assert spec is not None
    if spec.kind is bool:
        return _check_bool(spec, value)
    if spec.choices:
        return _check_choice(spec, value)
    return _check_number(spec, value)


@dataclass(frozen=True)
class GenerationOptions:
    """Validated sampling settings of one request. ``None`` means the default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    reasoning_effort: str | None = None
    thinking: bool | None = None
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str | None = None
    response_format: dict[str, Any] | None = None

    @property
    def active_tools(self) -> tuple[dict[str, Any], ...]:
        """The tools the model may call (none when tool_choice is 'none')."""
        return () if self.tool_choice == "none" else self.tools

    @property
    def json_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow, if response_format asks for one."""
        fmt = self.response_format
        if not fmt or fmt["type"] == "text":
            return None
        if fmt["type"] == "json_object":
            return {"type": "object"}
        wrapper = fmt.get("json_schema", fmt)
        return dict(wrapper["schema"])

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]) -> GenerationOptions:
        """Validate keyword options; unknown names and bad values raise InvalidRequestError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidRequestError(
                f"unknown option {unknown[0]!r}; the options are: {', '.join(sorted(known))}",
                param=unknown[0],
            )
        values: dict[str, Any] = {}
        for name, value in options.items():
            if value is None:
                continue
            try:
                values[name] = _check(name, value)
            except InvalidRequestError as exc:
                exc.param = name
                raise
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The options that were set, as plain values (for a request body)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and v != ():
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def for_completion(self) -> GenerationOptions:
        """These options, checked for raw text completion: the chat-only ones (tools,
        tool_choice, thinking, reasoning_effort) are refused."""
        chat_only = [name for name in CHAT_ONLY_OPTIONS if getattr(self, name) not in (None, ())]
        if chat_only:
            raise InvalidRequestError(f"option {chat_only[0]} applies to chat only; raw text "
                                      "completion takes sampling options (use chat() instead)",
                                      param=chat_only[0])
        return self
