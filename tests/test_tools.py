"""Tools (every call format) and schema-constrained structured output."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from openweight import Client, InvalidRequestError
from openweight.local.constrain import closed_objects
from openweight.options import GenerationOptions
from openweight.wire import to_messages

from conftest import WEATHER, scripted_generate, token_ids

ASK = [{"role": "user", "content": "Weather in Paris?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"},
                                           "bio": {"type": "string"}},
          "required": ["name", "age", "bio"]}
BOOK = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "genre": {"enum": ["fiction", "poetry", "science"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "author": {"type": "object",
                   "properties": {"name": {"type": "string", "maxLength": 30},
                                  "born": {"type": "integer"}},
                   "required": ["name", "born"]},
    },
    "required": ["title", "genre", "tags", "author"],
}


_ids = token_ids


def _scripted(path: Path, monkeypatch: pytest.MonkeyPatch, parts: list[str]) -> Client:
    client = Client(str(path))
    lm = client.backend.loaded  # type: ignore[attr-defined]
    monkeypatch.setattr(lm.model, "generate", scripted_generate(_ids(lm.tokenizer, parts)))
    return client


def _check_call(result: Any) -> None:
    assert result.finish_reason == "tool_calls"
    (call,) = result.tool_calls
    assert call.name == "get_weather" and dict(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")


def test_qwen_tool_call_tags(family_model: Callable[[str], Path],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    client = _scripted(family_model("qwen3"), monkeypatch, [
        "<think>", "I should call the tool.", "</think>", "\n\n",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "<|im_end|>"])
    result = client.chat(ASK, tools=[WEATHER])
    _check_call(result)
    assert result.reasoning == "I should call the tool." and result.text == ""
    streamed = list(client.stream(ASK, tools=[WEATHER]))
    assert streamed[-1].tool_calls == result.tool_calls
    assert "".join(c.text for c in streamed) == ""


def test_llama_json_tool_call(family_model: Callable[[str], Path],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    client = _scripted(family_model("llama3"), monkeypatch, [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}', "<|eom_id|>"])
    _check_call(client.chat(ASK, tools=[WEATHER], temperature=0))


def test_llama_plain_answer_with_tools_is_text(family_model: Callable[[str], Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    client = _scripted(family_model("llama3"), monkeypatch, ["It is sunny.", "<|eot_id|>"])
    result = client.chat(ASK, tools=[WEATHER], temperature=0)
    assert result.text == "It is sunny." and result.tool_calls == ()
    assert result.finish_reason == "stop"


@pytest.mark.parametrize("bad", ['{"name": "get_weather", "parameters": {"city": ',
                                 '{"nom": 1}'])
def test_malformed_json_call_is_text(family_model: Callable[[str], Path],
                                     monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    client = _scripted(family_model("llama3"), monkeypatch, [bad, "<|eot_id|>"])
    result = client.chat(ASK, tools=[WEATHER], temperature=0)
    assert result.tool_calls == () and result.text == bad.strip()


def test_malformed_tag_call_is_text(family_model: Callable[[str], Path],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    client = _scripted(family_model("qwen3"), monkeypatch, [
        "<think>", "hm", "</think>", "<tool_call>{oops}</tool_call>", "<|im_end|>"])
    result = client.chat(ASK, tools=[WEATHER])
    assert result.tool_calls == () and result.text == "{oops}"
    assert result.finish_reason == "stop"


def test_harmony_tool_call_with_tools(tiny_gpt_oss: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    client = _scripted(tiny_gpt_oss, monkeypatch, [
        "<|channel|>", "commentary to=functions.get_weather ", "<|constrain|>", "json",
        "<|message|>", '{"city": "Paris"}', "<|call|>"])
    engine = client.backend
    prompt = engine.format(to_messages(ASK), GenerationOptions(tools=(WEATHER,)))  # type: ignore[attr-defined]
    assert "# Tools get_weather" in prompt
    _check_call(client.chat(ASK, tools=[WEATHER]))


def test_tool_results_go_back_into_the_template(family_model: Callable[[str], Path]) -> None:
    engine = Client(str(family_model("qwen3"))).backend
    history = to_messages([
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
    ])
    prompt = engine.format(history, GenerationOptions(tools=(WEATHER,)))  # type: ignore[attr-defined]
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\n18C and sunny\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_python_function_as_tool(family_model: Callable[[str], Path],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def get_weather(city: str) -> str:
        """The weather in a city.

        Args:
            city: The city's name.
        """
        return "sunny"

    client = _scripted(family_model("llama3"), monkeypatch, [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}', "<|eot_id|>"])
    _check_call(client.chat(ASK, tools=[get_weather], temperature=0))

    def undocumented(x):  # type: ignore[no-untyped-def]
        return x

    with pytest.raises(InvalidRequestError, match="cannot describe the function undocumented"):
        client.chat(ASK, tools=[undocumented])


@pytest.mark.parametrize(
    ("tools", "needle"),
    [
        ("get_weather", "list of function specs"),
        ([{"type": "function", "function": {"name": "bad name!"}}], "invalid name"),
        ([{"type": "retrieval"}], "not a function spec"),
        ([WEATHER, WEATHER], "names a function twice"),
    ],
)
def test_bad_tools(tiny_model: Path, tools: object, needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        Client(str(tiny_model)).chat(ASK, tools=tools)


def test_model_without_tool_support(tiny_model: Path) -> None:
    with pytest.raises(InvalidRequestError, match="cannot call tools"):
        Client(str(tiny_model)).chat(ASK, tools=[WEATHER])
    # tool_choice none: no tools are offered, so any chat model answers
    assert Client(str(tiny_model)).chat(ASK, tools=[WEATHER], tool_choice="none",
                                        max_tokens=2).finish_reason == "length"


def _fmt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


@pytest.mark.parametrize("schema", [PERSON, BOOK], ids=["person", "book"])
def test_schema_output_always_validates_tiny(tiny_model: Path, schema: dict[str, Any]) -> None:
    """Even a random model writes valid documents when decoding is constrained."""
    client = Client(str(tiny_model))
    for seed in range(4):
        result = client.chat(ASK, response_format=_fmt(schema), temperature=1.0, seed=seed,
                             max_tokens=250)
        if result.finish_reason == "length":  # a random model may ramble inside a string
            continue
        jsonschema.validate(json.loads(result.text), schema)


def test_json_object_mode(tiny_model: Path) -> None:
    result = Client(str(tiny_model)).chat(ASK, response_format={"type": "json_object"},
                                          temperature=0.8, seed=3, max_tokens=200)
    if result.finish_reason == "stop":
        assert isinstance(json.loads(result.text), dict)
    else:
        assert result.text.startswith("{")


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
        ({"type": "frob"}, "frob"),
    ],
)
def test_unsupported_schema_is_rejected_before_generation(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, schema: dict[str, Any], needle: str
) -> None:
    client = Client(str(tiny_model))
    model = client.backend.loaded.model  # type: ignore[attr-defined]

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("generation must not start")

    monkeypatch.setattr(model, "generate", never)
    with pytest.raises(InvalidRequestError, match=needle):
        client.chat(ASK, response_format=_fmt(schema))


@pytest.mark.parametrize(
    "fmt", [{"type": "xml"}, {"type": "json_schema"}, "json", {"type": "json_schema",
                                                                "json_schema": {"schema": 3}}])
def test_bad_response_format(tiny_model: Path, fmt: object) -> None:
    with pytest.raises(InvalidRequestError, match=r"response_format|json_schema"):
        Client(str(tiny_model)).chat(ASK, response_format=fmt)


def test_closed_objects_keeps_validity() -> None:
    closed = closed_objects(BOOK)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["author"]["additionalProperties"] is False
    assert "additionalProperties" not in BOOK  # the caller's schema is not changed
    doc = {"title": "t", "genre": "poetry", "tags": [], "author": {"name": "n", "born": 1}}
    jsonschema.validate(doc, closed)
    jsonschema.validate(doc, BOOK)


@pytest.mark.slow
@pytest.mark.parametrize("schema", [PERSON, BOOK], ids=["person", "book"])
def test_schema_real_model_validates_over_seeds(
    smollm2_home: Path, monkeypatch: pytest.MonkeyPatch, schema: dict[str, Any]
) -> None:
    monkeypatch.setenv("OPENWEIGHT_HOME", str(smollm2_home))
    client = Client()
    for seed in range(3):
        result = client.chat([{"role": "user", "content": "Invent an example."}],
                             response_format=_fmt(schema), temperature=0.7, seed=seed)
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), schema)
